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

use bytes::Bytes;
use tokio::sync::{oneshot, watch};
use tunnel_proto::codec::PacketParts;
use tunnel_proto::payload::{
    encode_reason, AnnouncedConn, Attach, BrokerConnInit, Capacity, ConnOption, InstanceId,
    ListenMode, ListenState, MoveAnswer, MoveRequest,
};
use tunnel_proto::{Packet, PacketType, Token};

use crate::config::RelayConfig;
use crate::metrics::Metrics;
use crate::moves::{draw_id, MoveStep, PendingMoves};
use crate::sender::LinkSender;
use crate::session::{AttachOutcome, Session, VISIT_LIMIT};

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

/// Where an unanswered connect stands: the broker instances that were offered it, so a
/// refusal can be punted to another (docs/protocol.md §5.1). Dropped once an instance
/// answers CONN_INIT_ACK.
struct Pending {
    /// The client's window from its CONN_INIT, to offer the connection again.
    window: u16,
    /// Instances offered the connection so far, the current one last.
    tried: Vec<InstanceId>,
}

/// A packet queued for a client. One that came from the broker's link and goes on unchanged
/// keeps the bytes it came in (`wire`): they are written out as they are, where encoding it
/// again would compute its checksum a second time (a pass over every byte of a download).
pub(crate) struct Queued {
    packet: Packet,
    wire: Option<Bytes>,
}

impl Queued {
    /// `packet`, decoded from `wire` (its whole encoding, as
    /// `Decoder::next_packet_and_wire` hands it out).
    pub(crate) fn forwarded(packet: Packet, wire: Bytes) -> Queued {
        debug_assert_eq!(wire.len(), packet.wire_len());
        Queued {
            packet,
            wire: Some(wire),
        }
    }

    /// Appends the packet to an answer: the bytes it came in if it was forwarded (a long
    /// one is referenced, not copied), else its encoding.
    fn encode(self, out: &mut PacketParts) {
        match self.wire {
            Some(wire) => out.push_encoded(wire),
            None => out.push(&self.packet),
        }
    }
}

impl From<Packet> for Queued {
    fn from(packet: Packet) -> Queued {
        Queued { packet, wire: None }
    }
}

/// One virtual connection.
pub(crate) struct ConnEntry {
    pub(crate) server: Arc<str>,
    /// The instance of `server` the connection is placed on.
    pub(crate) instance: InstanceId,
    /// Set until the instance accepts the connection.
    pending: Option<Box<Pending>>,
    /// The affinity key the client gave, if any.
    affinity: Option<Box<str>>,
    pub(crate) token: Token,
    client_addr: Box<str>,
    queue: VecDeque<Queued>,
    queued_bytes: usize,
    pub(crate) last_activity: Instant,
    pub(crate) inactivity_timeout: Duration,
    pub(crate) waiter: Option<Waiter>,
    bytes_up: u64,
    bytes_down: u64,
    ending: Option<Ending>,
    unconfirmed: Option<UnconfirmedAccept>,
    /// Which CONN_CLOSEs passed through, and whether the connection still takes a place in
    /// its instance's capacity (see [`Table::note_close`]).
    closes: Closes,
    /// The session the connection belongs to (docs/protocol.md §2.1), if any: then only that
    /// session's requests push and pull it, and its packets wake the session's pull.
    pub(crate) session: Option<u32>,
    /// Whether it is on its session's ready list.
    ready: bool,
}

/// The two half-closes of a connection as the relay saw them pass.
#[derive(Debug, Clone, Copy, Default)]
struct Closes {
    from_client: bool,
    from_broker: bool,
    /// Both were seen: the connection no longer counts in its instance's `held`.
    released: bool,
}

impl ConnEntry {
    fn new(
        server: Arc<str>,
        instance: InstanceId,
        token: Token,
        client_addr: &str,
        now: Instant,
        timeout: Duration,
    ) -> Self {
        ConnEntry {
            server,
            instance,
            pending: None,
            affinity: None,
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
            closes: Closes::default(),
            session: None,
            ready: false,
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

/// A broker name the relay knows: the pool of its instances (docs/protocol.md §5.1).
struct BrokerEntry {
    instances: HashMap<InstanceId, Instance>,
    /// When an instance of the name was last linked; connects within the name grace after it
    /// get 503 instead of 404.
    last_seen: Instant,
    /// Turns taken among instances that tie for a placement.
    next_turn: u64,
}

/// One broker instance of a name: linked, or within its grace period after losing its link.
struct Instance {
    link: Option<LinkHandle>,
    mode: ListenMode,
    /// What the instance last reported (`max_connections` 0: not limited or not known).
    capacity: Capacity,
    lost_at: Option<Instant>,
    /// Whether its link understands CONN_MOVE (docs/protocol.md §5.2).
    moves: bool,
    /// Connections the table holds on this instance, less those closed both ways; the
    /// relay's own count, so a placement sees the one before it at once.
    held: u32,
    traffic: BrokerTraffic,
}

impl Instance {
    fn new() -> Instance {
        Instance {
            link: None,
            mode: ListenMode::NotAccepting,
            capacity: Capacity::default(),
            lost_at: None,
            moves: false,
            held: 0,
            traffic: BrokerTraffic::default(),
        }
    }

    /// Whether a new connection may be placed here now.
    fn takes_new(&self) -> bool {
        self.link.is_some() && self.mode == ListenMode::Accepting && !self.is_full()
    }

    fn is_full(&self) -> bool {
        let max = self.capacity.max_connections;
        max != 0 && self.held >= max
    }

    /// Capacity for the placement rule; "not limited" counts as u32::MAX.
    fn effective_max(&self) -> u64 {
        match self.capacity.max_connections {
            0 => u64::from(u32::MAX),
            max => u64::from(max),
        }
    }

    fn unused(&self) -> u64 {
        self.effective_max().saturating_sub(u64::from(self.held))
    }
}

/// Counters of one broker instance, for the status page and per-instance metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct BrokerTraffic {
    pub(crate) connections_opened: u64,
    pub(crate) bytes_up: u64,
    pub(crate) bytes_down: u64,
    /// Connections placed on the instance (punted ones included).
    pub(crate) placements: u64,
    /// Connections the instance refused (or lost with its link) before accepting them, which
    /// the relay offered to another instance.
    pub(crate) punts: u64,
}

/// One broker instance as the status snapshot shows it.
#[derive(Debug, Clone)]
pub(crate) struct BrokerRow {
    pub(crate) name: Arc<str>,
    pub(crate) instance: InstanceId,
    /// The live link's peer and start, or `None` during the grace period.
    pub(crate) link: Option<(SocketAddr, Instant)>,
    pub(crate) listening: bool,
    pub(crate) mode: ListenMode,
    pub(crate) capacity: Capacity,
    pub(crate) lost_at: Option<Instant>,
    pub(crate) traffic: BrokerTraffic,
    /// Connections the table holds on this instance (ending ones included).
    pub(crate) connections: u64,
}

/// Why a connect could not be placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NoPlace {
    /// The name is known (or may be: the relay just started) but no instance takes it now:
    /// all draining, full, or re-linking. 503 with `Retry-After`.
    Retry,
    /// No instance of that name is listening, and none was seen within the name grace: 404.
    Gone,
}

/// What a new link says about itself (LINK_INIT and its pool extension).
#[derive(Debug, Clone, Copy)]
pub(crate) struct LinkInfo {
    pub(crate) instance: InstanceId,
    pub(crate) state: ListenState,
    /// The broker understands CONN_MOVE (the features byte of its LINK_INIT).
    pub(crate) moves: bool,
}

/// A CONN_INIT to send on a link (a punt to another instance).
pub(crate) type Offer = (LinkSender, Packet);

/// What the table holds, copied in one pass under its lock.
#[derive(Debug, Clone, Default)]
pub(crate) struct TableView {
    pub(crate) brokers: Vec<BrokerRow>,
    pub(crate) connections: u64,
    pub(crate) sessions: u64,
    /// Bytes queued for clients over all connections, and in the fullest queue.
    pub(crate) queued_bytes: u64,
    pub(crate) largest_queue_bytes: u64,
}

/// Byte bounds of a downstream queue.
#[derive(Debug, Clone, Copy)]
pub(crate) struct QueueLimits {
    pub(crate) limit: usize,
    pub(crate) control_slack: usize,
    /// Bytes all the connections of one session may hold together (control packets get
    /// `control_slack` beyond it too).
    pub(crate) session_limit: usize,
}

impl QueueLimits {
    /// The bounds a relay run with `config` applies.
    pub(crate) fn of(config: &RelayConfig) -> QueueLimits {
        QueueLimits {
            limit: config.queue_limit,
            control_slack: config.queue_control_slack,
            session_limit: config.max_session_queue,
        }
    }

    /// For packets enqueued with `force`: the limits are not looked at.
    const FORCED: QueueLimits = QueueLimits {
        limit: 0,
        control_slack: 0,
        session_limit: 0,
    };
}

/// The bounds an ATTACH and a move are checked against.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AttachLimits {
    /// Most connections in one session (`--max-session-connections`).
    pub(crate) session_connections: usize,
    /// Most connections the relay holds (`--max-connections`); a connection moved here
    /// beyond it is refused.
    pub(crate) connections: usize,
    /// Most moves under way at once; an ATTACH beyond waits for the next one.
    pub(crate) pending_moves: usize,
}

/// What the relay sends a broker for a connection moved to it that it cannot take.
fn refused_move(id: u32) -> Packet {
    Packet::new(
        PacketType::ConnAbort,
        id,
        encode_reason("connection refused by relay"),
    )
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
    pub(crate) name_grace: Duration,
}

/// Whether a packet type must not be dropped on overflow: losing it would stall or confuse
/// the connection, and it is small and rare. DATA, ACK and NO_OP may be dropped (DATA is
/// retransmitted, a later ACK supersedes an earlier one).
fn is_control(kind: PacketType) -> bool {
    !matches!(kind, PacketType::Data | PacketType::Ack | PacketType::NoOp)
}

/// Queues an ACK ahead of its connection's queued DATA, in place of the ACK queued before it
/// at `old_ack` if there is one (`queued_ack`): the queue holds at most one ACK, before all
/// DATA.
///
/// An ACK is about the other direction: it owes nothing to the DATA queued beside it, and
/// the sender on the other side waits for it. Behind a deep queue (1 MiB per connection by
/// default, served 64 KiB per turn among a session's busy connections) it came a round of
/// every other connection per 64 KiB late: with 100 connections busy both ways, long enough
/// for the senders' retransmission timers to fire on packets that had all arrived. And the
/// newest ACK says all the older one did (the cumulative ack only grows, the window the
/// sender takes is the largest advertised, the selective acks are the receiver's state now).
fn queue_ack(queue: &mut VecDeque<Queued>, ack: Queued, old_ack: Option<usize>) {
    match old_ack {
        Some(i) => queue[i] = ack,
        None => {
            let first_data = queue
                .iter()
                .position(|q| q.packet.kind == PacketType::Data)
                .unwrap_or(queue.len());
            queue.insert(first_data, ack);
        }
    }
}

/// Where the ACK of a queue is, if it holds one: before its first DATA (`queue_ack`).
fn queued_ack(queue: &VecDeque<Queued>) -> Option<usize> {
    queue
        .iter()
        .take_while(|q| q.packet.kind != PacketType::Data)
        .position(|q| q.packet.kind == PacketType::Ack)
}

/// Compares the room left on two instances: the greater unused share of capacity first
/// (so instances fill in proportion to their capacities), then the greater unused count.
fn compare_room(a: &Instance, b: &Instance) -> std::cmp::Ordering {
    let share_a = u128::from(a.unused()) * u128::from(b.effective_max());
    let share_b = u128::from(b.unused()) * u128::from(a.effective_max());
    share_a
        .cmp(&share_b)
        .then_with(|| a.unused().cmp(&b.unused()))
}

/// The connections and the brokers.
pub(crate) struct Table {
    conns: HashMap<u32, ConnEntry>,
    sessions: HashMap<u32, Session>,
    brokers: HashMap<Arc<str>, BrokerEntry>,
    /// Affinity key of a name → the instance its connections go to, and how many live
    /// connections carry the key (the pin goes with the last of them, so the map is bounded
    /// by the connections).
    affinity: HashMap<(Arc<str>, Box<str>), (InstanceId, u32)>,
    next_id: u64,
    metrics: Arc<Metrics>,
    /// When the relay started: until the name grace has passed, every name may be one whose
    /// brokers are re-linking after a restart of the relay.
    started: Instant,
    /// Connections closed both ways and not yet forgotten (see [`Table::note_close`]).
    released: usize,
    /// This relay's id in its pool (docs/protocol.md §5.2), the top byte of its ids; 0
    /// outside a pool.
    relay_id: u8,
    /// Connections this relay asked its brokers to move here.
    moves: PendingMoves,
}

impl Table {
    pub(crate) fn new(metrics: Arc<Metrics>) -> Table {
        Table {
            conns: HashMap::new(),
            sessions: HashMap::new(),
            brokers: HashMap::new(),
            affinity: HashMap::new(),
            next_id: 1,
            metrics,
            started: Instant::now(),
            released: 0,
            relay_id: 0,
            moves: PendingMoves::default(),
        }
    }

    /// The same table, making ids with `relay_id` in their top byte.
    pub(crate) fn with_relay_id(mut self, relay_id: u8) -> Table {
        self.relay_id = relay_id;
        self
    }

    /// A fresh id for a link or a held pull.
    pub(crate) fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    pub(crate) fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Connections that still count against the relay's connection limit: all but those
    /// closed both ways, which only wait for their last acknowledgements (see
    /// [`Table::note_close`]).
    pub(crate) fn held_count(&self) -> usize {
        self.conns.len().saturating_sub(self.released)
    }

    pub(crate) fn links_up(&self) -> usize {
        self.brokers
            .values()
            .flat_map(|b| b.instances.values())
            .filter(|i| i.link.is_some())
            .count()
    }

    /// Whether any instance of `server` is linked now.
    pub(crate) fn has_link(&self, server: &str) -> bool {
        self.brokers
            .get(server)
            .is_some_and(|b| b.instances.values().any(|i| i.link.is_some()))
    }

    /// The live link of the instance connection `id` is placed on, if any.
    pub(crate) fn conn_link(&self, id: u32) -> Option<&LinkHandle> {
        let entry = self.conns.get(&id)?;
        self.instance_link(&entry.server, entry.instance)
    }

    fn instance_link(&self, server: &str, instance: InstanceId) -> Option<&LinkHandle> {
        self.brokers
            .get(server)?
            .instances
            .get(&instance)?
            .link
            .as_ref()
    }

    /// Picks the instance of `server` for a new connection (docs/protocol.md §5.1): the one
    /// pinned to `affinity` if it still takes connections; otherwise the accepting instance
    /// with the greatest unused share of its capacity, then the greatest unused capacity,
    /// ties taken in turn; instances in `exclude` are skipped.
    pub(crate) fn choose(
        &mut self,
        server: &str,
        affinity: Option<&str>,
        exclude: &[InstanceId],
    ) -> Option<(InstanceId, LinkHandle)> {
        let pinned = affinity.and_then(|key| {
            self.affinity
                .get(&(Arc::<str>::from(server), Box::<str>::from(key)))
                .map(|(instance, _)| *instance)
        });
        let broker = self.brokers.get_mut(server)?;
        if let Some(instance) = pinned.filter(|i| !exclude.contains(i)) {
            if let Some(inst) = broker.instances.get(&instance).filter(|i| i.takes_new()) {
                return inst.link.clone().map(|l| (instance, l));
            }
        }
        let mut best: Vec<(InstanceId, &Instance)> = Vec::new();
        for (id, inst) in &broker.instances {
            if !inst.takes_new() || exclude.contains(id) {
                continue;
            }
            let order = match best.first() {
                None => std::cmp::Ordering::Greater,
                Some((_, b)) => compare_room(inst, b),
            };
            match order {
                std::cmp::Ordering::Greater => {
                    best.clear();
                    best.push((*id, inst));
                }
                std::cmp::Ordering::Equal => best.push((*id, inst)),
                std::cmp::Ordering::Less => {}
            }
        }
        if best.is_empty() {
            return None;
        }
        // A stable order, so taking turns spreads ties evenly.
        best.sort_by_key(|(id, _)| *id);
        let turn = (broker.next_turn % best.len() as u64) as usize;
        let (id, inst) = best[turn];
        let link = inst.link.clone()?;
        broker.next_turn = broker.next_turn.wrapping_add(1);
        Some((id, link))
    }

    /// Why nothing could be placed for `server` (after [`Table::choose`] found nothing).
    pub(crate) fn no_place(&self, server: &str, now: Instant, name_grace: Duration) -> NoPlace {
        let starting = now.saturating_duration_since(self.started) < name_grace;
        let Some(broker) = self.brokers.get(server) else {
            return if starting {
                NoPlace::Retry
            } else {
                NoPlace::Gone
            };
        };
        let linked: Vec<&Instance> = broker
            .instances
            .values()
            .filter(|i| i.link.is_some())
            .collect();
        let comes_back = linked
            .iter()
            .any(|i| i.mode == ListenMode::Draining || i.mode == ListenMode::Accepting);
        if comes_back {
            // Draining (another instance is expected) or full.
            return NoPlace::Retry;
        }
        if !linked.is_empty() {
            // Linked and paused on purpose: as if nobody listened.
            return NoPlace::Gone;
        }
        let recently = now.saturating_duration_since(broker.last_seen) < name_grace;
        let in_grace = broker.instances.values().any(|i| i.lost_at.is_some());
        if recently || in_grace || starting {
            NoPlace::Retry
        } else {
            NoPlace::Gone
        }
    }

    /// The entry `id` if it belongs to `server`, `token` matches and it is in no session (a
    /// connection in a session is pushed and pulled only through it, §2.1); `None` for an
    /// unknown id and a wrong token alike (callers answer 404 to both).
    pub(crate) fn authorize(
        &mut self,
        id: u32,
        server: &str,
        token: &Token,
    ) -> Option<&mut ConnEntry> {
        let entry = self.conns.get_mut(&id)?;
        let token_ok = entry.token.ct_eq(token);
        if token_ok && &*entry.server == server && entry.session.is_none() {
            Some(entry)
        } else {
            None
        }
    }

    pub(crate) fn get_mut(&mut self, id: u32) -> Option<&mut ConnEntry> {
        self.conns.get_mut(&id)
    }

    /// Creates a connection with a random unused non-zero id and a random token.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn open(
        &mut self,
        server: &str,
        instance: InstanceId,
        affinity: Option<&str>,
        window: u16,
        client_addr: &str,
        now: Instant,
        timeout: Duration,
    ) -> (u32, Token) {
        use rand::Rng;
        // ThreadRng is a CSPRNG (ChaCha, reseeded from the OS), fit for tokens.
        let token = Token(rand::rng().random());
        let id = draw_id(self.relay_id, |id| self.conns.contains_key(&id));
        let server = self.server_name(server);
        if let Some(inst) = self.instance_mut(&server, instance) {
            inst.traffic.connections_opened += 1;
            inst.traffic.placements += 1;
            inst.held += 1;
        }
        let mut entry = ConnEntry::new(server.clone(), instance, token, client_addr, now, timeout);
        entry.pending = Some(Box::new(Pending {
            window,
            tried: vec![instance],
        }));
        if let Some(key) = affinity {
            let pin = self
                .affinity
                .entry((server, key.into()))
                .or_insert((instance, 0));
            pin.0 = instance;
            pin.1 += 1;
            entry.affinity = Some(key.into());
        }
        self.conns.insert(id, entry);
        (id, token)
    }

    fn instance_mut(&mut self, server: &str, instance: InstanceId) -> Option<&mut Instance> {
        self.brokers.get_mut(server)?.instances.get_mut(&instance)
    }

    /// The instance of connection `id` accepted it: no more punts.
    pub(crate) fn accepted(&mut self, id: u32) {
        if let Some(entry) = self.conns.get_mut(&id) {
            entry.pending = None;
        }
    }

    /// Connection `id` was refused by its instance (or lost with its link) before it was
    /// accepted: offers it to another instance of its name. Returns the CONN_INIT to send, or
    /// `None` when the connection was accepted already or no other instance takes it.
    pub(crate) fn punt(&mut self, id: u32) -> Option<Offer> {
        let entry = self.conns.get(&id)?;
        let pending = entry.pending.as_ref()?;
        let (server, old) = (entry.server.clone(), entry.instance);
        let affinity = entry.affinity.clone();
        let tried = pending.tried.clone();
        let (new, link) = self.choose(&server, affinity.as_deref(), &tried)?;
        if let Some(inst) = self.instance_mut(&server, old) {
            inst.held = inst.held.saturating_sub(1);
            inst.traffic.punts += 1;
        }
        if let Some(inst) = self.instance_mut(&server, new) {
            inst.held += 1;
            inst.traffic.placements += 1;
        }
        if let Some(key) = affinity {
            if let Some(pin) = self.affinity.get_mut(&(server.clone(), key)) {
                pin.0 = new;
            }
        }
        let entry = self.conns.get_mut(&id)?;
        entry.instance = new;
        let pending = entry.pending.as_mut()?;
        pending.tried.push(new);
        let init = Packet::new(
            PacketType::ConnInit,
            id,
            BrokerConnInit {
                token: entry.token,
                client_addr: entry.client_addr.to_string(),
            }
            .encode(),
        )
        .with_window(pending.window);
        tracing::info!(conn_id = id, server = %server, from = %old.short(), to = %new.short(), "connect punted to another instance");
        Some((link.sender, init))
    }

    /// Counts `bytes` pushed by the client of `id` on its entry and its broker.
    pub(crate) fn count_up(&mut self, id: u32, bytes: usize) {
        let Some(entry) = self.conns.get_mut(&id) else {
            return;
        };
        entry.bytes_up += bytes as u64;
        let (server, instance) = (entry.server.clone(), entry.instance);
        if let Some(inst) = self.instance_mut(&server, instance) {
            inst.traffic.bytes_up += bytes as u64;
        }
    }

    /// Counts `bytes` handed to the client of a connection of `server`, on its instance.
    fn count_down(&mut self, server: &str, instance: InstanceId, bytes: usize) {
        if let Some(inst) = self.instance_mut(server, instance) {
            inst.traffic.bytes_down += bytes as u64;
        }
    }

    /// A copy of the brokers and the queue totals. One pass over the connections with no
    /// allocation per connection: 0.5 to 0.8 ms for 20,000 in a test build on a busy machine (see
    /// the test below), and a status page or scrape is rare next to pushes and pulls.
    pub(crate) fn view(&self) -> TableView {
        let mut brokers: Vec<BrokerRow> = self
            .brokers
            .iter()
            .flat_map(|(name, b)| {
                b.instances.iter().map(|(id, i)| BrokerRow {
                    name: name.clone(),
                    instance: *id,
                    link: i.link.as_ref().map(|l| (l.peer, l.since)),
                    listening: i.link.is_some() && i.mode == ListenMode::Accepting,
                    mode: i.mode,
                    capacity: i.capacity,
                    lost_at: i.lost_at,
                    traffic: i.traffic,
                    // The relay's own count, kept up to date on open, punt, both closes and
                    // remove.
                    connections: u64::from(i.held),
                })
            })
            .collect();
        let mut view = TableView {
            connections: self.conns.len() as u64,
            sessions: self.sessions.len() as u64,
            ..TableView::default()
        };
        for entry in self.conns.values() {
            let queued = entry.queued_bytes as u64;
            view.queued_bytes += queued;
            view.largest_queue_bytes = view.largest_queue_bytes.max(queued);
        }
        brokers.sort_by(|a, b| (&a.name, a.instance).cmp(&(&b.name, b.instance)));
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

    /// Offers a packet from the broker to connection `id`'s queue and wakes its held pull,
    /// or, for a connection in a session, lists it as ready and wakes the session's pull.
    /// With `force`, the bounds are ignored (used for the relay's own CONN_ABORT).
    pub(crate) fn enqueue(
        &mut self,
        id: u32,
        packet: impl Into<Queued>,
        limits: QueueLimits,
        force: bool,
    ) -> Admit {
        let Some(entry) = self.conns.get_mut(&id) else {
            return Admit::UnknownConn;
        };
        let queued = packet.into();
        let packet = &queued.packet;
        let len = packet.wire_len();
        let slack = if is_control(packet.kind) {
            limits.control_slack
        } else {
            0
        };
        // An ACK takes the place of one already queued (below): only what it adds counts.
        let old_ack = (packet.kind == PacketType::Ack)
            .then(|| queued_ack(&entry.queue))
            .flatten();
        let replaced = old_ack.map_or(0, |i| entry.queue[i].packet.wire_len());
        let growth = len.saturating_sub(replaced);
        let mut session = entry.session.and_then(|sid| self.sessions.get_mut(&sid));
        let over_conn = entry.queued_bytes + growth > limits.limit + slack;
        let over_session = session
            .as_ref()
            .is_some_and(|s| s.queued_bytes + growth > limits.session_limit.saturating_add(slack));
        if !force && (over_conn || over_session) {
            self.metrics.dropped();
            return Admit::Dropped;
        }
        if packet.kind == PacketType::ConnInitAck {
            entry.unconfirmed = Some(UnconfirmedAccept {
                window: packet.window,
                resend_at: None,
            });
        }
        entry.queued_bytes = entry.queued_bytes + len - replaced;
        if queued.packet.kind == PacketType::Ack {
            queue_ack(&mut entry.queue, queued, old_ack);
        } else {
            entry.queue.push_back(queued);
        }
        match &mut session {
            Some(session) => {
                session.queued_bytes = session.queued_bytes + len - replaced;
                list_ready(id, entry, session);
            }
            None => entry.wake(Wake::Data),
        }
        Admit::Queued
    }

    /// Takes queued packets for `id`, encoded back to back, up to `limit` bytes (at least one
    /// packet if any is queued). An ended connection whose queue is now empty is forgotten.
    pub(crate) fn drain(&mut self, id: u32, limit: usize) -> Bytes {
        let mut out = PacketParts::new();
        self.visit(id, &mut out, usize::MAX, limit, true, Instant::now());
        out.into_bytes()
    }

    /// One turn of connection `id` in an answer: appends its packets to `out`, at most
    /// `visit_max` bytes of them (but at least one packet) and never past `total_max` for
    /// the whole answer (unless `out` is empty: an answer carries at least one packet). A
    /// CONN_INIT_ACK due to be resent comes first. With `repeat_last_word`, an ended
    /// connection's CONN_ABORT or CONN_REJECTED is added again when nothing else is (the
    /// per-connection pull, §8); a session hands it out once, and again only in answers to
    /// pushes of that connection (§2.1). An ended connection whose queue is now empty is
    /// forgotten. Returns whether packets are still queued.
    fn visit(
        &mut self,
        id: u32,
        out: &mut PacketParts,
        visit_max: usize,
        total_max: usize,
        repeat_last_word: bool,
        now: Instant,
    ) -> bool {
        let Some(entry) = self.conns.get_mut(&id) else {
            return false;
        };
        let start = out.len();
        if entry.init_ack_resend_due(now) {
            if let Some(u) = entry.unconfirmed {
                out.push(
                    &Packet::new(PacketType::ConnInitAck, id, Bytes::new()).with_window(u.window),
                );
            }
        }
        if let Some(u) = &mut entry.unconfirmed {
            // Handed out now (the original is first in the queue, or the copy above).
            u.resend_at = Some(now + INIT_ACK_RESEND);
        }
        let mut taken = 0;
        while let Some(front) = entry.queue.front() {
            let len = front.packet.wire_len();
            let this_visit = out.len() - start;
            if !out.is_empty() && out.len() + len > total_max {
                break;
            }
            if this_visit > 0 && this_visit + len > visit_max {
                break;
            }
            if let Some(queued) = entry.queue.pop_front() {
                queued.encode(out);
                entry.queued_bytes -= len;
                taken += len;
            }
        }
        if let Some(session) = entry.session.and_then(|sid| self.sessions.get_mut(&sid)) {
            session.queued_bytes = session.queued_bytes.saturating_sub(taken);
        }
        if entry.queue.is_empty() {
            // Give back the memory of a burst; an idle entry should stay small.
            entry.queue = VecDeque::new();
        }
        let added = out.len() - start;
        if let (true, Some(ending)) = (entry.queue.is_empty(), &mut entry.ending) {
            match &ending.last_word {
                // Delivered (again): keep repeating it for a little while.
                Some(word) => {
                    if repeat_last_word && added == 0 {
                        out.push(word);
                    }
                    ending.forget_at = ending.forget_at.min(now + LAST_WORD_KEPT);
                }
                None => {
                    let reason = ending.reason.clone();
                    entry.bytes_down += added as u64;
                    let (server, instance) = (entry.server.clone(), entry.instance);
                    self.count_down(&server, instance, added);
                    self.remove(id, &reason);
                    return false;
                }
            }
        }
        let added = out.len() - start;
        entry.bytes_down += added as u64;
        let more = !entry.queue.is_empty();
        let (server, instance) = (entry.server.clone(), entry.instance);
        self.count_down(&server, instance, added);
        more
    }

    /// A CONN_CLOSE of connection `id` passed through the relay, from its client or from its
    /// broker. Once both have, the connection stops counting against its instance's
    /// capacity: both applications are done with it, and what is left is the close's
    /// acknowledgements and the broker's TIME-WAIT (5 s), then CONN_SHUTDOWN. Counting those
    /// would cap a churning name at `capacity / 5 s` new connections per second (the soak
    /// test saw connects refused with 503 after its first 1,024 at the broker's default
    /// capacity). Retransmitted CONN_CLOSEs change nothing.
    pub(crate) fn note_close(&mut self, id: u32, from_client: bool) {
        let Some(entry) = self.conns.get_mut(&id) else {
            return;
        };
        let closes = &mut entry.closes;
        if from_client {
            closes.from_client = true;
        } else {
            closes.from_broker = true;
        }
        if closes.released || !(closes.from_client && closes.from_broker) {
            return;
        }
        closes.released = true;
        let (server, instance, sid) = (entry.server.clone(), entry.instance, entry.session);
        if let Some(inst) = self.instance_mut(&server, instance) {
            inst.held = inst.held.saturating_sub(1);
        }
        self.released += 1;
        // Nor against its session's connection limit, for the same reason.
        if let Some(session) = sid.and_then(|sid| self.sessions.get_mut(&sid)) {
            session.released += 1;
        }
    }

    /// Forgets connection `id`, logging its close line and waking its held pull.
    pub(crate) fn remove(&mut self, id: u32, reason: &str) -> bool {
        let Some(mut entry) = self.conns.remove(&id) else {
            return false;
        };
        entry.wake(Wake::Closed);
        leave_session(&mut self.sessions, id, &mut entry);
        self.metrics.closed();
        if entry.closes.released {
            self.released = self.released.saturating_sub(1);
        }
        if !entry.closes.released {
            if let Some(inst) = self.instance_mut(&entry.server, entry.instance) {
                inst.held = inst.held.saturating_sub(1);
            }
        }
        if let Some(key) = entry.affinity.take() {
            let pin_key = (entry.server.clone(), key);
            if let Some(pin) = self.affinity.get_mut(&pin_key) {
                pin.1 = pin.1.saturating_sub(1);
                if pin.1 == 0 {
                    self.affinity.remove(&pin_key);
                }
            }
        }
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
        // Past the bound: the last word must get through.
        self.enqueue(id, last_word.clone(), QueueLimits::FORCED, true);
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

    /// Installs an authenticated link for instance `info.instance` of `name`, replacing (and
    /// returning) that instance's previous link, and (re)installs the connections the broker
    /// announced. Other instances of the name and their connections are not touched. Returns
    /// the announced ids the relay refused (owned by another name or instance, id 0, or over
    /// the connection limit).
    ///
    /// Connections of this instance that the broker did not announce are aborted towards
    /// their clients: the broker restarted and forgot them, and without this an idle client
    /// would only find out at its next keepalive.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn link_up(
        &mut self,
        name: &str,
        info: LinkInfo,
        handle: LinkHandle,
        announced: &[AnnouncedConn],
        now: Instant,
        timeout: Duration,
        max_connections: usize,
        ending_linger: Duration,
    ) -> (Option<LinkHandle>, Vec<u32>) {
        let key = self.server_name(name);
        let broker = self.brokers.entry(key.clone()).or_insert(BrokerEntry {
            instances: HashMap::new(),
            last_seen: now,
            next_turn: 0,
        });
        broker.last_seen = now;
        let inst = broker
            .instances
            .entry(info.instance)
            .or_insert_with(Instance::new);
        let old = inst.link.replace(handle);
        inst.moves = info.moves;
        inst.mode = info.state.mode;
        if let Some(capacity) = info.state.capacity {
            inst.capacity = capacity;
        }
        inst.lost_at = None;
        let mut refused = Vec::new();
        for conn in announced {
            let full = self.conns.len() >= max_connections;
            match self.conns.get_mut(&conn.conn_id) {
                Some(entry) if entry.server == key && entry.instance == info.instance => {
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
                    // It was accepted by this instance before (it announces it).
                    entry.pending = None;
                }
                Some(_) => refused.push(conn.conn_id),
                None if conn.conn_id == 0 || full => refused.push(conn.conn_id),
                None => {
                    self.install(
                        conn.conn_id,
                        &key,
                        info.instance,
                        conn.token,
                        "(re-announced)",
                        now,
                        timeout,
                    );
                }
            }
        }
        let listed: HashSet<u32> = announced.iter().map(|c| c.conn_id).collect();
        let forgotten: Vec<u32> = self
            .conns
            .iter()
            .filter(|(id, e)| {
                e.server == key
                    && e.instance == info.instance
                    && e.ending.is_none()
                    && !listed.contains(id)
            })
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

    /// Installs connection `id`, held by instance `instance` of `server`, that this relay
    /// did not make or forgot (re-announced or moved here): accepted, in no session.
    #[allow(clippy::too_many_arguments)]
    fn install(
        &mut self,
        id: u32,
        server: &Arc<str>,
        instance: InstanceId,
        token: Token,
        origin: &str,
        now: Instant,
        timeout: Duration,
    ) {
        let entry = ConnEntry::new(server.clone(), instance, token, origin, now, timeout);
        self.conns.insert(id, entry);
        if let Some(inst) = self.instance_mut(server, instance) {
            inst.held += 1;
        }
    }

    /// Ends connection `id` with a CONN_ABORT(reason) from the relay itself.
    fn abort_to_client(&mut self, id: u32, reason: &str, forget_at: Instant) {
        let abort = Packet::new(PacketType::ConnAbort, id, encode_reason(reason));
        self.end_with(id, abort, reason, forget_at);
    }

    /// Records LISTEN_STATE from the link `link_id` of instance `instance` of `name`.
    pub(crate) fn set_listen_state(
        &mut self,
        name: &str,
        instance: InstanceId,
        link_id: u64,
        state: ListenState,
    ) {
        if let Some(inst) = self.instance_mut(name, instance) {
            if inst.link.as_ref().is_some_and(|l| l.id == link_id) {
                inst.mode = state.mode;
                if let Some(capacity) = state.capacity {
                    inst.capacity = capacity;
                }
            }
        }
    }

    /// The link `link_id` of `instance` of `name` is gone: start the instance's grace period,
    /// unless a newer link has replaced it already, and offer the connections it had not
    /// accepted yet to other instances. Returns whether it was the current link, and the
    /// CONN_INITs to send.
    pub(crate) fn link_down(
        &mut self,
        name: &str,
        instance: InstanceId,
        link_id: u64,
        now: Instant,
    ) -> (bool, Vec<Offer>) {
        let Some(broker) = self.brokers.get_mut(name) else {
            return (false, Vec::new());
        };
        broker.last_seen = now;
        let Some(inst) = broker.instances.get_mut(&instance) else {
            return (false, Vec::new());
        };
        let current = inst.link.as_ref().is_some_and(|l| l.id == link_id);
        if !current {
            return (false, Vec::new());
        }
        inst.link = None;
        inst.mode = ListenMode::NotAccepting;
        inst.lost_at = Some(now);
        let unanswered: Vec<u32> = self
            .conns
            .iter()
            .filter(|(_, e)| &*e.server == name && e.instance == instance && e.pending.is_some())
            .map(|(id, _)| *id)
            .collect();
        let offers = unanswered
            .into_iter()
            .filter_map(|id| self.punt(id))
            .collect();
        (true, offers)
    }

    /// Whether connection `id` belongs to instance `instance` of `server`.
    pub(crate) fn belongs_to(&self, id: u32, server: &str, instance: InstanceId) -> bool {
        self.conns
            .get(&id)
            .is_some_and(|e| &*e.server == server && e.instance == instance)
    }

    /// Applies every deadline: grace periods of lost links, lingering ended connections,
    /// client inactivity. Returns what to tell brokers: (link, CONN_ABORT packet).
    pub(crate) fn sweep(&mut self, now: Instant, rules: &SweepRules) -> Vec<(LinkSender, Packet)> {
        let mut expired: Vec<(Arc<str>, InstanceId)> = Vec::new();
        let mut forgotten_names = Vec::new();
        for (name, broker) in &mut self.brokers {
            if broker.instances.values().any(|i| i.link.is_some()) {
                broker.last_seen = now;
            }
            for (id, inst) in &broker.instances {
                if inst.link.is_none()
                    && inst.lost_at.is_some_and(|t| now >= t + rules.broker_grace)
                {
                    expired.push((name.clone(), *id));
                }
            }
            if broker.instances.is_empty() && now >= broker.last_seen + rules.name_grace {
                forgotten_names.push(name.clone());
            }
        }
        for name in forgotten_names {
            self.brokers.remove(&name);
            tracing::info!(server = %name, "name grace over; connects now get 404");
        }
        for (name, instance) in &expired {
            if let Some(broker) = self.brokers.get_mut(name) {
                broker.instances.remove(instance);
                broker.last_seen = now;
            }
            tracing::info!(server = %name, instance = %instance.short(), "broker grace period over; aborting its connections");
            let ids: Vec<u32> = self
                .conns
                .iter()
                .filter(|(_, e)| e.server == *name && e.instance == *instance)
                .map(|(id, _)| *id)
                .collect();
            for id in ids {
                self.abort_to_client(id, "broker link lost", now + rules.ending_linger);
            }
        }

        self.sweep_sessions(now);
        self.moves.sweep(now);
        let mut lingered = Vec::new();
        let mut inactive = Vec::new();
        for (id, entry) in &self.conns {
            // Every request of its session counts as the connection's activity, a held
            // session pull included.
            let session = entry.session.and_then(|sid| self.sessions.get(&sid));
            let last_activity = session
                .map(|s| s.last_activity.max(entry.last_activity))
                .unwrap_or(entry.last_activity);
            let pull_held = session.is_some_and(Session::pull_held)
                || matches!(&entry.waiter, Some(w) if !w.tx.is_closed());
            match &entry.ending {
                Some(ending) if now >= ending.forget_at => lingered.push(*id),
                Some(_) => {}
                // A held pull counts as activity; one whose client went away does not.
                None if !pull_held
                    && now.saturating_duration_since(last_activity) >= entry.inactivity_timeout =>
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
            if self.conns.contains_key(&id) {
                if let Some(link) = self.conn_link(id) {
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
        for session in self.sessions.values_mut() {
            session.wake(Wake::Closed);
        }
    }
}

/// Lists connection `id` as ready in its session (once) and wakes the session's pull.
fn list_ready(id: u32, entry: &mut ConnEntry, session: &mut Session) {
    if !entry.ready {
        entry.ready = true;
        session.ready.push_back(id);
    }
    session.wake(Wake::Data);
}

/// Takes connection `id` out of its session, if it is in one: off the session's list of
/// connections and its ready list, its queued bytes off the session's count.
fn leave_session(sessions: &mut HashMap<u32, Session>, id: u32, entry: &mut ConnEntry) {
    let Some(sid) = entry.session.take() else {
        return;
    };
    let was_ready = std::mem::take(&mut entry.ready);
    if let Some(session) = sessions.get_mut(&sid) {
        session.conns.remove(&id);
        if entry.closes.released {
            session.released = session.released.saturating_sub(1);
        }
        session.queued_bytes = session.queued_bytes.saturating_sub(entry.queued_bytes);
        if was_ready {
            session.unlist(id);
        }
    }
}

/// Sessions (docs/protocol.md §2.1): kept in the same table as the connections, so that a
/// connection and its session change together under one lock.
impl Table {
    pub(crate) fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Opens a session with a random unused non-zero id and a random token; `None` when the
    /// relay holds `max_sessions` already.
    pub(crate) fn open_session(
        &mut self,
        now: Instant,
        idle_timeout: Duration,
        client_addr: &str,
        max_sessions: usize,
    ) -> Option<(u32, Token)> {
        use rand::Rng;
        if self.sessions.len() >= max_sessions {
            return None;
        }
        // ThreadRng is a CSPRNG (ChaCha, reseeded from the OS), fit for tokens.
        let token = Token(rand::rng().random());
        let id = draw_id(self.relay_id, |id| self.sessions.contains_key(&id));
        self.sessions
            .insert(id, Session::new(token, now, idle_timeout, client_addr));
        self.metrics.session_opened();
        Some((id, token))
    }

    /// Session `sid` if `token` is its token; `None` for an unknown session and a wrong token
    /// alike (callers answer 404 to both). Counts as the session's activity.
    pub(crate) fn session_mut(
        &mut self,
        sid: u32,
        token: &Token,
        now: Instant,
    ) -> Option<&mut Session> {
        let session = self.sessions.get_mut(&sid)?;
        if !session.token.ct_eq(token) {
            return None;
        }
        session.last_activity = now;
        Some(session)
    }

    /// Whether session `sid` holds `max` connections already; connections closed both ways
    /// do not count (see [`Table::note_close`]).
    pub(crate) fn session_is_full(&self, sid: u32, max: usize) -> bool {
        self.sessions
            .get(&sid)
            .is_some_and(|s| s.conns.len().saturating_sub(s.released) >= max)
    }

    /// Whether connection `id` belongs to session `sid`.
    pub(crate) fn in_session(&self, id: u32, sid: u32) -> bool {
        self.conns.get(&id).is_some_and(|e| e.session == Some(sid))
    }

    /// Puts connection `id` into session `sid`, taking it from the session it was in. A
    /// per-connection pull it had is answered (NO_OP): it is fetched through the session
    /// from now on.
    pub(crate) fn join_session(&mut self, id: u32, sid: u32) {
        let Some(entry) = self.conns.get_mut(&id) else {
            return;
        };
        if !self.sessions.contains_key(&sid) {
            return;
        }
        leave_session(&mut self.sessions, id, entry);
        entry.wake(Wake::Superseded);
        let Some(session) = self.sessions.get_mut(&sid) else {
            return;
        };
        entry.session = Some(sid);
        session.conns.insert(id);
        if entry.closes.released {
            session.released += 1;
        }
        session.queued_bytes += entry.queued_bytes;
        if !entry.queue.is_empty() {
            list_ready(id, entry, session);
        }
    }

    /// Applies an ATTACH of connection `id` pushed in session `sid` (docs/protocol.md §2.1).
    /// A connection this relay does not hold may be on another relay's link of its broker:
    /// then the CONN_MOVEs to send are added to `asks` (docs/protocol.md §5.2) and the
    /// ATTACH waits.
    pub(crate) fn attach(
        &mut self,
        sid: u32,
        id: u32,
        attach: &Attach,
        limits: AttachLimits,
        now: Instant,
        asks: &mut Vec<(LinkSender, Packet)>,
    ) -> AttachOutcome {
        let held = self.conns.get(&id);
        let known = held.filter(|e| e.token.ct_eq(&attach.token) && *e.server == *attach.server);
        match known {
            Some(entry) if entry.session == Some(sid) => AttachOutcome::Attached,
            Some(_) if self.session_is_full(sid, limits.session_connections) => {
                AttachOutcome::SessionFull
            }
            Some(_) => {
                self.join_session(id, sid);
                self.metrics.session_attach();
                AttachOutcome::Attached
            }
            // The id is another connection's here: not one that can move in.
            None if held.is_some() => {
                if self.has_link(&attach.server) {
                    AttachOutcome::Unknown
                } else {
                    AttachOutcome::NotYet
                }
            }
            None => self.ask_move(sid, id, attach, limits, now, asks),
        }
    }

    /// An ATTACH of a connection this relay does not hold: ask the instances of its name
    /// that can move connections, or tell what is known without them.
    fn ask_move(
        &mut self,
        sid: u32,
        id: u32,
        attach: &Attach,
        limits: AttachLimits,
        now: Instant,
        asks: &mut Vec<(LinkSender, Packet)>,
    ) -> AttachOutcome {
        let server = self.server_name(&attach.server);
        let movers: Vec<(InstanceId, LinkSender)> = self
            .brokers
            .get(&server)
            .map(|b| {
                b.instances
                    .iter()
                    .filter(|(_, i)| i.moves)
                    .filter_map(|(id, i)| i.link.as_ref().map(|l| (*id, l.sender.clone())))
                    .collect()
            })
            .unwrap_or_default();
        if movers.is_empty() {
            return if self.has_link(&server) {
                AttachOutcome::Unknown
            } else {
                AttachOutcome::NotYet
            };
        }
        // At the limit, only a move already under way goes on (a membership check: taking
        // it out here would make every repeated ATTACH ask again at once and never end).
        if self.moves.len() >= limits.pending_moves && !self.moves.contains(id) {
            tracing::debug!(conn_id = id, "too many moves under way; ATTACH waits");
            return AttachOutcome::NotYet;
        }
        let instances = movers.iter().map(|(i, _)| *i).collect();
        match self
            .moves
            .on_attach(id, &attach.token, &server, sid, instances, now)
        {
            MoveStep::Ask(asked) => {
                let request = MoveRequest {
                    token: attach.token,
                };
                for (instance, sender) in movers {
                    if asked.contains(&instance) {
                        let packet = Packet::new(PacketType::ConnMove, id, request.encode());
                        asks.push((sender, packet));
                    }
                }
                AttachOutcome::NotYet
            }
            MoveStep::Wait => AttachOutcome::NotYet,
            MoveStep::Unknown => AttachOutcome::Unknown,
        }
    }

    /// A CONN_MOVE answer from instance `instance` of `server` about connection `id`
    /// (docs/protocol.md §5.2); `window` is the answer's header window, the broker's receive
    /// window for the connection. Returns a packet for the broker if the relay cannot take a
    /// connection moved to it (over its connection limit, or the id is another
    /// connection's here): CONN_ABORT, as for a refused re-announcement.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn move_answered(
        &mut self,
        server: &str,
        instance: InstanceId,
        id: u32,
        answer: MoveAnswer,
        window: u16,
        limits: AttachLimits,
        now: Instant,
        timeout: Duration,
    ) -> Option<Packet> {
        match answer {
            MoveAnswer::Unknown => {
                self.moves.on_unknown(id, server, instance);
                None
            }
            MoveAnswer::Left => {
                if self.belongs_to(id, server, instance) {
                    self.remove(id, "moved to another relay");
                }
                None
            }
            MoveAnswer::Moved { token, .. } => {
                let pending = self.moves.take(id);
                if let Some(entry) = self.conns.get(&id) {
                    if *entry.server == *server && entry.instance == instance {
                        return None; // a repeated answer
                    }
                    tracing::warn!(
                        conn_id = id,
                        server,
                        "moved connection's id is in use here; refused"
                    );
                    return Some(refused_move(id));
                }
                if self.conns.len() >= limits.connections {
                    tracing::warn!(
                        conn_id = id,
                        server,
                        "moved connection over the connection limit; refused"
                    );
                    return Some(refused_move(id));
                }
                let key = self.server_name(server);
                self.install(id, &key, instance, token, "(moved here)", now, timeout);
                if window > 0 {
                    // The broker accepted the connection (it holds it), but its CONN_INIT_ACK
                    // may have been lost with the relay that held it, and a client still
                    // opening would wait for it forever. Handed out until the client pushes
                    // a packet of the connection; a connection already open ignores it.
                    let ack =
                        Packet::new(PacketType::ConnInitAck, id, Bytes::new()).with_window(window);
                    self.enqueue(id, ack, QueueLimits::FORCED, true);
                }
                self.metrics.connection_moved();
                tracing::debug!(conn_id = id, server, instance = %instance.short(), "connection moved here");
                if let Some(sid) = pending.map(|p| p.session) {
                    if self.sessions.contains_key(&sid)
                        && !self.session_is_full(sid, limits.session_connections)
                    {
                        self.join_session(id, sid);
                        self.metrics.session_attach();
                        // The ATTACH's answer, handed out by the session's pull at once
                        // rather than at the client's next ATTACH.
                        let attached = Packet::new(PacketType::Attach, id, Bytes::new());
                        self.enqueue(id, attached, QueueLimits::FORCED, true);
                    }
                }
                None
            }
        }
    }

    /// What a client's push means for its connection `id`, whichever request carried it (a
    /// per-connection push with all its `packets`, or a session push with those of `id`):
    /// the client is active, has the CONN_INIT_ACK (no more resends), may set its inactivity
    /// timeout (CONN_OPTION 2, through `timeout_for`) and half-close; `bytes` are counted
    /// up. Returns whether the client aborts the connection: the caller forgets it once the
    /// CONN_ABORT is forwarded.
    pub(crate) fn client_pushed<'a>(
        &mut self,
        id: u32,
        packets: impl IntoIterator<Item = &'a Packet>,
        bytes: usize,
        now: Instant,
        timeout_for: impl Fn(u32) -> Duration,
    ) -> bool {
        let Some(entry) = self.conns.get_mut(&id) else {
            return false;
        };
        entry.last_activity = now;
        entry.confirm_accepted();
        let (mut closes, mut aborts) = (false, false);
        for packet in packets {
            match packet.kind {
                PacketType::ConnOption => {
                    if let Ok(ConnOption::InactivityTimeoutMs(ms)) =
                        ConnOption::decode(packet.payload.clone())
                    {
                        entry.inactivity_timeout = timeout_for(ms);
                    }
                }
                PacketType::ConnClose => closes = true,
                PacketType::ConnAbort => aborts = true,
                _ => {}
            }
        }
        self.count_up(id, bytes);
        if closes {
            self.note_close(id, true);
        }
        aborts
    }

    /// The CONN_ABORT or CONN_REJECTED that ended connection `id`, once its queue has been
    /// fetched: handed out again in the answer to a session push that carries packets of
    /// the connection (§2.1).
    pub(crate) fn last_word_again(&self, id: u32) -> Option<Packet> {
        let entry = self.conns.get(&id)?;
        if !entry.queue.is_empty() {
            // Still queued: the answer's drain hands it out.
            return None;
        }
        entry.ending.as_ref()?.last_word.as_deref().cloned()
    }

    /// Whether session `sid` has answers or connections with packets to hand out.
    pub(crate) fn session_has_ready(&self, sid: u32) -> bool {
        self.sessions
            .get(&sid)
            .is_some_and(|s| !s.ready.is_empty() || !s.answers.is_empty())
    }

    /// Queues answers to packets of session `sid`'s streamed upstream for its pull, and wakes
    /// the pull. Past [`MAX_ANSWERS`](crate::session::MAX_ANSWERS) they are dropped: the
    /// client asks again (an ATTACH is re-sent until answered, a packet of an unknown
    /// connection is retransmitted).
    pub(crate) fn queue_session_answers(&mut self, sid: u32, answers: &[u8]) {
        let Some(session) = self.sessions.get_mut(&sid) else {
            return;
        };
        if session.answers.len() + answers.len() > crate::session::MAX_ANSWERS {
            tracing::debug!(
                session = sid,
                bytes = answers.len(),
                "answers to the session's upstream not fetched; dropped"
            );
            return;
        }
        session.answers.extend_from_slice(answers);
        session.wake(Wake::Data);
    }

    /// Fills a session answer fairly: visits the ready connections in turn, at most
    /// [`VISIT_LIMIT`] bytes (at least one packet) each per visit, until `limit` bytes (at
    /// least one packet) or nothing is left. A connection with more goes to the back of the
    /// list; one whose next packet does not fit keeps its place at the front.
    /// `out` holds what the answer carries already (a push's answers to its ATTACHes); the
    /// answers queued for the session's upstream go next.
    pub(crate) fn drain_session(
        &mut self,
        sid: u32,
        mut out: PacketParts,
        limit: usize,
    ) -> PacketParts {
        let now = Instant::now();
        if let Some(session) = self.sessions.get_mut(&sid) {
            if !session.answers.is_empty() {
                out.push_encoded(session.answers.split().freeze());
            }
        }
        // Every turn takes a packet or shortens the list, so this ends; the bound is a
        // second guard.
        let most_turns = self.sessions.get(&sid).map_or(0, |s| s.ready.len()) + limit;
        for _ in 0..most_turns {
            let Some(session) = self.sessions.get_mut(&sid) else {
                break;
            };
            let Some(id) = session.ready.pop_front() else {
                break;
            };
            match self.conns.get_mut(&id) {
                Some(entry) if entry.session == Some(sid) => entry.ready = false,
                _ => continue,
            }
            let before = out.len();
            let more = self.visit(id, &mut out, VISIT_LIMIT, limit, false, now);
            if !more {
                continue;
            }
            let full = out.len() == before;
            if let (Some(entry), Some(session)) =
                (self.conns.get_mut(&id), self.sessions.get_mut(&sid))
            {
                entry.ready = true;
                if full {
                    session.ready.push_front(id);
                } else {
                    session.ready.push_back(id);
                }
            }
            if full || out.len() >= limit {
                break;
            }
        }
        out
    }

    /// Forgets session `sid`: its connections stay (with their own inactivity timeouts,
    /// counting the session's last request as theirs) and can be attached to a new session.
    pub(crate) fn remove_session(&mut self, sid: u32, reason: &str) -> bool {
        let Some(mut session) = self.sessions.remove(&sid) else {
            return false;
        };
        session.wake(Wake::Closed);
        for id in &session.conns {
            if let Some(entry) = self.conns.get_mut(id) {
                entry.session = None;
                entry.ready = false;
                entry.last_activity = entry.last_activity.max(session.last_activity);
            }
        }
        tracing::debug!(
            session = sid,
            client = %session.client_addr,
            connections = session.conns.len(),
            reason,
            "session forgotten"
        );
        true
    }

    /// The sweeper's part for sessions: forgets the idle ones, and lists the connections
    /// whose CONN_INIT_ACK is due to be handed out again as ready.
    fn sweep_sessions(&mut self, now: Instant) {
        let idle: Vec<u32> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.is_idle(now))
            .map(|(id, _)| *id)
            .collect();
        for sid in idle {
            if self.remove_session(sid, "idle timeout") {
                self.metrics.session_expired();
            }
        }
        for (id, entry) in self.conns.iter_mut() {
            let Some(sid) = entry.session else {
                continue;
            };
            if entry.ready || !entry.init_ack_resend_due(now) {
                continue;
            }
            if let Some(session) = self.sessions.get_mut(&sid) {
                list_ready(*id, entry, session);
            }
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
            // 264 with the pool fields (instance, pending, affinity); 280 with the session
            // fields (session, ready) (issue 9: at most 8 KiB per connection
            // at the relay, all costs included).
            std::mem::size_of::<ConnEntry>() <= 288,
            "{}",
            std::mem::size_of::<ConnEntry>()
        );
    }

    fn link(table: &mut Table, name: &str) -> LinkHandle {
        instance(table, name, InstanceId::LEGACY, 0)
    }

    /// Links instance `id` of `name`, accepting, with capacity `max`.
    fn instance(table: &mut Table, name: &str, id: InstanceId, max: u32) -> LinkHandle {
        linked(table, name, id, max, false)
    }

    /// Links instance `id` of `name`, accepting, with capacity `max`, understanding
    /// CONN_MOVE or not.
    pub(super) fn linked(
        table: &mut Table,
        name: &str,
        id: InstanceId,
        max: u32,
        moves: bool,
    ) -> LinkHandle {
        let handle = LinkHandle {
            id: table.next_id(),
            sender: crate::sender::channel(1 << 20).0,
            closed: Arc::new(watch::channel(false).0),
            peer: "127.0.0.1:9".parse().unwrap(),
            since: Instant::now(),
        };
        let info = LinkInfo {
            instance: id,
            state: ListenState {
                mode: ListenMode::Accepting,
                capacity: Some(Capacity {
                    max_connections: max,
                    live_connections: 0,
                }),
            },
            moves,
        };
        let out = table.link_up(
            name,
            info,
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
    fn a_connection_closed_both_ways_frees_its_place_in_the_capacity() {
        let mut table = Table::new(Arc::new(Metrics::default()));
        let one = InstanceId([1; 16]);
        let _link = instance(&mut table, "svc", one, 1);
        let (now, timeout) = (Instant::now(), Duration::from_secs(60));
        let (first, _) = table.open("svc", one, None, 16, "c", now, timeout);
        assert!(
            table.choose("svc", None, &[]).is_none(),
            "capacity 1 is full"
        );
        // One half-close (even repeated) is not the end: the applications still talk.
        table.note_close(first, true);
        table.note_close(first, true);
        assert!(table.choose("svc", None, &[]).is_none());
        // Both closes: only acknowledgements and the broker's TIME-WAIT are left.
        table.note_close(first, false);
        assert!(table.choose("svc", None, &[]).is_some());
        let (second, _) = table.open("svc", one, None, 16, "c", now, timeout);
        assert!(
            table.choose("svc", None, &[]).is_none(),
            "the new one counts"
        );
        // Forgetting the first (CONN_SHUTDOWN later) does not free the place twice.
        assert!(table.remove(first, "shutdown by broker"));
        assert!(table.choose("svc", None, &[]).is_none());
        assert!(table.remove(second, "aborted by client"));
        assert!(table.choose("svc", None, &[]).is_some());
    }

    #[test]
    fn the_view_counts_connections_and_traffic_per_broker() {
        let mut table = Table::new(Arc::new(Metrics::default()));
        let _a = link(&mut table, "a");
        let _b = link(&mut table, "b");
        let now = Instant::now();
        let timeout = Duration::from_secs(60);
        let legacy = InstanceId::LEGACY;
        let ids: Vec<u32> = (0..20_000)
            .map(|i| {
                let name = if i % 4 == 0 { "b" } else { "a" };
                table.open(name, legacy, None, 16, "c", now, timeout).0
            })
            .collect();
        table.count_up(ids[0], 100);
        let data = Packet::new(PacketType::Data, ids[1], Bytes::from(vec![0; 1000]));
        let limits = QueueLimits {
            limit: 1 << 20,
            control_slack: 0,
            session_limit: usize::MAX,
        };
        table.enqueue(ids[1], data, limits, false);
        // Not b's current link: no effect.
        assert!(!table.link_down("b", legacy, u64::MAX, now).0);

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
    fn a_forwarded_packet_leaves_as_the_bytes_it_came_in() {
        let mut table = Table::new(Arc::new(Metrics::default()));
        let now = Instant::now();
        let (id, _) = table.open("s", InstanceId::LEGACY, None, 16, "c", now, MINUTE);
        let data = Packet::new(PacketType::Data, id, Bytes::from_static(b"payload")).with_seq(4);
        let wire = data.to_bytes();
        let close = Packet::new(PacketType::ConnClose, id, Bytes::new()).with_seq(5);
        assert_eq!(
            table.enqueue(
                id,
                Queued::forwarded(data.clone(), wire.clone()),
                ROOMY,
                false
            ),
            Admit::Queued
        );
        assert_eq!(
            table.enqueue(id, close.clone(), ROOMY, false),
            Admit::Queued
        );
        let out = table.drain(id, 1 << 20);
        assert_eq!(
            &out[..wire.len()],
            &wire[..],
            "the received bytes, as they are"
        );
        assert_eq!(
            tunnel_proto::decode_all(out, 1 << 20).unwrap(),
            vec![data, close]
        );
    }

    /// A session's answer refers to a long forwarded packet where the link put it (the
    /// response body sends it from there), and copies the short packets around it together.
    #[test]
    fn a_session_answer_refers_to_long_forwarded_packets() {
        let (mut table, sid, ids) = session_with(1);
        let id = ids[0];
        let long = Packet::new(PacketType::Data, id, Bytes::from(vec![9; 20_000])).with_seq(1);
        let wire = long.to_bytes();
        let option = Packet::new(PacketType::ConnOption, id, Bytes::from_static(&[1, 0]));
        let short = Packet::new(PacketType::Data, id, Bytes::from_static(b"hi")).with_seq(2);
        for queued in [
            Queued::from(option.clone()),
            Queued::forwarded(long.clone(), wire.clone()),
            Queued::from(short.clone()),
        ] {
            assert_eq!(table.enqueue(id, queued, ROOMY, false), Admit::Queued);
        }
        let out = table.drain_session(sid, PacketParts::new(), 1 << 20);
        let parts = out.into_parts();
        assert_eq!(parts.len(), 3);
        assert_eq!(parts[1].as_ptr(), wire.as_ptr(), "not copied");
        assert_eq!(
            tunnel_proto::decode_all(Bytes::from(parts.concat()), 1 << 20).unwrap(),
            vec![option, long, short]
        );
    }

    /// An ACK goes out before the DATA its connection has queued, and a newer one takes the
    /// place of an older one, even when the queue is full.
    #[test]
    fn an_ack_overtakes_queued_data_and_replaces_the_ack_before_it() {
        let mut table = Table::new(Arc::new(Metrics::default()));
        let now = Instant::now();
        let (id, _) = table.open("s", InstanceId::LEGACY, None, 16, "c", now, MINUTE);
        let data =
            |seq| Packet::new(PacketType::Data, id, Bytes::from(vec![7; 1000])).with_seq(seq);
        // Cumulative ack `seq`, the peer holding `held` out of order.
        let ack = |seq, held: u32| {
            let sack = [held.to_be_bytes(), held.to_be_bytes()].concat();
            Packet::new(PacketType::Ack, id, Bytes::from(sack)).with_seq(seq)
        };
        let full = QueueLimits {
            limit: 2 * data(0).wire_len() + ack(0, 0).wire_len(),
            control_slack: 0,
            session_limit: usize::MAX,
        };
        for packet in [data(1), data(2), ack(5, 8), ack(6, 9)] {
            let admit = table.enqueue(id, packet, full, false);
            assert_eq!(admit, Admit::Queued);
        }
        assert_eq!(table.enqueue(id, data(3), full, false), Admit::Dropped);
        let out = table.drain(id, 1 << 20);
        assert_eq!(
            tunnel_proto::decode_all(out, 1 << 20).unwrap(),
            vec![ack(6, 9), data(1), data(2)]
        );
        assert_eq!(
            table.view().queued_bytes,
            0,
            "the replaced ACK is not counted"
        );
    }

    #[test]
    fn overflow_drops_data_but_keeps_control_within_slack() {
        let metrics = Arc::new(Metrics::default());
        let mut table = Table::new(metrics.clone());
        let (id, _) = table.open(
            "s",
            InstanceId::LEGACY,
            None,
            16,
            "addr",
            Instant::now(),
            Duration::from_secs(60),
        );
        let limits = QueueLimits {
            limit: 100,
            control_slack: 100,
            session_limit: usize::MAX,
        };
        let data = |n| Packet::new(PacketType::Data, id, Bytes::from(vec![0; n]));
        assert_eq!(table.enqueue(id, data(50), limits, false), Admit::Queued);
        assert_eq!(table.enqueue(id, data(50), limits, false), Admit::Dropped);
        let abort = Packet::new(PacketType::ConnAbort, id, Bytes::new());
        assert_eq!(table.enqueue(id, abort, limits, false), Admit::Queued);
        assert_eq!(table.enqueue(7, data(1), limits, false), Admit::UnknownConn);
        assert_eq!(metrics.snapshot(0, 0, 0).packets_dropped, 1);
        let out = table.drain(id, 1 << 20);
        assert_eq!(out.len(), 24 + 50 + 24);
    }

    /// A broker may have a whole window of the client's in flight: 64 DATA packets (the
    /// client's largest default window, tunnel-client's `DEFAULT_CLIENT_MAX_RECV_WINDOW`) of
    /// the broker's default 64 KiB payload, 24-byte headers included, and the ACK beside them.
    /// The default queue must hold them all, or the last packet of every full window is
    /// dropped and waits for a probe or a timeout (it did at exactly 1 MiB, with 16).
    #[test]
    fn the_default_queue_holds_a_full_default_client_window_and_its_ack() {
        const CLIENT_RECV_WINDOW: u32 = 64;
        let limits = QueueLimits::of(&RelayConfig::default());
        let mut table = Table::new(Arc::new(Metrics::default()));
        let now = Instant::now();
        let (id, _) = table.open("s", InstanceId::LEGACY, None, 16, "c", now, MINUTE);
        let payload = Bytes::from(vec![7; tunnel_proto::packet::DEFAULT_MAX_DATA_PAYLOAD]);
        for seq in 1..=CLIENT_RECV_WINDOW {
            let data = Packet::new(PacketType::Data, id, payload.clone()).with_seq(seq);
            assert_eq!(
                table.enqueue(id, data, limits, false),
                Admit::Queued,
                "DATA {seq} of the window"
            );
        }
        let ack = Packet::new(PacketType::Ack, id, Bytes::new()).with_seq(9);
        assert_eq!(table.enqueue(id, ack, limits, false), Admit::Queued);
    }

    fn place(table: &mut Table, name: &str, affinity: Option<&str>) -> (u32, InstanceId) {
        let (instance, _) = table.choose(name, affinity, &[]).expect("placed");
        let now = Instant::now();
        let timeout = Duration::from_secs(60);
        let (id, _) = table.open(name, instance, affinity, 16, "c", now, timeout);
        (id, instance)
    }

    fn count_on(placed: &[(u32, InstanceId)], instance: InstanceId) -> usize {
        placed.iter().filter(|(_, i)| *i == instance).count()
    }

    #[test]
    fn placement_fills_instances_in_proportion_to_capacity() {
        let mut table = Table::new(Arc::new(Metrics::default()));
        let (a, b) = (InstanceId([1; 16]), InstanceId([2; 16]));
        instance(&mut table, "s", a, 10);
        instance(&mut table, "s", b, 30);
        let placed: Vec<_> = (0..20).map(|_| place(&mut table, "s", None)).collect();
        assert_eq!((count_on(&placed, a), count_on(&placed, b)), (5, 15));
        // Full: nothing placed, and the connect is told to retry (503), not 404.
        let more: Vec<_> = (0..20).map(|_| place(&mut table, "s", None)).collect();
        assert_eq!((count_on(&more, a), count_on(&more, b)), (5, 15));
        assert!(table.choose("s", None, &[]).is_none());
        let later = Instant::now() + Duration::from_secs(3600);
        assert_eq!(
            table.no_place("s", later, Duration::from_secs(30)),
            NoPlace::Retry
        );
        // A closed connection frees its room at once.
        table.remove(placed[0].0, "test");
        assert_eq!(table.choose("s", None, &[]).map(|p| p.0), Some(placed[0].1));
    }

    #[test]
    fn ties_take_turns_and_affinity_sticks() {
        let mut table = Table::new(Arc::new(Metrics::default()));
        let ids = [
            InstanceId([1; 16]),
            InstanceId([2; 16]),
            InstanceId([3; 16]),
        ];
        for id in ids {
            instance(&mut table, "s", id, 0);
        }
        let placed: Vec<_> = (0..30).map(|_| place(&mut table, "s", None)).collect();
        for id in ids {
            assert_eq!(count_on(&placed, id), 10, "{placed:?}");
        }
        let (_, first) = place(&mut table, "s", Some("room-7"));
        for _ in 0..5 {
            assert_eq!(place(&mut table, "s", Some("room-7")).1, first);
        }
        // The pinned instance drains: the key moves to another one.
        let link_id = table.instance_link("s", first).unwrap().id;
        let draining = ListenState {
            mode: ListenMode::Draining,
            capacity: None,
        };
        table.set_listen_state("s", first, link_id, draining);
        let (_, moved) = place(&mut table, "s", Some("room-7"));
        assert_ne!(moved, first);
        assert_eq!(place(&mut table, "s", Some("room-7")).1, moved);
    }

    #[test]
    fn a_refused_connect_is_punted_to_the_next_instance_once() {
        let mut table = Table::new(Arc::new(Metrics::default()));
        let (a, b) = (InstanceId([1; 16]), InstanceId([2; 16]));
        instance(&mut table, "s", a, 0);
        instance(&mut table, "s", b, 0);
        let (id, first) = place(&mut table, "s", None);
        let (_, packet) = table.punt(id).expect("punted");
        assert_eq!(packet.kind, PacketType::ConnInit);
        assert_eq!(packet.conn_id, id);
        assert_eq!(packet.window, 16);
        let second = table.conns[&id].instance;
        assert_ne!(second, first);
        assert!(table.belongs_to(id, "s", second) && !table.belongs_to(id, "s", first));
        // Both tried: the refusal goes to the client.
        assert!(table.punt(id).is_none());
        // Once accepted, a connection is never punted.
        let (id2, _) = place(&mut table, "s", None);
        table.accepted(id2);
        assert!(table.punt(id2).is_none());
        let view = table.view();
        let punts: u64 = view.brokers.iter().map(|r| r.traffic.punts).sum();
        let placements: u64 = view.brokers.iter().map(|r| r.traffic.placements).sum();
        assert_eq!((punts, placements), (1, 3));
    }

    #[test]
    fn losing_one_instance_touches_only_its_connections() {
        let mut table = Table::new(Arc::new(Metrics::default()));
        let (a, b) = (InstanceId([1; 16]), InstanceId([2; 16]));
        let link_a = instance(&mut table, "s", a, 0);
        instance(&mut table, "s", b, 0);
        let placed: Vec<_> = (0..4).map(|_| place(&mut table, "s", None)).collect();
        for (id, _) in &placed {
            table.accepted(*id);
        }
        let now = Instant::now();
        let (current, offers) = table.link_down("s", a, link_a.id, now);
        assert!(current && offers.is_empty());
        // New connects go to b at once.
        assert_eq!(table.choose("s", None, &[]).map(|p| p.0), Some(b));
        let rules = SweepRules {
            broker_grace: Duration::from_secs(30),
            ending_linger: Duration::from_secs(30),
            name_grace: Duration::from_secs(30),
        };
        table.sweep(now + Duration::from_secs(31), &rules);
        for (id, inst) in &placed {
            let ended = table.conns[id].ending.is_some();
            assert_eq!(ended, *inst == a, "conn {id} on {inst:?}");
        }
    }

    #[test]
    fn a_name_without_instances_gets_503_for_the_name_grace_then_404() {
        let mut table = Table::new(Arc::new(Metrics::default()));
        let grace = Duration::from_secs(30);
        let start = table.started;
        // Just started: any name may be re-linking.
        assert_eq!(table.no_place("x", start, grace), NoPlace::Retry);
        assert_eq!(
            table.no_place("x", start + Duration::from_secs(31), grace),
            NoPlace::Gone
        );
        let a = InstanceId([1; 16]);
        let link_a = instance(&mut table, "s", a, 0);
        let now = start + Duration::from_secs(100);
        table.link_down("s", a, link_a.id, now);
        assert_eq!(table.no_place("s", now, grace), NoPlace::Retry);
        let rules = SweepRules {
            broker_grace: Duration::from_secs(10),
            ending_linger: Duration::from_secs(30),
            name_grace: grace,
        };
        table.sweep(now + Duration::from_secs(11), &rules);
        assert_eq!(
            table.no_place("s", now + Duration::from_secs(12), grace),
            NoPlace::Retry
        );
        table.sweep(now + Duration::from_secs(45), &rules);
        assert_eq!(
            table.no_place("s", now + Duration::from_secs(45), grace),
            NoPlace::Gone
        );
    }

    /// A table with a linked "s" and session `sid` holding `n` connections.
    /// Queue bounds small enough for a session test to reach: 1000 bytes a connection (100
    /// more for control packets), 1500 for the whole session.
    const SESSION_TEST_LIMITS: QueueLimits = QueueLimits {
        limit: 1000,
        control_slack: 100,
        session_limit: 1500,
    };

    fn session_with(n: usize) -> (Table, u32, Vec<u32>) {
        let mut table = Table::new(Arc::new(Metrics::default()));
        let _link = link(&mut table, "s");
        let now = Instant::now();
        let (sid, _) = table
            .open_session(now, Duration::from_secs(60), "c", 10)
            .expect("session");
        let ids = (0..n)
            .map(|_| {
                let (id, _) = table.open("s", InstanceId::LEGACY, None, 16, "c", now, MINUTE);
                table.join_session(id, sid);
                id
            })
            .collect();
        (table, sid, ids)
    }

    fn token_of(table: &Table, sid: u32) -> Token {
        table.sessions[&sid].token
    }

    pub(super) const MINUTE: Duration = Duration::from_secs(60);

    const ROOMY: QueueLimits = QueueLimits {
        limit: 8 << 20,
        control_slack: 64 << 10,
        session_limit: 16 << 20,
    };

    fn data_of(id: u32, len: usize) -> Packet {
        Packet::new(PacketType::Data, id, Bytes::from(vec![7; len]))
    }

    /// The conn ids of the packets of an answer, in order.
    fn ids_in(answer: PacketParts) -> Vec<u32> {
        tunnel_proto::decode_all(answer.into_bytes(), 2 << 20)
            .unwrap()
            .iter()
            .map(|p| p.conn_id)
            .collect()
    }

    #[test]
    fn a_deep_queue_does_not_starve_the_others_of_one_answer() {
        let (mut table, sid, ids) = session_with(3);
        let (big, small) = (ids[0], &ids[1..]);
        // 4 MiB queued on one connection before the others have anything.
        for _ in 0..64 {
            assert_eq!(
                table.enqueue(big, data_of(big, 64 * 1024 - 24), ROOMY, false),
                Admit::Queued
            );
        }
        for id in small {
            table.enqueue(*id, data_of(*id, 100), ROOMY, false);
        }
        let got = ids_in(table.drain_session(sid, PacketParts::new(), 1 << 20));
        // One visit of the big one (64 KiB), then the others, then its next turns.
        assert_eq!(&got[..3], &[big, small[0], small[1]], "{got:?}");
        assert!(got.iter().filter(|id| **id == big).count() >= 2);
        // The answer stays within the response limit.
        let session = &table.sessions[&sid];
        assert_eq!(session.ready, [big], "only the big one is left");
        assert_eq!(session.queued_bytes, table.conns[&big].queued_bytes);
    }

    #[test]
    fn the_ready_list_holds_each_connection_once_in_order_of_arrival() {
        let (mut table, sid, ids) = session_with(3);
        for id in [ids[2], ids[0], ids[2], ids[0], ids[1]] {
            table.enqueue(id, data_of(id, 10), ROOMY, false);
        }
        assert_eq!(table.sessions[&sid].ready, [ids[2], ids[0], ids[1]]);
        // A small limit: the first packet always goes, the next turn waits at the front.
        let got = ids_in(table.drain_session(sid, PacketParts::new(), 40));
        assert_eq!(got, [ids[2]]);
        // It had its turn: the one whose packet did not fit keeps its place at the front.
        assert_eq!(table.sessions[&sid].ready, [ids[0], ids[1], ids[2]]);
        let got = ids_in(table.drain_session(sid, PacketParts::new(), 1 << 20));
        assert_eq!(got, [ids[0], ids[0], ids[1], ids[2]]);
        assert!(table.sessions[&sid].ready.is_empty());
        assert!(!table.session_has_ready(sid));
        // A connection that goes away leaves the list and the session's byte count.
        table.enqueue(ids[1], data_of(ids[1], 10), ROOMY, false);
        table.remove(ids[1], "test");
        let session = &table.sessions[&sid];
        assert!(session.ready.is_empty() && session.queued_bytes == 0);
        assert_eq!(session.conns.len(), 2);
    }

    /// An ATTACH without moves: nothing may be asked of brokers.
    fn attach_in(table: &mut Table, sid: u32, id: u32, a: &Attach, max: usize) -> AttachOutcome {
        let mut asks = Vec::new();
        let outcome = table.attach(sid, id, a, limits(max), Instant::now(), &mut asks);
        assert!(asks.is_empty());
        outcome
    }

    fn limits(session_connections: usize) -> AttachLimits {
        AttachLimits {
            session_connections,
            connections: 1000,
            pending_moves: 1000,
        }
    }

    #[test]
    fn attach_moves_known_connections_and_refuses_the_others() {
        let (mut table, old, ids) = session_with(1);
        let id = ids[0];
        let token = table.conns[&id].token;
        table.enqueue(id, data_of(id, 10), ROOMY, false);
        let now = Instant::now();
        let (new, _) = table.open_session(now, MINUTE, "c", 10).unwrap();
        let attach = |token, server: &str| Attach {
            token,
            server: server.into(),
        };
        // Wrong token, or the right token with another name: unknown, since "s" is linked.
        let wrong = Token([9; 16]);
        assert_eq!(
            attach_in(&mut table, new, id, &attach(wrong, "s"), 10),
            AttachOutcome::Unknown
        );
        assert_eq!(
            attach_in(&mut table, new, 77, &attach(token, "s"), 10),
            AttachOutcome::Unknown
        );
        // A name without a link: the relay cannot tell yet.
        assert_eq!(
            attach_in(&mut table, new, id, &attach(token, "other"), 10),
            AttachOutcome::NotYet
        );
        assert!(table.in_session(id, old));
        // Known with its token: moved, with its queue and its place on the ready list.
        assert_eq!(
            attach_in(&mut table, new, id, &attach(token, "s"), 10),
            AttachOutcome::Attached
        );
        assert!(table.in_session(id, new) && !table.in_session(id, old));
        assert_eq!(table.sessions[&old].queued_bytes, 0);
        assert!(table.sessions[&old].ready.is_empty());
        assert_eq!(table.sessions[&new].ready, [id]);
        assert_eq!(table.sessions[&new].queued_bytes, 34);
        // Again: still attached, nothing changes.
        assert_eq!(
            attach_in(&mut table, new, id, &attach(token, "s"), 10),
            AttachOutcome::Attached
        );
        // A session at its connection limit takes no more.
        let (full, _) = table.open_session(now, MINUTE, "c", 10).unwrap();
        assert_eq!(
            attach_in(&mut table, full, id, &attach(token, "s"), 0),
            AttachOutcome::SessionFull
        );
        // The per-connection requests do not reach a connection in a session.
        assert!(table.authorize(id, "s", &token).is_none());
    }

    #[test]
    fn the_session_queue_is_bounded_as_a_whole() {
        let (mut table, sid, ids) = session_with(2);
        let limits = SESSION_TEST_LIMITS;
        assert_eq!(
            table.enqueue(ids[0], data_of(ids[0], 876), limits, false),
            Admit::Queued
        );
        // Below its own bound, above the session's.
        assert_eq!(
            table.enqueue(ids[1], data_of(ids[1], 876), limits, false),
            Admit::Dropped
        );
        // Control packets use the slack.
        let abort = Packet::new(PacketType::ConnAbort, ids[1], Bytes::from(vec![0; 50]));
        assert_eq!(table.enqueue(ids[1], abort, limits, false), Admit::Queued);
        assert_eq!(table.sessions[&sid].queued_bytes, 900 + 74);
        table.drain_session(sid, PacketParts::new(), 1 << 20);
        assert_eq!(table.sessions[&sid].queued_bytes, 0);
        assert_eq!(
            table.enqueue(ids[1], data_of(ids[1], 876), limits, false),
            Admit::Queued
        );
    }

    /// Answers to a streamed upstream's packets wake the session's pull, go out first in its
    /// next answer, and are bounded: past the bound they are dropped (the client asks again).
    #[test]
    fn upstream_answers_go_first_wake_the_pull_and_are_bounded() {
        let (mut table, sid, ids) = session_with(1);
        let limits = SESSION_TEST_LIMITS;
        assert_eq!(
            table.enqueue(ids[0], data_of(ids[0], 100), limits, false),
            Admit::Queued
        );
        let (tx, mut rx) = oneshot::channel();
        table.sessions.get_mut(&sid).unwrap().waiter = Some(Waiter { id: 1, tx });
        let abort = Packet::new(PacketType::ConnAbort, 77, Bytes::from_static(b"x")).to_bytes();
        table.queue_session_answers(sid, &abort);
        assert!(matches!(rx.try_recv(), Ok(Wake::Data)), "the pull is woken");
        let out = table.drain_session(sid, PacketParts::new(), 1 << 20);
        let packets = tunnel_proto::decode_all(out.into_bytes(), 1 << 20).unwrap();
        assert_eq!(packets.len(), 2);
        assert_eq!(
            (packets[0].kind, packets[0].conn_id),
            (PacketType::ConnAbort, 77)
        );
        assert_eq!(packets[1].conn_id, ids[0]);
        assert!(!table.session_has_ready(sid));

        let big = vec![0u8; crate::session::MAX_ANSWERS];
        table.queue_session_answers(sid, &big);
        assert!(table.session_has_ready(sid));
        table.queue_session_answers(sid, &abort);
        assert_eq!(
            table.sessions[&sid].answers.len(),
            crate::session::MAX_ANSWERS,
            "past the bound, answers are dropped"
        );
        // An unknown session: nothing happens.
        table.queue_session_answers(sid ^ 1, &abort);
    }

    #[test]
    fn the_session_limit_and_tokens() {
        let mut table = Table::new(Arc::new(Metrics::default()));
        let now = Instant::now();
        let (a, token) = table.open_session(now, MINUTE, "c", 2).unwrap();
        let (b, _) = table.open_session(now, MINUTE, "c", 2).unwrap();
        assert!(a != 0 && b != 0 && a != b);
        assert!(table.open_session(now, MINUTE, "c", 2).is_none());
        assert!(table.session_mut(a, &token, now).is_some());
        assert!(
            table.session_mut(b, &token, now).is_none(),
            "another session's token"
        );
        assert!(table.session_mut(a, &Token([0; 16]), now).is_none());
    }

    #[test]
    fn a_connection_closed_both_ways_frees_its_place_in_the_session_limit() {
        let (mut table, sid, ids) = session_with(2);
        assert!(table.session_is_full(sid, 2));
        table.note_close(ids[0], true);
        assert!(
            table.session_is_full(sid, 2),
            "one half-close is not the end"
        );
        table.note_close(ids[0], false);
        assert!(!table.session_is_full(sid, 2), "closed both ways: free");
        // Forgetting it later does not free the place twice.
        assert!(table.remove(ids[0], "shutdown by broker"));
        assert!(!table.session_is_full(sid, 2));
        assert!(table.session_is_full(sid, 1));
    }

    #[test]
    fn an_idle_session_expires_and_its_connections_stay() {
        let (mut table, sid, ids) = session_with(2);
        let rules = SweepRules {
            broker_grace: MINUTE,
            ending_linger: MINUTE,
            name_grace: MINUTE,
        };
        let start = table.sessions[&sid].last_activity;
        for id in &ids {
            table.conns.get_mut(id).unwrap().inactivity_timeout = 2 * MINUTE;
        }
        // Session requests keep the connections alive beyond their own last activity.
        let token = table.sessions[&sid].token;
        table.session_mut(sid, &token, start + Duration::from_secs(50));
        table.sweep(start + Duration::from_secs(130), &rules);
        assert!(
            table.conns.contains_key(&ids[0]),
            "kept by the session's requests"
        );
        assert!(!table.sessions.contains_key(&sid), "idle since 50 s");
        let (sid, _) = table.open_session(start, MINUTE, "c", 10).unwrap();
        for id in &ids {
            table.join_session(*id, sid);
        }
        // A held pull counts as activity, of the session and its connections.
        let (tx, _rx) = oneshot::channel();
        table.sessions.get_mut(&sid).unwrap().waiter = Some(Waiter { id: 1, tx });
        table.sweep(start + Duration::from_secs(200), &rules);
        assert!(table.sessions.contains_key(&sid));
        assert!(table.conns.contains_key(&ids[0]));
        table.sessions.get_mut(&sid).unwrap().waiter = None;
        // Idle: forgotten; its connections are not, and can be attached elsewhere.
        table.session_mut(
            sid,
            &token_of(&table, sid),
            start + Duration::from_secs(150),
        );
        table.sweep(start + Duration::from_secs(211), &rules);
        assert!(!table.sessions.contains_key(&sid));
        assert!(ids.iter().all(|id| table.conns[id].session.is_none()));
        assert_eq!(table.metrics.snapshot(0, 0, 0).sessions_expired, 2);
        // Their own inactivity timeout then counts from the session's last request.
        table.sweep(start + Duration::from_secs(269), &rules);
        assert!(table.conns.contains_key(&ids[0]));
        table.sweep(start + Duration::from_secs(271), &rules);
        assert!(!table.conns.contains_key(&ids[0]));
    }

    #[test]
    fn an_unconfirmed_accept_is_listed_again_until_the_client_pushes() {
        let (mut table, sid, ids) = session_with(1);
        let id = ids[0];
        let ack = Packet::new(PacketType::ConnInitAck, id, Bytes::new()).with_window(32);
        table.enqueue(id, ack, ROOMY, false);
        let got = ids_in(table.drain_session(sid, PacketParts::new(), 1 << 20));
        assert_eq!(got, [id]);
        let rules = SweepRules {
            broker_grace: MINUTE,
            ending_linger: MINUTE,
            name_grace: MINUTE,
        };
        table.sweep(Instant::now(), &rules);
        assert!(!table.session_has_ready(sid), "not due yet");
        table.sweep(Instant::now() + INIT_ACK_RESEND * 2, &rules);
        assert!(table.session_has_ready(sid), "due: listed");
        // The client pushes a packet of it: no more copies.
        table.client_pushed(id, [], 0, Instant::now(), |_| MINUTE);
        let later = Instant::now() + INIT_ACK_RESEND * 4;
        table.drain_session(sid, PacketParts::new(), 1 << 20);
        table.sweep(later, &rules);
        assert!(!table.session_has_ready(sid));
    }

    #[test]
    fn the_last_word_is_handed_out_once_then_only_to_pushes_of_the_connection() {
        let (mut table, sid, ids) = session_with(2);
        let id = ids[0];
        let abort = Packet::new(PacketType::ConnAbort, id, encode_reason("gone"));
        let now = Instant::now();
        table.end_with(id, abort, "aborted by broker: gone", now + MINUTE);
        // Not repeated while it is still queued (the drain hands it out).
        assert!(table.last_word_again(id).is_none());
        let got = ids_in(table.drain_session(sid, PacketParts::new(), 1 << 20));
        assert_eq!(got, [id]);
        // Once: the next answers of the session do not repeat it...
        table.enqueue(ids[1], data_of(ids[1], 10), ROOMY, false);
        let got = ids_in(table.drain_session(sid, PacketParts::new(), 1 << 20));
        assert_eq!(got, [ids[1]]);
        // ...but the answer to a push of that connection does, until it is forgotten.
        let word = table.last_word_again(id).expect("the last word");
        assert_eq!((word.kind, word.conn_id), (PacketType::ConnAbort, id));
        assert!(table.conns[&id].ending.as_ref().unwrap().forget_at <= now + LAST_WORD_KEPT * 2);
    }
}

#[cfg(test)]
mod move_tests {
    use super::tests::MINUTE;
    use super::*;
    use tunnel_proto::decode_all;

    fn attach(token: Token) -> Attach {
        Attach {
            token,
            server: "s".into(),
        }
    }

    fn limits() -> AttachLimits {
        AttachLimits {
            session_connections: 10,
            connections: 1000,
            pending_moves: 1000,
        }
    }

    fn moved(token: Token) -> MoveAnswer {
        MoveAnswer::Moved {
            token,
            pull_period_ms: 0,
            client_window: 64,
        }
    }

    #[test]
    fn ids_made_by_a_pooled_relay_carry_its_id() {
        let mut table = Table::new(Arc::new(Metrics::default())).with_relay_id(3);
        let a = InstanceId([1; 16]);
        let _link = super::tests::linked(&mut table, "s", a, 0, true);
        let now = Instant::now();
        for _ in 0..100 {
            let (id, _) = table.open("s", a, None, 16, "c", now, MINUTE);
            assert_eq!(id >> 24, 3);
            let (sid, _) = table.open_session(now, MINUTE, "c", 1000).unwrap();
            assert_eq!(sid >> 24, 3);
        }
    }

    #[test]
    fn an_unknown_connection_is_asked_of_every_mover_then_moved_into_the_session() {
        let mut table = Table::new(Arc::new(Metrics::default())).with_relay_id(2);
        let (a, b, old) = (
            InstanceId([1; 16]),
            InstanceId([2; 16]),
            InstanceId([3; 16]),
        );
        let _la = super::tests::linked(&mut table, "s", a, 0, true);
        let _lb = super::tests::linked(&mut table, "s", b, 0, true);
        // An instance that cannot move connections is not asked.
        let _lo = super::tests::linked(&mut table, "s", old, 0, false);
        let now = Instant::now();
        let (sid, _) = table.open_session(now, MINUTE, "c", 10).unwrap();
        let id = 0x0100_0005; // made by relay 1
        let token = Token([7; 16]);
        let mut asks = Vec::new();
        let outcome = table.attach(sid, id, &attach(token), limits(), now, &mut asks);
        assert_eq!(outcome, AttachOutcome::NotYet);
        assert_eq!(asks.len(), 2);
        for (_, packet) in &asks {
            assert_eq!(packet.kind, PacketType::ConnMove);
            assert_eq!(packet.conn_id, id);
            assert_eq!(
                MoveRequest::decode(packet.payload.clone()).unwrap().token,
                token
            );
        }
        // Asked already: the next ATTACH waits without asking again.
        asks.clear();
        let outcome = table.attach(sid, id, &attach(token), limits(), now, &mut asks);
        assert_eq!((outcome, asks.len()), (AttachOutcome::NotYet, 0));

        assert_eq!(
            table.move_answered("s", b, id, MoveAnswer::Unknown, 64, limits(), now, MINUTE),
            None
        );
        assert_eq!(
            table.move_answered("s", a, id, moved(token), 64, limits(), now, MINUTE),
            None
        );
        assert!(table.belongs_to(id, "s", a) && table.in_session(id, sid));
        // The broker's acceptance (in case the client was still opening) and the ATTACH's
        // answer are queued for the session's pull.
        let out = decode_all(
            table
                .drain_session(sid, PacketParts::new(), 1 << 20)
                .into_bytes(),
            1 << 20,
        )
        .unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(
            (out[0].kind, out[0].conn_id, out[0].window),
            (PacketType::ConnInitAck, id, 64)
        );
        assert_eq!((out[1].kind, out[1].conn_id), (PacketType::Attach, id));
        asks.clear();
        let outcome = table.attach(sid, id, &attach(token), limits(), now, &mut asks);
        assert_eq!((outcome, asks.len()), (AttachOutcome::Attached, 0));
        // A repeated answer changes nothing.
        assert_eq!(
            table.move_answered("s", a, id, moved(token), 64, limits(), now, MINUTE),
            None
        );
        // The broker moves it on to another relay: forgotten here, nothing sent anywhere.
        assert_eq!(
            table.move_answered("s", a, id, MoveAnswer::Left, 64, limits(), now, MINUTE),
            None
        );
        assert!(!table.belongs_to(id, "s", a));
        assert!(table
            .drain_session(sid, PacketParts::new(), 1 << 20)
            .is_empty());
    }

    #[test]
    fn a_connection_no_instance_holds_is_aborted_at_the_next_attach() {
        let mut table = Table::new(Arc::new(Metrics::default()));
        let (a, b) = (InstanceId([1; 16]), InstanceId([2; 16]));
        let _la = super::tests::linked(&mut table, "s", a, 0, true);
        let _lb = super::tests::linked(&mut table, "s", b, 0, true);
        let now = Instant::now();
        let (sid, _) = table.open_session(now, MINUTE, "c", 10).unwrap();
        let (id, token) = (0x0200_0009, Token([5; 16]));
        let mut asks = Vec::new();
        table.attach(sid, id, &attach(token), limits(), now, &mut asks);
        for instance in [a, b] {
            table.move_answered(
                "s",
                instance,
                id,
                MoveAnswer::Unknown,
                64,
                limits(),
                now,
                MINUTE,
            );
        }
        // Final only once the settle time since the first question has passed.
        let outcome = table.attach(sid, id, &attach(token), limits(), now, &mut asks);
        assert_eq!(outcome, AttachOutcome::NotYet);
        let settled = now + crate::moves::MOVE_SETTLE;
        let outcome = table.attach(sid, id, &attach(token), limits(), settled, &mut asks);
        assert_eq!(outcome, AttachOutcome::Unknown);
        // Unanswered questions are asked again after the retry delay.
        let (other, mut asks) = (0x0200_000a, Vec::new());
        table.attach(sid, other, &attach(token), limits(), now, &mut asks);
        asks.clear();
        let later = now + crate::moves::MOVE_RETRY;
        let outcome = table.attach(sid, other, &attach(token), limits(), later, &mut asks);
        assert_eq!((outcome, asks.len()), (AttachOutcome::NotYet, 2));
        // A Moved nobody waits for any more still installs the connection, in no session.
        let late = 0x0200_000b;
        table.move_answered("s", a, late, moved(token), 64, limits(), now, MINUTE);
        assert!(table.belongs_to(late, "s", a) && !table.in_session(late, sid));
    }

    #[test]
    fn a_moved_connection_whose_id_is_taken_here_is_refused_to_the_broker() {
        let mut table = Table::new(Arc::new(Metrics::default()));
        let a = InstanceId([1; 16]);
        let _la = super::tests::linked(&mut table, "s", a, 0, true);
        let now = Instant::now();
        let (id, _) = table.open("t", a, None, 16, "c", now, MINUTE);
        let refusal =
            table.move_answered("s", a, id, moved(Token([1; 16])), 64, limits(), now, MINUTE);
        let refusal = refusal.expect("refused");
        assert_eq!((refusal.kind, refusal.conn_id), (PacketType::ConnAbort, id));
        let full = AttachLimits {
            connections: 1,
            ..limits()
        };
        let refusal =
            table.move_answered("s", a, 0x55, moved(Token([1; 16])), 64, full, now, MINUTE);
        assert!(refusal.is_some() && !table.belongs_to(0x55, "s", a));
    }

    #[test]
    fn at_the_limit_of_moves_under_way_a_move_under_way_waits_then_ends() {
        let mut table = Table::new(Arc::new(Metrics::default())).with_relay_id(2);
        let a = InstanceId([1; 16]);
        let _la = super::tests::linked(&mut table, "s", a, 0, true);
        let now = Instant::now();
        let (sid, _) = table.open_session(now, MINUTE, "c", 10).unwrap();
        let one = AttachLimits {
            pending_moves: 1,
            ..limits()
        };
        let (id, token) = (0x0100_0005, Token([7; 16]));
        let mut asks = Vec::new();
        let outcome = table.attach(sid, id, &attach(token), one, now, &mut asks);
        assert_eq!((outcome, asks.len()), (AttachOutcome::NotYet, 1));
        // The move at the limit is the one under way: it waits, without asking again.
        asks.clear();
        let outcome = table.attach(sid, id, &attach(token), one, now, &mut asks);
        assert_eq!((outcome, asks.len()), (AttachOutcome::NotYet, 0));
        // Another connection waits for room, without asking.
        let outcome = table.attach(sid, id + 1, &attach(token), one, now, &mut asks);
        assert_eq!((outcome, asks.len()), (AttachOutcome::NotYet, 0));
        // Every instance asked said unknown: the next ATTACH ends the move.
        table.move_answered("s", a, id, MoveAnswer::Unknown, 0, one, now, MINUTE);
        let settled = now + crate::moves::MOVE_SETTLE;
        let outcome = table.attach(sid, id, &attach(token), one, settled, &mut asks);
        assert_eq!((outcome, asks.len()), (AttachOutcome::Unknown, 0));
        let outcome = table.attach(sid, id + 1, &attach(token), one, settled, &mut asks);
        assert_eq!((outcome, asks.len()), (AttachOutcome::NotYet, 1));
    }
}
