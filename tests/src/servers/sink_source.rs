//! A full-duplex checksum peer: the client streams seeded bytes up while the server streams
//! seeded bytes down, both at once, and each side verifies the other's with SHA-256. The
//! client half-closes when done sending; the server finishes sending, then reports what it
//! received and half-closes too, so one exchange also exercises half-close in both directions.
//!
//! Wire format (all integers big-endian):
//! - client → server: [`MAGIC`] (8 bytes), u64 `down_len`, u64 `down_seed`, then the up
//!   bytes until EOF;
//! - server → client: `down_len` bytes of [`SeededBytes`]`(down_seed)`, then a trailer: u64
//!   count of bytes received + their SHA-256 (32 bytes), then EOF.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

use super::spawn_accept_loop;
use crate::data::{hex, seeded_sha256, SeededBytes};

/// First bytes of every exchange, so a stray connection is told apart from a corrupt one.
pub const MAGIC: &[u8; 8] = b"TTSSRC01";
const HEADER_LEN: usize = 8 + 8 + 8;
const TRAILER_LEN: usize = 8 + 32;

/// Time the server gives a new connection to send its header.
pub const SERVER_HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// The server drops a connection on which no byte arrived for this long.
pub const SERVER_IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// Most bytes a client may ask the server to send in one exchange (a bound on a corrupted
/// header making the server stream for ever).
pub const MAX_DOWN_LEN: u64 = 64 << 30;

/// Counters of a [`SinkSourceServer`].
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SinkSourceStats {
    pub accepted: u64,
    /// Connections closed before sending a single byte: port probes (a TCP connect to the
    /// client's port opens a tunnel connection too), neither completed nor failed.
    pub empty: u64,
    /// Exchanges that ran to the end (trailer sent).
    pub completed: u64,
    pub failed: u64,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    /// The most recent failure, for test messages.
    pub last_error: Option<String>,
}

#[derive(Debug, Default)]
struct Counters {
    accepted: AtomicU64,
    empty: AtomicU64,
    completed: AtomicU64,
    failed: AtomicU64,
    bytes_received: AtomicU64,
    bytes_sent: AtomicU64,
    last_error: Mutex<Option<String>>,
}

/// The server side; stops when dropped.
#[derive(Debug)]
pub struct SinkSourceServer {
    addr: SocketAddr,
    counters: Arc<Counters>,
    task: tokio::task::JoinHandle<()>,
}

impl SinkSourceServer {
    /// Listens on 127.0.0.1, ephemeral port.
    pub async fn start() -> io::Result<SinkSourceServer> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let counters = Arc::new(Counters::default());
        let shared = Arc::clone(&counters);
        let task = spawn_accept_loop(listener, move |stream, peer| {
            let counters = Arc::clone(&shared);
            async move {
                counters.accepted.fetch_add(1, Ordering::Relaxed);
                match serve(stream, &counters).await {
                    Ok(Served::Exchange) => {
                        counters.completed.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Served::Empty) => {
                        counters.empty.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        tracing::info!(%peer, error = %e, "sink/source exchange failed");
                        counters.failed.fetch_add(1, Ordering::Relaxed);
                        *counters.last_error.lock().unwrap() = Some(format!("{peer}: {e}"));
                    }
                }
            }
        });
        Ok(SinkSourceServer {
            addr,
            counters,
            task,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn stats(&self) -> SinkSourceStats {
        SinkSourceStats {
            accepted: self.counters.accepted.load(Ordering::Relaxed),
            empty: self.counters.empty.load(Ordering::Relaxed),
            completed: self.counters.completed.load(Ordering::Relaxed),
            failed: self.counters.failed.load(Ordering::Relaxed),
            bytes_received: self.counters.bytes_received.load(Ordering::Relaxed),
            bytes_sent: self.counters.bytes_sent.load(Ordering::Relaxed),
            last_error: self.counters.last_error.lock().unwrap().clone(),
        }
    }

    /// The counters once a chain's readiness probe (one small exchange) is counted: the
    /// probe's client side can finish before the server records its completion, so a
    /// baseline read at once may miss it, and count it among the exchanges that follow.
    /// Waits up to 10 s for one completed exchange and for every accepted connection to
    /// have ended.
    pub async fn settled_stats(&self) -> SinkSourceStats {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let stats = self.stats();
            let all_ended = stats.accepted == stats.empty + stats.completed + stats.failed;
            if (stats.completed >= 1 && all_ended) || tokio::time::Instant::now() >= deadline {
                return stats;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
}

impl Drop for SinkSourceServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// How a connection ended well.
enum Served {
    Exchange,
    /// EOF before any byte.
    Empty,
}

async fn serve(mut stream: TcpStream, counters: &Counters) -> io::Result<Served> {
    let mut header = [0u8; HEADER_LEN];
    let read_header = async {
        let mut filled = 0;
        while filled < HEADER_LEN {
            let n = stream.read(&mut header[filled..]).await?;
            if n == 0 {
                return Ok(filled);
            }
            filled += n;
        }
        Ok::<_, io::Error>(filled)
    };
    let filled = tokio::time::timeout(SERVER_HEADER_TIMEOUT, read_header)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no header"))??;
    match filled {
        0 => return Ok(Served::Empty),
        HEADER_LEN => {}
        n => {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("EOF after {n} header bytes"),
            ))
        }
    }
    if &header[..8] != MAGIC {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("bad magic {:02x?}", &header[..8]),
        ));
    }
    let down_len = u64::from_be_bytes(header[8..16].try_into().expect("8 bytes"));
    let down_seed = u64::from_be_bytes(header[16..24].try_into().expect("8 bytes"));
    if down_len > MAX_DOWN_LEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("asked for {down_len} bytes, over {MAX_DOWN_LEN}"),
        ));
    }

    let (mut rd, mut wr) = stream.split();
    let receive = async {
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0u64;
        loop {
            let n = tokio::time::timeout(SERVER_IDLE_TIMEOUT, rd.read(&mut buf))
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "client idle"))??;
            if n == 0 {
                let digest: [u8; 32] = hasher.finalize().into();
                return Ok::<_, io::Error>((total, digest));
            }
            hasher.update(&buf[..n]);
            total += n as u64;
            counters
                .bytes_received
                .fetch_add(n as u64, Ordering::Relaxed);
        }
    };
    let send = async {
        SeededBytes::new(down_seed)
            .write_to(
                &mut CountingWriter::new(&mut wr, &counters.bytes_sent),
                down_len,
            )
            .await
    };
    let ((received, digest), _) = tokio::try_join!(receive, send)?;
    let mut trailer = [0u8; TRAILER_LEN];
    trailer[..8].copy_from_slice(&received.to_be_bytes());
    trailer[8..].copy_from_slice(&digest);
    wr.write_all(&trailer).await?;
    wr.shutdown().await?;
    Ok(Served::Exchange)
}

/// What one exchange moves: `up_len` bytes of seed `up_seed` from the client, `down_len`
/// bytes of seed `down_seed` from the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExchangeSpec {
    pub up_len: u64,
    pub up_seed: u64,
    pub down_len: u64,
    pub down_seed: u64,
}

impl ExchangeSpec {
    /// `len` bytes each way; the two directions get different streams derived from `seed`.
    pub fn symmetric(len: u64, seed: u64) -> ExchangeSpec {
        ExchangeSpec {
            up_len: len,
            up_seed: seed,
            down_len: len,
            down_seed: seed ^ 0xD0E5_7E57_0000_0001,
        }
    }
}

/// What a successful exchange measured.
#[derive(Debug, Clone, Copy)]
pub struct ExchangeReport {
    pub sent: u64,
    pub received: u64,
    pub elapsed: Duration,
}

/// Why an exchange failed, with the progress made, so a test failure says where bytes
/// stopped.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    #[error("exchange {spec:?} timed out after {after:?}: sent {sent} bytes (write side done: {sent_all}), received {received} of {expected_down} down bytes + {TRAILER_LEN} trailer")]
    Timeout {
        spec: ExchangeSpec,
        after: Duration,
        sent: u64,
        sent_all: bool,
        received: u64,
        expected_down: u64,
    },
    #[error("I/O error while {stage} (sent {sent}, received {received}): {source}")]
    Io {
        stage: &'static str,
        sent: u64,
        received: u64,
        source: io::Error,
    },
    #[error("stream ended after {received} bytes, expected {expected} (down bytes + trailer)")]
    EarlyEof { received: u64, expected: u64 },
    #[error("bytes after the trailer: the server sent more than asked")]
    TrailingData,
    #[error("down bytes corrupted: SHA-256 {got}, expected {expected}")]
    DownCorrupt { got: String, expected: String },
    #[error("server received {server_len} bytes with SHA-256 {server_sha}, client sent {sent_len} with {sent_sha}")]
    UpCorrupt {
        sent_len: u64,
        sent_sha: String,
        server_len: u64,
        server_sha: String,
    },
}

/// Runs one exchange over `stream` (connected, directly or through a tunnel, to a
/// [`SinkSourceServer`]), both directions at once, within `timeout`.
pub async fn sink_source_exchange<S>(
    stream: S,
    spec: &ExchangeSpec,
    timeout: Duration,
) -> Result<ExchangeReport, ExchangeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let started = Instant::now();
    let sent = AtomicU64::new(0);
    let sent_all = std::sync::atomic::AtomicBool::new(false);
    let received = AtomicU64::new(0);
    let (mut rd, mut wr) = tokio::io::split(stream);
    let io_err = |stage, source| ExchangeError::Io {
        stage,
        sent: sent.load(Ordering::Relaxed),
        received: received.load(Ordering::Relaxed),
        source,
    };

    let write_side = async {
        let mut header = [0u8; HEADER_LEN];
        header[..8].copy_from_slice(MAGIC);
        header[8..16].copy_from_slice(&spec.down_len.to_be_bytes());
        header[16..24].copy_from_slice(&spec.down_seed.to_be_bytes());
        wr.write_all(&header)
            .await
            .map_err(|e| io_err("writing the header", e))?;
        let digest = SeededBytes::new(spec.up_seed)
            .write_to(&mut CountingWriter::new(&mut wr, &sent), spec.up_len)
            .await
            .map_err(|e| io_err("sending up bytes", e))?;
        wr.flush().await.map_err(|e| io_err("flushing", e))?;
        wr.shutdown()
            .await
            .map_err(|e| io_err("half-closing (shutdown)", e))?;
        sent_all.store(true, Ordering::Relaxed);
        Ok::<_, ExchangeError>(digest)
    };

    let read_side = async {
        let expected = spec.down_len + TRAILER_LEN as u64;
        let mut hasher = Sha256::new();
        let mut trailer = Vec::with_capacity(TRAILER_LEN);
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = rd
                .read(&mut buf)
                .await
                .map_err(|e| io_err("receiving", e))?;
            let before = received.load(Ordering::Relaxed);
            if n == 0 {
                if before < expected {
                    return Err(ExchangeError::EarlyEof {
                        received: before,
                        expected,
                    });
                }
                break;
            }
            if before + n as u64 > expected {
                return Err(ExchangeError::TrailingData);
            }
            // Split the chunk between payload (hashed) and trailer.
            let payload_left = spec.down_len.saturating_sub(before).min(n as u64) as usize;
            hasher.update(&buf[..payload_left]);
            trailer.extend_from_slice(&buf[payload_left..n]);
            received.store(before + n as u64, Ordering::Relaxed);
        }
        let down_sha: [u8; 32] = hasher.finalize().into();
        Ok::<_, ExchangeError>((down_sha, trailer))
    };

    let joined =
        tokio::time::timeout(timeout, async { tokio::try_join!(write_side, read_side) }).await;
    let (up_sha, (down_sha, trailer)) = match joined {
        Ok(result) => result?,
        Err(_) => {
            return Err(ExchangeError::Timeout {
                spec: *spec,
                after: timeout,
                sent: sent.load(Ordering::Relaxed),
                sent_all: sent_all.load(Ordering::Relaxed),
                received: received.load(Ordering::Relaxed),
                expected_down: spec.down_len,
            })
        }
    };
    let expected_down = seeded_sha256(spec.down_seed, spec.down_len);
    if down_sha != expected_down {
        return Err(ExchangeError::DownCorrupt {
            got: hex(&down_sha),
            expected: hex(&expected_down),
        });
    }
    let server_len = u64::from_be_bytes(trailer[..8].try_into().expect("trailer length"));
    let server_sha = &trailer[8..];
    if server_len != spec.up_len || server_sha != up_sha {
        return Err(ExchangeError::UpCorrupt {
            sent_len: spec.up_len,
            sent_sha: hex(&up_sha),
            server_len,
            server_sha: hex(server_sha),
        });
    }
    Ok(ExchangeReport {
        sent: spec.up_len,
        received: spec.down_len,
        elapsed: started.elapsed(),
    })
}

/// Counts the bytes written through it into an atomic, so progress survives a timeout.
struct CountingWriter<'a, W> {
    inner: &'a mut W,
    count: &'a AtomicU64,
}

impl<'a, W> CountingWriter<'a, W> {
    fn new(inner: &'a mut W, count: &'a AtomicU64) -> Self {
        CountingWriter { inner, count }
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for CountingWriter<'_, W> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        let poll = std::pin::Pin::new(&mut *self.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = &poll {
            self.count.fetch_add(*n as u64, Ordering::Relaxed);
        }
        poll
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut *self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(20);

    #[tokio::test]
    async fn direct_exchange_succeeds_both_ways() {
        let server = SinkSourceServer::start().await.unwrap();
        for spec in [
            ExchangeSpec::symmetric(3 << 20, 1),
            ExchangeSpec::symmetric(0, 2),
            ExchangeSpec {
                up_len: 10,
                up_seed: 3,
                down_len: 1 << 20,
                down_seed: 4,
            },
        ] {
            let s = TcpStream::connect(server.addr()).await.unwrap();
            let report = sink_source_exchange(s, &spec, T).await.unwrap();
            assert_eq!((report.sent, report.received), (spec.up_len, spec.down_len));
        }
        let deadline = Instant::now() + T;
        while server.stats().completed < 3 {
            assert!(Instant::now() < deadline, "{:?}", server.stats());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(server.stats().failed, 0);
    }

    #[tokio::test]
    async fn empty_connection_is_neither_completed_nor_failed() {
        let server = SinkSourceServer::start().await.unwrap();
        drop(TcpStream::connect(server.addr()).await.unwrap());
        let mut half = TcpStream::connect(server.addr()).await.unwrap();
        half.write_all(MAGIC).await.unwrap();
        drop(half);
        let deadline = Instant::now() + T;
        while server.stats().empty + server.stats().failed < 2 {
            assert!(Instant::now() < deadline, "{:?}", server.stats());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let stats = server.stats();
        assert_eq!(
            (stats.empty, stats.failed, stats.completed),
            (1, 1, 0),
            "{stats:?}"
        );
    }

    /// A peer that flips one byte of what it sends down must be caught.
    #[tokio::test]
    async fn corrupted_down_bytes_are_detected() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut header = [0u8; HEADER_LEN];
            s.read_exact(&mut header).await.unwrap();
            let mut data = SeededBytes::new(u64::from_be_bytes(header[16..24].try_into().unwrap()))
                .take_vec(1000);
            data[500] ^= 1;
            let mut sink = Vec::new();
            s.read_to_end(&mut sink).await.unwrap();
            s.write_all(&data).await.unwrap();
            let mut trailer = (sink.len() as u64).to_be_bytes().to_vec();
            trailer.extend_from_slice(&crate::data::sha256(&sink));
            s.write_all(&trailer).await.unwrap();
        });
        let s = TcpStream::connect(addr).await.unwrap();
        let spec = ExchangeSpec::symmetric(1000, 5);
        let err = sink_source_exchange(s, &spec, T).await.unwrap_err();
        assert!(matches!(err, ExchangeError::DownCorrupt { .. }), "{err}");
    }

    /// A peer that reports a different count of up bytes must be caught, and a peer that
    /// closes early gives EarlyEof.
    #[tokio::test]
    async fn wrong_trailer_and_early_eof_are_detected() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            // First connection: honest down bytes, wrong up count.
            let (mut s, _) = listener.accept().await.unwrap();
            let mut header = [0u8; HEADER_LEN];
            s.read_exact(&mut header).await.unwrap();
            let mut sink = Vec::new();
            s.read_to_end(&mut sink).await.unwrap();
            let data = SeededBytes::new(u64::from_be_bytes(header[16..24].try_into().unwrap()))
                .take_vec(100);
            s.write_all(&data).await.unwrap();
            let mut trailer = (sink.len() as u64 - 1).to_be_bytes().to_vec();
            trailer.extend_from_slice(&crate::data::sha256(&sink[1..]));
            s.write_all(&trailer).await.unwrap();
            drop(s);
            // Second: closes after half the down bytes.
            let (mut s, _) = listener.accept().await.unwrap();
            s.read_exact(&mut header).await.unwrap();
            // Read everything first: closing with unread bytes would be a reset, not an EOF.
            s.read_to_end(&mut Vec::new()).await.unwrap();
            s.write_all(&data[..50]).await.unwrap();
        });
        let spec = ExchangeSpec::symmetric(100, 6);
        let err = sink_source_exchange(TcpStream::connect(addr).await.unwrap(), &spec, T)
            .await
            .unwrap_err();
        assert!(matches!(err, ExchangeError::UpCorrupt { .. }), "{err}");
        let err = sink_source_exchange(TcpStream::connect(addr).await.unwrap(), &spec, T)
            .await
            .unwrap_err();
        assert!(
            matches!(err, ExchangeError::EarlyEof { received: 50, .. }),
            "{err}"
        );
    }

    #[tokio::test]
    async fn silent_peer_times_out_with_progress() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _hold = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(s);
        });
        let spec = ExchangeSpec::symmetric(1000, 7);
        let err = sink_source_exchange(
            TcpStream::connect(addr).await.unwrap(),
            &spec,
            Duration::from_millis(300),
        )
        .await
        .unwrap_err();
        assert!(
            matches!(
                err,
                ExchangeError::Timeout {
                    sent: 1000,
                    sent_all: true,
                    received: 0,
                    ..
                }
            ),
            "{err}"
        );
    }
}
