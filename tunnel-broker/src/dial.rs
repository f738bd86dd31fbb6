//! Dialing the relay: TCP (+ TLS), LINK_INIT, and the relay's answer.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tunnel_proto::payload::{
    decode_reason, AnnouncedConn, LinkExtension, LinkFeatures, LinkInit, ListenState, RelayHello,
};
use tunnel_proto::{Decoder, Packet, PacketType};

use crate::config::BrokerConfig;

/// The byte stream under a link: TCP or TLS over TCP.
pub(crate) trait LinkIo: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> LinkIo for T {}

/// An authenticated link, ready to carry connections.
pub(crate) struct Link {
    pub io: Box<dyn LinkIo>,
    /// Holds whatever the relay sent right after LINK_INIT_ACK.
    pub decoder: Decoder,
    /// What the relay said of itself in LINK_INIT_ACK.
    pub hello: RelayHello,
}

/// Bytes reserved for each read from the link: a few whole packets, so that a bulk transfer
/// takes one system call per few packets (64 KiB took three times the calls).
pub(crate) const READ_CHUNK: usize = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub(crate) enum DialError {
    /// The relay answered CONN_REJECTED: wrong secret, name taken by policy, etc.
    #[error("relay rejected the link: {0}")]
    Rejected(String),
    #[error("{context}: {source}")]
    Io {
        context: &'static str,
        source: io::Error,
    },
    #[error("no LINK_INIT_ACK within {0:?}")]
    Timeout(Duration),
    #[error("protocol error during the link handshake: {0}")]
    Protocol(String),
}

fn io_err(context: &'static str) -> impl FnOnce(io::Error) -> DialError {
    move |source| DialError::Io { context, source }
}

/// Dials the relay at `relay` and authenticates, announcing `connections` and this instance
/// (`state`: its listen mode and load now); all of it within the configured handshake
/// timeout.
pub(crate) async fn dial(
    config: &BrokerConfig,
    relay: SocketAddr,
    connections: Vec<AnnouncedConn>,
    state: ListenState,
) -> Result<Link, DialError> {
    let limit = config.handshake_timeout;
    tokio::time::timeout(limit, dial_inner(config, relay, connections, state))
        .await
        .unwrap_or(Err(DialError::Timeout(limit)))
}

async fn dial_inner(
    config: &BrokerConfig,
    relay: SocketAddr,
    connections: Vec<AnnouncedConn>,
    state: ListenState,
) -> Result<Link, DialError> {
    let tcp = TcpStream::connect(relay)
        .await
        .map_err(io_err("connecting to the relay"))?;
    // Packets are written whole, often small (acks); do not let Nagle hold them back.
    tcp.set_nodelay(true)
        .map_err(io_err("setting TCP_NODELAY"))?;
    let mut io: Box<dyn LinkIo> = match &config.tls {
        None => Box::new(tcp),
        Some(tls) => {
            let connector = tokio_rustls::TlsConnector::from(tls.client_config.clone());
            Box::new(
                connector
                    .connect(tls.server_name.clone(), tcp)
                    .await
                    .map_err(io_err("TLS handshake with the relay"))?,
            )
        }
    };

    let init = LinkInit {
        server_name: config.server_name.clone(),
        secret: config.link_secret.clone(),
        connections,
        extension: Some(LinkExtension {
            instance: config.instance_id,
            keepalive_ms: u32::try_from(config.keepalive_interval.as_millis()).unwrap_or(u32::MAX),
            state,
            features: Some(LinkFeatures::MOVES),
        }),
    };
    let mut out = BytesMut::new();
    Packet::new(PacketType::LinkInit, 0, init.encode()).encode(&mut out);
    io.write_all(&out)
        .await
        .map_err(io_err("sending LINK_INIT"))?;
    io.flush().await.map_err(io_err("sending LINK_INIT"))?;

    let mut decoder = Decoder::new(config.max_packet_size);
    loop {
        match decoder.next_packet() {
            Ok(Some(packet)) => match packet.kind {
                PacketType::LinkInitAck => {
                    let hello = RelayHello::decode(packet.payload).map_err(|e| {
                        DialError::Protocol(format!("malformed LINK_INIT_ACK: {e}"))
                    })?;
                    return Ok(Link { io, decoder, hello });
                }
                PacketType::ConnRejected => {
                    return Err(DialError::Rejected(decode_reason(&packet.payload)))
                }
                // A keepalive before the answer is harmless.
                PacketType::NoOp => continue,
                other => {
                    return Err(DialError::Protocol(format!(
                        "expected LINK_INIT_ACK, got {other:?}"
                    )))
                }
            },
            Ok(None) => {}
            Err(e) => return Err(DialError::Protocol(e.to_string())),
        }
        decoder.buffer_mut().reserve(READ_CHUNK);
        let n = io
            .read_buf(decoder.buffer_mut())
            .await
            .map_err(io_err("reading the relay's answer to LINK_INIT"))?;
        if n == 0 {
            return Err(DialError::Protocol(
                "relay closed the link before answering LINK_INIT".into(),
            ));
        }
    }
}
