//! `marmoset key add|list|remove|passwd`: the repository's key files, one
//! per password. Changing a password rewrites only a key file.

use std::process::ExitCode;

use anyhow::Result;
use marmoset_storage::KeyInfo;
use serde_json::json;

use crate::cli::{Global, KeyCommand};
use crate::output::outln;
use crate::output::print_json;
use crate::repo_open::{new_password, open};

pub(super) fn run(g: &Global, c: KeyCommand) -> Result<ExitCode> {
    let mut repo = open(g)?;
    match c {
        KeyCommand::Add(a) => {
            let id = repo.add_key(&new_password(&a)?)?;
            if g.json {
                print_json(&json!({"added": id}))?;
            } else {
                outln!("added key {}", &id[..8]);
            }
        }
        KeyCommand::List => {
            let keys = repo.list_keys()?;
            if g.json {
                print_json(&serde_json::to_value(keys)?)?;
            } else {
                print_keys(&keys);
            }
        }
        KeyCommand::Remove { id } => {
            repo.remove_key(&id)?;
            if g.json {
                print_json(&json!({"removed": id}))?;
            } else {
                outln!("removed key {id}");
            }
        }
        KeyCommand::Passwd(a) => {
            let id = repo.change_password(&new_password(&a)?)?;
            if g.json {
                print_json(&json!({"key": id}))?;
            } else {
                outln!(
                    "password changed (new key {}); data was not rewritten",
                    &id[..8]
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The key table; `*` marks the key this password opened.
fn print_keys(keys: &[KeyInfo]) {
    outln!("  {:<10} {:<20} {:<16} User", "ID", "Created", "Host");
    for k in keys {
        outln!(
            "{} {:<10} {:<20} {:<16} {}",
            if k.current { "*" } else { " " },
            &k.id[..8],
            k.created.format("%Y-%m-%d %H:%M:%S"),
            k.hostname,
            k.username
        );
    }
}
