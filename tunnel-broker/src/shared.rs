//! State shared by the listener, the link task, the connection sinks and the per-connection
//! watchers.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::{mpsc, watch};
use tunnel_proto::driver::TunnelStream;
use tunnel_proto::payload::{encode_listen_state, encode_reason, ConnOption};
use tunnel_proto::{Packet, PacketType};

use crate::config::BrokerConfig;
use crate::table::ConnTable;
use crate::ClientInfo;

/// A connection waiting in the accept backlog.
pub(crate) type Accepted = (TunnelStream, ClientInfo);

/// The writer queue of the link that is up now, if any, and the listen state; one lock so a
/// new link always starts with the current listen state (see `install_link`).
#[derive(Debug, Default)]
struct LinkSlot {
    tx: Option<mpsc::Sender<Packet>>,
    accepting: bool,
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
                accepting: true,
            }),
            stop_tx,
            listener_dropped: AtomicBool::new(false),
            runtime: tokio::runtime::Handle::current(),
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
        let _ = tx.try_send(listen_state_packet(slot.accepting));
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
        self.slot().accepting && !self.is_stopped()
    }

    /// Records the listen state and tells the relay. The packet is queued from a task that,
    /// once it has room, sends the state current at that moment, so racing calls still leave
    /// the relay with the last state set.
    pub fn set_accepting(self: &Arc<Self>, accepting: bool) {
        let tx = {
            let mut slot = self.slot();
            if slot.accepting == accepting {
                return;
            }
            slot.accepting = accepting;
            slot.tx.clone()
        };
        let Some(tx) = tx else { return };
        let shared = Arc::clone(self);
        self.runtime.spawn(async move {
            let deadline = shared.config.link_write_timeout;
            if let Ok(Ok(permit)) = tokio::time::timeout(deadline, tx.reserve()).await {
                permit.send(listen_state_packet(shared.slot().accepting));
            }
        });
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

pub(crate) fn listen_state_packet(accepting: bool) -> Packet {
    Packet::new(PacketType::ListenState, 0, encode_listen_state(accepting))
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
