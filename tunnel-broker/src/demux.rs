//! What the link reader does with each packet from the relay: route it to its connection,
//! open new connections, answer what cannot be routed. Nothing here waits on a connection
//! (`ConnHandle::deliver` only queues), so one slow connection never stalls the link.

use std::sync::Arc;
use std::time::Instant;
use tunnel_proto::warn_limit::WarningLimit;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use tunnel_proto::connection::StreamError;
use tunnel_proto::driver::{self, ConnHandle};
use tunnel_proto::payload::{decode_reason, BrokerConnInit, MoveAnswer, MoveRequest};
use tunnel_proto::{Connection, Packet, PacketType};

use crate::shared::{abort_packet, rejected_packet, LinkId, Shared};
use crate::sink::LinkSink;
use crate::table::ConnEntry;
use crate::ClientInfo;

/// Handles one packet read from link `id`, whose writer queue is `link`. A connection's
/// packets are taken from whichever link they arrive on: while a connection moves, its
/// client's retransmissions may reach it through either relay (docs/protocol.md §5.2).
pub(crate) async fn handle_packet(
    shared: &Arc<Shared>,
    id: LinkId,
    link: &mpsc::Sender<Packet>,
    packet: Packet,
) {
    let conn_id = packet.conn_id;
    match packet.kind {
        PacketType::NoOp | PacketType::LinkInitAck => {}
        PacketType::ConnInit => on_conn_init(shared, id, link, packet).await,
        PacketType::ConnMove => on_move(shared, id, link, packet).await,
        PacketType::ConnAbort | PacketType::ConnRejected => {
            let reason = decode_reason(&packet.payload);
            if shared.table.link_of(conn_id).is_some_and(|on| on != id) {
                // From a relay the connection has left: that relay's view is stale.
                tracing::debug!(conn_id, %reason, "abort from a relay the connection left; ignored");
                return;
            }
            match shared.table.handle(conn_id) {
                Some(handle) => {
                    tracing::debug!(conn_id, %reason, "relay aborted the connection");
                    handle.fail(StreamError::AbortedByPeer(reason));
                }
                // Never answer an abort with an abort: two parts would ping-pong forever.
                None => tracing::debug!(conn_id, %reason, "abort for an unknown connection"),
            }
        }
        PacketType::Data | PacketType::ConnClose | PacketType::ConnOption | PacketType::Ack => {
            match shared.table.handle(conn_id) {
                Some(handle) => {
                    shared.observe_option(&packet);
                    handle.deliver(packet);
                }
                None if conn_id == 0 => {
                    tracing::debug!(kind = ?packet.kind, "connection packet without a conn id dropped")
                }
                None => {
                    tracing::debug!(conn_id, kind = ?packet.kind, "packet for an unknown connection; aborting it");
                    // Best effort: if the link queue is full another stray packet will ask
                    // again.
                    let _ = link.try_send(abort_packet(conn_id, "unknown connection"));
                }
            }
        }
        PacketType::ConnInitAck
        | PacketType::ConnShutdown
        | PacketType::LinkInit
        | PacketType::ListenState
        | PacketType::SessionInit
        | PacketType::Attach => {
            tracing::debug!(conn_id, kind = ?packet.kind, "packet type not expected from the relay; ignored")
        }
    }
}

async fn reply(shared: &Shared, link: &mpsc::Sender<Packet>, packet: Packet) {
    let deadline = shared.config.link_write_timeout;
    if tokio::time::timeout(deadline, link.send(packet))
        .await
        .is_err()
    {
        tracing::warn!("link queue full for {deadline:?}; handshake answer dropped");
    }
}

async fn on_conn_init(
    shared: &Arc<Shared>,
    id: LinkId,
    link: &mpsc::Sender<Packet>,
    packet: Packet,
) {
    let conn_id = packet.conn_id;
    if conn_id == 0 {
        tracing::warn!("CONN_INIT without a conn id from the relay; ignored");
        return;
    }
    let init = match BrokerConnInit::decode(packet.payload.clone()) {
        Ok(init) => init,
        Err(e) => {
            tracing::warn!(conn_id, error = %e, "malformed CONN_INIT from the relay; rejected");
            reply(
                shared,
                link,
                rejected_packet(conn_id, "malformed CONN_INIT"),
            )
            .await;
            return;
        }
    };
    let recv_window = shared.config.connection.recv_window;

    if let Some(token) = shared.table.token(conn_id) {
        if token.ct_eq(&init.token) {
            // The relay repeated a CONN_INIT we already took (its answer may have been lost
            // with a link): answer again, open nothing new.
            let ack = Packet::new(PacketType::ConnInitAck, conn_id, Bytes::new())
                .with_window(recv_window);
            reply(shared, link, ack).await;
        } else {
            tracing::warn!(
                conn_id,
                "CONN_INIT for a conn id in use with another token; rejected"
            );
            reply(
                shared,
                link,
                rejected_packet(conn_id, "connection id in use"),
            )
            .await;
        }
        return;
    }

    if !shared.is_accepting() {
        tracing::info!(conn_id, client = %init.client_addr, "connection refused: not accepting");
        reply(shared, link, rejected_packet(conn_id, "not accepting")).await;
        return;
    }
    let permit = match shared.accept_tx.try_reserve() {
        Ok(permit) => permit,
        Err(TrySendError::Full(())) => {
            static BACKLOG_FULL: WarningLimit =
                WarningLimit::new(std::time::Duration::from_secs(10));
            tunnel_proto::warn_limited!(BACKLOG_FULL, conn_id, client = %init.client_addr, "connection refused: accept backlog full");
            reply(shared, link, rejected_packet(conn_id, "backlog full")).await;
            return;
        }
        Err(TrySendError::Closed(())) => {
            reply(shared, link, rejected_packet(conn_id, "not accepting")).await;
            return;
        }
    };

    let conn = Connection::new(
        conn_id,
        packet.window,
        shared.config.connection.clone(),
        Instant::now(),
    );
    let window = conn.recv_window();
    let sink = Arc::new(LinkSink {
        shared: Arc::clone(shared),
        conn_id,
    });
    let (stream, handle) = driver::spawn(conn, sink);
    shared.table.insert(
        conn_id,
        ConnEntry {
            handle: handle.clone(),
            token: init.token,
            pull_period_ms: 0,
            client_window: packet.window,
            link: id,
        },
    );
    shared.load_changed();
    watch_end(shared, handle);
    // The answer goes out before the application can write, so the relay sees
    // CONN_INIT_ACK ahead of any data of this connection.
    let ack = Packet::new(PacketType::ConnInitAck, conn_id, Bytes::new()).with_window(window);
    reply(shared, link, ack).await;
    tracing::debug!(conn_id, client = %init.client_addr, "connection queued for accept");
    permit.send((
        stream,
        ClientInfo {
            conn_id,
            client_addr: init.client_addr,
        },
    ));
}

/// A relay asks for a connection whose client re-attached there (docs/protocol.md §5.2):
/// if we hold it with that token, it moves onto the link the question came on.
async fn on_move(shared: &Arc<Shared>, id: LinkId, link: &mpsc::Sender<Packet>, packet: Packet) {
    let conn_id = packet.conn_id;
    let request = match MoveRequest::decode(packet.payload) {
        Ok(request) => request,
        Err(e) => {
            tracing::warn!(conn_id, error = %e, "malformed CONN_MOVE from the relay; ignored");
            return;
        }
    };
    let entry = shared
        .table
        .get(conn_id)
        .filter(|entry| entry.token.ct_eq(&request.token));
    let Some(entry) = entry else {
        tracing::debug!(conn_id, "CONN_MOVE for a connection not held here");
        reply(shared, link, move_packet(conn_id, &MoveAnswer::Unknown)).await;
        return;
    };
    let moved = MoveAnswer::Moved {
        token: entry.token,
        pull_period_ms: entry.pull_period_ms,
        client_window: entry.client_window,
    };
    // The answer is queued before the connection is put on this link, so the relay knows
    // the connection before it sees any of its packets.
    let answer = move_packet(conn_id, &moved).with_window(entry.handle.recv_window());
    reply(shared, link, answer).await;
    let Some(old) = shared.table.rebind(conn_id, id) else {
        return; // ended meanwhile; its CONN_SHUTDOWN tells the relay
    };
    if old == id {
        return; // asked again (an answer lost with a link): nothing moved
    }
    tracing::debug!(conn_id, "connection moved to another relay's link");
    // What was in flight went to the relay that is gone: resend it now, on this link.
    entry.handle.path_restored();
    if shared.link_moves(old) {
        shared
            .send_on_link(old, move_packet(conn_id, &MoveAnswer::Left))
            .await;
    }
}

fn move_packet(conn_id: u32, answer: &MoveAnswer) -> Packet {
    Packet::new(PacketType::ConnMove, conn_id, answer.encode())
}

/// When the connection's driver ends, tell the relay and forget the connection.
fn watch_end(shared: &Arc<Shared>, handle: ConnHandle) {
    let shared = Arc::clone(shared);
    tokio::spawn(async move {
        handle.closed().await;
        shared.connection_ended(handle.conn_id()).await;
    });
}
