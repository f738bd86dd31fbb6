//! Opening a connection in the session (docs/protocol.md §2.1 and §3): the connect request in
//! the session, then the broker's answer, which arrives through the session's pull.

use std::sync::Arc;

use tokio::time::Instant;
use tunnel_proto::backoff::Backoff;
use tunnel_proto::driver::TunnelStream;
use tunnel_proto::payload::encode_reason;
use tunnel_proto::warn_limit::WarningLimit;
use tunnel_proto::{Packet, PacketType, Token};

use super::pusher::SessionSink;
use super::registry::Handshake;
use super::ClientSession;
use crate::connect::{log_close, parse_connect_answer, permanent_error, start_driver};
use crate::error::ConnectError;
use crate::http::{Failure, RequestError, SessionKey};

/// Opens one connection in the session. `Ok(None)`: the relay does not serve sessions; the
/// caller uses the per-connection requests.
pub(crate) async fn connect(
    session: &Arc<ClientSession>,
) -> Result<Option<TunnelStream>, ConnectError> {
    let config = &session.config;
    let deadline = Instant::now() + config.connect_timeout;
    let mut last_error = String::from("no answer yet");
    let timed_out = |last_error: String| {
        tracing::warn!(relay = %session.relay.display_url(), server = %config.server_name,
            "connect timed out after {:?}: {last_error}", config.connect_timeout);
        ConnectError::TimedOut {
            after: config.connect_timeout,
            last_error,
        }
    };

    let opened = tokio::time::timeout_at(deadline, async {
        // Connects wait their turn: opening many at once must not cost an HTTP connection each.
        let _slot = session
            .connect_slots
            .acquire()
            .await
            .map_err(|_| ConnectError::Aborted("the client is shutting down".into()))?;
        open(session, &mut last_error).await
    })
    .await;
    let (conn_id, recv_window, answer) = match opened {
        Ok(Ok(Some(opened))) => opened,
        Ok(Ok(None)) => return Ok(None),
        Ok(Err(e)) => return Err(e),
        Err(_) => return Err(timed_out(last_error)),
    };

    let window = match tokio::time::timeout_at(deadline, answer).await {
        Ok(Ok(Handshake::Accepted { window })) => window,
        Ok(Ok(Handshake::Rejected(reason))) => {
            session.lock_registry().remove(conn_id);
            tracing::warn!(conn_id, server = %config.server_name,
                "connection rejected by the server: {reason}");
            return Err(ConnectError::Rejected(reason));
        }
        Ok(Ok(Handshake::Aborted(reason))) => {
            session.lock_registry().remove(conn_id);
            tracing::warn!(conn_id, "connection aborted during the handshake: {reason}");
            return Err(ConnectError::Aborted(reason));
        }
        Ok(Err(_)) => {
            // The registry was emptied: the session gave up (outage past the grace, or a
            // refusal); its log line says why.
            return Err(ConnectError::Aborted(
                "the session to the relay failed during the handshake".into(),
            ));
        }
        Err(_) => {
            session.lock_registry().remove(conn_id);
            abort_at_relay(session, conn_id, "client connect timed out").await;
            tracing::warn!(conn_id, server = %config.server_name,
                "no answer from the server within {:?}", config.connect_timeout);
            return Err(ConnectError::TimedOut {
                after: config.connect_timeout,
                last_error: "the server has not answered the connection".into(),
            });
        }
    };

    let sink = Arc::new(SessionSink {
        session: session.clone(),
    });
    let (stream, handle) = start_driver(conn_id, window, config, recv_window, sink);
    let early = session.lock_registry().go_live(conn_id, handle.clone());
    if !early.is_empty() {
        handle.deliver_all(early);
    }
    tracing::info!(conn_id, relay = %session.relay.display_url(),
        server = %config.server_name, "tunnel connection established");
    let session = session.clone();
    tokio::spawn(async move {
        log_close(handle.clone()).await;
        session.connection_ended(handle.conn_id());
    });
    Ok(Some(stream))
}

/// The connect request in the session, with its retries: the connection's id, the receive
/// window its CONN_INIT announced (what the session's relay holds for it), and the channel on
/// which the broker's answer arrives. `None`: sessions are not served.
async fn open(
    session: &Arc<ClientSession>,
    last_error: &mut String,
) -> Result<Option<(u32, u16, tokio::sync::oneshot::Receiver<Handshake>)>, ConnectError> {
    let config = &session.config;
    let mut backoff = Backoff::new(config.retry_initial, config.retry_max);
    loop {
        let error = match session.key().await {
            Err(e) => e,
            Ok(key) => {
                let recv_window = config.recv_window_for(key.queue_limit);
                let init = Packet::new(PacketType::ConnInit, 0, Default::default())
                    .with_window(recv_window);
                match session.relay.session_connect(&key, &init).await {
                    Ok(packets) => {
                        let (conn_id, token) = parse_connect_answer(packets)?;
                        let answer = register(session, &key, conn_id, token);
                        return Ok(Some((conn_id, recv_window, answer)));
                    }
                    Err(e) if e.failure() == Failure::Gone => {
                        // Unknown server, or unknown session: an empty push tells them apart.
                        match session.relay.session_push(&key, Default::default()).await {
                            Ok(_) => {
                                tracing::warn!(server = %config.server_name, relay = %session.relay.display_url(),
                                "connect: HTTP 404: the relay knows no such server");
                                return Err(ConnectError::NoSuchServer {
                                    server: config.server_name.clone(),
                                });
                            }
                            Err(probe) if probe.failure() == Failure::Gone => {
                                session.forget(&key, "connect");
                                continue;
                            }
                            Err(probe) => probe,
                        }
                    }
                    Err(e) => e,
                }
            }
        };
        if session.unsupported() {
            return Ok(None);
        }
        match (error.failure(), &error) {
            (_, RequestError::BadBody(msg)) => {
                return Err(ConnectError::BadResponse(format!(
                    "connect answer: {msg} (is {} a tunnel relay?)",
                    session.relay.display_url()
                )));
            }
            (Failure::Permanent, _) => {
                let refused = permanent_error(&error, &session.relay);
                tracing::warn!(server = %config.server_name, relay = %session.relay.display_url(),
                    "connect refused: {refused}");
                return Err(refused);
            }
            _ => {
                let delay = backoff.next_delay();
                static RETRIES: WarningLimit =
                    WarningLimit::new(std::time::Duration::from_secs(10));
                tunnel_proto::warn_limited!(RETRIES, server = %config.server_name,
                    relay = %session.relay.display_url(), "connect failed: {error}; retrying in {delay:?}");
                *last_error = error.to_string();
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Registers a connection the relay opened, and makes sure the pull loop runs to fetch the
/// broker's answer.
fn register(
    session: &Arc<ClientSession>,
    key: &SessionKey,
    conn_id: u32,
    token: Token,
) -> tokio::sync::oneshot::Receiver<Handshake> {
    let current = session.current().map_or(key.generation, |k| k.generation);
    let server: Arc<str> = session.relay.server_name().into();
    let answer = session
        .lock_registry()
        .register(conn_id, token, server, key.generation, current);
    session.ensure_tasks();
    answer
}

/// Best effort: tells the relay (and through it the broker) that this connection is given
/// up, so it does not wait for an inactivity timeout.
async fn abort_at_relay(session: &Arc<ClientSession>, conn_id: u32, reason: &str) {
    let packet = Packet::new(PacketType::ConnAbort, conn_id, encode_reason(reason));
    session.outbox.put(vec![packet]).await;
    session.pusher_wake.notify_one();
}
