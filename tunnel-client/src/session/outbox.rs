//! The packets the session's connections hand over, waiting for a push. Bounded in bytes:
//! a connection's driver waits while it is full, which is the back-pressure that keeps a
//! fast writer from queueing without end when the relay or the path is slow.

use std::collections::VecDeque;
use std::sync::Mutex;

use tokio::sync::Semaphore;
use tunnel_proto::Packet;

pub(super) struct Outbox {
    queue: Mutex<VecDeque<Packet>>,
    /// One permit per byte of room.
    room: Semaphore,
    limit: usize,
}

impl Outbox {
    pub(super) fn new(limit: usize) -> Outbox {
        Outbox {
            queue: Mutex::new(VecDeque::new()),
            room: Semaphore::new(limit),
            limit,
        }
    }

    /// What a packet takes of the room (a packet larger than the whole outbox takes all of it).
    fn cost(&self, packet: &Packet) -> u32 {
        u32::try_from(packet.wire_len().min(self.limit)).unwrap_or(u32::MAX)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Packet>> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues packets, waiting for room for each.
    pub(super) async fn put(&self, packets: Vec<Packet>) {
        for packet in packets {
            match self.room.acquire_many(self.cost(&packet)).await {
                Ok(permit) => permit.forget(),
                // Never closed; if it were, nothing could be sent anyway.
                Err(_) => return,
            }
            self.lock().push_back(packet);
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Takes queued packets up to `max` bytes on the wire (at least one if any is queued).
    pub(super) fn take(&self, max: usize) -> Vec<Packet> {
        let mut taken = Vec::new();
        let mut bytes = 0;
        let mut freed = 0usize;
        {
            let mut queue = self.lock();
            while let Some(front) = queue.front() {
                let len = front.wire_len();
                if !taken.is_empty() && bytes + len > max {
                    break;
                }
                bytes += len;
                if let Some(packet) = queue.pop_front() {
                    freed += self.cost(&packet) as usize;
                    taken.push(packet);
                }
            }
        }
        self.room.add_permits(freed);
        taken
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use tunnel_proto::PacketType;

    fn data(len: usize) -> Packet {
        Packet::new(PacketType::Data, 1, Bytes::from(vec![0u8; len]))
    }

    #[tokio::test]
    async fn a_full_outbox_makes_the_writer_wait_until_a_push_takes_packets() {
        let outbox = std::sync::Arc::new(Outbox::new(1000));
        outbox.put(vec![data(476), data(476)]).await; // 500 bytes each on the wire
        let writer = {
            let outbox = outbox.clone();
            tokio::spawn(async move { outbox.put(vec![data(476)]).await })
        };
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!writer.is_finished(), "no room: the writer waits");
        let taken = outbox.take(600);
        assert_eq!(taken.len(), 1, "only whole packets up to the limit");
        tokio::time::timeout(std::time::Duration::from_secs(5), writer)
            .await
            .expect("room made")
            .unwrap();
        assert_eq!(outbox.take(usize::MAX).len(), 2);
        assert!(outbox.is_empty());
    }
}
