//! A TCP proxy on loopback that emulates a wide-area link, for benchmarks
//! (tc netem is not available here):
//!
//!     delay_proxy LISTEN_PORT UPSTREAM_PORT DELAY_MS [WINDOW_KIB]
//!
//! Each connection is forwarded to 127.0.0.1:UPSTREAM_PORT. The first bytes
//! of each request (client bytes after a response, or the first ones on a
//! connection) wait DELAY_MS: one round trip per request, as on a real
//! link, not per packet.
//!
//! With WINDOW_KIB, each direction of each connection also waits DELAY_MS
//! after every WINDOW_KIB it forwards. That is the other half of a real
//! WAN: a TCP connection carries at most one window per round trip, so one
//! connection's throughput is WINDOW/RTT (1 MiB at 80 ms is 12.5 MiB/s)
//! however fast the two ends are, and parallel connections are what fill
//! the link. Without it, bandwidth per connection is unlimited and only
//! the per-request latency is emulated.
//!
//! With DELAY_PROXY_LOG set, each request line is printed to stderr with
//! a timestamp: a tool's request timeline.
//!
//! Written with tokio so the proxy itself is never the bottleneck (the
//! Python fault proxy is).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};

#[derive(Clone, Copy)]
struct Link {
    delay: Duration,
    /// Bytes one direction may forward per round trip; `None`: unlimited.
    window: Option<usize>,
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (Some(listen), Some(upstream), Some(delay)) = (
        args.get(1).and_then(|a| a.parse::<u16>().ok()),
        args.get(2).and_then(|a| a.parse::<u16>().ok()),
        args.get(3).and_then(|a| a.parse::<u64>().ok()),
    ) else {
        eprintln!("usage: delay_proxy LISTEN_PORT UPSTREAM_PORT DELAY_MS [WINDOW_KIB]");
        std::process::exit(2);
    };
    let window = match args.get(4) {
        None => None,
        Some(w) => match w.parse::<usize>() {
            Ok(kib) if kib > 0 => Some(kib << 10),
            _ => {
                eprintln!("delay_proxy: WINDOW_KIB must be a positive number");
                std::process::exit(2);
            }
        },
    };
    let link = Link {
        delay: Duration::from_millis(delay),
        window,
    };
    let listener = TcpListener::bind(("127.0.0.1", listen)).await?;
    println!("ready");
    loop {
        let (client, _) = listener.accept().await?;
        tokio::spawn(async move {
            if let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await {
                let _ = relay(client, server, link).await;
            }
        });
    }
}

async fn relay(client: TcpStream, server: TcpStream, link: Link) -> std::io::Result<()> {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    // Set when the server has answered: the client's next bytes start a
    // new request.
    let new_request = Arc::new(AtomicBool::new(true));
    let up = forward(cr, sw, link, Direction::Request(new_request.clone()));
    let down = forward(sr, cw, link, Direction::Response(new_request));
    let (a, b) = tokio::join!(up, down);
    a.and(b)
}

enum Direction {
    /// Client to server: waits a round trip at the start of each request.
    Request(Arc<AtomicBool>),
    /// Server to client: marks that the next client bytes are a new request.
    Response(Arc<AtomicBool>),
}

async fn forward(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    link: Link,
    direction: Direction,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 256 << 10];
    // Bytes forwarded in the current window.
    let mut in_window = 0usize;
    loop {
        let cap = match link.window {
            Some(w) => (w - in_window).min(buf.len()),
            None => buf.len(),
        };
        let n = from.read(&mut buf[..cap]).await?;
        if n == 0 {
            return to.shutdown().await;
        }
        match &direction {
            Direction::Request(new_request) => {
                if new_request.swap(false, Ordering::AcqRel) {
                    if std::env::var_os("DELAY_PROXY_LOG").is_some() {
                        // The request line, to see a tool's request timeline.
                        let line = buf[..n].split(|&b| b == b'\r').next().unwrap_or(&[]);
                        eprintln!(
                            "{:.3} {}",
                            std::time::SystemTime::now()
                                .duration_since(std::time::UNIX_EPOCH)
                                .map_or(0.0, |d| d.as_secs_f64()),
                            String::from_utf8_lossy(&line[..line.len().min(120)])
                        );
                    }
                    tokio::time::sleep(link.delay).await;
                    in_window = 0;
                }
            }
            Direction::Response(new_request) => new_request.store(true, Ordering::Release),
        }
        to.write_all(&buf[..n]).await?;
        if let Some(w) = link.window {
            in_window += n;
            if in_window >= w {
                tokio::time::sleep(link.delay).await;
                in_window = 0;
            }
        }
    }
}
