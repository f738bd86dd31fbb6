//! Joining two byte streams both ways with TCP's half-close semantics: when one side's reads
//! end, the other side's write half is shut down and the opposite direction goes on. The
//! client binary joins a local TCP connection to a tunnel stream with it, the broker binary a
//! tunnel stream to its TCP service. Available with the `driver` feature.
//!
//! ```
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//! use tunnel_proto::splice::splice;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let (a, mut a_far) = tokio::io::duplex(1024);
//! let (b, mut b_far) = tokio::io::duplex(1024);
//! let joined = tokio::spawn(splice(a, b));
//! a_far.write_all(b"ping").await.unwrap();
//! a_far.shutdown().await.unwrap(); // b_far reads "ping", then end of stream
//! let mut got = Vec::new();
//! b_far.read_to_end(&mut got).await.unwrap();
//! assert_eq!(got, b"ping");
//! drop(b_far); // the other direction ends too
//! let outcome = joined.await.unwrap();
//! assert_eq!(outcome.a_to_b, 4);
//! # }
//! ```

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

/// Largest copy buffer of each direction: one full DATA packet's worth.
pub const COPY_BUFFER: usize = 64 * 1024;

/// Smallest copy buffer, the one an idle or chatty direction keeps. Thousands of idle
/// spliced connections are the common case (a client binary holding database or MQTT
/// connections): with a full buffer each, an idle connection that has moved a few bytes
/// costs the touched pages of two 64 KiB buffers.
pub const MIN_COPY_BUFFER: usize = 2 * 1024;

/// A copy buffer that grows while reads fill it (bulk transfer) and shrinks back when they
/// come small again (interactive or idle).
struct CopyBuffer {
    buf: Vec<u8>,
}

impl CopyBuffer {
    fn new() -> CopyBuffer {
        CopyBuffer {
            buf: vec![0u8; MIN_COPY_BUFFER],
        }
    }

    /// Adapts the size to a read of `n` bytes: four times larger after a full read, back to
    /// the minimum after a read under an eighth of it.
    fn adapt(&mut self, n: usize) {
        let len = self.buf.len();
        if n == len && len < COPY_BUFFER {
            self.buf = vec![0u8; (len * 4).min(COPY_BUFFER)];
        } else if n < len / 8 && len > MIN_COPY_BUFFER {
            self.buf = vec![0u8; MIN_COPY_BUFFER];
        }
    }
}

/// What a splice moved, and how it ended.
#[derive(Debug)]
pub struct SpliceOutcome {
    /// Bytes read from `a` and written to `b`.
    pub a_to_b: u64,
    /// Bytes read from `b` and written to `a`.
    pub b_to_a: u64,
    /// `Ok` when both directions reached end of stream and were shut down; the first error
    /// otherwise (which also ends the other direction).
    pub result: io::Result<()>,
}

/// Copies `a` → `b` and `b` → `a` until both directions have ended or one fails.
pub async fn splice<A, B>(a: A, b: B) -> SpliceOutcome
where
    A: AsyncRead + AsyncWrite,
    B: AsyncRead + AsyncWrite,
{
    join(a, b, None).await
}

/// [`splice`] that also ends the `a` → `b` direction, as if `a` had closed, once `stop` turns
/// `true` (or its sender is dropped): for a graceful shutdown, `b` gets a half-close and its
/// answer still flows back to `a`.
pub async fn splice_until<A, B>(a: A, b: B, stop: watch::Receiver<bool>) -> SpliceOutcome
where
    A: AsyncRead + AsyncWrite,
    B: AsyncRead + AsyncWrite,
{
    join(a, b, Some(stop)).await
}

async fn join<A, B>(a: A, b: B, stop: Option<watch::Receiver<bool>>) -> SpliceOutcome
where
    A: AsyncRead + AsyncWrite,
    B: AsyncRead + AsyncWrite,
{
    let (mut a_read, mut a_write) = tokio::io::split(a);
    let (mut b_read, mut b_write) = tokio::io::split(b);
    let mut a_to_b = 0u64;
    let mut b_to_a = 0u64;
    let result = tokio::try_join!(
        pump(&mut a_read, &mut b_write, &mut a_to_b, stop),
        pump(&mut b_read, &mut a_write, &mut b_to_a, None),
    )
    .map(|_| ());
    SpliceOutcome {
        a_to_b,
        b_to_a,
        result,
    }
}

/// One direction: copy until end of stream (or `stop`), then shut the writer down
/// (half-close).
async fn pump<R, W>(
    reader: &mut R,
    writer: &mut W,
    count: &mut u64,
    mut stop: Option<watch::Receiver<bool>>,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut copy = CopyBuffer::new();
    loop {
        let buf = &mut copy.buf;
        let n = match &mut stop {
            Some(stop) => tokio::select! {
                n = reader.read(buf) => n?,
                // A dropped sender counts as a stop too.
                _ = stop.wait_for(|stopped| *stopped) => 0,
            },
            None => reader.read(buf).await?,
        };
        if n == 0 {
            return writer.shutdown().await;
        }
        writer.write_all(&buf[..n]).await?;
        *count += n as u64;
        copy.adapt(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_copy_buffer_grows_with_full_reads_and_shrinks_with_small_ones() {
        let mut copy = CopyBuffer::new();
        assert_eq!(copy.buf.len(), MIN_COPY_BUFFER);
        let mut sizes = Vec::new();
        for _ in 0..4 {
            let full = copy.buf.len();
            copy.adapt(full);
            sizes.push(copy.buf.len());
        }
        assert_eq!(sizes, [8 * 1024, 32 * 1024, COPY_BUFFER, COPY_BUFFER]);
        copy.adapt(COPY_BUFFER / 2);
        assert_eq!(copy.buf.len(), COPY_BUFFER, "half full: keep");
        copy.adapt(100);
        assert_eq!(copy.buf.len(), MIN_COPY_BUFFER, "small read: shrink");
    }

    #[tokio::test]
    async fn half_close_of_one_side_lets_the_other_direction_finish() {
        let (a_near, mut a_far) = tokio::io::duplex(1024);
        let (b_near, mut b_far) = tokio::io::duplex(1024);
        let task = tokio::spawn(splice(a_near, b_near));

        // A sends and closes its writing side.
        a_far.write_all(b"request").await.unwrap();
        a_far.shutdown().await.unwrap();
        let mut got = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), b_far.read_to_end(&mut got));
        read.await.expect("b sees end of stream").unwrap();
        assert_eq!(got, b"request");

        // B still answers after A's half-close.
        b_far.write_all(b"response").await.unwrap();
        b_far.shutdown().await.unwrap();
        let mut got = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), a_far.read_to_end(&mut got));
        read.await.expect("a sees end of stream").unwrap();
        assert_eq!(got, b"response");

        let outcome = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("splice ends")
            .unwrap();
        outcome.result.unwrap();
        assert_eq!((outcome.a_to_b, outcome.b_to_a), (7, 8));
    }

    #[tokio::test]
    async fn a_stop_half_closes_toward_b_and_the_answer_still_flows_back() {
        let (a_near, mut a_far) = tokio::io::duplex(1024);
        let (b_near, mut b_far) = tokio::io::duplex(1024);
        let (stop_tx, stop_rx) = watch::channel(false);
        let task = tokio::spawn(splice_until(a_near, b_near, stop_rx));

        a_far.write_all(b"req").await.unwrap();
        let mut got = [0u8; 3];
        b_far.read_exact(&mut got).await.unwrap();
        stop_tx.send_replace(true);
        // B sees end of stream although A never closed...
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), b_far.read_to_end(&mut rest));
        read.await
            .expect("b sees end of stream after the stop")
            .unwrap();
        assert!(rest.is_empty());
        // ...and its answer still reaches A.
        b_far.write_all(b"answer").await.unwrap();
        b_far.shutdown().await.unwrap();
        let mut answer = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), a_far.read_to_end(&mut answer));
        read.await.expect("a sees end of stream").unwrap();
        assert_eq!(answer, b"answer");
        let outcome = task.await.unwrap();
        outcome.result.unwrap();
        assert_eq!((outcome.a_to_b, outcome.b_to_a), (3, 6));
    }
}
