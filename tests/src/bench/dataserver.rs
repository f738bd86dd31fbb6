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
/// Command byte of a throughput exchange that ends by byte counts, not by a half-close.
pub const THROUGHPUT_COUNTED: u8 = b'L';
/// Command byte of a request/response exchange.
pub const REQUEST_RESPONSE: u8 = b'Q';
/// Largest request or answer of a request/response exchange (the server holds one request).
pub const MAX_EXCHANGE: u32 = 16 << 20;
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
    match first[0] {
        THROUGHPUT => {}
        THROUGHPUT_COUNTED => return serve_counted(stream).await,
        REQUEST_RESPONSE => return serve_exchanges(stream).await,
        _ => return serve_echo(stream, first[0]).await,
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

/// Echo, `first` (already read) included.
async fn serve_echo(mut stream: TcpStream, first: u8) -> io::Result<()> {
    stream.write_all(&[first]).await?;
    let (mut rd, mut wr) = stream.split();
    tokio::io::copy(&mut rd, &mut wr).await?;
    wr.shutdown().await
}

/// The `L` exchange: exactly `up_len` bytes in while `down_len` go out, then the count.
async fn serve_counted(mut stream: TcpStream) -> io::Result<()> {
    let up_len = stream.read_u64().await?;
    let down_len = stream.read_u64().await?;
    stream.write_all(&[READY]).await?;
    let (mut rd, mut wr) = stream.split();
    let sink = async {
        let mut buf = vec![0u8; IO_CHUNK];
        let mut total = 0u64;
        while total < up_len {
            let want = (up_len - total).min(buf.len() as u64) as usize;
            let n = rd.read(&mut buf[..want]).await?;
            if n == 0 {
                break;
            }
            total += n as u64;
        }
        Ok::<_, io::Error>(total)
    };
    let source = write_pattern(&mut wr, down_len);
    let (received, ()) = tokio::try_join!(sink, source)?;
    wr.write_u64(received).await?;
    wr.shutdown().await
}

/// The `Q` exchange: an answer of `answer_len` bytes for every `request_len` bytes received.
async fn serve_exchanges(mut stream: TcpStream) -> io::Result<()> {
    let request_len = stream.read_u32().await?;
    let answer_len = stream.read_u32().await?;
    if request_len == 0 || request_len > MAX_EXCHANGE || answer_len > MAX_EXCHANGE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("request/response sizes {request_len}/{answer_len} not in 1..={MAX_EXCHANGE}"),
        ));
    }
    stream.write_all(&[READY]).await?;
    let mut request = vec![0u8; request_len as usize];
    loop {
        match stream.read_exact(&mut request).await {
            Ok(_) => {}
            // The client ends the exchange with its EOF between two requests.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e),
        }
        write_pattern(&mut stream, answer_len as u64).await?;
    }
    stream.shutdown().await
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

#[cfg(test)]
mod tests {
    use super::*;

    async fn start() -> (DataServer, SocketAddr) {
        let addr = tunnel_tests::free_addr();
        (DataServer::start(addr).await.expect("data server"), addr)
    }

    /// Every request of the `Q` exchange gets exactly `answer_len` bytes, and the server ends
    /// the connection after the client's EOF.
    #[tokio::test]
    async fn request_response_answers_exactly_the_asked_size() {
        let (_server, addr) = start().await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        let mut header = vec![REQUEST_RESPONSE];
        header.extend_from_slice(&10u32.to_be_bytes());
        header.extend_from_slice(&5u32.to_be_bytes());
        s.write_all(&header).await.unwrap();
        assert_eq!(s.read_u8().await.unwrap(), READY);
        // Two requests, the second split across writes: two answers.
        s.write_all(&[b'a'; 13]).await.unwrap();
        s.write_all(&[b'b'; 7]).await.unwrap();
        s.shutdown().await.unwrap();
        let mut back = Vec::new();
        tokio::time::timeout(std::time::Duration::from_secs(10), s.read_to_end(&mut back))
            .await
            .expect("the server ends the exchange")
            .unwrap();
        assert_eq!(back.len(), 10);
    }

    /// The bench's measurements of the `L` and `Q` exchanges complete against the server: the
    /// counted throughput checks the server's count of the up bytes, and every exchange is
    /// timed.
    #[tokio::test]
    async fn counted_throughput_and_exchanges_through_the_measurements() {
        let (_server, addr) = start().await;
        let timeout = std::time::Duration::from_secs(30);
        let t = crate::measure::throughput_counted(addr, 3 << 20, 1 << 20, timeout)
            .await
            .unwrap();
        assert_eq!((t.up, t.down), (3 << 20, 1 << 20));
        let done = crate::measure::request_response(
            addr,
            3,
            200,
            2048,
            std::time::Duration::from_millis(200),
            timeout,
        )
        .await
        .unwrap();
        assert!(done.count >= 3, "{} exchanges", done.count);
        assert_eq!(done.latencies.len() as u64, done.count);
    }
}
