//! Counters of the relay and their Prometheus text rendering (`GET /metrics`).
//!
//! Counters are plain atomics bumped on the hot path; the two gauges (open connections, links
//! up) are read from the connection table when rendering, so they can never drift.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

/// Why a connect was refused, one counter each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    /// 400: the body was not one CONN_INIT with conn_id 0, or the query was incomplete.
    BadRequest,
    /// 404: no broker of that name is linked and listening.
    NoServer,
    /// 503: the relay holds `max_connections` already.
    Limit,
    /// 503: the broker's link did not take the CONN_INIT in time.
    LinkBusy,
    /// 503 with `Retry-After`: the name's instances are re-linking, draining or full.
    NoInstance,
}

impl RejectReason {
    const ALL: [RejectReason; 5] = [
        RejectReason::BadRequest,
        RejectReason::NoServer,
        RejectReason::Limit,
        RejectReason::LinkBusy,
        RejectReason::NoInstance,
    ];

    fn label(self) -> &'static str {
        match self {
            RejectReason::BadRequest => "bad_request",
            RejectReason::NoServer => "no_server",
            RejectReason::Limit => "limit",
            RejectReason::LinkBusy => "link_busy",
            RejectReason::NoInstance => "no_instance",
        }
    }
}

/// Why a session request was refused (docs/protocol.md §2.1), one counter each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionRejectReason {
    /// 400: the opening's body was not one SESSION_INIT with conn_id 0 and a u32.
    BadRequest,
    /// 503: the relay holds `max_sessions` already.
    Limit,
    /// 503: a connect in a session that holds `max_session_connections` already.
    ConnectionLimit,
}

impl SessionRejectReason {
    const ALL: [SessionRejectReason; 3] = [
        SessionRejectReason::BadRequest,
        SessionRejectReason::Limit,
        SessionRejectReason::ConnectionLimit,
    ];

    fn label(self) -> &'static str {
        match self {
            SessionRejectReason::BadRequest => "bad_request",
            SessionRejectReason::Limit => "limit",
            SessionRejectReason::ConnectionLimit => "connection_limit",
        }
    }
}

/// The relay's counters.
#[derive(Debug, Default)]
pub struct Metrics {
    connects_total: AtomicU64,
    rejected: [AtomicU64; 5],
    pushes_total: AtomicU64,
    pulls_total: AtomicU64,
    streams_total: AtomicU64,
    upstreams_total: AtomicU64,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
    packets_dropped: AtomicU64,
    link_auth_failures: AtomicU64,
    client_auth_failures: AtomicU64,
    links_accepted: AtomicU64,
    connections_closed: AtomicU64,
    sessions_opened: AtomicU64,
    session_rejected: [AtomicU64; 3],
    session_attaches: AtomicU64,
    sessions_expired: AtomicU64,
    connections_moved: AtomicU64,
}

/// A copy of every counter and gauge at one moment, for tests and for rendering.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetricsSnapshot {
    /// Connections the relay holds now.
    pub open_connections: u64,
    /// Broker links up now.
    pub links_up: u64,
    /// Connect requests answered with a new connection.
    pub connects_total: u64,
    /// Connect requests refused with 400 (malformed).
    pub connects_rejected_bad_request: u64,
    /// Connect requests refused with 404 (no broker of that name).
    pub connects_rejected_no_server: u64,
    /// Connect requests refused with 503 at the connection limit.
    pub connects_rejected_limit: u64,
    /// Connect requests refused with 503 because the broker's link could not take them.
    pub connects_rejected_link_busy: u64,
    /// Connects answered 503 with `Retry-After`: no instance of the name takes connections
    /// right now (re-linking, draining or full).
    pub connects_rejected_no_instance: u64,
    /// Push requests served.
    pub pushes_total: u64,
    /// Pull requests served (streamed pulls included).
    pub pulls_total: u64,
    /// Streamed pulls served (docs/protocol.md §2.2).
    pub streams_total: u64,
    /// Streamed upstreams served (docs/protocol.md §2.3).
    pub upstreams_total: u64,
    /// Bytes of packets received in push bodies.
    pub bytes_up: u64,
    /// Bytes of packets sent in push and pull responses.
    pub bytes_down: u64,
    /// Packets dropped because a connection's downstream queue was full.
    pub packets_dropped: u64,
    /// Broker links refused for a wrong link secret.
    pub link_auth_failures: u64,
    /// Tunnel requests refused with 401 (client authentication).
    pub client_auth_failures: u64,
    /// Broker links authenticated and installed.
    pub links_accepted: u64,
    /// Connections the relay has forgotten (closed, aborted or timed out).
    pub connections_closed: u64,
    /// Sessions the relay holds now.
    pub sessions: u64,
    /// Sessions opened.
    pub sessions_opened: u64,
    /// Session openings refused with 400 (malformed).
    pub session_rejected_bad_request: u64,
    /// Session openings refused with 503 at `max_sessions`.
    pub session_rejected_limit: u64,
    /// Connects in a session refused with 503 at `max_session_connections`.
    pub session_rejected_connection_limit: u64,
    /// Connections attached to a session by ATTACH (confirmed).
    pub session_attaches: u64,
    /// Sessions forgotten after their idle timeout.
    pub sessions_expired: u64,
    /// Connections a broker moved onto this relay's link from another relay's
    /// (docs/protocol.md §5.2).
    pub connections_moved: u64,
}

fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

impl Metrics {
    pub(crate) fn connect(&self) {
        bump(&self.connects_total, 1);
    }
    pub(crate) fn rejected(&self, reason: RejectReason) {
        bump(&self.rejected[reason as usize], 1);
    }
    pub(crate) fn push(&self, bytes: usize) {
        bump(&self.pushes_total, 1);
        bump(&self.bytes_up, bytes as u64);
    }
    pub(crate) fn pull(&self) {
        bump(&self.pulls_total, 1);
    }
    pub(crate) fn stream(&self) {
        bump(&self.pulls_total, 1);
        bump(&self.streams_total, 1);
    }
    pub(crate) fn upstream(&self) {
        bump(&self.upstreams_total, 1);
    }
    /// Bytes of packets received in a streamed upstream.
    pub(crate) fn received_up(&self, bytes: usize) {
        bump(&self.bytes_up, bytes as u64);
    }
    pub(crate) fn sent_down(&self, bytes: usize) {
        bump(&self.bytes_down, bytes as u64);
    }
    pub(crate) fn dropped(&self) {
        bump(&self.packets_dropped, 1);
    }
    pub(crate) fn auth_failure(&self) {
        bump(&self.link_auth_failures, 1);
    }
    pub(crate) fn client_auth_failure(&self) {
        bump(&self.client_auth_failures, 1);
    }
    pub(crate) fn link_accepted(&self) {
        bump(&self.links_accepted, 1);
    }
    pub(crate) fn closed(&self) {
        bump(&self.connections_closed, 1);
    }
    pub(crate) fn session_opened(&self) {
        bump(&self.sessions_opened, 1);
    }
    pub(crate) fn session_rejected(&self, reason: SessionRejectReason) {
        bump(&self.session_rejected[reason as usize], 1);
    }
    pub(crate) fn session_attach(&self) {
        bump(&self.session_attaches, 1);
    }
    pub(crate) fn session_expired(&self) {
        bump(&self.sessions_expired, 1);
    }
    pub(crate) fn connection_moved(&self) {
        bump(&self.connections_moved, 1);
    }

    /// Reads every counter; the gauges come from the caller (the connection table).
    pub fn snapshot(&self, open_connections: u64, links_up: u64, sessions: u64) -> MetricsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let rejected = |r: SessionRejectReason| get(&self.session_rejected[r as usize]);
        MetricsSnapshot {
            open_connections,
            links_up,
            sessions,
            sessions_opened: get(&self.sessions_opened),
            session_rejected_bad_request: rejected(SessionRejectReason::BadRequest),
            session_rejected_limit: rejected(SessionRejectReason::Limit),
            session_rejected_connection_limit: rejected(SessionRejectReason::ConnectionLimit),
            session_attaches: get(&self.session_attaches),
            sessions_expired: get(&self.sessions_expired),
            connections_moved: get(&self.connections_moved),
            connects_total: get(&self.connects_total),
            connects_rejected_bad_request: get(&self.rejected[RejectReason::BadRequest as usize]),
            connects_rejected_no_server: get(&self.rejected[RejectReason::NoServer as usize]),
            connects_rejected_limit: get(&self.rejected[RejectReason::Limit as usize]),
            connects_rejected_link_busy: get(&self.rejected[RejectReason::LinkBusy as usize]),
            connects_rejected_no_instance: get(&self.rejected[RejectReason::NoInstance as usize]),
            pushes_total: get(&self.pushes_total),
            pulls_total: get(&self.pulls_total),
            streams_total: get(&self.streams_total),
            upstreams_total: get(&self.upstreams_total),
            bytes_up: get(&self.bytes_up),
            bytes_down: get(&self.bytes_down),
            packets_dropped: get(&self.packets_dropped),
            link_auth_failures: get(&self.link_auth_failures),
            client_auth_failures: get(&self.client_auth_failures),
            links_accepted: get(&self.links_accepted),
            connections_closed: get(&self.connections_closed),
        }
    }
}

/// Writes one metric family: HELP, TYPE, then one sample per `(labels, value)`, where
/// `labels` is the rendered label set (`{a="b"}`, see [`labels`]) or empty.
pub(crate) fn family(
    out: &mut String,
    name: &str,
    kind: &str,
    help: &str,
    samples: impl IntoIterator<Item = (String, u64)>,
) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, value) in samples {
        let _ = writeln!(out, "{name}{labels} {value}");
    }
}

/// One unlabelled sample.
fn single(value: u64) -> [(String, u64); 1] {
    [(String::new(), value)]
}

/// A label set `{k="v",…}` with the values escaped as the exposition format requires
/// (backslash, double quote and newline).
pub(crate) fn labels(pairs: &[(&str, &str)]) -> String {
    let mut out = String::from("{");
    for (i, (key, value)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(key);
        out.push_str("=\"");
        for c in value.chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '"' => out.push_str("\\\""),
                '\n' => out.push_str("\\n"),
                c => out.push(c),
            }
        }
        out.push('"');
    }
    out.push('}');
    out
}

impl MetricsSnapshot {
    /// The counters and the two gauges in the Prometheus text exposition format (0.0.4).
    /// Names follow Prometheus conventions: `_total` on counters, base units (`_bytes`),
    /// and one family with a label where a quantity has variants (direction, request type,
    /// reason, side).
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(3072);
        self.render_into(&mut out);
        out
    }

    pub(crate) fn render_into(&self, out: &mut String) {
        family(
            out,
            "tunnel_open_connections",
            "gauge",
            "Virtual connections held.",
            single(self.open_connections),
        );
        family(
            out,
            "tunnel_links_up",
            "gauge",
            "Broker links authenticated and alive.",
            single(self.links_up),
        );
        family(
            out,
            "tunnel_connects_total",
            "counter",
            "Connections opened.",
            single(self.connects_total),
        );
        family(
            out,
            "tunnel_requests_total",
            "counter",
            "Push and pull requests served, by type (stream: the pulls that were streamed, \
             also counted as pull; upstream: the streamed pushes, not counted as push).",
            [
                (labels(&[("type", "push")]), self.pushes_total),
                (labels(&[("type", "pull")]), self.pulls_total),
                (labels(&[("type", "stream")]), self.streams_total),
                (labels(&[("type", "upstream")]), self.upstreams_total),
            ],
        );
        family(
            out,
            "tunnel_bytes_total",
            "counter",
            "Packet bytes exchanged with clients: up = received in push bodies, down = sent \
             in push and pull responses.",
            [
                (labels(&[("direction", "up")]), self.bytes_up),
                (labels(&[("direction", "down")]), self.bytes_down),
            ],
        );
        family(
            out,
            "tunnel_packets_dropped_total",
            "counter",
            "Packets dropped on downstream queue overflow.",
            single(self.packets_dropped),
        );
        family(
            out,
            "tunnel_auth_failures_total",
            "counter",
            "Credentials refused: side=link for brokers at LINK_INIT, side=client for tunnel \
             requests answered 401.",
            [
                (labels(&[("side", "link")]), self.link_auth_failures),
                (labels(&[("side", "client")]), self.client_auth_failures),
            ],
        );
        family(
            out,
            "tunnel_links_accepted_total",
            "counter",
            "Broker links authenticated.",
            single(self.links_accepted),
        );
        family(
            out,
            "tunnel_connections_closed_total",
            "counter",
            "Connections forgotten by the relay.",
            single(self.connections_closed),
        );
        family(
            out,
            "tunnel_connects_rejected_total",
            "counter",
            "Connects refused, by reason.",
            RejectReason::ALL.map(|reason| {
                let value = match reason {
                    RejectReason::BadRequest => self.connects_rejected_bad_request,
                    RejectReason::NoServer => self.connects_rejected_no_server,
                    RejectReason::Limit => self.connects_rejected_limit,
                    RejectReason::LinkBusy => self.connects_rejected_link_busy,
                    RejectReason::NoInstance => self.connects_rejected_no_instance,
                };
                (labels(&[("reason", reason.label())]), value)
            }),
        );
        family(
            out,
            "tunnel_sessions",
            "gauge",
            "Sessions held (docs/protocol.md §2.1).",
            single(self.sessions),
        );
        family(
            out,
            "tunnel_sessions_opened_total",
            "counter",
            "Sessions opened.",
            single(self.sessions_opened),
        );
        family(
            out,
            "tunnel_session_rejected_total",
            "counter",
            "Session requests refused, by reason: bad_request (400 opening), limit (503 at \
             the session limit), connection_limit (503 connect at the per-session limit).",
            SessionRejectReason::ALL.map(|reason| {
                let value = match reason {
                    SessionRejectReason::BadRequest => self.session_rejected_bad_request,
                    SessionRejectReason::Limit => self.session_rejected_limit,
                    SessionRejectReason::ConnectionLimit => self.session_rejected_connection_limit,
                };
                (labels(&[("reason", reason.label())]), value)
            }),
        );
        family(
            out,
            "tunnel_session_attaches_total",
            "counter",
            "Connections attached to a session by ATTACH.",
            single(self.session_attaches),
        );
        family(
            out,
            "tunnel_sessions_expired_total",
            "counter",
            "Sessions forgotten after their idle timeout.",
            single(self.sessions_expired),
        );
        family(
            out,
            "tunnel_connections_moved_total",
            "counter",
            "Connections moved onto this relay's links from another relay's (relay pools).",
            single(self.connections_moved),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(
            labels(&[("server", "a\\b\"c\nd"), ("direction", "up")]),
            r#"{server="a\\b\"c\nd",direction="up"}"#
        );
    }

    #[test]
    fn every_family_has_help_and_type_and_counters_end_in_total() {
        let text = MetricsSnapshot::default().render();
        let mut families = 0;
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                families += 1;
                let (name, kind) = rest.split_once(' ').unwrap();
                assert!(
                    text.contains(&format!("# HELP {name} ")),
                    "{name} has no HELP"
                );
                assert_eq!(kind == "counter", name.ends_with("_total"), "{line}");
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap();
                assert!(
                    text.contains(&format!("# TYPE {name} ")),
                    "sample {line} has no TYPE"
                );
            }
        }
        assert_eq!(families, 16);
        assert!(text.contains("tunnel_bytes_total{direction=\"up\"} 0"));
    }
}
