//! Running a command as root without the capabilities that bypass file
//! permissions, so an unreadable file really is unreadable.

use std::process::Command;

/// Wraps `c` in `setpriv` dropping `CAP_DAC_OVERRIDE` and
/// `CAP_DAC_READ_SEARCH` when running as root; unchanged otherwise.
pub fn without_dac_override(mut c: Command) -> Command {
    if nix::unistd::geteuid().is_root() {
        let prog = c.get_program().to_owned();
        let args: Vec<_> = c.get_args().map(|a| a.to_owned()).collect();
        let envs: Vec<_> = c
            .get_envs()
            .map(|(k, v)| (k.to_owned(), v.map(|v| v.to_owned())))
            .collect();
        let mut w = Command::new("setpriv");
        w.args([
            "--inh-caps=-all",
            "--bounding-set=-dac_override,-dac_read_search",
            "--",
        ])
        .arg(prog)
        .args(args);
        for (k, v) in envs {
            match v {
                Some(v) => w.env(k, v),
                None => w.env_remove(k),
            };
        }
        c = w;
    }
    c
}
