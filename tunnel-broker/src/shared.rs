//! State shared by the listener, the link task, the connection sinks and the per-connection
//! watchers.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, watch, Notify};
use tunnel_proto::driver::TunnelStream;
use tunnel_proto::payload::{encode_reason, Capacity, ConnOption, ListenMode, ListenState};
use tunnel_proto::{Packet, PacketType};

use crate::config::BrokerConfig;
use crate::table::ConnTable;
use crate::ClientInfo;

/// Shortest time between two LISTEN_STATE packets sent because the live count changed: at
/// high connection rates one update per this interval carries the latest count, instead of
/// one per connection (docs/protocol.md §5). Mode changes are sent at once.
pub const CAPACITY_UPDATE_INTERVAL: Duration = Duration::from_millis(100);

/// A connection waiting in the accept backlog.
pub(crate) type Accepted = (TunnelStream, ClientInfo);

/// The writer queue of the link that is up now, if any, and the listen state; one lock so a
/// new link always starts with the current listen state (see `install_link`).
#[derive(Debug)]
struct LinkSlot {
    tx: Option<mpsc::Sender<Packet>>,
    mode: ListenMode,
}

#[derive(Debug)]
pub(crate) struct Shared {
    pub config: BrokerConfig,
    pub table: ConnTable,
    pub accept_tx: mpsc::Sender<Accepted>,
    slot: Mutex<LinkSlot>,
    /// Set once: the listener is shut down (or dropped with no connection left); the link
    /// task flushes its queue and ends, and nothing is redialed.
    stop_tx: watch::Sender<bool>,
    /// The `TunnelListener` is gone: the link stays up only for the connections still live.
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
            slot: Mutex::new(LinkSlot {
                tx: None,
                mode: ListenMode::Accepting,
            }),
            stop_tx,
            listener_dropped: AtomicBool::new(false),
            runtime: tokio::runtime::Handle::current(),
            load_changed: Notify::new(),
        })
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, LinkSlot> {
        // Every critical section is a plain field update, so poisoning cannot leave it torn.
        self.slot.lock().unwrap_or_else(|e| e.into_inner())
    }

    // ---- the current link ----

    /// Makes `tx` the current link's queue, with LISTEN_STATE as its first packet
    /// (docs/protocol.md §5: LINK_INIT, its ack, then LISTEN_STATE).
    pub fn install_link(&self, tx: &mpsc::Sender<Packet>) {
        let mut slot = self.slot();
        // The queue is new and empty, so this cannot fail for lack of room.
        let _ = tx.try_send(listen_state_packet(self.state_with(slot.mode)));
        slot.tx = Some(tx.clone());
    }

    /// Forgets `tx` if it is still the current link (a newer link is left alone).
    pub fn clear_link(&self, tx: &mpsc::Sender<Packet>) {
        let mut slot = self.slot();
        if slot.tx.as_ref().is_some_and(|cur| cur.same_channel(tx)) {
            slot.tx = None;
        }
    }

    pub fn current_link(&self) -> Option<mpsc::Sender<Packet>> {
        self.slot().tx.clone()
    }

    pub fn is_link_up(&self) -> bool {
        self.current_link().is_some_and(|tx| !tx.is_closed())
    }

    /// Queues `packet` on the current link, waiting for room at most the link write timeout;
    /// dropped when no link is up (the peer's connection state recovers by retransmission
    /// or by its own timeouts).
    pub async fn send_on_link(&self, packet: Packet) {
        if let Some(tx) = self.current_link() {
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
        self.slot().mode == ListenMode::Accepting && !self.is_stopped()
    }

    pub fn mode(&self) -> ListenMode {
        self.slot().mode
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

    /// Records the listen mode and tells the relay at once. The packet is queued from a task
    /// that, once it has room, sends the state current at that moment, so racing calls still
    /// leave the relay with the last state set.
    pub fn set_mode(self: &Arc<Self>, mode: ListenMode) {
        let tx = {
            let mut slot = self.slot();
            if slot.mode == mode {
                return;
            }
            slot.mode = mode;
            slot.tx.clone()
        };
        if let Some(tx) = tx {
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

    /// Sends the live count to the relay whenever it changed, at most once per
    /// [`CAPACITY_UPDATE_INTERVAL`], until the broker stops.
    pub async fn report_capacity(self: Arc<Self>) {
        let mut stop = self.stop_signal();
        loop {
            tokio::select! {
                _ = self.load_changed.notified() => {}
                _ = stopped(&mut stop) => return,
            }
            // Changes during the pause are carried by this one update.
            tokio::time::sleep(CAPACITY_UPDATE_INTERVAL).await;
            if let Some(tx) = self.current_link() {
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

    /// A connection's driver ended: forget it, tell the relay (CONN_SHUTDOWN), and end the
    /// link if the listener is gone and this was the last connection.
    pub async fn connection_ended(&self, conn_id: u32) {
        if self.table.remove(conn_id).is_none() {
            return; // already taken out by shutdown
        }
        self.load_changed();
        self.send_on_link(Packet::new(PacketType::ConnShutdown, conn_id, Bytes::new()))
            .await;
        self.stop_if_orphaned();
    }

    /// Ends the link when no listener and no connection need it any more.
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
