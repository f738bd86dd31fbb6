//! The broker link listener: accepts TCP (optionally TLS) links, authenticates LINK_INIT in
//! constant time, installs the link and the connections it announces, then reads the link
//! continuously and sorts its packets into the connections' downstream queues.
//!
//! Reading never waits on a connection: queues are bounded in bytes and overflow is dropped
//! (the broker retransmits). A link silent for three keepalive intervals is dead; its
//! connections then wait out the broker grace period in the table.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tunnel_proto::payload::{
    decode_reason, encode_reason, Capacity, ConnOption, InstanceId, LinkFeatures, LinkInit,
    ListenMode, ListenState, MoveAnswer, RelayHello,
};
use tunnel_proto::{Decoder, Packet, PacketType};

use crate::sender::{self, LinkSender};
use crate::state::{accept_until_stopped, stopped, Shared};
use crate::table::{LinkHandle, LinkInfo, Offer, Queued, Table};

/// Longest broker keepalive the relay honours: a broker announcing more cannot keep a dead
/// link counted as alive for longer than three of these.
pub(crate) const MAX_BROKER_KEEPALIVE: Duration = Duration::from_secs(600);

/// What the relay knows of a link's broker from LINK_INIT: its instance, its listen state
/// and capacity, and its keepalive (docs/protocol.md §5). A version-1 LINK_INIT is the
/// legacy instance, accepting, with unknown capacity and the relay's own keepalive; it
/// still sends LISTEN_STATE at once.
fn link_info(init: &LinkInit, relay_keepalive: Duration) -> (LinkInfo, Duration) {
    match &init.extension {
        Some(ext) => {
            let broker = Duration::from_millis(u64::from(ext.keepalive_ms));
            (
                LinkInfo {
                    instance: ext.instance,
                    state: ext.state,
                    moves: ext.features.is_some_and(|f| f.has(LinkFeatures::MOVES)),
                },
                broker.min(MAX_BROKER_KEEPALIVE),
            )
        }
        None => (
            LinkInfo {
                instance: InstanceId::LEGACY,
                state: ListenState {
                    mode: ListenMode::NotAccepting,
                    capacity: Some(Capacity::default()),
                },
                moves: false,
            },
            relay_keepalive,
        ),
    }
}

/// Sends the CONN_INITs of punted connections; a link that cannot take one at once leaves
/// its connection to the client's connect timeout (logged).
fn send_offers(offers: Vec<Offer>) {
    for (sender, packet) in offers {
        if sender.try_send_packet(&packet).is_err() {
            tracing::warn!(
                conn_id = packet.conn_id,
                "link busy; punted CONN_INIT not sent"
            );
        }
    }
}

/// Room kept free in the read buffer so each read can take a good share of a burst.
const READ_CHUNK: usize = 256 * 1024;

/// Accepts links until the relay stops.
pub(crate) async fn run_listener(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    shared: Arc<Shared>,
) {
    let pending = shared.link_handshake_slots.clone();
    let mut stopping = shared.stopping.clone();
    loop {
        let Some((tcp, peer)) = accept_until_stopped(&listener, &mut stopping, "link").await else {
            break;
        };
        let Ok(permit) = pending.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "too many links in handshake; closing this one");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let shared = shared.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + shared.config.link_handshake_timeout;
            match tls {
                None => serve_link(tcp, peer, deadline, permit, shared).await,
                Some(acceptor) => {
                    match tokio::time::timeout_at(deadline, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => serve_link(stream, peer, deadline, permit, shared).await,
                        Ok(Err(err)) => {
                            tracing::warn!(%peer, error = %err, "link TLS handshake failed")
                        }
                        Err(_) => tracing::warn!(%peer, "link TLS handshake timed out"),
                    }
                }
            }
        });
    }
}

/// Reads until `decoder` yields a packet.
async fn read_packet<R: AsyncRead + Unpin>(
    io: &mut R,
    decoder: &mut Decoder,
) -> io::Result<Packet> {
    loop {
        match decoder.next_packet() {
            Ok(Some(packet)) => return Ok(packet),
            Ok(None) => {}
            Err(err) => return Err(io::Error::new(io::ErrorKind::InvalidData, err)),
        }
        decoder.buffer_mut().reserve(READ_CHUNK);
        if io.read_buf(decoder.buffer_mut()).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
}

/// Sends CONN_REJECTED(reason) and closes, within `deadline`.
async fn reject<S: AsyncWrite + Unpin>(io: &mut S, reason: &str, deadline: tokio::time::Instant) {
    let packet = Packet::new(PacketType::ConnRejected, 0, encode_reason(reason)).to_bytes();
    let _ = tokio::time::timeout_at(deadline, async {
        io.write_all(&packet).await?;
        io.shutdown().await
    })
    .await;
}

async fn serve_link<S>(
    mut io: S,
    peer: SocketAddr,
    deadline: tokio::time::Instant,
    handshake_permit: tokio::sync::OwnedSemaphorePermit,
    shared: Arc<Shared>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let config = &shared.config;
    let mut decoder = Decoder::new(config.max_packet_size);
    let first = match tokio::time::timeout_at(deadline, read_packet(&mut io, &mut decoder)).await {
        Ok(Ok(packet)) => packet,
        Ok(Err(err)) => {
            tracing::warn!(%peer, error = %err, "link closed before LINK_INIT");
            return;
        }
        Err(_) => {
            tracing::warn!(%peer, "no LINK_INIT within the handshake timeout");
            reject(
                &mut io,
                "no LINK_INIT in time",
                deadline + Duration::from_secs(1),
            )
            .await;
            return;
        }
    };
    let init = match first.kind {
        PacketType::LinkInit => LinkInit::decode(first.payload),
        other => {
            tracing::warn!(%peer, kind = ?other, "link did not start with LINK_INIT");
            reject(&mut io, "expected LINK_INIT", deadline).await;
            return;
        }
    };
    let init = match init {
        Ok(init) => init,
        Err(err) => {
            tracing::warn!(%peer, error = %err, "malformed LINK_INIT");
            reject(&mut io, "malformed LINK_INIT", deadline).await;
            return;
        }
    };
    // Hashed before the constant-time comparison, so a wrong length is not answered faster
    // than a wrong content (slices' `ct_eq` returns early on a length mismatch).
    let secret_ok =
        config
            .link_secrets
            .check(&init.server_name, init.secret.as_ref(), &config.link_secret);
    if !secret_ok {
        shared.metrics.auth_failure();
        tracing::warn!(%peer, server = %init.server_name, "link authentication failed");
        reject(&mut io, "authentication failed", deadline).await;
        return;
    }
    drop(handshake_permit);

    let (info, broker_keepalive) = link_info(&init, config.link_keepalive);
    let instance = info.instance;
    let name = init.server_name;
    let (reader, writer) = tokio::io::split(io);
    let (sender, receiver) = sender::channel(config.link_write_buffer);
    // Who this relay is in its pool and that it can move connections (docs/protocol.md §5.2).
    let hello = RelayHello {
        relay_id: config.relay_id,
        features: LinkFeatures::MOVES,
    };
    let ack = Packet::new(PacketType::LinkInitAck, 0, hello.encode()).to_bytes();
    // The queue is empty and not yet shared, so the ACK is first on the wire.
    let _ = sender.try_send(ack);
    let closed = Arc::new(watch::channel(false).0);
    let link_id = {
        let mut table = shared.table();
        let link_id = table.next_id();
        let handle = LinkHandle {
            id: link_id,
            sender: sender.clone(),
            closed: closed.clone(),
            peer,
            since: Instant::now(),
        };
        let (old, refused) = table.link_up(
            &name,
            info,
            handle,
            &init.connections,
            Instant::now(),
            config.client_inactivity_timeout,
            config.max_connections,
            config.ending_linger,
        );
        if let Some(old) = old {
            tracing::info!(server = %name, instance = %instance.short(), "link replaced by a newer one of the same instance");
            old.close();
        }
        for conn_id in refused {
            tracing::warn!(server = %name, conn_id, "announced connection refused");
            let abort = Packet::new(
                PacketType::ConnAbort,
                conn_id,
                encode_reason("connection refused by relay"),
            );
            let _ = sender.try_send_packet(&abort);
        }
        link_id
    };
    shared.metrics.link_accepted();
    tracing::info!(server = %name, instance = %instance.short(), %peer, announced = init.connections.len(),
        mode = ?info.state.mode, capacity = info.state.capacity.map_or(0, |c| c.max_connections),
        keepalive_ms = broker_keepalive.as_millis() as u64, "link up");

    tokio::spawn(sender::run_writer(
        writer,
        receiver,
        config.link_keepalive,
        closed.clone(),
    ));
    // Dead after three of the longer keepalive: a broker that keeps quiet for its own
    // (longer) interval is alive, and so is one that is quiet for the relay's.
    let dead_after = config.link_keepalive.max(broker_keepalive) * 3;
    let link = ReadLink {
        name: &name,
        instance,
        link_id,
        sender: &sender,
        dead_after,
    };
    let why = read_link(reader, decoder, &link, &closed, &shared).await;
    closed.send_replace(true);
    drop(sender);
    let (current, offers) = shared
        .table()
        .link_down(&name, instance, link_id, Instant::now());
    if current {
        tracing::info!(server = %name, instance = %instance.short(), %peer, reason = why, punted = offers.len(), "link down; grace period started");
    } else {
        tracing::info!(server = %name, instance = %instance.short(), %peer, reason = why, "old link closed");
    }
    send_offers(offers);
}

/// Which link packets are read from.
struct ReadLink<'a> {
    name: &'a str,
    instance: InstanceId,
    link_id: u64,
    sender: &'a LinkSender,
    /// Silence after which the link is dead.
    dead_after: Duration,
}

/// Reads packets until the link ends; returns why it ended.
async fn read_link<R: AsyncRead + Unpin>(
    mut io: R,
    mut decoder: Decoder,
    link: &ReadLink<'_>,
    closed: &watch::Sender<bool>,
    shared: &Shared,
) -> &'static str {
    let (name, dead_after) = (link.name, link.dead_after);
    let mut closed_rx = closed.subscribe();
    let mut stopping = shared.stopping.clone();
    let mut batch = Vec::new();
    loop {
        loop {
            match decoder.next_packet_and_wire() {
                Ok(Some(received)) => batch.push(received),
                Ok(None) => break,
                Err(err) => {
                    tracing::warn!(server = name, error = %err, "undecodable packet on link");
                    return "protocol error";
                }
            }
        }
        if !batch.is_empty() {
            let mut offers = Vec::new();
            {
                let mut table = shared.table();
                for (packet, wire) in batch.drain(..) {
                    offers.extend(route(&mut table, shared, link, packet, wire));
                }
            }
            send_offers(offers);
        }
        if decoder.buffer_mut().capacity() - decoder.buffered() < READ_CHUNK / 4 {
            decoder.buffer_mut().reserve(READ_CHUNK);
        }
        let read = tokio::select! {
            _ = stopped(&mut closed_rx) => return "closed by relay",
            _ = stopped(&mut stopping) => return "relay stopping",
            read = tokio::time::timeout(dead_after, io.read_buf(decoder.buffer_mut())) => read,
        };
        match read {
            Err(_) => {
                return "silent for three keepalive intervals (the longer of relay's and broker's)"
            }
            Ok(Ok(0)) => return "closed by broker",
            Ok(Ok(_)) => {}
            Ok(Err(err)) => {
                tracing::debug!(server = name, error = %err, "link read failed");
                return "read error";
            }
        }
    }
}

/// Sorts one packet from a broker's link (decoded from `wire`) into the table; returns the
/// CONN_INIT to send if the packet made the relay punt a connection to another instance.
fn route(
    table: &mut Table,
    shared: &Shared,
    link: &ReadLink<'_>,
    packet: Packet,
    wire: Bytes,
) -> Option<Offer> {
    let config = &shared.config;
    let (name, sender) = (link.name, link.sender);
    let id = packet.conn_id;
    match packet.kind {
        PacketType::NoOp if id == 0 => return None,
        PacketType::ListenState => {
            match ListenState::decode(packet.payload) {
                Ok(state) => {
                    tracing::debug!(server = name, instance = %link.instance.short(), mode = ?state.mode, capacity = ?state.capacity, "listen state");
                    table.set_listen_state(name, link.instance, link.link_id, state);
                }
                Err(err) => tracing::warn!(server = name, error = %err, "bad LISTEN_STATE ignored"),
            }
            return None;
        }
        PacketType::ConnInit | PacketType::LinkInit | PacketType::LinkInitAck => {
            tracing::warn!(server = name, kind = ?packet.kind, conn_id = id, "unexpected packet from broker ignored");
            return None;
        }
        PacketType::ConnMove => {
            on_move_answer(table, shared, link, packet);
            return None;
        }
        _ => {}
    }
    if !table.belongs_to(id, name, link.instance) {
        // Tell the broker to drop a connection the relay does not know, unless the packet
        // is itself an ending.
        let is_ending = matches!(
            packet.kind,
            PacketType::ConnAbort | PacketType::ConnShutdown | PacketType::ConnRejected
        );
        if !is_ending {
            tracing::debug!(server = name, conn_id = id, "packet for unknown connection");
            let abort = Packet::new(
                PacketType::ConnAbort,
                id,
                encode_reason("unknown connection"),
            );
            let _ = sender.try_send_packet(&abort);
        }
        return None;
    }
    let forget_at = Instant::now() + config.ending_linger;
    match packet.kind {
        PacketType::ConnShutdown => table.end_after_delivery(id, "shutdown by broker", forget_at),
        PacketType::ConnRejected => {
            // Refused before it was accepted: try another instance before the client hears
            // of it (docs/protocol.md §5.1).
            if let Some(offer) = table.punt(id) {
                return Some(offer);
            }
            let reason = format!("rejected by broker: {}", decode_reason(&packet.payload));
            table.end_with(id, packet, &reason, forget_at);
        }
        PacketType::ConnAbort => {
            let reason = format!("aborted by broker: {}", decode_reason(&packet.payload));
            table.end_with(id, packet, &reason, forget_at);
        }
        PacketType::ConnOption => {
            if let Ok(ConnOption::InactivityTimeoutMs(ms)) =
                ConnOption::decode(packet.payload.clone())
            {
                if let Some(entry) = table.get_mut(id) {
                    entry.inactivity_timeout = config.inactivity_timeout_for(ms);
                }
            }
            table.enqueue(id, packet, shared.queue_limits(), false);
        }
        PacketType::ConnInitAck => {
            table.accepted(id);
            table.enqueue(id, packet, shared.queue_limits(), false);
        }
        PacketType::ConnClose => {
            table.note_close(id, false);
            table.enqueue(id, packet, shared.queue_limits(), false);
        }
        // DATA and ACK, the bulk of a download: passed on as they came.
        _ => {
            let queued = Queued::forwarded(packet, wire);
            table.enqueue(id, queued, shared.queue_limits(), false);
        }
    }
    None
}

/// A broker's answer to a CONN_MOVE, or its notice that a connection left for another relay
/// (docs/protocol.md §5.2).
fn on_move_answer(table: &mut Table, shared: &Shared, link: &ReadLink<'_>, packet: Packet) {
    let config = &shared.config;
    let id = packet.conn_id;
    let window = packet.window;
    let answer = match MoveAnswer::decode(packet.payload) {
        Ok(answer) => answer,
        Err(err) => {
            tracing::warn!(server = link.name, conn_id = id, error = %err, "bad CONN_MOVE from broker ignored");
            return;
        }
    };
    let refusal = table.move_answered(
        link.name,
        link.instance,
        id,
        answer,
        window,
        shared.attach_limits(),
        Instant::now(),
        config.client_inactivity_timeout,
    );
    if let Some(abort) = refusal {
        let _ = link.sender.try_send_packet(&abort);
    }
}
