//! The write side of a broker link: a byte-bounded queue feeding one writer task.
//!
//! HTTP handlers hand whole push bodies (already validated packets) to [`LinkSender::send`],
//! which waits, up to a deadline, for room in the link's byte budget. The writer task coalesces
//! queued chunks into large writes, sends a NO_OP when the link has been idle for a keepalive
//! interval, and declares the link dead when a write stalls for three intervals.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tunnel_proto::chunks::Chunks;
use tunnel_proto::{Packet, PacketType};

/// Largest single write the writer builds by coalescing queued chunks.
const COALESCE_LIMIT: usize = 256 * 1024;

/// Why bytes could not be queued on a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SendError {
    /// No room appeared before the deadline (or, for `try_send`, right now).
    Full,
    /// The link is closed.
    Closed,
}

struct Chunk {
    bytes: Bytes,
    /// Holds the chunk's share of the byte budget until it has been written.
    permit: OwnedSemaphorePermit,
}

/// Cloneable handle that queues bytes for one link.
#[derive(Clone)]
pub(crate) struct LinkSender {
    tx: mpsc::UnboundedSender<Chunk>,
    budget: Arc<Semaphore>,
    capacity: usize,
}

/// The writer's end, consumed by [`run_writer`].
pub(crate) struct LinkReceiver {
    rx: mpsc::UnboundedReceiver<Chunk>,
}

/// A link write queue holding at most `capacity` bytes.
pub(crate) fn channel(capacity: usize) -> (LinkSender, LinkReceiver) {
    let capacity = capacity
        .clamp(1, Semaphore::MAX_PERMITS)
        .min(u32::MAX as usize);
    let (tx, rx) = mpsc::unbounded_channel();
    (
        LinkSender {
            tx,
            budget: Arc::new(Semaphore::new(capacity)),
            capacity,
        },
        LinkReceiver { rx },
    )
}

impl LinkSender {
    fn permits_for(&self, bytes: &Bytes) -> u32 {
        // A chunk larger than the whole budget still goes through, alone.
        bytes.len().clamp(1, self.capacity) as u32
    }

    /// Queues `bytes`, waiting at most `deadline` for room.
    pub(crate) async fn send(&self, bytes: Bytes, deadline: Duration) -> Result<(), SendError> {
        let n = self.permits_for(&bytes);
        let permit =
            match tokio::time::timeout(deadline, self.budget.clone().acquire_many_owned(n)).await {
                Err(_) => return Err(SendError::Full),
                Ok(Err(_)) => return Err(SendError::Closed),
                Ok(Ok(permit)) => permit,
            };
        self.tx
            .send(Chunk { bytes, permit })
            .map_err(|_| SendError::Closed)
    }

    /// Queues `bytes` only if there is room right now (used by the sweeper, which must
    /// never wait).
    pub(crate) fn try_send(&self, bytes: Bytes) -> Result<(), SendError> {
        let n = self.permits_for(&bytes);
        let permit = self
            .budget
            .clone()
            .try_acquire_many_owned(n)
            .map_err(|e| match e {
                tokio::sync::TryAcquireError::Closed => SendError::Closed,
                tokio::sync::TryAcquireError::NoPermits => SendError::Full,
            })?;
        self.tx
            .send(Chunk { bytes, permit })
            .map_err(|_| SendError::Closed)
    }

    /// Encodes and queues one packet without waiting.
    pub(crate) fn try_send_packet(&self, packet: &Packet) -> Result<(), SendError> {
        self.try_send(packet.to_bytes())
    }
}

/// Writes queued chunks to `io` until the queue's senders are all gone, `closed` is set, or a
/// write fails or stalls; then sets `closed` so the reader stops too.
/// Chunks shorter than this are copied together; longer ones are written from their own
/// buffers.
const COPY_BELOW: usize = 4 * 1024;

/// One link write being gathered. Long chunks (push bodies, data packets) are written from
/// their own buffers in one vectored write: copying every chunk into one buffer was a tenth
/// of the relay's time in a profile of a bulk upload. Short ones (acks, control packets) are
/// copied together, so that a batch of them does not take a slot of the write each.
#[derive(Default)]
struct Batch {
    chunks: Chunks,
    short: BytesMut,
    len: usize,
}

impl Batch {
    fn add(&mut self, bytes: Bytes) {
        self.len += bytes.len();
        if bytes.len() < COPY_BELOW {
            self.short.extend_from_slice(&bytes);
        } else {
            self.chunks.push(self.short.split().freeze());
            self.chunks.push(bytes);
        }
    }

    fn finish(mut self) -> Chunks {
        self.chunks.push(self.short.freeze());
        self.chunks
    }
}

pub(crate) async fn run_writer<W: AsyncWrite + Unpin>(
    mut io: W,
    mut queue: LinkReceiver,
    keepalive: Duration,
    closed: Arc<watch::Sender<bool>>,
) {
    let mut closed_rx = closed.subscribe();
    let dead_after = keepalive * 3;
    let keepalive_packet = Packet::new(PacketType::NoOp, 0, Bytes::new()).to_bytes();
    loop {
        let first = tokio::select! {
            _ = crate::state::stopped(&mut closed_rx) => break,
            next = tokio::time::timeout(keepalive, queue.rx.recv()) => next,
        };
        let mut permits = Vec::new();
        let mut batch = Batch::default();
        match first {
            Err(_) => batch.add(keepalive_packet.clone()),
            Ok(None) => break,
            Ok(Some(chunk)) => {
                batch.add(chunk.bytes);
                permits.push(chunk.permit);
                while batch.len < COALESCE_LIMIT {
                    match queue.rx.try_recv() {
                        Ok(chunk) => {
                            batch.add(chunk.bytes);
                            permits.push(chunk.permit);
                        }
                        Err(_) => break,
                    }
                }
            }
        }
        let mut batch = batch.finish();
        match tokio::time::timeout(dead_after, io.write_all_buf(&mut batch)).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => {
                tracing::debug!(error = %err, "link write failed");
                break;
            }
            Err(_) => {
                tracing::warn!("link write stalled for {dead_after:?}; closing the link");
                break;
            }
        }
        drop(permits);
    }
    closed.send_replace(true);
    let _ = tokio::time::timeout(keepalive, io.shutdown()).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Buf;

    #[test]
    fn a_batch_keeps_the_order_copies_short_chunks_and_shares_long_ones() {
        let long = Bytes::from(vec![7u8; COPY_BELOW]);
        let mut batch = Batch::default();
        batch.add(Bytes::from_static(b"ab"));
        batch.add(Bytes::from_static(b"cd"));
        batch.add(long.clone());
        batch.add(Bytes::from_static(b"ef"));
        assert_eq!(batch.len, 6 + COPY_BELOW);
        let mut chunks = batch.finish();
        assert_eq!(chunks.count(), 3, "ab+cd, the long one, ef");
        let mut slices = [std::io::IoSlice::new(&[]); 4];
        assert_eq!(chunks.chunks_vectored(&mut slices), 3);
        assert_eq!(slices[1].as_ptr(), long.as_ptr(), "not copied");
        let all = chunks.copy_to_bytes(chunks.remaining());
        let mut expected = b"abcd".to_vec();
        expected.extend_from_slice(&long);
        expected.extend_from_slice(b"ef");
        assert_eq!(all, expected);
    }
}
