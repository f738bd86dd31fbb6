//! Opening a connection through the relay (docs/protocol.md §3): the connect request with its
//! retries, the handshake pulls until the broker's CONN_INIT_ACK, then the driver, the push
//! sink and the pull loop.

use std::sync::{Arc, OnceLock};
use tunnel_proto::warn_limit::WarningLimit;

use tokio::time::Instant;
use tunnel_proto::packet::HEADER_LEN;
use tunnel_proto::payload::{decode_reason, decode_token, encode_reason, ConnOption};
use tunnel_proto::{Connection, Packet, PacketType, Token};

use crate::config::ClientConfig;
use crate::error::ConnectError;
use crate::http::{status_hint, Failure, Relay, RequestError};
use crate::per_conn::PerConn;
use crate::push::HttpSink;
use crate::session::{ClientSession, SessionOwner};
use tunnel_proto::backoff::Backoff;
use tunnel_proto::driver::{self, ConnHandle, TunnelStream};

/// Opens a connection to `config.server_name` through the relay at `config.relay_url`: the
/// tunnel's `TcpStream::connect`.
///
/// Resolves once the broker accepted the connection (CONN_INIT_ACK), or fails with a typed
/// error: unknown server (404), refused request, rejection by the broker, or no success
/// within `config.connect_timeout` (503s and network errors are retried until then).
///
/// To open many connections, make one [`TunnelClient`] and call its
/// [`connect`](TunnelClient::connect): its connections share one HTTP connection pool (and
/// one TLS set-up).
pub async fn connect(config: ClientConfig) -> Result<TunnelStream, ConnectError> {
    TunnelClient::new(config)?.connect().await
}

/// Opens tunnel connections to one server through one relay. Every connection opened by a
/// `TunnelClient` (and its clones, which are cheap) shares one pool of HTTP connections to
/// the relay, so many idle tunnel connections over HTTP/2 travel on a handful of TCP
/// connections, and a new one costs no new TLS handshake.
///
/// # Example: many connections at once
///
/// ```
/// # mod doc_support { include!(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/doc_support/echo_tunnel.rs")); }
/// use tokio::io::{AsyncReadExt, AsyncWriteExt};
/// use tokio::task::JoinSet;
/// use tunnel_client::{ClientConfig, TunnelClient};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> std::io::Result<()> {
/// # let tunnel = doc_support::EchoTunnel::start().await?;
/// # let relay_url = tunnel.relay_url();
/// let client = TunnelClient::new(ClientConfig::new(relay_url, "echo"))?;
/// let mut streams = JoinSet::new();
/// for i in 0..20 {
///     let client = client.clone();
///     streams.spawn(async move {
///         let mut stream = client.connect().await?;
///         stream.write_all(format!("line {i}\n").as_bytes()).await?;
///         stream.shutdown().await?;
///         let mut echoed = String::new();
///         stream.read_to_string(&mut echoed).await?;
///         assert_eq!(echoed, format!("line {i}\n"));
///         Ok::<_, std::io::Error>(())
///     });
/// }
/// while let Some(done) = streams.join_next().await {
///     done??;
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct TunnelClient {
    relay: Relay,
    config: ClientConfig,
    /// The session all connections share (`ClientConfig::session`).
    session: Option<Arc<SessionOwner>>,
}

impl TunnelClient {
    /// Checks the configuration and builds the HTTP client; no request is made yet. Fails
    /// with [`ConnectError::InvalidConfig`] (bad URL, proxy or CA file).
    pub fn new(config: ClientConfig) -> Result<TunnelClient, ConnectError> {
        let largest = config.max_packet_size.saturating_sub(HEADER_LEN);
        if !(1..=largest).contains(&config.connection.max_data_payload) {
            return Err(ConnectError::InvalidConfig(format!(
                "max data payload {} bytes: must be 1 to {largest} (the largest packet, {} \
                 bytes, less its 24-byte header)",
                config.connection.max_data_payload, config.max_packet_size
            )));
        }
        let relay = Relay::new(&config)?;
        let session = config.session.then(|| {
            let session = Arc::new(ClientSession::new(relay.clone(), config.clone()));
            Arc::new(SessionOwner(session))
        });
        Ok(TunnelClient {
            relay,
            config,
            session,
        })
    }

    /// The configuration this client was made with.
    pub fn config(&self) -> &ClientConfig {
        &self.config
    }

    /// How requests reach the relay now: `direct`, `environment proxy variables`, or the
    /// proxy and how it was chosen (`--proxy`, PAC script). With a PAC script this follows
    /// its fail-over list as proxies stop answering.
    pub fn route(&self) -> &str {
        self.relay.route_label()
    }

    /// How the session's downstream goes: streaming or polling now, and how many streams,
    /// polls and fall-backs it made (docs/protocol.md §2.2). `None` without a session
    /// ([`ClientConfig::session`] off, or a relay that does not serve sessions).
    pub fn session_stats(&self) -> Option<crate::SessionStats> {
        let session = &self.session.as_ref()?.0;
        (!session.unsupported()).then(|| session.stats())
    }

    /// Opens one connection; see [`connect`](crate::connect).
    pub async fn connect(&self) -> Result<TunnelStream, ConnectError> {
        if let Some(session) = self
            .session
            .as_ref()
            .map(|s| &s.0)
            .filter(|s| !s.unsupported())
        {
            if let Some(stream) = crate::session::connect(session).await? {
                return Ok(stream);
            }
        }
        connect_with(self.relay.clone(), self.config.clone()).await
    }
}

async fn connect_with(relay: Relay, config: ClientConfig) -> Result<TunnelStream, ConnectError> {
    let deadline = Instant::now() + config.connect_timeout;
    let mut last_error = String::from("no answer yet");

    let opened = tokio::time::timeout_at(deadline, open(&relay, &config, &mut last_error)).await;
    let (conn_id, token) = match opened {
        Ok(result) => result?,
        Err(_) => {
            tracing::warn!(relay = %relay.display_url(), server = %config.server_name,
                "connect timed out after {:?}: {last_error}", config.connect_timeout);
            return Err(ConnectError::TimedOut {
                after: config.connect_timeout,
                last_error,
            });
        }
    };
    let per_conn = Arc::new(PerConn::new(relay, config, conn_id, token));

    let handshake = tokio::time::timeout_at(deadline, handshake(&per_conn, &mut last_error)).await;
    let (peer_window, early) = match handshake {
        Ok(Ok(accepted)) => accepted,
        Ok(Err(e)) => {
            if !matches!(e, ConnectError::Rejected(_) | ConnectError::Aborted(_)) {
                abort_at_relay(&per_conn, "client gave up during the handshake");
            }
            return Err(e);
        }
        Err(_) => {
            tracing::warn!(conn_id, server = %per_conn.config.server_name,
                "no answer from the server within {:?}: {last_error}", per_conn.config.connect_timeout);
            abort_at_relay(&per_conn, "client connect timed out");
            return Err(ConnectError::TimedOut {
                after: per_conn.config.connect_timeout,
                last_error,
            });
        }
    };

    let handle_cell = Arc::new(OnceLock::new());
    let sink = Arc::new(HttpSink::new(per_conn.clone(), handle_cell.clone()));
    let (stream, handle) = start_driver(
        conn_id,
        peer_window,
        &per_conn.config,
        per_conn.config.connection.recv_window,
        sink,
    );
    let _ = handle_cell.set(handle.clone());
    if !early.is_empty() {
        handle.deliver_all(early);
    }
    tracing::info!(conn_id, relay = %per_conn.relay.display_url(),
        server = %per_conn.config.server_name, "tunnel connection established");
    tokio::spawn(crate::pull::run(per_conn.clone(), handle.clone()));
    tokio::spawn(log_close(handle));
    Ok(stream)
}

/// Starts the driver of an accepted connection (both transports): the connection with the
/// broker's first window, its first ACK (which tells the relay the CONN_INIT_ACK arrived) and
/// the outage option, handing its packets to `sink`.
pub(crate) fn start_driver(
    conn_id: u32,
    peer_window: u16,
    config: &ClientConfig,
    recv_window: u16,
    sink: Arc<dyn driver::PacketSink>,
) -> (TunnelStream, ConnHandle) {
    let allowance = config.peer_silence_allowance();
    let mut conn_config = config.connection.clone();
    // The window announced in the CONN_INIT: the connection must keep to it.
    conn_config.recv_window = recv_window;
    conn_config.idle_timeout = conn_config.idle_timeout.max(allowance);
    let mut conn = Connection::new(conn_id, peer_window, conn_config, driver::now());
    // Our first push tells the relay we have the CONN_INIT_ACK, so it stops resending it.
    conn.send_ack_now();
    // Ride out outages up to the grace: the relay's inactivity timeout and the broker's idle
    // timeout follow this option (docs/protocol.md §6).
    let allowance_ms = u32::try_from(allowance.as_millis()).unwrap_or(u32::MAX);
    if let Err(e) = conn.send_option(ConnOption::InactivityTimeoutMs(allowance_ms)) {
        tracing::debug!(conn_id, "could not queue the inactivity option: {e}");
    }
    let mut stream_config = config.stream.clone();
    stream_config.max_batch_bytes = stream_config.max_batch_bytes.min(config.max_push_body);
    driver::spawn_with_config(conn, sink, stream_config)
}

/// POSTs CONN_INIT until the relay assigns a connection id and token.
async fn open(
    relay: &Relay,
    config: &ClientConfig,
    last_error: &mut String,
) -> Result<(u32, Token), ConnectError> {
    let init = Packet::new(PacketType::ConnInit, 0, Default::default())
        .with_window(config.connection.recv_window);
    let mut backoff = Backoff::new(config.retry_initial, config.retry_max);
    loop {
        let error = match relay.connect(&init).await {
            Ok(packets) => return parse_connect_answer(packets),
            Err(e) => e,
        };
        match (error.failure(), &error) {
            (Failure::Gone, _) => {
                tracing::warn!(server = %config.server_name, relay = %relay.display_url(),
                    "connect: HTTP 404: the relay knows no such server");
                return Err(ConnectError::NoSuchServer {
                    server: config.server_name.clone(),
                });
            }
            (_, RequestError::BadBody(msg)) => {
                return Err(ConnectError::BadResponse(format!(
                    "connect answer: {msg} (is {} a tunnel relay?)",
                    relay.display_url()
                )));
            }
            (Failure::Permanent, _) => {
                let refused = permanent_error(&error, relay);
                tracing::warn!(server = %config.server_name, relay = %relay.display_url(),
                    "connect refused: {refused}");
                return Err(refused);
            }
            (Failure::Transient, _) => {
                let delay = backoff.next_delay();
                // Every connect retries while the relay is unreachable: one warning per 10 s.
                static RETRIES: WarningLimit =
                    WarningLimit::new(std::time::Duration::from_secs(10));
                tunnel_proto::warn_limited!(RETRIES, server = %config.server_name,
                    relay = %relay.display_url(), "connect failed: {error}; retrying in {delay:?}");
                *last_error = error.to_string();
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// The connect error for a request failure that retrying cannot fix.
pub(crate) fn permanent_error(error: &RequestError, relay: &Relay) -> ConnectError {
    if let RequestError::Tls(msg) = error {
        return ConnectError::Tls(msg.clone());
    }
    let status = error.status().map_or(0, |s| s.as_u16());
    // A 407 after a handshake of ours: its scheme and user say more than the status.
    let auth_failure = (status == 407)
        .then(|| relay.proxy_auth_failure())
        .flatten()
        .map(|why| format!("proxy authentication failed: {why}"));
    let hint = auth_failure.unwrap_or_else(|| {
        error
            .status()
            .and_then(status_hint)
            .unwrap_or("unexpected status")
            .to_string()
    });
    ConnectError::Refused { status, hint }
}

pub(crate) fn parse_connect_answer(packets: Vec<Packet>) -> Result<(u32, Token), ConnectError> {
    let Some(init) = packets.into_iter().find(|p| p.kind != PacketType::NoOp) else {
        return Err(ConnectError::BadResponse(
            "connect answer holds no CONN_INIT".into(),
        ));
    };
    match init.kind {
        PacketType::ConnInit if init.conn_id != 0 => {
            let token = decode_token(init.payload)
                .map_err(|e| ConnectError::BadResponse(format!("connect answer: {e}")))?;
            Ok((init.conn_id, token))
        }
        PacketType::ConnInit => Err(ConnectError::BadResponse(
            "connect answer assigns connection id 0".into(),
        )),
        PacketType::ConnRejected => Err(ConnectError::Rejected(decode_reason(&init.payload))),
        other => Err(ConnectError::BadResponse(format!(
            "connect answer is {other:?}, expected CONN_INIT"
        ))),
    }
}

/// Pulls until the broker's answer arrives: its receive window, and the packets that came
/// after CONN_INIT_ACK in the same body (they belong to the connection).
async fn handshake(
    per_conn: &PerConn,
    last_error: &mut String,
) -> Result<(u16, Vec<Packet>), ConnectError> {
    let config = &per_conn.config;
    let mut backoff = Backoff::new(config.retry_initial, config.retry_max);
    loop {
        let error = match per_conn.relay.pull(per_conn.conn_id, &per_conn.token).await {
            Ok(packets) => {
                backoff.reset();
                let mut packets = packets.into_iter();
                while let Some(p) = packets.next() {
                    match p.kind {
                        PacketType::ConnInitAck => {
                            let rest = packets.filter(|p| p.kind != PacketType::NoOp).collect();
                            return Ok((p.window, rest));
                        }
                        PacketType::ConnRejected => {
                            let reason = decode_reason(&p.payload);
                            tracing::warn!(conn_id = per_conn.conn_id, server = %config.server_name,
                                "connection rejected by the server: {reason}");
                            return Err(ConnectError::Rejected(reason));
                        }
                        PacketType::ConnAbort => {
                            let reason = decode_reason(&p.payload);
                            tracing::warn!(
                                conn_id = per_conn.conn_id,
                                "connection aborted during the handshake: {reason}"
                            );
                            return Err(ConnectError::Aborted(reason));
                        }
                        PacketType::NoOp => {}
                        other => tracing::debug!(
                            conn_id = per_conn.conn_id,
                            "ignoring {other:?} before CONN_INIT_ACK"
                        ),
                    }
                }
                *last_error = "the server has not answered the connection yet".into();
                continue;
            }
            Err(e) => e,
        };
        match error.failure() {
            Failure::Gone => {
                return Err(ConnectError::Aborted(
                    "the relay no longer knows the connection".into(),
                ))
            }
            Failure::Permanent => return Err(permanent_error(&error, &per_conn.relay)),
            Failure::Transient => {
                let delay = backoff.next_delay();
                tracing::warn!(
                    conn_id = per_conn.conn_id,
                    "handshake pull failed: {error}; retrying in {delay:?}"
                );
                *last_error = error.to_string();
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Best effort: tells the relay (and through it the broker) that this client is gone, so the
/// connection does not wait for an inactivity timeout.
fn abort_at_relay(per_conn: &Arc<PerConn>, reason: &str) {
    let packet = Packet::new(
        PacketType::ConnAbort,
        per_conn.conn_id,
        encode_reason(reason),
    );
    let per_conn = per_conn.clone();
    tokio::spawn(async move {
        let body = packet.to_bytes();
        if let Err(e) = per_conn
            .relay
            .push(per_conn.conn_id, &per_conn.token, body)
            .await
        {
            tracing::debug!(conn_id = per_conn.conn_id, "could not send CONN_ABORT: {e}");
        }
    });
}

pub(crate) async fn log_close(handle: ConnHandle) {
    handle.closed().await;
    let stats = handle.stats();
    match handle.error() {
        None => tracing::info!(
            conn_id = handle.conn_id(),
            bytes_sent = stats.bytes_sent,
            bytes_received = stats.bytes_received,
            retransmits = stats.retransmits,
            tail_probes = stats.tail_probes,
            "tunnel connection closed"
        ),
        Some(e) => tracing::warn!(
            conn_id = handle.conn_id(),
            bytes_sent = stats.bytes_sent,
            bytes_received = stats.bytes_received,
            retransmits = stats.retransmits,
            tail_probes = stats.tail_probes,
            "tunnel connection failed: {e}"
        ),
    }
}
