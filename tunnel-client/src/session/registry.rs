//! The connections of a session and where the relay's packets for each go: to the waiting
//! connect while the connection opens, to its driver once it runs.

use std::collections::HashMap;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;
use tunnel_proto::driver::ConnHandle;
use tunnel_proto::payload::decode_reason;
use tunnel_proto::{Packet, PacketType, Token};

/// Packets kept for a connection whose driver does not run yet (after CONN_INIT_ACK, before
/// the connect task starts it). The broker sends at most our window (16 packets by default)
/// before it hears from us; more is dropped and retransmitted.
const MAX_EARLY_PACKETS: usize = 256;

/// Connections whose packets arrived before their connect answer was registered: the broker's
/// CONN_INIT_ACK can overtake the relay's answer to the connect request. Bounded in count and
/// kept briefly; a lost CONN_INIT_ACK is handed out again by the relay anyway.
const MAX_ORPHANS: usize = 1024;
const MAX_ORPHAN_PACKETS: usize = 64;
const ORPHAN_KEPT: Duration = Duration::from_secs(10);

/// How often an unanswered ATTACH is sent again (the relay answers nothing while it cannot
/// tell yet, docs/protocol.md §2.1).
pub(super) const ATTACH_RESEND: Duration = Duration::from_millis(200);

/// The broker's answer to a connection being opened.
#[derive(Debug)]
pub(super) enum Handshake {
    /// CONN_INIT_ACK with the broker's first window.
    Accepted { window: u16 },
    /// CONN_REJECTED with the broker's reason.
    Rejected(String),
    /// CONN_ABORT (from the broker or the relay) with its reason.
    Aborted(String),
}

enum State {
    /// Waiting for the broker's answer; packets after CONN_INIT_ACK are kept in `early`.
    Opening {
        answer: Option<oneshot::Sender<Handshake>>,
        early: Vec<Packet>,
    },
    Live(ConnHandle),
}

struct Entry {
    token: Token,
    server: std::sync::Arc<str>,
    /// The newest session generation the connection is attached to.
    attached: u64,
    /// When an ATTACH for it was last sent.
    attach_sent: Option<Instant>,
    state: State,
}

/// The connections of a session by id.
#[derive(Default)]
pub(super) struct Registry {
    conns: HashMap<u32, Entry>,
    orphans: HashMap<u32, (Instant, Vec<Packet>)>,
    /// The session generation some connection may need an ATTACH to (0: none): set when a
    /// new session opens, cleared when a scan for that generation (or a newer one) finds none
    /// due or unanswered, so the common case costs no scan. A scan for an older generation (a
    /// push built with the key of a session that was just replaced) neither sends ATTACHes
    /// nor clears it: that would leave the connections unattached to the new session for
    /// good.
    attach_pending_for: u64,
}

/// What [`Registry::route`] leaves to do outside the lock.
#[derive(Default)]
pub(super) struct Routed {
    /// Packets for running drivers, by connection.
    pub(super) deliveries: Vec<(ConnHandle, Vec<Packet>)>,
    /// Running connections just attached to a new session: what they sent meanwhile was
    /// dropped, so they retransmit at once.
    pub(super) attached: Vec<ConnHandle>,
}

/// One ATTACH to send: connection id, token, server name.
pub(super) type AttachRequest = (u32, Token, std::sync::Arc<str>);

impl Registry {
    pub(super) fn len(&self) -> usize {
        self.conns.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// Registers a connection the relay just opened in session `generation`; the receiver
    /// gets the broker's answer. Packets that arrived for it before are applied now.
    pub(super) fn register(
        &mut self,
        conn_id: u32,
        token: Token,
        server: std::sync::Arc<str>,
        generation: u64,
        current_generation: u64,
    ) -> oneshot::Receiver<Handshake> {
        let (tx, rx) = oneshot::channel();
        let mut entry = Entry {
            token,
            server,
            attached: generation,
            attach_sent: None,
            state: State::Opening {
                answer: Some(tx),
                early: Vec::new(),
            },
        };
        if generation < current_generation {
            self.attach_pending_for = self.attach_pending_for.max(current_generation);
        }
        if let Some((_, packets)) = self.orphans.remove(&conn_id) {
            for packet in packets {
                // Not live yet: nothing to deliver to a driver.
                let _ = apply(&mut entry, packet, generation);
            }
        }
        self.conns.insert(conn_id, entry);
        rx
    }

    /// The connect task started the connection's driver: packets kept for it are returned
    /// to be delivered.
    pub(super) fn go_live(&mut self, conn_id: u32, handle: ConnHandle) -> Vec<Packet> {
        let Some(entry) = self.conns.get_mut(&conn_id) else {
            return Vec::new();
        };
        match std::mem::replace(&mut entry.state, State::Live(handle)) {
            State::Opening { early, .. } => early,
            State::Live(_) => Vec::new(),
        }
    }

    pub(super) fn remove(&mut self, conn_id: u32) {
        self.conns.remove(&conn_id);
    }

    /// Whether packets of `conn_id` may go out in a push of session `generation`: not while
    /// the connection waits to be attached to it. Unknown ids pass (a last CONN_ABORT).
    pub(super) fn may_send(&self, conn_id: u32, generation: u64) -> bool {
        self.conns
            .get(&conn_id)
            .is_none_or(|e| e.attached >= generation)
    }

    /// Session `generation` was opened: every connection must be attached to it.
    pub(super) fn note_new_session(&mut self, generation: u64) -> usize {
        if !self.conns.is_empty() {
            self.attach_pending_for = self.attach_pending_for.max(generation);
        }
        for entry in self.conns.values_mut() {
            entry.attach_sent = None;
        }
        self.conns.len()
    }

    /// The ATTACHes due for session `generation`, at most `max` (marked as sent now), and
    /// when the next one falls due if some wait for an answer.
    pub(super) fn attaches_due(
        &mut self,
        generation: u64,
        max: usize,
        now: Instant,
    ) -> (Vec<AttachRequest>, Option<Instant>) {
        if self.attach_pending_for == 0 || generation < self.attach_pending_for {
            return (Vec::new(), None);
        }
        let mut due = Vec::new();
        let mut next: Option<Instant> = None;
        for (id, entry) in &mut self.conns {
            if entry.attached >= generation {
                continue;
            }
            match entry.attach_sent {
                Some(sent) if now < sent + ATTACH_RESEND => {
                    let at = sent + ATTACH_RESEND;
                    next = Some(next.map_or(at, |n| n.min(at)));
                }
                _ if due.len() < max => {
                    entry.attach_sent = Some(now);
                    due.push((*id, entry.token, entry.server.clone()));
                    let at = now + ATTACH_RESEND;
                    next = Some(next.map_or(at, |n| n.min(at)));
                }
                // More are due than fit: the next push takes them.
                _ => next = Some(now),
            }
        }
        if due.is_empty() && next.is_none() {
            self.attach_pending_for = 0;
        }
        (due, next)
    }

    /// Handles of the running connections.
    pub(super) fn live_handles(&self) -> Vec<ConnHandle> {
        self.conns
            .values()
            .filter_map(|e| match &e.state {
                State::Live(h) => Some(h.clone()),
                State::Opening { .. } => None,
            })
            .collect()
    }

    /// Empties the registry: the handles of the running connections are returned (to be
    /// failed); connects still waiting see their answer channel close.
    pub(super) fn take_all(&mut self) -> Vec<ConnHandle> {
        let handles = self.live_handles();
        self.conns.clear();
        self.orphans.clear();
        handles
    }

    /// Sorts the packets of one answer by connection: what goes to running drivers is
    /// returned (to be delivered outside the lock), the rest is applied here.
    pub(super) fn route(&mut self, packets: Vec<Packet>, generation: u64) -> Routed {
        let now = Instant::now();
        let mut routed = Routed::default();
        let deliveries = &mut routed.deliveries;
        for packet in packets {
            if packet.kind == PacketType::NoOp {
                continue;
            }
            let conn_id = packet.conn_id;
            let Some(entry) = self.conns.get_mut(&conn_id) else {
                self.keep_orphan(packet, now);
                continue;
            };
            if packet.kind == PacketType::Attach {
                if let State::Live(handle) = &entry.state {
                    routed.attached.push(handle.clone());
                }
            }
            if let Some(packet) = apply(entry, packet, generation) {
                if let State::Live(handle) = &entry.state {
                    match deliveries.last_mut() {
                        Some((h, list)) if h.conn_id() == conn_id => list.push(packet),
                        _ => deliveries.push((handle.clone(), vec![packet])),
                    }
                }
            }
        }
        routed
    }

    fn keep_orphan(&mut self, packet: Packet, now: Instant) {
        self.orphans.retain(|_, (at, _)| now < *at + ORPHAN_KEPT);
        if self.orphans.len() >= MAX_ORPHANS && !self.orphans.contains_key(&packet.conn_id) {
            tracing::debug!(
                conn_id = packet.conn_id,
                "packet for an unknown connection dropped"
            );
            return;
        }
        let (_, list) = self
            .orphans
            .entry(packet.conn_id)
            .or_insert_with(|| (now, Vec::new()));
        if list.len() < MAX_ORPHAN_PACKETS {
            list.push(packet);
        }
    }
}

/// Applies one packet to a connection's entry; returns it if it is for the running driver.
fn apply(entry: &mut Entry, packet: Packet, generation: u64) -> Option<Packet> {
    if packet.kind == PacketType::Attach {
        entry.attached = entry.attached.max(generation);
        return None;
    }
    match &mut entry.state {
        State::Live(_) => Some(packet),
        State::Opening { answer, early } => {
            let outcome = match packet.kind {
                PacketType::ConnInitAck => Handshake::Accepted {
                    window: packet.window,
                },
                PacketType::ConnRejected => Handshake::Rejected(decode_reason(&packet.payload)),
                PacketType::ConnAbort => Handshake::Aborted(decode_reason(&packet.payload)),
                _ => {
                    // After CONN_INIT_ACK: the connection's first packets, kept for its driver.
                    if answer.is_none() && early.len() < MAX_EARLY_PACKETS {
                        early.push(packet);
                    }
                    return None;
                }
            };
            match answer.take() {
                Some(tx) => {
                    let _ = tx.send(outcome);
                }
                // Already answered: a CONN_ABORT after CONN_INIT_ACK is for the driver; a
                // repeated CONN_INIT_ACK is harmless.
                None if early.len() < MAX_EARLY_PACKETS => early.push(packet),
                None => {}
            }
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn token() -> Token {
        Token([7; 16])
    }

    fn packet(kind: PacketType, conn_id: u32) -> Packet {
        Packet::new(kind, conn_id, Bytes::new())
    }

    #[tokio::test]
    async fn the_broker_answer_reaches_the_connect_even_before_registration() {
        let mut registry = Registry::default();
        // CONN_INIT_ACK and a first DATA overtake the connect answer.
        let early = registry.route(
            vec![
                packet(PacketType::ConnInitAck, 5).with_window(9),
                packet(PacketType::Data, 5),
            ],
            1,
        );
        assert!(early.deliveries.is_empty());
        let rx = registry.register(5, token(), "echo".into(), 1, 1);
        match rx.await.unwrap() {
            Handshake::Accepted { window } => assert_eq!(window, 9),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn attaches_are_due_once_per_resend_interval_until_confirmed() {
        let mut registry = Registry::default();
        let _rx = registry.register(1, token(), "echo".into(), 1, 1);
        let _rx = registry.register(2, token(), "echo".into(), 1, 1);
        let now = Instant::now();
        assert!(
            registry.attaches_due(2, 10, now).0.is_empty(),
            "no new session yet"
        );
        registry.note_new_session(2);
        assert!(!registry.may_send(1, 2));
        let (due, next) = registry.attaches_due(2, 10, now);
        assert_eq!(due.len(), 2);
        assert_eq!(next, Some(now + ATTACH_RESEND));
        assert!(registry.attaches_due(2, 10, now).0.is_empty(), "just sent");
        // Connection 1 is confirmed; 2 is sent again after the interval.
        registry.route(vec![packet(PacketType::Attach, 1)], 2);
        assert!(registry.may_send(1, 2));
        let (due, _) = registry.attaches_due(2, 10, now + ATTACH_RESEND);
        assert_eq!(due.iter().map(|d| d.0).collect::<Vec<_>>(), vec![2]);
        registry.route(vec![packet(PacketType::Attach, 2)], 2);
        let (due, next) = registry.attaches_due(2, 10, now + ATTACH_RESEND * 2);
        assert!(due.is_empty() && next.is_none());
    }

    #[test]
    fn a_push_built_for_the_replaced_session_leaves_the_attaches_due() {
        // The pusher took session 1's key, then session 2 opened before it built its body.
        let mut registry = Registry::default();
        let _rx = registry.register(1, token(), "echo".into(), 1, 1);
        registry.note_new_session(2);
        let now = Instant::now();
        assert_eq!(registry.attaches_due(1, 10, now), (Vec::new(), None));
        let (due, next) = registry.attaches_due(2, 10, now);
        assert_eq!(due.iter().map(|d| d.0).collect::<Vec<_>>(), vec![1]);
        assert_eq!(next, Some(now + ATTACH_RESEND));
    }

    #[test]
    fn orphans_are_bounded() {
        let mut registry = Registry::default();
        let many: Vec<Packet> = (1..=(MAX_ORPHANS as u32 + 100))
            .map(|id| packet(PacketType::Data, id))
            .collect();
        registry.route(many, 1);
        assert_eq!(registry.orphans.len(), MAX_ORPHANS);
        let same: Vec<Packet> = (0..200).map(|_| packet(PacketType::Data, 1)).collect();
        registry.route(same, 1);
        assert_eq!(registry.orphans[&1].1.len(), MAX_ORPHAN_PACKETS);
    }
}
