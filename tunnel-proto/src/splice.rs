//! Joining a tunnel connection to a socket both ways, with TCP's half-close semantics: when
//! one side's reads end, the other side's write half is shut down and the opposite direction
//! goes on. The client binary joins each local TCP connection to a tunnel stream with it, the
//! broker binary each tunnel stream to its TCP service. Available with the `driver` feature.
//!
//! Bytes are not copied in user space on the way: a bulk read from the socket is handed to
//! the tunnel connection as the buffer it was read into, and the tunnel's received payloads
//! are written to the socket as they arrived, several at once with a vectored write. (A
//! profile of a bulk transfer found the two copies of a generic copy loop at a tenth of the
//! client's and broker's time.)
//!
//! ```
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//! use tunnel_proto::splice::splice;
//! # use std::future::Future;
//! # use std::pin::Pin;
//! # use std::sync::{Arc, OnceLock};
//! # use tunnel_proto::driver::{self, ConnHandle, PacketSink};
//! # use tunnel_proto::{Connection, ConnectionConfig, Packet};
//! # struct Wire(OnceLock<ConnHandle>);
//! # impl PacketSink for Wire {
//! #     fn send(&self, packets: Vec<Packet>) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
//! #         Box::pin(async move { self.0.get().map(|peer| peer.deliver_all(packets)); })
//! #     }
//! # }
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! # let config = ConnectionConfig::default();
//! # let (to_b, to_a) = (Arc::new(Wire(OnceLock::new())), Arc::new(Wire(OnceLock::new())));
//! # let (tunnel, a) = driver::spawn(Connection::new(1, 64, config.clone(), driver::now()), to_b.clone());
//! # let (mut far_end, b) = driver::spawn(Connection::new(1, 64, config, driver::now()), to_a.clone());
//! # let _ = (to_b.0.set(b), to_a.0.set(a));
//! // `tunnel` is a TunnelStream whose peer is `far_end`.
//! let (socket, mut app) = tokio::io::duplex(1024);
//! let joined = tokio::spawn(splice(tunnel, socket));
//! far_end.write_all(b"ping").await.unwrap();
//! far_end.shutdown().await.unwrap(); // the socket reads "ping", then end of stream
//! let mut got = Vec::new();
//! app.read_to_end(&mut got).await.unwrap();
//! assert_eq!(got, b"ping");
//! drop(app); // the other direction ends too
//! let outcome = joined.await.unwrap();
//! assert_eq!(outcome.from_tunnel, 4);
//! # }
//! ```

use std::future::poll_fn;
use std::io;
use std::task::Poll;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

use crate::chunks::Chunks;
use crate::driver::TunnelStream;

/// Largest read from the socket, and most bytes taken from the tunnel for one socket write:
/// four full DATA packets' worth (a read is cut into packets without a copy). The bench's
/// plain forwarder moves 256 KiB per system call too; 64 KiB took twice the calls and, over
/// h2c, 8 % more CPU per GiB (BENCHMARKS.md).
pub const COPY_BUFFER: usize = 256 * 1024;

/// Smallest read buffer, the one an idle or chatty direction keeps. Thousands of idle
/// spliced connections are the common case (a client binary holding database or MQTT
/// connections): with a full buffer each, an idle connection that has moved a few bytes
/// costs the touched pages of a 64 KiB buffer.
pub const MIN_COPY_BUFFER: usize = 2 * 1024;

/// Most received payloads written to the socket in one vectored write.
const MAX_WRITE_CHUNKS: usize = 64;

/// Whether `chunks` holds enough for one socket write.
fn is_full(chunks: &Chunks) -> bool {
    chunks.remaining() >= COPY_BUFFER || chunks.count() >= MAX_WRITE_CHUNKS
}

/// The socket's read buffer: it grows while reads fill it (bulk transfer) and shrinks back
/// when they come small again (interactive or idle). Each read is split off as `Bytes` and
/// handed to the tunnel; the buffer's free room serves the next reads.
struct ReadBuffer {
    buf: BytesMut,
    /// How much the next read may take.
    size: usize,
}

impl ReadBuffer {
    fn new() -> ReadBuffer {
        ReadBuffer {
            buf: BytesMut::new(),
            size: MIN_COPY_BUFFER,
        }
    }

    /// Reads once from `reader` into the free room, `size` at most; 0 at end of stream.
    async fn read_from<R: AsyncRead + Unpin>(&mut self, reader: &mut R) -> io::Result<usize> {
        if self.buf.capacity() < self.size {
            // A new allocation unless every chunk cut from the old one is gone already.
            self.buf.reserve(self.size);
        }
        let mut room = (&mut self.buf).limit(self.size);
        reader.read_buf(&mut room).await
    }

    /// Takes the bytes read, and adapts the size to a read of `n` bytes: four times larger
    /// after a full read, back to the minimum after a read under an eighth of it.
    fn take(&mut self, n: usize) -> Bytes {
        let data = self.buf.split().freeze();
        if n == self.size && self.size < COPY_BUFFER {
            self.size = (self.size * 4).min(COPY_BUFFER);
        } else if n < self.size / 8 && self.size > MIN_COPY_BUFFER {
            self.size = MIN_COPY_BUFFER;
            // Let go of the large buffer's free room.
            self.buf = BytesMut::new();
        }
        data
    }
}

/// What a splice moved, and how it ended.
#[derive(Debug)]
pub struct SpliceOutcome {
    /// Bytes read from the socket and sent through the tunnel.
    pub to_tunnel: u64,
    /// Bytes received from the tunnel and written to the socket.
    pub from_tunnel: u64,
    /// `Ok` when both directions reached end of stream and were shut down; the first error
    /// otherwise (which also ends the other direction).
    pub result: io::Result<()>,
}

/// Copies the socket into the tunnel and the tunnel into the socket until both directions
/// have ended or one fails. The tunnel stream is dropped at the end: after a failure that
/// aborts the connection (see [`TunnelStream`]).
pub async fn splice<S>(tunnel: TunnelStream, socket: S) -> SpliceOutcome
where
    S: AsyncRead + AsyncWrite,
{
    join(tunnel, socket, None).await
}

/// [`splice`] that also ends the socket → tunnel direction, as if the socket had closed,
/// once `stop` turns `true` (or its sender is dropped): for a graceful shutdown, the tunnel
/// gets a half-close and the answer still flows back to the socket.
pub async fn splice_until<S>(
    tunnel: TunnelStream,
    socket: S,
    stop: watch::Receiver<bool>,
) -> SpliceOutcome
where
    S: AsyncRead + AsyncWrite,
{
    join(tunnel, socket, Some(stop)).await
}

async fn join<S>(
    tunnel: TunnelStream,
    socket: S,
    stop: Option<watch::Receiver<bool>>,
) -> SpliceOutcome
where
    S: AsyncRead + AsyncWrite,
{
    let (mut socket_read, mut socket_write) = tokio::io::split(socket);
    let mut to_tunnel = 0u64;
    let mut from_tunnel = 0u64;
    let result = tokio::try_join!(
        socket_to_tunnel(&mut socket_read, &tunnel, &mut to_tunnel, stop),
        tunnel_to_socket(&tunnel, &mut socket_write, &mut from_tunnel),
    )
    .map(|_| ());
    SpliceOutcome {
        to_tunnel,
        from_tunnel,
        result,
    }
}

/// One direction: read the socket until end of stream (or `stop`), then half-close the
/// tunnel.
async fn socket_to_tunnel<R: AsyncRead + Unpin>(
    socket: &mut R,
    tunnel: &TunnelStream,
    count: &mut u64,
    mut stop: Option<watch::Receiver<bool>>,
) -> io::Result<()> {
    let mut buffer = ReadBuffer::new();
    loop {
        let n = match &mut stop {
            Some(stop) => tokio::select! {
                n = buffer.read_from(socket) => n?,
                // A dropped sender counts as a stop too.
                _ = stop.wait_for(|stopped| *stopped) => 0,
            },
            None => buffer.read_from(socket).await?,
        };
        if n == 0 {
            return tunnel.shutdown_write();
        }
        let mut data = buffer.take(n);
        while !data.is_empty() {
            poll_fn(|cx| tunnel.poll_write_bytes(cx, &mut data)).await?;
        }
        *count += n as u64;
    }
}

/// The other direction: write what the tunnel delivers to the socket until the tunnel's end
/// of stream, then half-close the socket.
async fn tunnel_to_socket<W: AsyncWrite + Unpin>(
    tunnel: &TunnelStream,
    socket: &mut W,
    count: &mut u64,
) -> io::Result<()> {
    let mut chunks = Chunks::default();
    loop {
        // Wait for the first payload, then take whatever else is ready, to write it all at once.
        let mut ended = false;
        poll_fn(|cx| loop {
            match tunnel.poll_read_chunk(cx, COPY_BUFFER) {
                Poll::Ready(Ok(chunk)) if chunk.is_empty() => {
                    ended = true;
                    return Poll::Ready(Ok(()));
                }
                Poll::Ready(Ok(chunk)) => {
                    chunks.push(chunk);
                    if is_full(&chunks) {
                        return Poll::Ready(Ok(()));
                    }
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending if chunks.has_remaining() => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        })
        .await?;
        let len = chunks.remaining();
        socket.write_all_buf(&mut chunks).await?;
        *count += len as u64;
        if ended {
            return socket.shutdown().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::{self, ConnHandle, PacketSink};
    use crate::{Connection, ConnectionConfig, Packet};
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::{Arc, OnceLock};
    use std::time::Duration;

    /// Hands every packet straight to the other end.
    struct Wire(OnceLock<ConnHandle>);

    impl PacketSink for Wire {
        fn send(&self, packets: Vec<Packet>) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
            Box::pin(async move {
                if let Some(peer) = self.0.get() {
                    peer.deliver_all(packets);
                }
            })
        }
    }

    /// Two tunnel streams back to back.
    fn tunnel_pair() -> (TunnelStream, TunnelStream) {
        let config = ConnectionConfig::default();
        let (to_b, to_a) = (
            Arc::new(Wire(OnceLock::new())),
            Arc::new(Wire(OnceLock::new())),
        );
        let a = Connection::new(1, config.recv_window, config.clone(), driver::now());
        let b = Connection::new(1, config.recv_window, config, driver::now());
        let (a, a_handle) = driver::spawn(a, to_b.clone());
        let (b, b_handle) = driver::spawn(b, to_a.clone());
        let _ = to_b.0.set(b_handle);
        let _ = to_a.0.set(a_handle);
        (a, b)
    }

    #[tokio::test]
    async fn the_read_buffer_grows_with_full_reads_and_shrinks_with_small_ones() {
        let mut buffer = ReadBuffer::new();
        let mut source: &[u8] = &[7u8; 1024 * 1024];
        let mut sizes = Vec::new();
        for _ in 0..5 {
            let n = buffer.read_from(&mut source).await.unwrap();
            assert_eq!(n, buffer.size, "a full read");
            assert_eq!(buffer.take(n).len(), n);
            sizes.push(buffer.size);
        }
        assert_eq!(
            sizes,
            [8 * 1024, 32 * 1024, 128 * 1024, COPY_BUFFER, COPY_BUFFER]
        );
        let mut half: &[u8] = &[7u8; COPY_BUFFER / 2];
        let n = buffer.read_from(&mut half).await.unwrap();
        buffer.take(n);
        assert_eq!(buffer.size, COPY_BUFFER, "half full: keep");
        let mut small: &[u8] = b"small";
        let n = buffer.read_from(&mut small).await.unwrap();
        assert_eq!(&buffer.take(n)[..], b"small");
        assert_eq!(buffer.size, MIN_COPY_BUFFER, "small read: shrink");
        assert_eq!(buffer.buf.capacity(), 0, "the large buffer is let go");
    }

    #[tokio::test]
    async fn bulk_data_crosses_both_ways_intact() {
        let (tunnel, mut far_end) = tunnel_pair();
        // A small pipe, so socket writes are cut short and resumed.
        let (socket, app) = tokio::io::duplex(7_000);
        let task = tokio::spawn(splice(tunnel, socket));
        let up: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let down: Vec<u8> = (0..2_000_000u32).map(|i| (i % 241) as u8).collect();
        let (mut app_read, mut app_write) = tokio::io::split(app);
        let (up_sent, down_sent) = (up.clone(), down.clone());
        let app_writer = tokio::spawn(async move {
            // Writes of many sizes, from single bytes to more than a packet.
            let mut rest = &up_sent[..];
            let mut size = 1usize;
            while !rest.is_empty() {
                let n = size.min(rest.len());
                app_write.write_all(&rest[..n]).await.unwrap();
                rest = &rest[n..];
                size = (size * 7 + 3) % 90_001;
            }
            app_write.shutdown().await.unwrap();
        });
        let (mut far_read, mut far_write) = tokio::io::split(far_end);
        let far_writer = tokio::spawn(async move {
            far_write.write_all(&down_sent).await.unwrap();
            far_write.shutdown().await.unwrap();
            far_write
        });
        let mut got_up = Vec::new();
        let mut got_down = Vec::new();
        let (r1, r2) = tokio::join!(
            far_read.read_to_end(&mut got_up),
            app_read.read_to_end(&mut got_down)
        );
        r1.unwrap();
        r2.unwrap();
        assert!(got_up == up, "socket to tunnel intact");
        assert!(got_down == down, "tunnel to socket intact");
        app_writer.await.unwrap();
        far_end = far_read.unsplit(far_writer.await.unwrap());
        let outcome = tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("splice ends")
            .unwrap();
        outcome.result.unwrap();
        assert_eq!(
            (outcome.to_tunnel, outcome.from_tunnel),
            (up.len() as u64, down.len() as u64)
        );
        drop(far_end);
    }

    #[tokio::test]
    async fn half_close_of_one_side_lets_the_other_direction_finish() {
        let (tunnel, mut far_end) = tunnel_pair();
        let (socket, mut app) = tokio::io::duplex(1024);
        let task = tokio::spawn(splice(tunnel, socket));

        // The socket's side sends and closes its writing side.
        app.write_all(b"request").await.unwrap();
        app.shutdown().await.unwrap();
        let mut got = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), far_end.read_to_end(&mut got));
        read.await.expect("the tunnel sees end of stream").unwrap();
        assert_eq!(got, b"request");

        // The tunnel's side still answers after the half-close.
        far_end.write_all(b"response").await.unwrap();
        far_end.shutdown().await.unwrap();
        let mut got = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), app.read_to_end(&mut got));
        read.await.expect("the socket sees end of stream").unwrap();
        assert_eq!(got, b"response");

        let outcome = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("splice ends")
            .unwrap();
        outcome.result.unwrap();
        assert_eq!((outcome.to_tunnel, outcome.from_tunnel), (7, 8));
    }

    #[tokio::test]
    async fn a_stop_half_closes_the_tunnel_and_the_answer_still_flows_back() {
        let (tunnel, mut far_end) = tunnel_pair();
        let (socket, mut app) = tokio::io::duplex(1024);
        let (stop_tx, stop_rx) = watch::channel(false);
        let task = tokio::spawn(splice_until(tunnel, socket, stop_rx));

        app.write_all(b"req").await.unwrap();
        let mut got = [0u8; 3];
        far_end.read_exact(&mut got).await.unwrap();
        stop_tx.send_replace(true);
        // The tunnel sees end of stream although the socket never closed...
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), far_end.read_to_end(&mut rest));
        read.await
            .expect("the tunnel sees end of stream after the stop")
            .unwrap();
        assert!(rest.is_empty());
        // ...and its answer still reaches the socket.
        far_end.write_all(b"answer").await.unwrap();
        far_end.shutdown().await.unwrap();
        let mut answer = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), app.read_to_end(&mut answer));
        read.await.expect("the socket sees end of stream").unwrap();
        assert_eq!(answer, b"answer");
        let outcome = task.await.unwrap();
        outcome.result.unwrap();
        assert_eq!((outcome.to_tunnel, outcome.from_tunnel), (3, 6));
    }

    #[tokio::test]
    async fn an_aborted_tunnel_ends_the_splice_with_an_error() {
        let (tunnel, far_end) = tunnel_pair();
        let (socket, mut app) = tokio::io::duplex(1024);
        let task = tokio::spawn(splice(tunnel, socket));
        far_end.abort("test abort");
        let outcome = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("splice ends")
            .unwrap();
        let error = outcome.result.expect_err("the abort is an error");
        assert_eq!(error.kind(), io::ErrorKind::ConnectionReset, "{error}");
        // The socket goes with the splice (the binaries reset theirs after an error).
        let mut buf = [0u8; 8];
        let read = tokio::time::timeout(Duration::from_secs(5), app.read(&mut buf));
        assert_eq!(read.await.expect("the socket side ended").unwrap(), 0);
    }
}
