//! `--json` output, shared by every command and the agent: one pretty
//! JSON document on stdout, ended by a newline.

use std::io::Write;

use anyhow::Result;

pub(crate) fn print_json(v: &serde_json::Value) -> Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, v)?;
    writeln!(out)?;
    Ok(())
}
