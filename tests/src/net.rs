//! Ports and readiness waits.

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

/// Pause between two readiness attempts.
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// A loopback port that was free a moment ago (bound to port 0, then released). Another
/// process could take it in between; on loopback in a test run that is rare enough.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr").port()
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
