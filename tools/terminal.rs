//! What reaches the operator's terminal: file names from a source tree or
//! a snapshot may hold control characters, and printed raw they would run
//! escape sequences in the operator's terminal (retitle it, clear it, fake
//! output). On a terminal they are escaped; pipes and files get the exact
//! bytes, and `--json` is escaped by serde.

use std::borrow::Cow;
use std::io::Write;

/// A name as printed for a person: on a terminal (`tty`), control
/// characters (C0, DEL, C1) and backslashes are escaped, so a file name
/// cannot send escape sequences to the operator's terminal. Elsewhere
/// (pipes, files) names stay exact for scripts; `--json` is escaped by
/// serde.
pub(crate) fn shown(s: &str, tty: bool) -> Cow<'_, str> {
    if tty {
        escape_controls(s)
    } else {
        Cow::Borrowed(s)
    }
}

/// `\\` for a backslash, `\n`, `\t`, `\r`, and `\xNN` (the code point) for
/// every other control character.
fn escape_controls(s: &str) -> Cow<'_, str> {
    if !s.chars().any(|c| c == '\\' || c.is_control()) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => out.push_str(&format!("\\x{:02x}", u32::from(c))),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// The log writer on a terminal: log lines carry paths too. Each event is
/// written whole, so escaping a write at a time keeps characters intact.
pub(crate) struct EscapingStderr;

impl Write for EscapingStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        std::io::stderr().write_all(escape_log(&String::from_utf8_lossy(buf)).as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// Escapes control characters except the newlines that end log lines.
fn escape_log(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.split_inclusive('\n') {
        let (body, end) = match line.strip_suffix('\n') {
            Some(b) => (b, "\n"),
            None => (line, ""),
        };
        out.push_str(&escape_controls(body));
        out.push_str(end);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_escaped_only_on_a_terminal() {
        let evil = "a\u{1b}]0;owned\u{7}b\\c\nd\te\u{7f}\u{9b}2Jé";
        assert_eq!(
            shown(evil, true),
            "a\\x1b]0;owned\\x07b\\\\c\\nd\\te\\x7f\\x9b2Jé"
        );
        assert_eq!(shown(evil, false), evil);
        assert!(matches!(shown("plain/ünïcødé.txt", true), Cow::Borrowed(_)));
    }

    #[test]
    fn log_lines_keep_their_newlines_only() {
        assert_eq!(
            escape_log("WARN path=a\u{1b}[2Jb\nINFO x\ty\n"),
            "WARN path=a\\x1b[2Jb\nINFO x\\ty\n"
        );
    }
}
