//! One established link: a reader that demultiplexes packets to connections and a writer
//! that batches the connections' packets into few writes. Returns why the link ended.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tunnel_proto::chunks::Chunks;
use tunnel_proto::{Decoder, Packet, PacketParts, PacketType};

use crate::config::BrokerConfig;
use crate::demux;
use crate::dial::{Link, READ_CHUNK};
use crate::shared::{LinkId, Shared};

/// Why a link ended.
#[derive(Debug)]
pub(crate) enum LinkEnd {
    /// The broker is stopping; the queue was flushed and the link closed politely.
    Stopped,
    /// Lost: relay closed it, I/O error, silence, stall or garbage. The reason is for logs.
    Lost(String),
}

/// The writer queue of a link, created when the link is up and before it runs, so the
/// listener reports the link up as soon as the handshake is done.
pub(crate) struct LinkQueue {
    tx: mpsc::Sender<Packet>,
    rx: mpsc::Receiver<Packet>,
}

/// Creates the queue of a newly authenticated link to `relay` and makes it link `id`'s.
pub(crate) fn install(shared: &Shared, id: LinkId, relay: SocketAddr, link: &Link) -> LinkQueue {
    let (tx, rx) = mpsc::channel(shared.config.link_write_queue);
    shared.install_link(id, relay, link.hello, &tx);
    LinkQueue { tx, rx }
}

/// Runs link `id` until it is lost or the broker stops.
pub(crate) async fn run(shared: &Arc<Shared>, id: LinkId, link: Link, queue: LinkQueue) -> LinkEnd {
    let config = &shared.config;
    let LinkQueue { tx, rx } = queue;
    let (reader, writer) = tokio::io::split(link.io);
    let end = tokio::select! {
        end = read_loop(shared, id, reader, link.decoder, &tx) => end,
        end = write_loop(config, writer, rx, shared.stop_signal()) => end,
    };
    shared.clear_link(id, &tx);
    end
}

async fn read_loop<R: AsyncRead + Unpin>(
    shared: &Arc<Shared>,
    id: LinkId,
    mut reader: R,
    mut decoder: Decoder,
    tx: &mpsc::Sender<Packet>,
) -> LinkEnd {
    let silence_limit = shared.config.link_dead_after();
    loop {
        // Take out every whole packet before reading more, so the decoder holds at most one
        // partial packet plus one read.
        loop {
            match decoder.next_packet() {
                Ok(Some(packet)) => demux::handle_packet(shared, id, tx, packet).await,
                Ok(None) => break,
                Err(e) => return LinkEnd::Lost(format!("undecodable data from the relay: {e}")),
            }
        }
        decoder.buffer_mut().reserve(READ_CHUNK);
        match tokio::time::timeout(silence_limit, reader.read_buf(decoder.buffer_mut())).await {
            Err(_) => {
                return LinkEnd::Lost(format!(
                    "nothing heard from the relay for {silence_limit:?}"
                ))
            }
            Ok(Ok(0)) => {
                return LinkEnd::Lost(match decoder.finish() {
                    Ok(()) => "relay closed the link".into(),
                    Err(e) => format!("relay closed the link inside a packet: {e}"),
                })
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return LinkEnd::Lost(format!("read error: {e}")),
        }
    }
}

async fn write_loop<W: AsyncWrite + Unpin>(
    config: &BrokerConfig,
    mut writer: W,
    mut rx: mpsc::Receiver<Packet>,
    mut stop: watch::Receiver<bool>,
) -> LinkEnd {
    loop {
        let first = tokio::select! {
            biased;
            _ = crate::shared::stopped(&mut stop) => {
                // Flush what is queued (aborts of a shutdown among it), then close.
                let mut batch = PacketParts::new();
                while let Ok(packet) = rx.try_recv() {
                    batch.push(&packet);
                }
                let mut batch = Chunks::from(batch.into_parts());
                let flush = async {
                    writer.write_all_buf(&mut batch).await?;
                    writer.shutdown().await
                };
                if let Err(e) = tokio::time::timeout(config.link_write_timeout, flush).await.unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into())) {
                    tracing::debug!(error = %e, "final link flush failed");
                }
                return LinkEnd::Stopped;
            }
            next = tokio::time::timeout(config.keepalive_interval, rx.recv()) => match next {
                Ok(Some(packet)) => packet,
                // Cannot happen while `run` holds a sender; treat it as a stop.
                Ok(None) => return LinkEnd::Stopped,
                // Idle for a keepalive interval: tell the relay we are alive.
                Err(_) => Packet::new(PacketType::NoOp, 0, Bytes::new()),
            },
        };
        // Long payloads are written from the connections' own buffers, gathered into one
        // vectored write with the headers (copying them into one buffer was 5 % of the
        // broker's time during a download).
        let mut batch = PacketParts::new();
        batch.push(&first);
        while batch.len() < config.link_write_batch_bytes {
            match rx.try_recv() {
                Ok(packet) => batch.push(&packet),
                Err(_) => break,
            }
        }
        let mut batch = Chunks::from(batch.into_parts());
        let write = async {
            writer.write_all_buf(&mut batch).await?;
            writer.flush().await
        };
        match tokio::time::timeout(config.link_write_timeout, write).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return LinkEnd::Lost(format!("write error: {e}")),
            Err(_) => {
                return LinkEnd::Lost(format!(
                    "a write to the relay took longer than {:?}",
                    config.link_write_timeout
                ))
            }
        }
    }
}
