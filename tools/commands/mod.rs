//! One file per command: validate arguments, call the engine, print.
//!
//! Imports only go downwards: this dispatcher calls the command modules,
//! and they use the shared shell helpers beside it (`repo_open` to open
//! the repository, `output` for `--json`, `progress` and `terminal` for
//! people), never this module or each other. So `agent`, which needs
//! the same helpers, is one command among the others rather than a
//! module that both calls and is called by the commands.

mod agent;
mod backup;
mod cat;
mod check;
mod copy;
mod diff;
mod find;
mod forget;
mod init;
mod k8s;
mod key;
mod ls;
mod maintain;
mod mount;
mod repair;
mod restore;
mod sets;
mod snapshots;
mod stats;
mod verify;

use std::process::ExitCode;

use anyhow::Result;

use crate::cli::{Cli, Command, RepairCommand};

pub fn run(cli: Cli) -> Result<ExitCode> {
    let g = &cli.global;
    match cli.command {
        Command::Init(a) => init::run(g, a),
        Command::Backup(a) => backup::run(g, a),
        Command::Snapshots(a) => snapshots::run(g, a),
        Command::Ls(a) => ls::run(g, a),
        Command::Restore(a) => restore::run(g, a),
        Command::Cat(a) => cat::run(g, a),
        Command::Stats(a) => stats::run(g, a),
        Command::Copy(a) => copy::run(g, a),
        Command::Sets { command } => sets::run(g, command),
        Command::Forget(a) => forget::run(g, a),
        Command::Maintain(a) => maintain::run(g, a),
        Command::Check(a) => check::run(g, a),
        Command::Verify(a) => verify::run(g, a),
        Command::Mount(a) => mount::run(g, a),
        Command::Agent(a) => agent::run(g, a),
        Command::K8s { command } => k8s::run(g, command),
        Command::Diff(a) => diff::run(g, a),
        Command::Find(a) => find::run(g, a),
        Command::Key { command } => key::run(g, command),
        Command::Repair { command } => match command {
            RepairCommand::Index => repair::index(g),
            RepairCommand::Snapshots { dry_run, read_data } => {
                repair::snapshots(g, dry_run, read_data)
            }
        },
    }
}
