//! The session requests of the HTTP interface (docs/protocol.md §2.1): opening a session,
//! and the session's pull and push. A connect in a session is the connect of `http.rs` with
//! a [`SessionKey`].

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use http_body_util::Either;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use tokio::sync::oneshot;
use tunnel_proto::codec::PacketParts;
use tunnel_proto::payload::{encode_reason, encode_token, Attach, SessionRequest};
use tunnel_proto::warn_limit::WarningLimit;
use tunnel_proto::{decode_all, Packet, PacketType, Token};

use crate::forwarded;
use crate::http::{
    client_may_send, error, link_error_text, no_op, packets, read_body, read_push_body, Body,
};
use crate::metrics::SessionRejectReason;
use crate::sender::LinkSender;
use crate::session::AttachOutcome;
use crate::session_stream::SessionStream;
use crate::session_upstream::SessionUpstream;
use crate::state::Shared;
use crate::table::{Waiter, Wake};

/// The session a request names: `Session=<id>` and its `Tunnel-Session-Token`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SessionKey {
    pub(crate) id: u32,
    pub(crate) token: Token,
}

/// The one answer to an unknown session and a wrong session token alike.
pub(crate) fn unknown() -> Response<Body> {
    error(StatusCode::NOT_FOUND, "unknown session")
}

/// The reason of the CONN_ABORT that answers a packet of a connection not in the session.
const UNKNOWN_CONNECTION: &str = "unknown connection";

/// `POST ?Type=session` with one SESSION_INIT: opens a session.
pub(crate) async fn open(
    req: Request<Incoming>,
    peer: SocketAddr,
    shared: &Shared,
) -> Response<Body> {
    let config = &shared.config;
    let client = forwarded::client_addr(req.headers(), peer, &config.trusted_proxies).to_string();
    let refuse = |resp| {
        shared
            .metrics
            .session_rejected(SessionRejectReason::BadRequest);
        resp
    };
    let limit = config.max_body_size.min(config.max_packet_size);
    let body = match read_body(req, limit, shared).await {
        Ok(body) => body,
        Err(resp) => return refuse(resp),
    };
    let request = match decode_all(body, config.max_packet_size) {
        Ok(list)
            if list.len() == 1
                && list[0].kind == PacketType::SessionInit
                && list[0].conn_id == 0 =>
        {
            SessionRequest::decode(list[0].payload.clone()).ok()
        }
        _ => None,
    };
    let Some(request) = request else {
        tracing::debug!(%client, "malformed session opening");
        return refuse(error(
            StatusCode::BAD_REQUEST,
            "session body must be one SESSION_INIT with conn_id 0 and a u32 payload",
        ));
    };
    let idle_timeout = config.inactivity_timeout_for(request.idle_timeout_ms);
    let opened =
        shared
            .table()
            .open_session(Instant::now(), idle_timeout, &client, config.max_sessions);
    let Some((sid, token)) = opened else {
        shared.metrics.session_rejected(SessionRejectReason::Limit);
        static AT_LIMIT: WarningLimit = WarningLimit::new(std::time::Duration::from_secs(10));
        tunnel_proto::warn_limited!(AT_LIMIT, %client, "session limit reached; session refused");
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "relay at its session limit",
        );
    };
    // One line per session (never its token).
    tracing::info!(session = sid, %client, idle_timeout_ms = idle_timeout.as_millis() as u64, "session opened");
    let mut answer =
        packets(Packet::new(PacketType::SessionInit, sid, encode_token(&token)).to_bytes());
    answer.headers_mut().insert(
        crate::query::QUEUE_LIMIT_HEADER,
        HeaderValue::from(config.queue_limit),
    );
    answer
}

/// `POST ?Type=close&Session=N`: the client is done with the session. It is forgotten at
/// once instead of after its idle timeout; its connections (normally none left) stay, in no
/// session. A held pull of it is answered NO_OP.
pub(crate) fn close(shared: &Shared, key: SessionKey) -> Response<Body> {
    let mut table = shared.table();
    if table
        .session_mut(key.id, &key.token, Instant::now())
        .is_none()
    {
        return unknown();
    }
    table.remove_session(key.id, "closed by the client");
    drop(table);
    packets(Bytes::new())
}

/// `?Type=pull&Session=N`: packets of any of the session's connections, filled fairly;
/// held up to the pull wait while none is queued, then NO_OP. A newer pull or stream of the
/// session ends it with NO_OP.
pub(crate) async fn pull(shared: &Shared, key: SessionKey) -> Response<Body> {
    let config = &shared.config;
    shared.metrics.pull();
    let deadline = tokio::time::Instant::now() + config.pull_wait;
    let pull_id = shared.table().next_id();
    loop {
        let woken: oneshot::Receiver<Wake> = {
            let mut table = shared.table();
            let Some(session) = table.session_mut(key.id, &key.token, Instant::now()) else {
                return unknown();
            };
            if !session.claim_pull(pull_id) {
                return no_op();
            }
            if table.session_has_ready(key.id) {
                let out = table.drain_session(key.id, PacketParts::new(), config.response_limit);
                if !out.is_empty() {
                    drop(table);
                    shared.metrics.sent_down(out.len());
                    return packets(out);
                }
            }
            if shared.is_stopping() {
                return no_op();
            }
            let Some(session) = table.session_mut(key.id, &key.token, Instant::now()) else {
                return unknown();
            };
            let (tx, rx) = oneshot::channel();
            session.waiter = Some(Waiter { id: pull_id, tx });
            rx
        };
        match tokio::time::timeout_at(deadline, woken).await {
            Ok(Ok(Wake::Superseded)) => return no_op(),
            // Data: drain it at the top. Closed or dropped: the top finds out why (forgotten:
            // 404; stopping: NO_OP).
            Ok(_) => continue,
            Err(_) => {
                let mut table = shared.table();
                // The wait itself was activity (session_mut counts it).
                if let Some(session) = table.session_mut(key.id, &key.token, Instant::now()) {
                    if session.waiter.as_ref().is_some_and(|w| w.id == pull_id) {
                        session.waiter = None;
                    }
                    if !session.claim_pull(pull_id) {
                        return no_op();
                    }
                    let out =
                        table.drain_session(key.id, PacketParts::new(), config.response_limit);
                    if !out.is_empty() {
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

/// `GET ?Type=pull&Session=N&Stream=1`: a streamed pull (docs/protocol.md §2.2), 404 for an
/// unknown session.
pub(crate) fn stream(shared: &Arc<Shared>, key: SessionKey) -> Response<Body> {
    let Some(body) = SessionStream::open(shared.clone(), key) else {
        return unknown();
    };
    shared.metrics.stream();
    let mut resp = Response::new(Either::Right(Either::Left(body)));
    let headers = resp.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // Asks nginx not to buffer this response (a proxy that ignores it is detected by the
    // client, which then polls).
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    resp
}

/// `POST ?Type=push&Session=N&Stream=1`: a streamed upstream (docs/protocol.md §2.3); 404
/// for an unknown session.
pub(crate) fn upstream(
    req: Request<Incoming>,
    shared: &Arc<Shared>,
    key: SessionKey,
) -> Response<Body> {
    if shared
        .table()
        .session_mut(key.id, &key.token, Instant::now())
        .is_none()
    {
        return unknown();
    }
    shared.metrics.upstream();
    let body = SessionUpstream::new(shared.clone(), key, req.into_body());
    let mut resp = Response::new(Either::Right(Either::Right(body)));
    let headers = resp.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// The packets of one session push that go to one broker link, in body order.
struct ToLink<'a> {
    link_id: u64,
    sender: LinkSender,
    packets: Vec<&'a Packet>,
}

/// The packets of one connection in a session push, for the per-connection rules.
struct Pushed<'a> {
    id: u32,
    packets: Vec<&'a Packet>,
    bytes: usize,
}

/// Checks a session push body: every packet of a type a client pushes, or ATTACH with a
/// well-formed payload, and never conn_id 0. Returns the ATTACHes, or why the body is
/// refused.
fn check_push(list: &[Packet]) -> Result<Vec<(u32, Attach)>, &'static str> {
    let mut attaches = Vec::new();
    for packet in list {
        if packet.conn_id == 0 {
            return Err("session push holds a packet with conn_id 0");
        }
        if packet.kind == PacketType::Attach {
            let attach = Attach::decode(packet.payload.clone())
                .map_err(|_| "session push holds a malformed ATTACH")?;
            attaches.push((packet.conn_id, attach));
        } else if !client_may_send(packet.kind) {
            return Err("session push holds a packet of a type a client never pushes");
        }
    }
    Ok(attaches)
}

/// `POST ?Type=push&Session=N`: the body's packets applied ([`apply_push`]). The answer:
/// the ATTACHes' answers, a CONN_ABORT per connection not in the session, the last word of
/// ended connections pushed to, then queued packets of the session, filled fairly.
pub(crate) async fn push(
    req: Request<Incoming>,
    shared: &Shared,
    key: SessionKey,
) -> Response<Body> {
    let body = match read_push_body(req, shared).await {
        Ok(read) => read,
        Err(resp) => return resp,
    };
    shared.metrics.push(body.len);
    let answer = match apply_push(shared, key, body.runs, body.packets).await {
        Ok(answer) => answer,
        Err(refused) => return refused.response(),
    };
    let mut out = PacketParts::new();
    if !answer.is_empty() {
        out.push_encoded(answer.freeze());
    }
    let out = shared
        .table()
        .drain_session(key.id, out, shared.config.response_limit);
    shared.metrics.sent_down(out.len());
    packets(out)
}

/// Why pushed packets were not applied.
#[derive(Debug)]
pub(crate) enum PushRefused {
    /// The packets break a rule of session pushes (400).
    Malformed(&'static str),
    /// No such session, or a wrong token (404).
    UnknownSession,
    /// A broker link did not take them in time (503).
    LinkBusy(&'static str),
}

impl PushRefused {
    pub(crate) fn response(&self) -> Response<Body> {
        match self {
            PushRefused::Malformed(why) => error(StatusCode::BAD_REQUEST, why),
            PushRefused::UnknownSession => unknown(),
            PushRefused::LinkBusy(why) => error(StatusCode::SERVICE_UNAVAILABLE, why),
        }
    }

    pub(crate) fn reason(&self) -> &'static str {
        match self {
            PushRefused::Malformed(why) | PushRefused::LinkBusy(why) => why,
            PushRefused::UnknownSession => "unknown session",
        }
    }
}

/// Applies packets pushed in session `key` (a push body, or a run of a streamed upstream;
/// the `runs` are `list` back to back): ATTACHes first, then the other packets to the links
/// of their connections, each link's in body order. Returns the answers: the ATTACHes', a
/// CONN_ABORT per connection not in the session, and the last word of ended connections
/// pushed to.
pub(crate) async fn apply_push(
    shared: &Shared,
    key: SessionKey,
    runs: Vec<Bytes>,
    list: Vec<Packet>,
) -> Result<BytesMut, PushRefused> {
    let config = &shared.config;
    let attaches = match check_push(&list) {
        Ok(attaches) => attaches,
        Err(why) => {
            tracing::debug!(session = key.id, why, "session push refused");
            return Err(PushRefused::Malformed(why));
        }
    };
    let now = Instant::now();
    let mut answer = BytesMut::new();
    let mut to_links: Vec<ToLink<'_>> = Vec::new();
    // Whether every packet of the body goes to a link (no ATTACH, none refused or dropped).
    let mut whole_body = attaches.is_empty();
    let mut pushed: Vec<Pushed<'_>> = Vec::new();
    let mut aborted_by_client = Vec::new();
    // CONN_MOVEs for connections this relay does not hold (docs/protocol.md §5.2).
    let mut move_asks = Vec::new();
    {
        let mut table = shared.table();
        if table.session_mut(key.id, &key.token, now).is_none() {
            return Err(PushRefused::UnknownSession);
        }
        for (id, attach) in &attaches {
            let abort = |reason| Packet::new(PacketType::ConnAbort, *id, encode_reason(reason));
            let limits = shared.attach_limits();
            match table.attach(key.id, *id, attach, limits, now, &mut move_asks) {
                AttachOutcome::Attached => {
                    Packet::new(PacketType::Attach, *id, Bytes::new()).encode(&mut answer)
                }
                AttachOutcome::Unknown => abort(UNKNOWN_CONNECTION).encode(&mut answer),
                AttachOutcome::SessionFull => {
                    static SESSION_FULL: WarningLimit =
                        WarningLimit::new(std::time::Duration::from_secs(10));
                    tunnel_proto::warn_limited!(
                        SESSION_FULL,
                        session = key.id,
                        conn_id = *id,
                        "session at its connection limit; ATTACH refused"
                    );
                    abort("session at its connection limit").encode(&mut answer)
                }
                AttachOutcome::NotYet => {}
            }
        }
        let mut refused: HashSet<u32> = HashSet::new();
        let mut slot_of: HashMap<u32, usize> = HashMap::new();
        for packet in list.iter().filter(|p| p.kind != PacketType::Attach) {
            let id = packet.conn_id;
            if !table.in_session(id, key.id) {
                whole_body = false;
                if refused.insert(id) {
                    Packet::new(PacketType::ConnAbort, id, encode_reason(UNKNOWN_CONNECTION))
                        .encode(&mut answer);
                }
                continue;
            }
            // No link to its instance right now: dropped, the connection retransmits.
            let Some(link) = table.conn_link(id) else {
                whole_body = false;
                tracing::debug!(
                    session = key.id,
                    conn_id = id,
                    "no link for a pushed packet; dropped"
                );
                continue;
            };
            let to_link = match to_links.iter_mut().position(|t| t.link_id == link.id) {
                Some(i) => &mut to_links[i],
                None => {
                    to_links.push(ToLink {
                        link_id: link.id,
                        sender: link.sender.clone(),
                        packets: Vec::new(),
                    });
                    to_links.last_mut().expect("just pushed")
                }
            };
            to_link.packets.push(packet);
            let slot = *slot_of.entry(id).or_insert_with(|| {
                pushed.push(Pushed {
                    id,
                    packets: Vec::new(),
                    bytes: 0,
                });
                pushed.len() - 1
            });
            pushed[slot].packets.push(packet);
            pushed[slot].bytes += packet.wire_len();
        }
        for conn in &pushed {
            let aborts = table.client_pushed(
                conn.id,
                conn.packets.iter().copied(),
                conn.bytes,
                now,
                |ms| config.inactivity_timeout_for(ms),
            );
            if aborts {
                aborted_by_client.push(conn.id);
            }
        }
    }
    // Best effort: a lost question is asked again at the client's next ATTACH.
    for (sender, ask) in move_asks {
        if sender.try_send_packet(&ask).is_err() {
            tracing::debug!(conn_id = ask.conn_id, "link busy; CONN_MOVE not sent");
        }
    }
    let single_link = to_links.len() == 1;
    for to_link in to_links {
        // The common case, one client's traffic to one broker: the body is already those
        // packets back to back, so it goes as it came (no copy, no checksums computed again).
        let chunks = if whole_body && single_link {
            runs.clone()
        } else {
            let mut bytes = BytesMut::new();
            for packet in &to_link.packets {
                packet.encode(&mut bytes);
            }
            vec![bytes.freeze()]
        };
        for chunk in chunks {
            if let Err(err) = to_link.sender.send(chunk, config.link_send_timeout).await {
                return Err(PushRefused::LinkBusy(link_error_text(err)));
            }
        }
    }
    let mut table = shared.table();
    for id in &aborted_by_client {
        table.remove(*id, "aborted by client");
    }
    for conn in &pushed {
        if let Some(word) = table.last_word_again(conn.id) {
            word.encode(&mut answer);
        }
    }
    Ok(answer)
}
