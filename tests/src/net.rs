//! Ports and readiness waits.

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

/// Pause between two readiness attempts.
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// A loopback port that was free a moment ago, for a child process to bind.
///
/// Another process could take it between this check and the child's bind. Ports that
/// `bind(0)` hands out come from the kernel's ephemeral range, which every outgoing
/// connection on the machine also draws from, and the tests make thousands of those: a port
/// released there can be taken by a `connect` at any moment. So the port is picked below that
/// range, where only explicit binds go, walking from a per-process start so that test
/// processes running side by side do not try the same ports in the same order.
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const LOWEST: u32 = 10_000;
    let ephemeral_start = ephemeral_port_start().unwrap_or(32_768);
    if ephemeral_start > LOWEST + 1_000 {
        let span = ephemeral_start - LOWEST;
        let start = (std::process::id().wrapping_mul(7_919)) % span;
        for _ in 0..span {
            let offset = (start + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
            let port = (LOWEST + offset) as u16;
            if TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        }
    }
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr").port()
}

/// The first port of the kernel's ephemeral range (`ip_local_port_range`).
fn ephemeral_port_start() -> Option<u32> {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    range.split_whitespace().next()?.parse().ok()
}

/// `127.0.0.1:<free_port()>`.
pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// Retries a TCP connect to `addr` until it succeeds or `timeout` passes.
pub async fn wait_for_tcp(addr: SocketAddr, timeout: Duration) -> io::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let attempt = tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(addr)).await;
        let last_error = match attempt {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(e)) => e.to_string(),
            Err(_) => "connect took over 1 s".to_string(),
        };
        if Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("nothing accepted TCP on {addr} within {timeout:?} (last: {last_error})"),
            ));
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// A reqwest client that ignores the machine's proxy settings.
pub fn direct_http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("building a reqwest client")
}

/// Retries `GET url` until it answers 200 or `timeout` passes.
pub async fn wait_for_http_ok(url: &str, timeout: Duration) -> io::Result<()> {
    let client = direct_http_client();
    let deadline = Instant::now() + timeout;
    loop {
        let last = match client.get(url).send().await {
            Ok(resp) if resp.status().is_success() => return Ok(()),
            Ok(resp) => format!("status {}", resp.status()),
            Err(e) => format!("{e}"),
        };
        if Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("GET {url} did not answer 200 within {timeout:?} (last: {last})"),
            ));
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_come_from_below_the_ephemeral_range_and_differ() {
        let ephemeral_start = ephemeral_port_start().unwrap_or(32_768);
        let (a, b) = (free_port(), free_port());
        assert_ne!(a, b);
        if ephemeral_start > 11_000 {
            assert!(u32::from(a) < ephemeral_start && u32::from(b) < ephemeral_start);
        }
        TcpListener::bind(("127.0.0.1", a)).expect("the port is free");
    }

    #[tokio::test]
    async fn wait_for_tcp_times_out_on_a_closed_port() {
        let addr = free_addr();
        let err = wait_for_tcp(addr, Duration::from_millis(200))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }

    #[tokio::test]
    async fn wait_for_tcp_sees_a_listener() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        wait_for_tcp(listener.local_addr().unwrap(), Duration::from_secs(5))
            .await
            .unwrap();
    }
}
