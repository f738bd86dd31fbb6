//! The connection table: every virtual connection the relay holds and every broker it knows.
//!
//! One `Table` sits behind one mutex ([`crate::state::Shared`]); its methods never block and
//! never await, so the lock is only held for map operations. A connection entry is small (no
//! task, no channel; an empty `VecDeque` does not allocate) so ten thousand idle connections
//! cost little. A held pull is a `oneshot` sender in its entry, woken when packets arrive, when
//! a newer pull supersedes it, or when the entry goes away.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::sync::{oneshot, watch};
use tunnel_proto::payload::{encode_reason, AnnouncedConn};
use tunnel_proto::{Packet, PacketType, Token};

use crate::metrics::Metrics;
use crate::sender::LinkSender;

/// Why a held pull was woken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wake {
    /// Packets were queued.
    Data,
    /// A newer pull for the same connection arrived; answer NO_OP now.
    Superseded,
    /// The relay is stopping or the entry went away.
    Closed,
}

/// A held pull: its id (to tell it from a newer one) and the way to wake it.
pub(crate) struct Waiter {
    pub(crate) id: u64,
    pub(crate) tx: oneshot::Sender<Wake>,
}

/// How often the broker's CONN_INIT_ACK is handed out again until the client shows, with its
/// first push, that it has it. CONN_INIT_ACK has no sequence number: if the response that
/// carried it is lost (a proxy dropped it after the relay answered), nothing else would ever
/// resend it and the client's connect would time out.
pub(crate) const INIT_ACK_RESEND: Duration = Duration::from_millis(500);

/// The broker accepted the connection, and the client has not confirmed it yet.
#[derive(Debug, Clone, Copy)]
struct UnconfirmedAccept {
    /// The window the broker announced in its CONN_INIT_ACK.
    window: u16,
    /// When to hand out a copy; `None` while the original is still queued.
    resend_at: Option<Instant>,
}

/// A connection that is over but still has packets for its client.
struct Ending {
    reason: Box<str>,
    forget_at: Instant,
    /// The CONN_ABORT or CONN_REJECTED that ended it. Unsequenced, so it is handed out with
    /// every answer until the entry is forgotten: if the response that carried it is lost,
    /// the client still learns why instead of getting a bare 404.
    last_word: Option<Box<Packet>>,
}

/// How long an ended connection's last word stays available after it was first handed out.
const LAST_WORD_KEPT: Duration = Duration::from_secs(5);

/// One virtual connection.
pub(crate) struct ConnEntry {
    pub(crate) server: Arc<str>,
    pub(crate) token: Token,
    client_addr: Box<str>,
    queue: VecDeque<Packet>,
    queued_bytes: usize,
    pub(crate) last_activity: Instant,
    pub(crate) inactivity_timeout: Duration,
    pub(crate) waiter: Option<Waiter>,
    bytes_up: u64,
    bytes_down: u64,
    ending: Option<Ending>,
    unconfirmed: Option<UnconfirmedAccept>,
}

impl ConnEntry {
    fn new(
        server: Arc<str>,
        token: Token,
        client_addr: &str,
        now: Instant,
        timeout: Duration,
    ) -> Self {
        ConnEntry {
            server,
            token,
            client_addr: client_addr.into(),
            queue: VecDeque::new(),
            queued_bytes: 0,
            last_activity: now,
            inactivity_timeout: timeout,
            waiter: None,
            bytes_up: 0,
            bytes_down: 0,
            ending: None,
            unconfirmed: None,
        }
    }

    pub(crate) fn wake(&mut self, why: Wake) {
        if let Some(waiter) = self.waiter.take() {
            let _ = waiter.tx.send(why);
        }
    }

    /// Whether a pull has something to take now (queued packets, a CONN_INIT_ACK due to be
    /// handed out again, or the last word of an ended connection).
    pub(crate) fn has_queued(&self, now: Instant) -> bool {
        !self.queue.is_empty()
            || self.init_ack_resend_due(now)
            || self.ending.as_ref().is_some_and(|e| e.last_word.is_some())
    }

    fn init_ack_resend_due(&self, now: Instant) -> bool {
        self.unconfirmed
            .and_then(|u| u.resend_at)
            .is_some_and(|t| now >= t)
    }

    /// When a held pull must be answered to resend the CONN_INIT_ACK, if at all.
    pub(crate) fn init_ack_resend_at(&self) -> Option<Instant> {
        self.unconfirmed.and_then(|u| u.resend_at)
    }

    /// The client pushed: it has the CONN_INIT_ACK, stop resending it.
    pub(crate) fn confirm_accepted(&mut self) {
        self.unconfirmed = None;
    }
}

/// The live link of a broker, as the table holds it.
#[derive(Clone)]
pub(crate) struct LinkHandle {
    pub(crate) id: u64,
    pub(crate) sender: LinkSender,
    /// Set to true to make the link's reader and writer stop.
    pub(crate) closed: Arc<watch::Sender<bool>>,
    /// The broker's address as the link's TCP peer (for the status page).
    pub(crate) peer: SocketAddr,
    /// When the link was authenticated.
    pub(crate) since: Instant,
}

impl LinkHandle {
    pub(crate) fn close(&self) {
        self.closed.send_replace(true);
    }
}

/// A broker name the relay knows: linked, or within its grace period after losing its link.
struct BrokerEntry {
    link: Option<LinkHandle>,
    listening: bool,
    lost_at: Option<Instant>,
    /// Connections opened to this broker, and packet bytes its clients pushed (up) and
    /// fetched (down), since the name was first linked or last forgotten after its grace.
    traffic: BrokerTraffic,
}

/// Counters of one broker name, for the status page and per-broker metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct BrokerTraffic {
    pub(crate) connections_opened: u64,
    pub(crate) bytes_up: u64,
    pub(crate) bytes_down: u64,
}

/// One broker name as the status snapshot shows it.
#[derive(Debug, Clone)]
pub(crate) struct BrokerRow {
    pub(crate) name: Arc<str>,
    /// The live link's peer and start, or `None` during the grace period.
    pub(crate) link: Option<(SocketAddr, Instant)>,
    pub(crate) listening: bool,
    pub(crate) lost_at: Option<Instant>,
    pub(crate) traffic: BrokerTraffic,
    /// Connections the table holds for this name (ending ones included).
    pub(crate) connections: u64,
}

/// What the table holds, copied in one pass under its lock.
#[derive(Debug, Clone, Default)]
pub(crate) struct TableView {
    pub(crate) brokers: Vec<BrokerRow>,
    pub(crate) connections: u64,
    /// Bytes queued for clients over all connections, and in the fullest queue.
    pub(crate) queued_bytes: u64,
    pub(crate) largest_queue_bytes: u64,
}

/// Byte bounds of a downstream queue.
#[derive(Debug, Clone, Copy)]
pub(crate) struct QueueLimits {
    pub(crate) limit: usize,
    pub(crate) control_slack: usize,
}

/// What became of a packet offered to a connection's queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admit {
    Queued,
    Dropped,
    UnknownConn,
}

/// Deadlines and bounds the sweeper applies.
pub(crate) struct SweepRules {
    pub(crate) broker_grace: Duration,
    pub(crate) ending_linger: Duration,
}

/// Whether a packet type must not be dropped on overflow: losing it would stall or confuse
/// the connection, and it is small and rare. DATA, ACK and NO_OP may be dropped (DATA is
/// retransmitted, a later ACK supersedes an earlier one).
fn is_control(kind: PacketType) -> bool {
    !matches!(kind, PacketType::Data | PacketType::Ack | PacketType::NoOp)
}

/// The connections and the brokers.
pub(crate) struct Table {
    conns: HashMap<u32, ConnEntry>,
    brokers: HashMap<Arc<str>, BrokerEntry>,
    next_id: u64,
    metrics: Arc<Metrics>,
}

impl Table {
    pub(crate) fn new(metrics: Arc<Metrics>) -> Table {
        Table {
            conns: HashMap::new(),
            brokers: HashMap::new(),
            next_id: 1,
            metrics,
        }
    }

    /// A fresh id for a link or a held pull.
    pub(crate) fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    pub(crate) fn connection_count(&self) -> usize {
        self.conns.len()
    }

    pub(crate) fn links_up(&self) -> usize {
        self.brokers.values().filter(|b| b.link.is_some()).count()
    }

    /// The live link of `server`, if any.
    pub(crate) fn link(&self, server: &str) -> Option<&LinkHandle> {
        self.brokers.get(server).and_then(|b| b.link.as_ref())
    }

    /// The live link of `server` if its broker also accepts new connections.
    pub(crate) fn listening_link(&self, server: &str) -> Option<&LinkHandle> {
        self.brokers
            .get(server)
            .filter(|b| b.listening)
            .and_then(|b| b.link.as_ref())
    }

    /// The entry `id` if it belongs to `server` and `token` matches; `None` for an unknown id
    /// and a wrong token alike (callers answer 404 to both).
    pub(crate) fn authorize(
        &mut self,
        id: u32,
        server: &str,
        token: &Token,
    ) -> Option<&mut ConnEntry> {
        let entry = self.conns.get_mut(&id)?;
        let token_ok = entry.token.ct_eq(token);
        if token_ok && &*entry.server == server {
            Some(entry)
        } else {
            None
        }
    }

    pub(crate) fn get_mut(&mut self, id: u32) -> Option<&mut ConnEntry> {
        self.conns.get_mut(&id)
    }

    /// Creates a connection with a random unused non-zero id and a random token.
    pub(crate) fn open(
        &mut self,
        server: &str,
        client_addr: &str,
        now: Instant,
        timeout: Duration,
    ) -> (u32, Token) {
        use rand::Rng;
        // ThreadRng is a CSPRNG (ChaCha, reseeded from the OS), fit for tokens.
        let mut rng = rand::rng();
        let token = Token(rng.random());
        let id = loop {
            let id: u32 = rng.random();
            if id != 0 && !self.conns.contains_key(&id) {
                break id;
            }
        };
        let server = self.server_name(server);
        if let Some(broker) = self.brokers.get_mut(&server) {
            broker.traffic.connections_opened += 1;
        }
        self.conns
            .insert(id, ConnEntry::new(server, token, client_addr, now, timeout));
        (id, token)
    }

    /// Counts `bytes` pushed by the client of `id` on its entry and its broker.
    pub(crate) fn count_up(&mut self, id: u32, bytes: usize) {
        let Some(entry) = self.conns.get_mut(&id) else {
            return;
        };
        entry.bytes_up += bytes as u64;
        if let Some(broker) = self.brokers.get_mut(&*entry.server) {
            broker.traffic.bytes_up += bytes as u64;
        }
    }

    /// Counts `bytes` handed to the client of a connection of `server`, on the broker.
    fn count_down(&mut self, server: &str, bytes: usize) {
        if let Some(broker) = self.brokers.get_mut(server) {
            broker.traffic.bytes_down += bytes as u64;
        }
    }

    /// A copy of the brokers and the queue totals. One pass over the connections with no
    /// allocation per connection: 0.5 to 0.8 ms for 20,000 in a test build on a busy machine (see
    /// the test below), and a status page or scrape is rare next to pushes and pulls.
    pub(crate) fn view(&self) -> TableView {
        let mut brokers: Vec<BrokerRow> = self
            .brokers
            .iter()
            .map(|(name, b)| BrokerRow {
                name: name.clone(),
                link: b.link.as_ref().map(|l| (l.peer, l.since)),
                listening: b.listening,
                lost_at: b.lost_at,
                traffic: b.traffic,
                connections: 0,
            })
            .collect();
        let mut view = TableView {
            connections: self.conns.len() as u64,
            ..TableView::default()
        };
        for entry in self.conns.values() {
            // Entries share their broker's name (`server_name`), so the pointer test hits.
            if let Some(row) = brokers
                .iter_mut()
                .find(|r| Arc::ptr_eq(&r.name, &entry.server) || r.name == entry.server)
            {
                row.connections += 1;
            }
            let queued = entry.queued_bytes as u64;
            view.queued_bytes += queued;
            view.largest_queue_bytes = view.largest_queue_bytes.max(queued);
        }
        brokers.sort_by(|a, b| a.name.cmp(&b.name));
        view.brokers = brokers;
        view
    }

    /// The shared copy of a broker name, so entries do not each allocate it.
    fn server_name(&self, server: &str) -> Arc<str> {
        match self.brokers.get_key_value(server) {
            Some((name, _)) => name.clone(),
            None => server.into(),
        }
    }

    /// Offers a packet from the broker to connection `id`'s queue and wakes its held pull.
    /// With `force`, the bound is ignored (used for the relay's own CONN_ABORT).
    pub(crate) fn enqueue(
        &mut self,
        id: u32,
        packet: Packet,
        limits: QueueLimits,
        force: bool,
    ) -> Admit {
        let Some(entry) = self.conns.get_mut(&id) else {
            return Admit::UnknownConn;
        };
        let len = packet.wire_len();
        let bound = if is_control(packet.kind) {
            limits.limit + limits.control_slack
        } else {
            limits.limit
        };
        if !force && entry.queued_bytes + len > bound {
            self.metrics.dropped();
            return Admit::Dropped;
        }
        if packet.kind == PacketType::ConnInitAck {
            entry.unconfirmed = Some(UnconfirmedAccept {
                window: packet.window,
                resend_at: None,
            });
        }
        entry.queued_bytes += len;
        entry.queue.push_back(packet);
        entry.wake(Wake::Data);
        Admit::Queued
    }

    /// Takes queued packets for `id`, encoded back to back, up to `limit` bytes (at least one
    /// packet if any is queued). An ended connection whose queue is now empty is forgotten.
    pub(crate) fn drain(&mut self, id: u32, limit: usize) -> Bytes {
        let Some(entry) = self.conns.get_mut(&id) else {
            return Bytes::new();
        };
        let mut out = BytesMut::new();
        let now = Instant::now();
        if entry.init_ack_resend_due(now) {
            if let Some(u) = entry.unconfirmed {
                Packet::new(PacketType::ConnInitAck, id, Bytes::new())
                    .with_window(u.window)
                    .encode(&mut out);
            }
        }
        if let Some(u) = &mut entry.unconfirmed {
            // Handed out now (the original is first in the queue, or the copy above).
            u.resend_at = Some(now + INIT_ACK_RESEND);
        }
        while let Some(front) = entry.queue.front() {
            let len = front.wire_len();
            if !out.is_empty() && out.len() + len > limit {
                break;
            }
            if let Some(packet) = entry.queue.pop_front() {
                packet.encode(&mut out);
                entry.queued_bytes -= len;
            }
        }
        if entry.queue.is_empty() {
            // Give back the memory of a burst; an idle entry should stay small.
            entry.queue = VecDeque::new();
        }
        if let (true, Some(ending)) = (entry.queue.is_empty(), &mut entry.ending) {
            match &ending.last_word {
                // Delivered (again): keep repeating it for a little while.
                Some(word) => {
                    if out.is_empty() {
                        word.encode(&mut out);
                    }
                    ending.forget_at = ending.forget_at.min(now + LAST_WORD_KEPT);
                }
                None => {
                    let reason = ending.reason.clone();
                    entry.bytes_down += out.len() as u64;
                    let server = entry.server.clone();
                    self.count_down(&server, out.len());
                    self.remove(id, &reason);
                    return out.freeze();
                }
            }
        }
        entry.bytes_down += out.len() as u64;
        let server = entry.server.clone();
        self.count_down(&server, out.len());
        out.freeze()
    }

    /// Forgets connection `id`, logging its close line and waking its held pull.
    pub(crate) fn remove(&mut self, id: u32, reason: &str) -> bool {
        let Some(mut entry) = self.conns.remove(&id) else {
            return false;
        };
        entry.wake(Wake::Closed);
        self.metrics.closed();
        tracing::info!(
            conn_id = id,
            server = %entry.server,
            client = %entry.client_addr,
            bytes_up = entry.bytes_up,
            bytes_down = entry.bytes_down,
            reason,
            "connection closed"
        );
        true
    }

    /// Ends connection `id` once its client has fetched its queue, or at `forget_at`.
    pub(crate) fn end_after_delivery(&mut self, id: u32, reason: &str, forget_at: Instant) {
        let Some(entry) = self.conns.get_mut(&id) else {
            return;
        };
        if entry.queue.is_empty() {
            self.remove(id, reason);
        } else if entry.ending.is_none() {
            entry.ending = Some(Ending {
                reason: reason.into(),
                forget_at,
                last_word: None,
            });
        }
    }

    /// Ends connection `id` with `last_word` (a CONN_ABORT or CONN_REJECTED for its client),
    /// queued after what is already there and then repeated on every answer until
    /// `forget_at`, or for `LAST_WORD_KEPT` after it was first fetched.
    pub(crate) fn end_with(
        &mut self,
        id: u32,
        last_word: Packet,
        reason: &str,
        forget_at: Instant,
    ) {
        let no_bound = QueueLimits {
            limit: 0,
            control_slack: 0,
        };
        // Past the bound: the last word must get through.
        self.enqueue(id, last_word.clone(), no_bound, true);
        let Some(entry) = self.conns.get_mut(&id) else {
            return;
        };
        if entry.ending.is_none() {
            entry.ending = Some(Ending {
                reason: reason.into(),
                forget_at,
                last_word: Some(Box::new(last_word)),
            });
        }
    }

    /// Installs an authenticated link for `name`, replacing (and returning) the previous one,
    /// and (re)installs the connections the broker announced. Returns the announced ids the
    /// relay refused (owned by another broker, id 0, or over the connection limit).
    ///
    /// Connections of `name` that the broker did not announce are aborted towards their
    /// clients: the broker restarted and forgot them, and without this an idle client would
    /// only find out at its next keepalive.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn link_up(
        &mut self,
        name: &str,
        handle: LinkHandle,
        announced: &[AnnouncedConn],
        now: Instant,
        timeout: Duration,
        max_connections: usize,
        ending_linger: Duration,
    ) -> (Option<LinkHandle>, Vec<u32>) {
        let key = self.server_name(name);
        let broker = self.brokers.entry(key.clone()).or_insert(BrokerEntry {
            link: None,
            listening: false,
            lost_at: None,
            traffic: BrokerTraffic::default(),
        });
        let old = broker.link.replace(handle);
        broker.listening = false;
        broker.lost_at = None;
        let mut refused = Vec::new();
        for conn in announced {
            let full = self.conns.len() >= max_connections;
            match self.conns.get_mut(&conn.conn_id) {
                Some(entry) if entry.server == key => {
                    // Link replaced: keep the queue. The relay's token is the one it gave out;
                    // a broker announcing another is confused, and the relay's wins.
                    if !entry.token.ct_eq(&conn.token) {
                        tracing::warn!(
                            conn_id = conn.conn_id,
                            server = name,
                            "announced token differs; keeping the relay's"
                        );
                    }
                    entry.last_activity = now;
                }
                Some(_) => refused.push(conn.conn_id),
                None if conn.conn_id == 0 || full => refused.push(conn.conn_id),
                None => {
                    let entry =
                        ConnEntry::new(key.clone(), conn.token, "(re-announced)", now, timeout);
                    self.conns.insert(conn.conn_id, entry);
                }
            }
        }
        let listed: HashSet<u32> = announced.iter().map(|c| c.conn_id).collect();
        let forgotten: Vec<u32> = self
            .conns
            .iter()
            .filter(|(id, e)| e.server == key && e.ending.is_none() && !listed.contains(id))
            .map(|(id, _)| *id)
            .collect();
        for id in forgotten {
            self.abort_to_client(
                id,
                "broker no longer knows the connection",
                now + ending_linger,
            );
        }
        (old, refused)
    }

    /// Ends connection `id` with a CONN_ABORT(reason) from the relay itself.
    fn abort_to_client(&mut self, id: u32, reason: &str, forget_at: Instant) {
        let abort = Packet::new(PacketType::ConnAbort, id, encode_reason(reason));
        self.end_with(id, abort, reason, forget_at);
    }

    /// Records LISTEN_STATE from the link `link_id` of `name`.
    pub(crate) fn set_listening(&mut self, name: &str, link_id: u64, listening: bool) {
        if let Some(broker) = self.brokers.get_mut(name) {
            if broker.link.as_ref().is_some_and(|l| l.id == link_id) {
                broker.listening = listening;
            }
        }
    }

    /// The link `link_id` of `name` is gone: start the grace period, unless a newer link has
    /// replaced it already. Returns whether it was the current link.
    pub(crate) fn link_down(&mut self, name: &str, link_id: u64, now: Instant) -> bool {
        let Some(broker) = self.brokers.get_mut(name) else {
            return false;
        };
        let current = broker.link.as_ref().is_some_and(|l| l.id == link_id);
        if !current {
            return false;
        }
        broker.link = None;
        broker.listening = false;
        broker.lost_at = Some(now);
        true
    }

    /// Whether connection `id` belongs to `server`.
    pub(crate) fn belongs_to(&self, id: u32, server: &str) -> bool {
        self.conns.get(&id).is_some_and(|e| &*e.server == server)
    }

    /// Applies every deadline: grace periods of lost links, lingering ended connections,
    /// client inactivity. Returns what to tell brokers: (link, CONN_ABORT packet).
    pub(crate) fn sweep(&mut self, now: Instant, rules: &SweepRules) -> Vec<(LinkSender, Packet)> {
        let expired_brokers: Vec<Arc<str>> = self
            .brokers
            .iter()
            .filter(|(_, b)| {
                b.link.is_none() && b.lost_at.is_some_and(|t| now >= t + rules.broker_grace)
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in &expired_brokers {
            self.brokers.remove(name);
            tracing::info!(server = %name, "broker grace period over; aborting its connections");
            let ids: Vec<u32> = self
                .conns
                .iter()
                .filter(|(_, e)| e.server == *name)
                .map(|(id, _)| *id)
                .collect();
            for id in ids {
                self.abort_to_client(id, "broker link lost", now + rules.ending_linger);
            }
        }

        let mut lingered = Vec::new();
        let mut inactive = Vec::new();
        for (id, entry) in &self.conns {
            match &entry.ending {
                Some(ending) if now >= ending.forget_at => lingered.push(*id),
                Some(_) => {}
                // A held pull counts as activity; one whose client went away does not.
                None if !matches!(&entry.waiter, Some(w) if !w.tx.is_closed())
                    && now.saturating_duration_since(entry.last_activity)
                        >= entry.inactivity_timeout =>
                {
                    inactive.push(*id)
                }
                None => {}
            }
        }
        for id in lingered {
            let reason = self
                .conns
                .get_mut(&id)
                .and_then(|e| e.ending.take())
                .map(|e| e.reason)
                .unwrap_or_else(|| "ended".into());
            self.remove(id, &format!("{reason} (queue not fetched)"));
        }
        let mut to_brokers = Vec::new();
        for id in inactive {
            if let Some(server) = self.conns.get(&id).map(|e| e.server.clone()) {
                if let Some(link) = self.link(&server) {
                    let abort =
                        Packet::new(PacketType::ConnAbort, id, encode_reason("client inactive"));
                    to_brokers.push((link.sender.clone(), abort));
                }
                self.remove(id, "client inactive");
            }
        }
        to_brokers
    }

    /// Wakes every held pull (graceful stop).
    pub(crate) fn wake_all(&mut self) {
        for entry in self.conns.values_mut() {
            entry.wake(Wake::Closed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idle_entry_is_small() {
        // The relay must hold 10,000 idle connections at < 32 KiB each; the entry itself
        // (no queued packets, no held pull) is a few hundred bytes.
        assert!(
            std::mem::size_of::<ConnEntry>() <= 256,
            "{}",
            std::mem::size_of::<ConnEntry>()
        );
    }

    fn link(table: &mut Table, name: &str) -> LinkHandle {
        let handle = LinkHandle {
            id: table.next_id(),
            sender: crate::sender::channel(1 << 20).0,
            closed: Arc::new(watch::channel(false).0),
            peer: "127.0.0.1:9".parse().unwrap(),
            since: Instant::now(),
        };
        let out = table.link_up(
            name,
            handle.clone(),
            &[],
            Instant::now(),
            Duration::from_secs(60),
            usize::MAX,
            Duration::from_secs(30),
        );
        assert!(out.0.is_none() && out.1.is_empty());
        handle
    }

    #[test]
    fn the_view_counts_connections_and_traffic_per_broker() {
        let mut table = Table::new(Arc::new(Metrics::default()));
        let _a = link(&mut table, "a");
        let _b = link(&mut table, "b");
        let now = Instant::now();
        let timeout = Duration::from_secs(60);
        let ids: Vec<u32> = (0..20_000)
            .map(|i| {
                table
                    .open(if i % 4 == 0 { "b" } else { "a" }, "c", now, timeout)
                    .0
            })
            .collect();
        table.count_up(ids[0], 100);
        let data = Packet::new(PacketType::Data, ids[1], Bytes::from(vec![0; 1000]));
        let limits = QueueLimits {
            limit: 1 << 20,
            control_slack: 0,
        };
        table.enqueue(ids[1], data, limits, false);
        // Not b's current link: no effect.
        assert!(!table.link_down("b", u64::MAX, now));

        let started = Instant::now();
        let view = table.view();
        let took = started.elapsed();
        // The figure behind `view`'s comment; printed with --nocapture.
        eprintln!("Table::view over 20,000 connections: {took:?}");
        assert_eq!(view.connections, 20_000);
        assert_eq!(view.queued_bytes, 1024);
        assert_eq!(view.largest_queue_bytes, 1024);
        let names: Vec<&str> = view.brokers.iter().map(|b| &*b.name).collect();
        assert_eq!(names, ["a", "b"]);
        let (a, b) = (&view.brokers[0], &view.brokers[1]);
        assert_eq!(
            (a.connections, a.traffic.connections_opened),
            (15_000, 15_000)
        );
        assert_eq!(
            (b.connections, b.traffic.connections_opened),
            (5_000, 5_000)
        );
        // ids[0] went to "b" (i = 0), ids[1] to "a".
        assert_eq!(b.traffic.bytes_up, 100);
        assert!(a.link.is_some() && b.link.is_some());

        let out = table.drain(ids[1], 1 << 20);
        assert_eq!(out.len(), 1024);
        table.remove(ids[0], "test");
        let view = table.view();
        assert_eq!(view.brokers[0].traffic.bytes_down, 1024);
        assert_eq!(view.brokers[1].connections, 4_999);
        assert_eq!(view.brokers[1].traffic.connections_opened, 5_000);
        assert_eq!(view.queued_bytes, 0);
    }

    #[test]
    fn overflow_drops_data_but_keeps_control_within_slack() {
        let metrics = Arc::new(Metrics::default());
        let mut table = Table::new(metrics.clone());
        let (id, _) = table.open("s", "addr", Instant::now(), Duration::from_secs(60));
        let limits = QueueLimits {
            limit: 100,
            control_slack: 100,
        };
        let data = |n| Packet::new(PacketType::Data, id, Bytes::from(vec![0; n]));
        assert_eq!(table.enqueue(id, data(50), limits, false), Admit::Queued);
        assert_eq!(table.enqueue(id, data(50), limits, false), Admit::Dropped);
        let abort = Packet::new(PacketType::ConnAbort, id, Bytes::new());
        assert_eq!(table.enqueue(id, abort, limits, false), Admit::Queued);
        assert_eq!(table.enqueue(7, data(1), limits, false), Admit::UnknownConn);
        assert_eq!(metrics.snapshot(0, 0).packets_dropped, 1);
        let out = table.drain(id, 1 << 20);
        assert_eq!(out.len(), 24 + 50 + 24);
    }
}
