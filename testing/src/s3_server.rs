//! A real S3-compatible server (moto) on a free loopback port, one per test.
//!
//! A missing `moto_server` fails the test instead of passing it silently:
//! `./scripts/test` installs moto. To skip the S3 tests on purpose, set
//! `MARMOSET_SKIP_S3_TESTS=1`; each one then says on stderr that it was
//! skipped.

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};

use crate::ports::{free_port, wait_port};

/// Set to `1` to skip the tests that need an S3 server.
pub const SKIP_VAR: &str = "MARMOSET_SKIP_S3_TESTS";

/// A moto server with one bucket; killed on drop.
pub struct S3Server {
    child: Child,
    pub port: u16,
    pub bucket: String,
}

impl S3Server {
    /// Starts moto and creates the bucket. `None` only when
    /// `MARMOSET_SKIP_S3_TESTS=1`: the caller returns and the test counts as
    /// skipped. Panics when moto cannot be started.
    pub fn start() -> Option<S3Server> {
        if std::env::var(SKIP_VAR).is_ok_and(|v| v == "1") {
            // Straight to stderr: the test harness would swallow eprintln!
            // of a passing test, and a skip must be seen.
            let test = std::thread::current()
                .name()
                .unwrap_or("an S3 test")
                .to_string();
            let _ = writeln!(std::io::stderr(), "skipped {test}: {SKIP_VAR}=1");
            return None;
        }
        let port = free_port();
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "moto_server cannot be started ({e}): install it with \
                     `pip install 'moto[server]'` (./scripts/test does), or set \
                     {SKIP_VAR}=1 to skip the S3 tests"
                )
            });
        let s = S3Server {
            child,
            port,
            bucket: "marmoset".into(),
        };
        assert!(wait_port(port), "moto did not start");
        // Create the bucket with a plain HTTP PUT (moto accepts it unsigned).
        // The port may accept connections before the app answers: retry.
        let mut resp = String::new();
        for _ in 0..100 {
            resp.clear();
            if let Ok(mut c) = std::net::TcpStream::connect(("127.0.0.1", port)) {
                let _ = write!(c, "PUT /{} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", s.bucket);
                let _ = c.read_to_string(&mut resp);
            }
            if resp.starts_with("HTTP/1.1 200") {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        assert!(resp.starts_with("HTTP/1.1 200"), "bucket creation: {resp}");
        Some(s)
    }

    /// A marmoset repository URL for `prefix` in the bucket.
    pub fn url(&self, prefix: &str) -> String {
        format!("s3:http://127.0.0.1:{}/{}/{prefix}", self.port, self.bucket)
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
