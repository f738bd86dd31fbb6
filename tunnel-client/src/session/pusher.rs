//! The session's pusher: one task that turns the outbox into batches across connections, up
//! to `max_push_body` each, and puts the ATTACHes a new session needs in front of them. A
//! batch goes down the session's streamed upstream when one is open
//! ([`super::upstream`]), else in a push request, at most `max_pushes_in_flight` at once.

use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tunnel_proto::backoff::Backoff;
use tunnel_proto::connection::StreamError;
use tunnel_proto::driver::PacketSink;
use tunnel_proto::payload::Attach;
use tunnel_proto::warn_limit::WarningLimit;
use tunnel_proto::{Packet, PacketParts, PacketType};

use super::upstream::{Upstream, UpstreamSlot};
use super::ClientSession;
use crate::body::PartsBody;
use crate::http::{Failure, SessionKey};

/// Longest the pusher sleeps with nothing to do before it checks whether its session is
/// still alive (it holds no strong reference while it waits).
const IDLE_CHECK: Duration = Duration::from_secs(1);

/// At most one "push failed" warning per interval for the whole process.
static RETRY_WARNINGS: WarningLimit = WarningLimit::new(Duration::from_secs(10));

/// The [`PacketSink`] of a connection in a session: its packets go to the session's outbox.
pub(crate) struct SessionSink {
    pub(super) session: Arc<ClientSession>,
}

impl PacketSink for SessionSink {
    fn send(
        &self,
        packets: Vec<Packet>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            let session = &self.session;
            session.outbox.put(packets).await;
            // A free slot (in the upstream, or for a push) and a session: send from here, one
            // task switch sooner than the pusher would (this is the latency of an interactive
            // connection). Otherwise, or if packets are left, the pusher takes over.
            let mut attaches_pending = false;
            if let Some(key) = session.current() {
                if let Some(slot) = Slot::try_take(session, &key) {
                    let (body, attach_at) = build_body(session, &key);
                    attaches_pending = attach_at.is_some();
                    slot.send(session, key, body);
                }
            }
            // The pusher also keeps the clock of unanswered ATTACHes.
            if attaches_pending || !session.outbox.is_empty() {
                session.pusher_wake.notify_one();
            }
        })
    }
}

/// Runs while the session exists.
pub(super) async fn run(session: Weak<ClientSession>, wake: Arc<Notify>, slots: Arc<Semaphore>) {
    let mut next_attach: Option<Instant> = None;
    let mut open_backoff: Option<Backoff> = None;
    loop {
        let has_work = match session.upgrade() {
            None => return,
            Some(s) => !s.outbox.is_empty() || next_attach.is_some_and(|t| Instant::now() >= t),
        };
        if !has_work {
            let sleep_until = next_attach.unwrap_or_else(|| Instant::now() + IDLE_CHECK);
            tokio::select! {
                _ = wake.notified() => {}
                _ = tokio::time::sleep_until(sleep_until) => {}
            }
            // Re-check for attaches after a wake (a new session may have opened).
            if next_attach.is_none() {
                next_attach = Some(Instant::now());
            }
            continue;
        }
        let Some(strong) = session.upgrade() else {
            return;
        };
        let key = match strong.key().await {
            Ok(key) => {
                open_backoff = None;
                key
            }
            Err(error) => {
                let session = strong;
                session.note_failure(&error, "opening a session for a push");
                let config = &session.config;
                let delay = open_backoff
                    .get_or_insert_with(|| Backoff::new(config.retry_initial, config.retry_max))
                    .next_delay();
                drop(session);
                tokio::time::sleep(delay).await;
                continue;
            }
        };
        // Wait for a slot without keeping the session alive.
        strong.want_upstream(&key);
        let upstream = strong.upstream.waiting_slot(&key);
        drop(strong);
        let slot = match upstream {
            Some(waiting) => match waiting.wait().await {
                Some(slot) => Slot::Upstream(slot),
                // The upstream ended meanwhile: look again.
                None => continue,
            },
            None => tokio::select! {
                permit = slots.clone().acquire_owned() => match permit {
                    Ok(permit) => Slot::Push(permit),
                    Err(_) => return,
                },
                // An upstream opened meanwhile (it wakes the pusher; it may hold the last push
                // slot), or more packets came: look again.
                _ = wake.notified() => continue,
            },
        };
        let Some(session) = session.upgrade() else {
            return;
        };
        let (body, attach_at) = build_body(&session, &key);
        next_attach = attach_at;
        slot.send(&session, key, body);
    }
}

/// Where the next batch goes: the open streamed upstream, or a push request.
enum Slot {
    Upstream(UpstreamSlot),
    Push(OwnedSemaphorePermit),
}

impl Slot {
    /// A slot free now: in the session's open upstream if it has one (and room), else for a
    /// push. Asks for an upstream if the session should have one.
    fn try_take(session: &Arc<ClientSession>, key: &Arc<SessionKey>) -> Option<Slot> {
        session.want_upstream(key);
        if session.upstream.current() == Upstream::Streaming {
            return session.upstream.try_slot(key).map(Slot::Upstream);
        }
        session
            .push_slots
            .clone()
            .try_acquire_owned()
            .ok()
            .map(Slot::Push)
    }

    /// Sends `body` (nothing if it is empty).
    fn send(self, session: &Arc<ClientSession>, key: Arc<SessionKey>, body: PartsBody) {
        if body.is_empty() {
            return;
        }
        match self {
            Slot::Upstream(slot) => slot.send(body),
            Slot::Push(permit) => {
                tokio::spawn(push(session.clone(), key, body, permit));
            }
        }
    }
}

/// The next push body: due ATTACHes first, then queued packets of connections that may be
/// sent in this session. Also when the next ATTACH falls due.
fn build_body(session: &ClientSession, key: &SessionKey) -> (PartsBody, Option<Instant>) {
    let max = session.config.max_push_body;
    let mut out = PacketParts::new();
    let now = Instant::now();
    // An ATTACH takes at most 24 + 16 + 2 + 255 bytes; half a body is plenty for a batch.
    let max_attaches = (max / 2 / 300).max(1);
    let (attaches, next_attach) =
        session
            .lock_registry()
            .attaches_due(key.generation, max_attaches, now);
    for (conn_id, token, server) in attaches {
        let payload = Attach {
            token,
            server: server.to_string(),
        }
        .encode();
        out.push(&Packet::new(PacketType::Attach, conn_id, payload));
    }
    let packets = session.outbox.take(max.saturating_sub(out.len()).max(1));
    if !packets.is_empty() {
        let registry = session.lock_registry();
        let mut held_back = 0usize;
        for packet in packets {
            if registry.may_send(packet.conn_id, key.generation) {
                out.push(&packet);
            } else {
                // Not attached to this session yet: the relay would answer "unknown
                // connection". Dropped; the connection retransmits what matters.
                held_back += 1;
            }
        }
        if held_back > 0 {
            tracing::debug!(
                packets = held_back,
                "packets of connections not yet re-attached dropped"
            );
        }
    }
    (PartsBody::new(out.into_parts()), next_attach)
}

/// One push request with its retries.
async fn push(
    session: Arc<ClientSession>,
    key: Arc<SessionKey>,
    body: PartsBody,
    _permit: OwnedSemaphorePermit,
) {
    let config = &session.config;
    let mut backoff = Backoff::new(config.retry_initial, config.retry_max);
    let attempts = config.push_attempts.max(1);
    for attempt in 1..=attempts {
        let error = match session.relay.session_push(&key, body.clone()).await {
            Ok(packets) => {
                session.request_succeeded();
                session.dispatch(packets, key.generation);
                return;
            }
            Err(e) => e,
        };
        match error.failure() {
            Failure::Gone => {
                session.forget(&key, "push");
                // The ATTACHes and packets in the body are lost: a new session re-attaches,
                // and the connections retransmit.
                session.pusher_wake.notify_one();
                return;
            }
            Failure::Permanent => {
                tracing::error!(
                    session = key.id,
                    bytes = body.len(),
                    "push refused: {error}; body dropped"
                );
                return;
            }
            Failure::Transient => {
                if let Some(after) = session.request_failed() {
                    tracing::error!(session = key.id,
                        "requests failing for {after:?} ({error}); giving up on the connections of the session");
                    session.fail_all(StreamError::TimedOut(after));
                    return;
                }
                if attempt == attempts {
                    tracing::debug!(
                        session = key.id,
                        bytes = body.len(),
                        "push failed {attempts} times ({error}); body dropped, will be retransmitted"
                    );
                    return;
                }
                tunnel_proto::warn_limited!(
                    RETRY_WARNINGS,
                    session = key.id,
                    "push failed ({error}); retrying"
                );
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    }
}
