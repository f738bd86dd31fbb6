//! State shared by the listener, the link tasks (one per relay), the connection sinks and
//! the per-connection watchers.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, watch, Notify};
use tunnel_proto::driver::TunnelStream;
use tunnel_proto::payload::{
    encode_reason, Capacity, ConnOption, LinkFeatures, ListenMode, ListenState, RelayHello,
};
use tunnel_proto::{Packet, PacketType};

use crate::config::BrokerConfig;
use crate::relays::Relays;
use crate::table::ConnTable;
use crate::ClientInfo;

/// Shortest time between two LISTEN_STATE packets sent because the live count changed: at
/// high connection rates one update per this interval carries the latest count, instead of
/// one per connection (docs/protocol.md §5). Mode changes are sent at once.
pub const CAPACITY_UPDATE_INTERVAL: Duration = Duration::from_millis(100);

/// A connection waiting in the accept backlog.
pub(crate) type Accepted = (TunnelStream, ClientInfo);

/// Which link a connection is on: one per relay address the broker links to, kept across
/// that relay's redials (`crate::relays`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct LinkId(pub u64);

/// A link that is up: its writer queue and what its relay said of itself.
#[derive(Debug)]
struct UpLink {
    relay: SocketAddr,
    tx: mpsc::Sender<Packet>,
    hello: RelayHello,
}

/// The links up now and the listen state; one lock so a new link always starts with the
/// current listen state (see `install_link`).
#[derive(Debug)]
struct Links {
    up: HashMap<LinkId, UpLink>,
    mode: ListenMode,
}

#[derive(Debug)]
pub(crate) struct Shared {
    pub config: BrokerConfig,
    pub table: ConnTable,
    pub accept_tx: mpsc::Sender<Accepted>,
    /// The relay addresses linked to, each with its supervisor.
    pub relays: Relays,
    links: Mutex<Links>,
    /// Set once: the listener is shut down (or dropped with no connection left); the link
    /// tasks flush their queues and end, and nothing is redialed.
    stop_tx: watch::Sender<bool>,
    /// The `TunnelListener` is gone: the links stay up only for the connections still live.
    pub listener_dropped: AtomicBool,
    /// Where background tasks are spawned from synchronous code.
    pub runtime: tokio::runtime::Handle,
    /// Woken when the live count changed; the capacity reporter sends it, coalesced.
    load_changed: Notify,
}

impl Shared {
    pub fn new(config: BrokerConfig, accept_tx: mpsc::Sender<Accepted>) -> Arc<Shared> {
        let (stop_tx, _) = watch::channel(false);
        Arc::new(Shared {
            config,
            table: ConnTable::default(),
            accept_tx,
            relays: Relays::default(),
            links: Mutex::new(Links {
                up: HashMap::new(),
                mode: ListenMode::Accepting,
            }),
            stop_tx,
            listener_dropped: AtomicBool::new(false),
            runtime: tokio::runtime::Handle::current(),
            load_changed: Notify::new(),
        })
    }

    fn links(&self) -> std::sync::MutexGuard<'_, Links> {
        // Every critical section is a plain field update, so poisoning cannot leave it torn.
        self.links.lock().unwrap_or_else(|e| e.into_inner())
    }

    // ---- the links ----

    /// Makes `tx` the queue of link `id`, with LISTEN_STATE as its first packet
    /// (docs/protocol.md §5: LINK_INIT, its ack, then LISTEN_STATE).
    pub fn install_link(
        &self,
        id: LinkId,
        relay: SocketAddr,
        hello: RelayHello,
        tx: &mpsc::Sender<Packet>,
    ) {
        let mut links = self.links();
        // The queue is new and empty, so this cannot fail for lack of room.
        let _ = tx.try_send(listen_state_packet(self.state_with(links.mode)));
        if hello.relay_id != 0 {
            let twin = links
                .up
                .iter()
                .find(|(other, link)| **other != id && link.hello.relay_id == hello.relay_id);
            if let Some((_, twin)) = twin {
                // Ids of connections made by the two could collide (docs/protocol.md §5.2);
                // the broker refuses a colliding CONN_INIT, but the operator should know.
                tracing::error!(relay = %relay, other = %twin.relay, relay_id = hello.relay_id,
                    "two relays have the same relay id: give each relay of a pool its own --relay-id");
            }
        }
        links.up.insert(
            id,
            UpLink {
                relay,
                tx: tx.clone(),
                hello,
            },
        );
    }

    /// Forgets link `id` if `tx` is still its queue (a newer link is left alone).
    pub fn clear_link(&self, id: LinkId, tx: &mpsc::Sender<Packet>) {
        let mut links = self.links();
        if links.up.get(&id).is_some_and(|up| up.tx.same_channel(tx)) {
            links.up.remove(&id);
        }
    }

    /// The writer queue of link `id`, if it is up.
    pub fn link_tx(&self, id: LinkId) -> Option<mpsc::Sender<Packet>> {
        self.links().up.get(&id).map(|up| up.tx.clone())
    }

    /// Whether link `id` is up and its relay understands CONN_MOVE.
    pub fn link_moves(&self, id: LinkId) -> bool {
        self.links()
            .up
            .get(&id)
            .is_some_and(|up| up.hello.features.has(LinkFeatures::MOVES))
    }

    fn all_link_txs(&self) -> Vec<mpsc::Sender<Packet>> {
        self.links().up.values().map(|up| up.tx.clone()).collect()
    }

    /// How many links are up right now.
    pub fn links_up(&self) -> usize {
        self.links()
            .up
            .values()
            .filter(|up| !up.tx.is_closed())
            .count()
    }

    pub fn is_link_up(&self) -> bool {
        self.links_up() > 0
    }

    /// Queues `packet` on link `id`, waiting for room at most the link write timeout;
    /// dropped when that link is down (the peer's connection state recovers by
    /// retransmission or by its own timeouts).
    pub async fn send_on_link(&self, id: LinkId, packet: Packet) {
        if let Some(tx) = self.link_tx(id) {
            let deadline = self.config.link_write_timeout;
            if tokio::time::timeout(deadline, tx.send(packet))
                .await
                .is_err()
            {
                tracing::debug!("link queue full for {deadline:?}; control packet dropped");
            }
        }
    }

    // ---- listen state ----

    pub fn is_accepting(&self) -> bool {
        self.links().mode == ListenMode::Accepting && !self.is_stopped()
    }

    pub fn mode(&self) -> ListenMode {
        self.links().mode
    }

    /// The listen mode and load to report now.
    pub fn listen_state(&self) -> ListenState {
        self.state_with(self.mode())
    }

    fn state_with(&self, mode: ListenMode) -> ListenState {
        ListenState {
            mode,
            capacity: Some(Capacity {
                max_connections: self.config.max_connections,
                live_connections: u32::try_from(self.table.len()).unwrap_or(u32::MAX),
            }),
        }
    }

    /// Records the listen mode and tells every relay at once. The packets are queued from
    /// tasks that, once they have room, send the state current at that moment, so racing
    /// calls still leave the relays with the last state set.
    pub fn set_mode(self: &Arc<Self>, mode: ListenMode) {
        let txs = {
            let mut links = self.links();
            if links.mode == mode {
                return;
            }
            links.mode = mode;
            links
                .up
                .values()
                .map(|up| up.tx.clone())
                .collect::<Vec<_>>()
        };
        for tx in txs {
            self.runtime.spawn(send_state(Arc::clone(self), tx));
        }
    }

    pub fn set_accepting(self: &Arc<Self>, accepting: bool) {
        self.set_mode(if accepting {
            ListenMode::Accepting
        } else {
            ListenMode::NotAccepting
        });
    }

    /// The live count changed: the capacity reporter sends an update soon.
    pub fn load_changed(&self) {
        self.load_changed.notify_one();
    }

    /// Sends the live count to every relay whenever it changed, at most once per
    /// [`CAPACITY_UPDATE_INTERVAL`], until the broker stops. Every relay gets the broker's
    /// total count (docs/protocol.md §5.2), so each places connections on the same figures.
    pub async fn report_capacity(self: Arc<Self>) {
        let mut stop = self.stop_signal();
        loop {
            tokio::select! {
                _ = self.load_changed.notified() => {}
                _ = stopped(&mut stop) => return,
            }
            // Changes during the pause are carried by this one update.
            tokio::time::sleep(CAPACITY_UPDATE_INTERVAL).await;
            for tx in self.all_link_txs() {
                send_state(Arc::clone(&self), tx).await;
            }
        }
    }

    // ---- stop ----

    pub fn stop(&self) {
        self.stop_tx.send_replace(true);
    }

    pub fn is_stopped(&self) -> bool {
        *self.stop_tx.borrow()
    }

    pub fn stop_signal(&self) -> watch::Receiver<bool> {
        self.stop_tx.subscribe()
    }

    /// A connection's driver ended: forget it, tell its relay (CONN_SHUTDOWN), and end the
    /// links if the listener is gone and this was the last connection.
    pub async fn connection_ended(&self, conn_id: u32) {
        let Some(entry) = self.table.remove(conn_id) else {
            return; // already taken out by shutdown
        };
        self.load_changed();
        self.send_on_link(
            entry.link,
            Packet::new(PacketType::ConnShutdown, conn_id, Bytes::new()),
        )
        .await;
        self.stop_if_orphaned();
    }

    /// Ends the links when no listener and no connection need it any more.
    pub fn stop_if_orphaned(&self) {
        if self.listener_dropped.load(Ordering::SeqCst) && self.table.len() == 0 {
            self.stop();
        }
    }

    /// Notes a pull period passing through in a CONN_OPTION, for later re-announcements.
    pub fn observe_option(&self, packet: &Packet) {
        if packet.kind != PacketType::ConnOption {
            return;
        }
        if let Ok(ConnOption::PullPeriodMs(ms)) = ConnOption::decode(packet.payload.clone()) {
            self.table.set_pull_period(packet.conn_id, ms);
        }
    }
}

pub(crate) fn listen_state_packet(state: ListenState) -> Packet {
    Packet::new(PacketType::ListenState, 0, state.encode())
}

/// Queues LISTEN_STATE with the state current once `tx` has room (waiting at most the link
/// write timeout).
async fn send_state(shared: Arc<Shared>, tx: mpsc::Sender<Packet>) {
    let deadline = shared.config.link_write_timeout;
    if let Ok(Ok(permit)) = tokio::time::timeout(deadline, tx.reserve()).await {
        permit.send(listen_state_packet(shared.listen_state()));
    }
}

pub(crate) fn abort_packet(conn_id: u32, reason: &str) -> Packet {
    Packet::new(PacketType::ConnAbort, conn_id, encode_reason(reason))
}

pub(crate) fn rejected_packet(conn_id: u32, reason: &str) -> Packet {
    Packet::new(PacketType::ConnRejected, conn_id, encode_reason(reason))
}

/// Resolves once the broker is stopped. (A helper so the watch guard is dropped inside it:
/// holding the guard would make callers' futures not `Send`.)
pub(crate) async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopped| *stopped).await;
}
