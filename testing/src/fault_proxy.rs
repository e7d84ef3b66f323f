//! The fault-injecting HTTP proxy (`fault_proxy.py`, next to this file) in
//! front of a loopback port: seeded 500/503 answers, connection resets,
//! delays and truncated bodies.

use std::process::{Child, Command, Stdio};

use crate::ports::{free_port, wait_port};

/// The proxy script; also run by `benches/s3_parallel.sh`.
pub const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/src/fault_proxy.py");

/// A running proxy; killed on drop.
pub struct FaultProxy {
    child: Child,
    pub port: u16,
}

impl FaultProxy {
    /// Proxies a free port to `upstream`; each request meets a fault with
    /// `probability` (seeded by `seed`), and every request is delayed by
    /// `delay_ms`.
    pub fn start(upstream: u16, probability: f64, seed: u64, delay_ms: u64) -> FaultProxy {
        Self::spawn(upstream, probability, seed, delay_ms, false)
    }

    /// Like [`FaultProxy::start`], but only ranged reads (pack data) meet
    /// faults: the repository still opens, its data cannot be read.
    pub fn start_ranged_only(upstream: u16, probability: f64, seed: u64) -> FaultProxy {
        Self::spawn(upstream, probability, seed, 0, true)
    }

    fn spawn(
        upstream: u16,
        probability: f64,
        seed: u64,
        delay_ms: u64,
        ranged: bool,
    ) -> FaultProxy {
        let port = free_port();
        let child = Command::new("python3")
            .arg(SCRIPT)
            .args([
                port.to_string(),
                upstream.to_string(),
                probability.to_string(),
                seed.to_string(),
                delay_ms.to_string(),
                if ranged { "ranged" } else { "all" }.to_string(),
            ])
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        assert!(wait_port(port), "proxy did not start");
        FaultProxy { child, port }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
