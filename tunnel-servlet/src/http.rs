//! The HTTP interface (docs/protocol.md §2): routing, and the connect, push and pull handlers.
//!
//! Handlers lock the table only for map operations and never across an await. A push body is
//! validated whole before any of it is forwarded, then forwarded as is (it is already the
//! packets back to back). Every response ends: a pull is held, and a streamed pull
//! (`session_stream.rs`) kept open, at most `pull_wait`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;
use tunnel_proto::chunks::Chunks;
use tunnel_proto::warn_limit::WarningLimit;

use bytes::Bytes;
use http_body_util::{BodyExt, Either, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::header::{
    HeaderValue, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE,
};
use hyper::{Method, Request, Response, StatusCode};
use tokio::sync::oneshot;
use tunnel_proto::payload::{encode_token, BrokerConnInit};
use tunnel_proto::{decode_all, Decoder, Packet, PacketType, Token};

use crate::forwarded;
use crate::metrics::{RejectReason, SessionRejectReason};
use crate::query::{self, Kind};
use crate::sender::SendError;
use crate::session_http::{self as session, SessionKey};
use crate::session_stream::SessionStream;
use crate::session_upstream::SessionUpstream;
use crate::state::Shared;
use crate::status::StatusSnapshot;
use crate::table::{NoPlace, Waiter, Wake};

/// Every response's body: whole, a streamed pull (docs/protocol.md §2.2), or the empty body
/// that reads a streamed upstream (§2.3).
/// Their data is a list of buffers ([`Chunks`]), so that a streamed pull sends the packets a
/// broker sent as the bytes the link read them into, and still as one chunk per batch.
pub(crate) type Body = Either<Full<Chunks>, Either<SessionStream, SessionUpstream>>;

/// A response of `status` with `body` of `content_type`, never cached: every answer of the
/// relay is about one moment.
pub(crate) fn uncached(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Body> {
    uncached_chunks(status, content_type, Chunks::from(body.into()))
}

/// As [`uncached`], with a body of several buffers (sent with one vectored write).
fn uncached_chunks(status: StatusCode, content_type: &'static str, body: Chunks) -> Response<Body> {
    let mut resp = Response::new(Either::Left(Full::new(body)));
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// A short text/plain error. Never include a token in `msg`.
pub(crate) fn error(status: StatusCode, msg: &str) -> Response<Body> {
    uncached(status, "text/plain; charset=utf-8", format!("{msg}\n"))
}

/// `GET /healthz`: 200 "ok" while the relay serves.
pub(crate) fn healthz() -> Response<Body> {
    error(StatusCode::OK, "ok")
}

/// `GET /metrics`: the snapshot in the Prometheus text format.
pub(crate) fn metrics(snapshot: &StatusSnapshot) -> Response<Body> {
    uncached(
        StatusCode::OK,
        "text/plain; version=0.0.4; charset=utf-8",
        snapshot.render_prometheus(),
    )
}

/// A 200 whose body is packets: encoded in one buffer, or a session's answer whose long
/// packets are the bytes the broker link read (`PacketParts`), sent without a copy.
pub(crate) fn packets(body: impl Into<Chunks>) -> Response<Body> {
    uncached_chunks(StatusCode::OK, "application/octet-stream", body.into())
}

pub(crate) fn no_op() -> Response<Body> {
    packets(Packet::new(PacketType::NoOp, 0, Bytes::new()).to_bytes())
}

/// Entry point of every HTTP request.
pub(crate) async fn handle(
    req: Request<Incoming>,
    peer: SocketAddr,
    shared: Arc<Shared>,
) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path();
    let resp = if path == shared.config.base_path {
        match refuse_unauthenticated(&req, peer, &shared) {
            None => tunnel(req, peer, &shared).await,
            Some(refusal) => refusal,
        }
    } else if path == "/healthz" && req.method() == Method::GET {
        healthz()
    } else if path == "/metrics" && req.method() == Method::GET && shared.config.public_metrics {
        metrics(&StatusSnapshot::gather(&shared))
    } else {
        error(StatusCode::NOT_FOUND, "no such path")
    };
    Ok(resp)
}

/// Applies `client_auth` (if configured) before anything of the request is read: the 401
/// to answer, with one `WWW-Authenticate` challenge per accepted scheme, or `None` to go on.
/// The log line says why, never what was presented.
fn refuse_unauthenticated(
    req: &Request<Incoming>,
    peer: SocketAddr,
    shared: &Shared,
) -> Option<Response<Body>> {
    let auth = shared.config.client_auth.as_ref()?;
    let failure = auth.check(req.headers()).err()?;
    shared.metrics.client_auth_failure();
    static AUTH_FAILURES: WarningLimit = WarningLimit::new(std::time::Duration::from_secs(10));
    tunnel_proto::warn_limited!(
        AUTH_FAILURES,
        %peer,
        reason = failure.as_str(),
        "client authentication failed; 401"
    );
    let mut resp = error(StatusCode::UNAUTHORIZED, "client authentication required");
    for challenge in auth.challenges() {
        resp.headers_mut().append(WWW_AUTHENTICATE, challenge);
    }
    Some(resp)
}

async fn tunnel(req: Request<Incoming>, peer: SocketAddr, shared: &Arc<Shared>) -> Response<Body> {
    let params = query::parse(req.uri().query());
    let Some(kind) = params.kind else {
        return error(
            StatusCode::BAD_REQUEST,
            "Type must be connect, push, pull, session or close",
        );
    };
    let method = req.method().clone();
    if kind == Kind::Session {
        if method != Method::POST {
            return error(StatusCode::METHOD_NOT_ALLOWED, "session must be a POST");
        }
        return session::open(req, peer, shared).await;
    }
    let in_session = match (params.session_given, params.session) {
        (false, _) => None,
        (true, Some(sid)) => match query::session_token(req.headers()) {
            Some(token) => Some(SessionKey { id: sid, token }),
            None => {
                if kind == Kind::Connect {
                    shared.metrics.rejected(RejectReason::BadRequest);
                }
                return error(
                    StatusCode::BAD_REQUEST,
                    "Tunnel-Session-Token header missing or not 32 hex digits",
                );
            }
        },
        (true, None) => {
            if kind == Kind::Connect {
                shared.metrics.rejected(RejectReason::BadRequest);
            }
            return error(StatusCode::BAD_REQUEST, "Session is invalid");
        }
    };
    if let (Some(key), false) = (in_session, kind == Kind::Connect) {
        return match kind {
            Kind::Close if method == Method::POST => session::close(shared, key),
            Kind::Close => error(StatusCode::METHOD_NOT_ALLOWED, "close must be a POST"),
            Kind::Push if method == Method::POST && params.stream => {
                session::upstream(req, shared, key)
            }
            Kind::Push if method == Method::POST => session::push(req, shared, key).await,
            Kind::Push => error(StatusCode::METHOD_NOT_ALLOWED, "push must be a POST"),
            Kind::Pull if method == Method::GET && params.stream => session::stream(shared, key),
            Kind::Pull if method == Method::GET || method == Method::POST => {
                session::pull(shared, key).await
            }
            _ => error(
                StatusCode::METHOD_NOT_ALLOWED,
                "pull must be a GET or a POST",
            ),
        };
    }
    let Some(server) = params.server else {
        if kind == Kind::Connect {
            shared.metrics.rejected(RejectReason::BadRequest);
        }
        return error(StatusCode::BAD_REQUEST, "ServerName is missing or invalid");
    };
    if kind == Kind::Connect {
        if method != Method::POST {
            return error(StatusCode::METHOD_NOT_ALLOWED, "connect must be a POST");
        }
        let place = Placement {
            server: &server,
            affinity: params.affinity.as_deref(),
            session: in_session,
        };
        return connect(req, peer, shared, place).await;
    }
    let Some(conn_id) = params.conn_id else {
        return error(StatusCode::BAD_REQUEST, "ConnId is missing or invalid");
    };
    let Some(token) = query::token(req.headers()) else {
        return error(
            StatusCode::BAD_REQUEST,
            "Tunnel-Token header missing or not 32 hex digits",
        );
    };
    match kind {
        Kind::Push if method == Method::POST => push(req, shared, &server, conn_id, token).await,
        Kind::Push => error(StatusCode::METHOD_NOT_ALLOWED, "push must be a POST"),
        Kind::Pull if method == Method::GET || method == Method::POST => {
            pull(shared, &server, conn_id, token).await
        }
        Kind::Pull => error(
            StatusCode::METHOD_NOT_ALLOWED,
            "pull must be a GET or a POST",
        ),
        Kind::Close => error(StatusCode::BAD_REQUEST, "close needs a Session"),
        Kind::Connect | Kind::Session => unreachable!("handled above"),
    }
}

/// The request's `Content-Length`, if it has a valid one.
fn declared_length(req: &Request<Incoming>) -> Option<u64> {
    req.headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
}

/// Reads the whole body, at most `limit` bytes, within the body deadline.
pub(crate) async fn read_body(
    req: Request<Incoming>,
    limit: usize,
    shared: &Shared,
) -> Result<Bytes, Response<Body>> {
    let too_large = || error(StatusCode::PAYLOAD_TOO_LARGE, "request body over the limit");
    if declared_length(&req).is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let body = Limited::new(req.into_body(), limit);
    match tokio::time::timeout(shared.config.body_read_timeout, body.collect()).await {
        Err(_) => Err(error(
            StatusCode::REQUEST_TIMEOUT,
            "request body not received in time",
        )),
        Ok(Err(err)) if err.downcast_ref::<LengthLimitError>().is_some() => Err(too_large()),
        Ok(Err(err)) => {
            tracing::debug!(error = %err, "request body read failed");
            Err(error(
                StatusCode::BAD_REQUEST,
                "request body could not be read",
            ))
        }
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
    }
}

/// Where a connect asks to go: the server name, its affinity key and its session, if any.
struct Placement<'a> {
    server: &'a str,
    affinity: Option<&'a str>,
    session: Option<SessionKey>,
}

async fn connect(
    req: Request<Incoming>,
    peer: SocketAddr,
    shared: &Shared,
    place: Placement<'_>,
) -> Response<Body> {
    let Placement {
        server,
        affinity,
        session,
    } = place;
    let config = &shared.config;
    let client = forwarded::client_addr(req.headers(), peer, &config.trusted_proxies).to_string();
    let body = match read_body(
        req,
        config.max_body_size.min(config.max_packet_size),
        shared,
    )
    .await
    {
        Ok(body) => body,
        Err(resp) => {
            shared.metrics.rejected(RejectReason::BadRequest);
            return resp;
        }
    };
    let init = match decode_all(body, config.max_packet_size) {
        Ok(mut list)
            if list.len() == 1 && list[0].kind == PacketType::ConnInit && list[0].conn_id == 0 =>
        {
            list.remove(0)
        }
        Ok(_) => {
            shared.metrics.rejected(RejectReason::BadRequest);
            return error(
                StatusCode::BAD_REQUEST,
                "connect body must be one CONN_INIT with conn_id 0",
            );
        }
        Err(err) => {
            tracing::debug!(%client, error = %err, "malformed connect body");
            shared.metrics.rejected(RejectReason::BadRequest);
            return error(
                StatusCode::BAD_REQUEST,
                "connect body is not a valid packet",
            );
        }
    };
    let (link, instance, conn_id, token) = {
        let mut table = shared.table();
        if let Some(key) = &session {
            if table
                .session_mut(key.id, &key.token, Instant::now())
                .is_none()
            {
                drop(table);
                shared.metrics.rejected(RejectReason::BadRequest);
                return session::unknown();
            }
            if table.session_is_full(key.id, config.max_session_connections) {
                drop(table);
                shared
                    .metrics
                    .session_rejected(SessionRejectReason::ConnectionLimit);
                static SESSION_FULL: WarningLimit =
                    WarningLimit::new(std::time::Duration::from_secs(10));
                tunnel_proto::warn_limited!(
                    SESSION_FULL,
                    %client,
                    session = key.id,
                    "session at its connection limit; connect refused"
                );
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "session at its connection limit",
                );
            }
        }
        let Some((instance, link)) = table.choose(server, affinity, &[]) else {
            let why = table.no_place(server, Instant::now(), config.name_grace);
            drop(table);
            return match why {
                NoPlace::Gone => {
                    shared.metrics.rejected(RejectReason::NoServer);
                    error(StatusCode::NOT_FOUND, "no broker of that name is listening")
                }
                NoPlace::Retry => {
                    shared.metrics.rejected(RejectReason::NoInstance);
                    tracing::debug!(%client, server, "no instance takes connections right now; 503");
                    retry_later(
                        "no broker instance of that name takes connections right now; retry",
                    )
                }
            };
        };
        // Connections closed both ways do not count (they linger a few seconds for their
        // last acknowledgements), but the entries stay bounded: at most twice the limit.
        if table.held_count() >= config.max_connections
            || table.connection_count() >= config.max_connections.saturating_mul(2)
        {
            drop(table);
            shared.metrics.rejected(RejectReason::Limit);
            static AT_LIMIT: WarningLimit = WarningLimit::new(std::time::Duration::from_secs(10));
            tunnel_proto::warn_limited!(
                AT_LIMIT,
                %client,
                server,
                "connection limit reached; connect refused"
            );
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "relay at its connection limit",
            );
        }
        let (conn_id, token) = table.open(
            server,
            instance,
            affinity,
            init.window,
            &client,
            Instant::now(),
            config.client_inactivity_timeout,
        );
        if let Some(key) = &session {
            table.join_session(conn_id, key.id);
        }
        (link, instance, conn_id, token)
    };
    let to_broker = Packet::new(
        PacketType::ConnInit,
        conn_id,
        BrokerConnInit {
            token,
            client_addr: client.clone(),
        }
        .encode(),
    )
    .with_window(init.window);
    if let Err(err) = link
        .sender
        .send(to_broker.to_bytes(), config.link_send_timeout)
        .await
    {
        shared
            .table()
            .remove(conn_id, "broker link could not take CONN_INIT");
        shared.metrics.rejected(RejectReason::LinkBusy);
        return error(StatusCode::SERVICE_UNAVAILABLE, link_error_text(err));
    }
    shared.metrics.connect();
    let session = session.map(|k| k.id);
    tracing::info!(conn_id, server, instance = %instance.short(), client = %client, window = init.window, session, "connection opened");
    packets(Packet::new(PacketType::ConnInit, conn_id, encode_token(&token)).to_bytes())
}

/// Seconds a client is asked to wait (`Retry-After`) when a name has no instance that takes
/// connections right now (docs/protocol.md §2).
pub(crate) const RETRY_AFTER_SECS: u32 = 1;

/// 503 with `Retry-After`: the name is expected back soon.
pub(crate) fn retry_later(msg: &str) -> Response<Body> {
    let mut resp = error(StatusCode::SERVICE_UNAVAILABLE, msg);
    resp.headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
    resp
}

pub(crate) fn link_error_text(err: SendError) -> &'static str {
    match err {
        SendError::Full => "broker link busy",
        SendError::Closed => "broker link closed",
    }
}

/// Packet types a client may push. The others are link-level or broker-only, and a client
/// sending them is malformed.
pub(crate) fn client_may_send(kind: PacketType) -> bool {
    matches!(
        kind,
        PacketType::Data
            | PacketType::ConnClose
            | PacketType::Ack
            | PacketType::ConnOption
            | PacketType::ConnAbort
            | PacketType::NoOp
    )
}

/// Reads a push body (per connection or in a session) and decodes its packets; the answer
/// to a body over the limit, too slow or not packets otherwise.
/// A push body as it was read: runs of whole packets, each the wire bytes of its packets
/// back to back as the body's frames brought them, and the packets decoded from them.
#[derive(Debug, Default)]
pub(crate) struct PushBody {
    pub runs: Vec<Bytes>,
    pub packets: Vec<Packet>,
    /// Bytes in all runs.
    pub len: usize,
}

/// Why a push body was not read whole.
enum PushBodyFailure {
    Read(Box<dyn std::error::Error + Send + Sync>),
    Decode(tunnel_proto::DecodeError),
}

/// Reads and decodes a push body frame by frame, at most `max_body_size` bytes, within the
/// body deadline. The packets are slices of the frames (only a packet cut by a frame's edge
/// is copied), and the runs go to the broker as they are: collecting a large body into one
/// buffer first was a tenth of the relay's time in a profile of a bulk upload.
pub(crate) async fn read_push_body(
    req: Request<Incoming>,
    shared: &Shared,
) -> Result<PushBody, Response<Body>> {
    let config = &shared.config;
    let too_large = || error(StatusCode::PAYLOAD_TOO_LARGE, "request body over the limit");
    if declared_length(&req).is_some_and(|n| n > config.max_body_size as u64) {
        return Err(too_large());
    }
    let mut body = Limited::new(req.into_body(), config.max_body_size);
    let mut decoder = Decoder::new(config.max_packet_size);
    let mut read = PushBody::default();
    let reading = async {
        while let Some(frame) = body.frame().await {
            let Ok(data) = frame.map_err(PushBodyFailure::Read)?.into_data() else {
                continue; // trailers carry nothing for us
            };
            decoder.feed_bytes(data);
            loop {
                let run = decoder.take_whole().map_err(PushBodyFailure::Decode)?;
                if run.is_empty() {
                    break;
                }
                let packets = decode_all(run.clone(), config.max_packet_size)
                    .map_err(PushBodyFailure::Decode)?;
                read.packets.extend(packets);
                read.len += run.len();
                read.runs.push(run);
            }
        }
        decoder.finish().map_err(PushBodyFailure::Decode)
    };
    match tokio::time::timeout(config.body_read_timeout, reading).await {
        Err(_) => Err(error(
            StatusCode::REQUEST_TIMEOUT,
            "request body not received in time",
        )),
        Ok(Err(PushBodyFailure::Read(err))) if err.downcast_ref::<LengthLimitError>().is_some() => {
            Err(too_large())
        }
        Ok(Err(PushBodyFailure::Read(err))) => {
            tracing::debug!(error = %err, "request body read failed");
            Err(error(
                StatusCode::BAD_REQUEST,
                "request body could not be read",
            ))
        }
        Ok(Err(PushBodyFailure::Decode(err))) => {
            tracing::debug!(error = %err, "malformed push body");
            Err(error(
                StatusCode::BAD_REQUEST,
                "push body is not valid packets",
            ))
        }
        Ok(Ok(())) => Ok(read),
    }
}

async fn push(
    req: Request<Incoming>,
    shared: &Shared,
    server: &str,
    conn_id: u32,
    token: Token,
) -> Response<Body> {
    let config = &shared.config;
    let body = match read_push_body(req, shared).await {
        Ok(read) => read,
        Err(resp) => return resp,
    };
    if let Some(bad) = body
        .packets
        .iter()
        .find(|p| p.conn_id != conn_id || !client_may_send(p.kind))
    {
        tracing::debug!(conn_id, kind = ?bad.kind, packet_conn = bad.conn_id, "push with a foreign packet");
        return error(
            StatusCode::BAD_REQUEST,
            "push holds a packet of another connection or type",
        );
    }
    let (sender, client_aborts) = {
        let mut table = shared.table();
        // Without a link the relay cannot tell an unknown connection from one not
        // re-announced yet (after a relay restart): the client must retry, not give up.
        if !table.has_link(server) {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "no link to that broker right now",
            );
        }
        if table.authorize(conn_id, server, &token).is_none() {
            return error(StatusCode::NOT_FOUND, "unknown connection");
        }
        // The link of the instance the connection is on; it may be re-linking.
        let Some(link) = table.conn_link(conn_id).cloned() else {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "no link to that broker instance right now",
            );
        };
        let client_aborts =
            table.client_pushed(conn_id, &body.packets, body.len, Instant::now(), |ms| {
                config.inactivity_timeout_for(ms)
            });
        (link.sender, client_aborts)
    };
    shared.metrics.push(body.len);
    for run in body.runs {
        if let Err(err) = sender.send(run, config.link_send_timeout).await {
            return error(StatusCode::SERVICE_UNAVAILABLE, link_error_text(err));
        }
    }
    let mut table = shared.table();
    if client_aborts {
        table.remove(conn_id, "aborted by client");
        return packets(Bytes::new());
    }
    let out = table.drain(conn_id, config.response_limit);
    drop(table);
    shared.metrics.sent_down(out.len());
    packets(out)
}

async fn pull(shared: &Shared, server: &str, conn_id: u32, token: Token) -> Response<Body> {
    let config = &shared.config;
    shared.metrics.pull();
    let deadline = tokio::time::Instant::now() + config.pull_wait;
    loop {
        let (pull_id, woken, wake_at): (u64, oneshot::Receiver<Wake>, tokio::time::Instant) = {
            let mut table = shared.table();
            let has_link = table.has_link(server);
            let pull_id = table.next_id();
            let Some(entry) = table.authorize(conn_id, server, &token) else {
                // Without a link the relay cannot tell "unknown" from "not re-announced yet".
                return if has_link {
                    error(StatusCode::NOT_FOUND, "unknown connection")
                } else {
                    error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "no link to that broker right now",
                    )
                };
            };
            entry.last_activity = Instant::now();
            if entry.has_queued(Instant::now()) {
                let out = table.drain(conn_id, config.response_limit);
                drop(table);
                shared.metrics.sent_down(out.len());
                return packets(out);
            }
            if shared.is_stopping() {
                return no_op();
            }
            entry.wake(Wake::Superseded);
            let (tx, rx) = oneshot::channel();
            entry.waiter = Some(Waiter { id: pull_id, tx });
            let wake_at = match entry.init_ack_resend_at() {
                Some(t) => deadline.min(tokio::time::Instant::from_std(t)),
                None => deadline,
            };
            (pull_id, rx, wake_at)
        };
        match tokio::time::timeout_at(wake_at, woken).await {
            Ok(Ok(Wake::Superseded)) => return no_op(),
            // Data: drain it at the top. Closed or dropped: the top finds out why (gone: 404;
            // stopping: NO_OP).
            Ok(_) => continue,
            Err(_) => {
                let mut table = shared.table();
                if let Some(entry) = table.get_mut(conn_id) {
                    if entry.waiter.as_ref().is_some_and(|w| w.id == pull_id) {
                        entry.waiter = None;
                    }
                    // The wait itself was client activity.
                    entry.last_activity = Instant::now();
                    if entry.has_queued(Instant::now()) {
                        let out = table.drain(conn_id, config.response_limit);
                        drop(table);
                        shared.metrics.sent_down(out.len());
                        return packets(out);
                    }
                }
                return no_op();
            }
        }
    }
}
