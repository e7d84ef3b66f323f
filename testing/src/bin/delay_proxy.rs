//! A TCP proxy on loopback that adds a round trip to every request, for
//! benchmarks over a "WAN" (tc netem is not available here):
//!
//!     delay_proxy LISTEN_PORT UPSTREAM_PORT DELAY_MS
//!
//! Each connection is forwarded to 127.0.0.1:UPSTREAM_PORT. The first bytes
//! of each request (client bytes after a response, or the first ones on a
//! connection) wait DELAY_MS; the rest of the request and the responses
//! flow at full speed, so an upload is slowed by one round trip per
//! request, as on a real link, not per packet. Written with tokio so the
//! proxy itself is never the bottleneck (the Python fault proxy is).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (Some(listen), Some(upstream), Some(delay)) = (
        args.get(1).and_then(|a| a.parse::<u16>().ok()),
        args.get(2).and_then(|a| a.parse::<u16>().ok()),
        args.get(3).and_then(|a| a.parse::<u64>().ok()),
    ) else {
        eprintln!("usage: delay_proxy LISTEN_PORT UPSTREAM_PORT DELAY_MS");
        std::process::exit(2);
    };
    let delay = Duration::from_millis(delay);
    let listener = TcpListener::bind(("127.0.0.1", listen)).await?;
    println!("ready");
    loop {
        let (client, _) = listener.accept().await?;
        tokio::spawn(async move {
            if let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await {
                let _ = relay(client, server, delay).await;
            }
        });
    }
}

async fn relay(client: TcpStream, server: TcpStream, delay: Duration) -> std::io::Result<()> {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    // Set when the server has answered: the client's next bytes start a
    // new request.
    let new_request = Arc::new(AtomicBool::new(true));
    let flag = new_request.clone();
    let up = async move {
        let mut buf = vec![0u8; 256 << 10];
        loop {
            let n = cr.read(&mut buf).await?;
            if n == 0 {
                return sw.shutdown().await;
            }
            if new_request.swap(false, Ordering::AcqRel) {
                tokio::time::sleep(delay).await;
            }
            sw.write_all(&buf[..n]).await?;
        }
    };
    let down = async move {
        let mut buf = vec![0u8; 256 << 10];
        loop {
            let n = sr.read(&mut buf).await?;
            if n == 0 {
                return cw.shutdown().await;
            }
            flag.store(true, Ordering::Release);
            cw.write_all(&buf[..n]).await?;
        }
    };
    let (a, b) = tokio::join!(up, down);
    a.and(b)
}
