//! The push side of the HTTP transport: a [`PacketSink`] that POSTs batches of packets,
//! several requests in flight, and delivers packets the relay piggybacks on the answers.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tunnel_proto::connection::StreamError;
use tunnel_proto::Packet;

use crate::http::Failure;
use crate::per_conn::PerConn;
use tunnel_proto::backoff::Backoff;
use tunnel_proto::driver::{ConnHandle, PacketSink};

pub struct HttpSink {
    per_conn: Arc<PerConn>,
    /// One permit per push request in flight.
    in_flight: Arc<Semaphore>,
    /// Set right after the driver is spawned (the handle does not exist before).
    handle: Arc<OnceLock<ConnHandle>>,
}

impl HttpSink {
    pub fn new(per_conn: Arc<PerConn>, handle: Arc<OnceLock<ConnHandle>>) -> HttpSink {
        let permits = per_conn.config.max_pushes_in_flight.max(1);
        HttpSink {
            per_conn,
            in_flight: Arc::new(Semaphore::new(permits)),
            handle,
        }
    }
}

impl PacketSink for HttpSink {
    fn send(&self, packets: Vec<Packet>) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            for body in split_bodies(&packets, self.per_conn.config.max_push_body) {
                // Waiting for a free slot is the back-pressure on the driver.
                let Ok(permit) = self.in_flight.clone().acquire_owned().await else {
                    return;
                };
                tokio::spawn(push_body(
                    self.per_conn.clone(),
                    self.handle.clone(),
                    body,
                    permit,
                ));
            }
        })
    }
}

/// Encodes packets into bodies of at most `max` bytes each (one oversized packet alone).
fn split_bodies(packets: &[Packet], max: usize) -> Vec<Bytes> {
    let mut bodies = Vec::new();
    let mut start = 0;
    let mut size = 0;
    for (i, p) in packets.iter().enumerate() {
        if i > start && size + p.wire_len() > max {
            bodies.push(tunnel_proto::encode_all(&packets[start..i]));
            start = i;
            size = 0;
        }
        size += p.wire_len();
    }
    if start < packets.len() {
        bodies.push(tunnel_proto::encode_all(&packets[start..]));
    }
    bodies
}

async fn push_body(
    per_conn: Arc<PerConn>,
    handle: Arc<OnceLock<ConnHandle>>,
    body: Bytes,
    _permit: OwnedSemaphorePermit,
) {
    let config = &per_conn.config;
    let mut backoff = Backoff::new(config.retry_initial, config.retry_max);
    let attempts = config.push_attempts.max(1);
    for attempt in 1..=attempts {
        // The first attempt always goes out: the driver ends (and the handle reads closed)
        // right after handing over its last batch, which carries the CONN_ABORT or the final
        // ACK. Only retries are pointless once the connection is over.
        if attempt > 1 && handle.get().is_some_and(ConnHandle::is_closed) {
            return;
        }
        let result = per_conn
            .relay
            .push(per_conn.conn_id, &per_conn.token, body.clone())
            .await;
        let error = match result {
            Ok(packets) => {
                per_conn.push_succeeded();
                if !packets.is_empty() {
                    match handle.get() {
                        Some(h) => h.deliver_all(packets),
                        None => tracing::debug!(
                            conn_id = per_conn.conn_id,
                            "packets piggybacked before the driver started; dropped"
                        ),
                    }
                }
                return;
            }
            Err(e) => e,
        };
        match error.failure() {
            Failure::Gone => {
                match handle.get() {
                    Some(h) => {
                        h.fail(StreamError::AbortedByPeer(
                            "relay no longer knows the connection".into(),
                        ));
                        crate::pull::log_gone(h, "push", &error);
                    }
                    None => tracing::info!(
                        conn_id = per_conn.conn_id,
                        "push: {error}; the connection is gone"
                    ),
                }
                return;
            }
            Failure::Permanent => {
                // 413 included: batches are built under the limit, so this is a bug or a
                // misconfigured relay; the connection retransmits, possibly in vain.
                tracing::error!(
                    conn_id = per_conn.conn_id,
                    bytes = body.len(),
                    "push refused: {error}; body dropped"
                );
                return;
            }
            Failure::Transient => {
                if let Some(after) = per_conn.push_failed() {
                    tracing::error!(
                        conn_id = per_conn.conn_id,
                        "push failing for {after:?} ({error}); giving up on the connection"
                    );
                    if let Some(h) = handle.get() {
                        h.fail(StreamError::TimedOut(after));
                    }
                    return;
                }
                if attempt == attempts {
                    tracing::debug!(
                        conn_id = per_conn.conn_id,
                        bytes = body.len(),
                        "push failed {attempts} times ({error}); body dropped, will be retransmitted"
                    );
                    return;
                }
                tracing::debug!(
                    conn_id = per_conn.conn_id,
                    attempt,
                    "push failed ({error}); retrying"
                );
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tunnel_proto::PacketType;

    fn data(len: usize) -> Packet {
        Packet::new(PacketType::Data, 1, Bytes::from(vec![0u8; len]))
    }

    #[test]
    fn bodies_stay_under_the_limit() {
        let packets: Vec<Packet> = (0..10).map(|_| data(76)).collect(); // 100 bytes each
        let bodies = split_bodies(&packets, 250);
        assert_eq!(
            bodies.iter().map(Bytes::len).collect::<Vec<_>>(),
            vec![200; 5]
        );
        let one = split_bodies(&[data(1000)], 250);
        assert_eq!(one.len(), 1);
        assert!(split_bodies(&[], 250).is_empty());
    }
}
