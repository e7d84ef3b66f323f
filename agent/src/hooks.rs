//! Pre/post backup hooks from pod annotations, compatible with Velero's
//! `pre.hook.backup.velero.io/*` and `post.hook.backup.velero.io/*`.
//!
//! The command runs in the application container through the `pods/exec`
//! API, so a database can flush or checkpoint before its files are read.

use std::collections::BTreeMap;
use std::time::Duration;

/// What to do when a hook fails or times out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnError {
    /// Record the failure and back up anyway.
    Continue,
    /// Do not back up the pod's volumes (Velero's default).
    Fail,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hook {
    /// `None`: the pod's first container.
    pub container: Option<String>,
    pub command: Vec<String>,
    pub on_error: OnError,
    pub timeout: Duration,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodHooks {
    pub pre: Option<Hook>,
    pub post: Option<Hook>,
    /// Annotations that could not be understood; reported, hooks not run.
    pub errors: Vec<String>,
}

/// The longest a hook may run, whatever its annotation says: a tenant's
/// hook that hangs for days would hold every later run on the node.
pub const MAX_HOOK_TIMEOUT: Duration = Duration::from_secs(30 * 60);

pub fn from_annotations(ann: &BTreeMap<String, String>, default_timeout: Duration) -> PodHooks {
    let mut out = PodHooks::default();
    out.pre = parse(ann, "pre", default_timeout, &mut out.errors);
    out.post = parse(ann, "post", default_timeout, &mut out.errors);
    out
}

fn parse(
    ann: &BTreeMap<String, String>,
    phase: &str,
    default_timeout: Duration,
    errors: &mut Vec<String>,
) -> Option<Hook> {
    let key = |k: &str| format!("{phase}.hook.backup.velero.io/{k}");
    let raw = ann.get(&key("command"))?;
    let command = match parse_command(raw) {
        Ok(c) => c,
        Err(e) => {
            errors.push(format!("{}: {e}", key("command")));
            return None;
        }
    };
    let on_error = match ann.get(&key("on-error")).map(String::as_str) {
        None | Some("Fail") => OnError::Fail,
        Some("Continue") => OnError::Continue,
        Some(other) => {
            errors.push(format!(
                "{}: {other:?} is neither Continue nor Fail",
                key("on-error")
            ));
            return None;
        }
    };
    let timeout = match ann.get(&key("timeout")) {
        None => default_timeout,
        Some(t) => match crate::config::parse_span(t) {
            Ok(d) if d > MAX_HOOK_TIMEOUT => {
                errors.push(format!(
                    "{}: {t} is longer than the {} minutes a hook may take",
                    key("timeout"),
                    MAX_HOOK_TIMEOUT.as_secs() / 60
                ));
                return None;
            }
            Ok(d) => d,
            Err(e) => {
                errors.push(format!("{}: {e}", key("timeout")));
                return None;
            }
        },
    };
    Some(Hook {
        container: ann.get(&key("container")).cloned(),
        command,
        on_error,
        timeout,
    })
}

/// Velero accepts a JSON array (`["/bin/sh","-c","sync"]`) or one word.
fn parse_command(raw: &str) -> Result<Vec<String>, String> {
    let t = raw.trim();
    let cmd: Vec<String> = if t.starts_with('[') {
        serde_json::from_str(t).map_err(|e| format!("not a JSON array of strings: {e}"))?
    } else {
        vec![t.to_string()]
    };
    if cmd.is_empty() || cmd[0].is_empty() {
        return Err("empty command".into());
    }
    Ok(cmd)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ann(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn velero_annotations_are_understood() {
        let h = from_annotations(
            &ann(&[
                ("pre.hook.backup.velero.io/container", "postgres"),
                (
                    "pre.hook.backup.velero.io/command",
                    r#"["/bin/sh", "-c", "psql -c CHECKPOINT"]"#,
                ),
                ("pre.hook.backup.velero.io/on-error", "Continue"),
                ("pre.hook.backup.velero.io/timeout", "2m"),
                ("post.hook.backup.velero.io/command", "/usr/bin/unfreeze"),
            ]),
            Duration::from_secs(30),
        );
        let pre = h.pre.unwrap();
        assert_eq!(pre.container.as_deref(), Some("postgres"));
        assert_eq!(pre.command, ["/bin/sh", "-c", "psql -c CHECKPOINT"]);
        assert_eq!(pre.on_error, OnError::Continue);
        assert_eq!(pre.timeout, Duration::from_secs(120));
        let post = h.post.unwrap();
        assert_eq!(post.command, ["/usr/bin/unfreeze"]);
        assert_eq!(post.on_error, OnError::Fail);
        assert_eq!(post.timeout, Duration::from_secs(30));
        assert!(h.errors.is_empty());
    }

    #[test]
    fn malformed_hooks_are_reported_not_run() {
        let h = from_annotations(
            &ann(&[
                ("pre.hook.backup.velero.io/command", "[\"unterminated"),
                ("post.hook.backup.velero.io/command", "sync"),
                ("post.hook.backup.velero.io/on-error", "Ignore"),
            ]),
            Duration::from_secs(30),
        );
        assert!(h.pre.is_none() && h.post.is_none());
        assert_eq!(h.errors.len(), 2, "{:?}", h.errors);
        assert!(h.errors[1].contains("Ignore"));
    }
}
