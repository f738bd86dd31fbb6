//! The bench's data endpoint behind `tunnel-broker --forward` (and behind the baselines).
//!
//! Protocol, chosen by the first byte a connection sends:
//! - `T` + u64 big-endian `down_len`: throughput. The server answers [`READY`] at once (so
//!   the client can start its clock once the path is open), then sends `down_len` bytes while it
//!   discards what the client sends; once both the client's EOF has arrived and the down bytes
//!   are out, it sends a u64 count of the bytes it received and closes. The count doubles as
//!   the client's proof that its up bytes all arrived.
//! - anything else: echo, that first byte included (ping-pong, idle connections, and the
//!   harness's echo ready probe).

use std::io;
use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Command byte of a throughput exchange.
pub const THROUGHPUT: u8 = b'T';
/// The server's first byte of a throughput exchange.
pub const READY: u8 = b'R';
/// Size of the buffers the server reads and writes with.
pub const IO_CHUNK: usize = 256 * 1024;

/// Listening data server; stops when dropped.
pub struct DataServer {
    task: tokio::task::JoinHandle<()>,
}

impl DataServer {
    pub async fn start(addr: SocketAddr) -> io::Result<DataServer> {
        let listener = TcpListener::bind(addr).await?;
        let task = tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        let _ = stream.set_nodelay(true);
                        tokio::spawn(async move {
                            if let Err(e) = serve(stream).await {
                                tracing::debug!(error = %e, "bench data connection failed");
                            }
                        });
                    }
                    Err(e) => {
                        // EMFILE while the idle section fills the table: back off, not spin.
                        tracing::warn!(error = %e, "bench data server accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    }
                }
            }
        });
        Ok(DataServer { task })
    }
}

impl Drop for DataServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(mut stream: TcpStream) -> io::Result<()> {
    let mut first = [0u8; 1];
    if stream.read(&mut first).await? == 0 {
        return Ok(());
    }
    if first[0] != THROUGHPUT {
        stream.write_all(&first).await?;
        let (mut rd, mut wr) = stream.split();
        tokio::io::copy(&mut rd, &mut wr).await?;
        return wr.shutdown().await;
    }
    let down_len = stream.read_u64().await?;
    stream.write_all(&[READY]).await?;
    let (mut rd, mut wr) = stream.split();
    let sink = async {
        let mut buf = vec![0u8; IO_CHUNK];
        let mut total = 0u64;
        loop {
            let n = rd.read(&mut buf).await?;
            if n == 0 {
                return Ok::<_, io::Error>(total);
            }
            total += n as u64;
        }
    };
    let source = async {
        write_pattern(&mut wr, down_len).await?;
        Ok::<_, io::Error>(())
    };
    let (received, ()) = tokio::try_join!(sink, source)?;
    wr.write_u64(received).await?;
    wr.shutdown().await
}

/// Writes `len` bytes of a fixed non-trivial pattern (generating data would cost CPU that the
/// measurement should not include).
pub async fn write_pattern<W: tokio::io::AsyncWrite + Unpin>(
    wr: &mut W,
    len: u64,
) -> io::Result<()> {
    static PATTERN: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    let pattern = PATTERN.get_or_init(|| (0..IO_CHUNK).map(|i| (i * 131 % 251) as u8).collect());
    let mut left = len;
    while left > 0 {
        let n = left.min(pattern.len() as u64) as usize;
        wr.write_all(&pattern[..n]).await?;
        left -= n as u64;
    }
    Ok(())
}
