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
use tunnel_proto::payload::{decode_reason, BrokerConnInit};
use tunnel_proto::{Connection, Packet, PacketType};

use crate::shared::{abort_packet, rejected_packet, Shared};
use crate::sink::LinkSink;
use crate::table::ConnEntry;
use crate::ClientInfo;

/// Handles one packet read from the link whose writer queue is `link`.
pub(crate) async fn handle_packet(
    shared: &Arc<Shared>,
    link: &mpsc::Sender<Packet>,
    packet: Packet,
) {
    let conn_id = packet.conn_id;
    match packet.kind {
        PacketType::NoOp | PacketType::LinkInitAck => {}
        PacketType::ConnInit => on_conn_init(shared, link, packet).await,
        PacketType::ConnAbort | PacketType::ConnRejected => {
            let reason = decode_reason(&packet.payload);
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
        | PacketType::Attach
        | PacketType::ConnMove => {
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

async fn on_conn_init(shared: &Arc<Shared>, link: &mpsc::Sender<Packet>, packet: Packet) {
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
    });
    let (stream, handle) = driver::spawn(conn, sink);
    shared.table.insert(
        conn_id,
        ConnEntry {
            handle: handle.clone(),
            token: init.token,
            pull_period_ms: 0,
            client_window: packet.window,
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

/// When the connection's driver ends, tell the relay and forget the connection.
fn watch_end(shared: &Arc<Shared>, handle: ConnHandle) {
    let shared = Arc::clone(shared);
    tokio::spawn(async move {
        handle.closed().await;
        shared.connection_ended(handle.conn_id()).await;
    });
}
