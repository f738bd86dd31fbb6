//! A TCP echo server with half-close: echoes until the peer's EOF, then shuts its own write
//! side down.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::spawn_accept_loop;

/// A connection that sends nothing for this long is closed (so a lost peer cannot pin a
/// task for ever).
pub const ECHO_IDLE_TIMEOUT: Duration = Duration::from_secs(120);

/// Counters of an [`EchoServer`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct EchoStats {
    /// Connections accepted.
    pub accepted: u64,
    /// Connections that ended with EOF from the peer and a clean shutdown of ours.
    pub completed: u64,
    /// Connections that ended with an error or the idle timeout.
    pub failed: u64,
    /// Bytes echoed, all connections together.
    pub bytes: u64,
}

#[derive(Debug, Default)]
struct Counters {
    accepted: AtomicU64,
    completed: AtomicU64,
    failed: AtomicU64,
    bytes: AtomicU64,
}

/// The server; stops (and drops its connections) when dropped.
#[derive(Debug)]
pub struct EchoServer {
    addr: SocketAddr,
    counters: Arc<Counters>,
    task: tokio::task::JoinHandle<()>,
}

impl EchoServer {
    /// Listens on 127.0.0.1, ephemeral port.
    pub async fn start() -> io::Result<EchoServer> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let counters = Arc::new(Counters::default());
        let shared = Arc::clone(&counters);
        let task = spawn_accept_loop(listener, move |stream, peer| {
            let counters = Arc::clone(&shared);
            async move {
                counters.accepted.fetch_add(1, Ordering::Relaxed);
                match echo(stream, &counters).await {
                    Ok(()) => counters.completed.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        tracing::info!(%peer, error = %e, "echo connection failed");
                        counters.failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        });
        Ok(EchoServer {
            addr,
            counters,
            task,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn stats(&self) -> EchoStats {
        EchoStats {
            accepted: self.counters.accepted.load(Ordering::Relaxed),
            completed: self.counters.completed.load(Ordering::Relaxed),
            failed: self.counters.failed.load(Ordering::Relaxed),
            bytes: self.counters.bytes.load(Ordering::Relaxed),
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn echo(mut stream: TcpStream, counters: &Counters) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = tokio::time::timeout(ECHO_IDLE_TIMEOUT, stream.read(&mut buf))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "echo peer idle"))??;
        if n == 0 {
            return stream.shutdown().await;
        }
        stream.write_all(&buf[..n]).await?;
        counters.bytes.fetch_add(n as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn echoes_and_half_closes() {
        let server = EchoServer::start().await.unwrap();
        let mut s = TcpStream::connect(server.addr()).await.unwrap();
        s.write_all(b"hello").await.unwrap();
        s.shutdown().await.unwrap();
        let mut back = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut back))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(back, b"hello");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while server.stats().completed < 1 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{:?}",
                server.stats()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(server.stats().bytes, 5);
    }
}
