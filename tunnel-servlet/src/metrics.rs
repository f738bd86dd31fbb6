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
}

impl RejectReason {
    const ALL: [RejectReason; 4] = [
        RejectReason::BadRequest,
        RejectReason::NoServer,
        RejectReason::Limit,
        RejectReason::LinkBusy,
    ];

    fn label(self) -> &'static str {
        match self {
            RejectReason::BadRequest => "bad_request",
            RejectReason::NoServer => "no_server",
            RejectReason::Limit => "limit",
            RejectReason::LinkBusy => "link_busy",
        }
    }
}

/// The relay's counters.
#[derive(Debug, Default)]
pub struct Metrics {
    connects_total: AtomicU64,
    rejected: [AtomicU64; 4],
    pushes_total: AtomicU64,
    pulls_total: AtomicU64,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
    packets_dropped: AtomicU64,
    link_auth_failures: AtomicU64,
    client_auth_failures: AtomicU64,
    links_accepted: AtomicU64,
    connections_closed: AtomicU64,
}

/// A copy of every counter and gauge at one moment, for tests and for rendering.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetricsSnapshot {
    pub open_connections: u64,
    pub links_up: u64,
    pub connects_total: u64,
    pub connects_rejected_bad_request: u64,
    pub connects_rejected_no_server: u64,
    pub connects_rejected_limit: u64,
    pub connects_rejected_link_busy: u64,
    pub pushes_total: u64,
    pub pulls_total: u64,
    /// Bytes of packets received in push bodies.
    pub bytes_up: u64,
    /// Bytes of packets sent in push and pull responses.
    pub bytes_down: u64,
    /// Packets dropped because a connection's downstream queue was full.
    pub packets_dropped: u64,
    pub link_auth_failures: u64,
    /// Tunnel requests refused with 401 (client authentication).
    pub client_auth_failures: u64,
    pub links_accepted: u64,
    pub connections_closed: u64,
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

    /// Reads every counter; the gauges come from the caller (the connection table).
    pub fn snapshot(&self, open_connections: u64, links_up: u64) -> MetricsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        MetricsSnapshot {
            open_connections,
            links_up,
            connects_total: get(&self.connects_total),
            connects_rejected_bad_request: get(&self.rejected[RejectReason::BadRequest as usize]),
            connects_rejected_no_server: get(&self.rejected[RejectReason::NoServer as usize]),
            connects_rejected_limit: get(&self.rejected[RejectReason::Limit as usize]),
            connects_rejected_link_busy: get(&self.rejected[RejectReason::LinkBusy as usize]),
            pushes_total: get(&self.pushes_total),
            pulls_total: get(&self.pulls_total),
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

impl MetricsSnapshot {
    /// Prometheus text exposition format, version 0.0.4.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(2048);
        let mut one = |name: &str, kind: &str, help: &str, value: u64| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            let _ = writeln!(out, "{name} {value}");
        };
        one(
            "tunnel_open_connections",
            "gauge",
            "Virtual connections held.",
            self.open_connections,
        );
        one(
            "tunnel_links_up",
            "gauge",
            "Broker links authenticated and alive.",
            self.links_up,
        );
        one(
            "tunnel_connects_total",
            "counter",
            "Connections opened.",
            self.connects_total,
        );
        one(
            "tunnel_pushes_total",
            "counter",
            "Push requests served.",
            self.pushes_total,
        );
        one(
            "tunnel_pulls_total",
            "counter",
            "Pull requests served.",
            self.pulls_total,
        );
        one(
            "tunnel_bytes_up_total",
            "counter",
            "Packet bytes received from clients.",
            self.bytes_up,
        );
        one(
            "tunnel_bytes_down_total",
            "counter",
            "Packet bytes sent to clients.",
            self.bytes_down,
        );
        one(
            "tunnel_packets_dropped_total",
            "counter",
            "Packets dropped on downstream queue overflow.",
            self.packets_dropped,
        );
        one(
            "tunnel_link_auth_failures_total",
            "counter",
            "Broker links refused at LINK_INIT.",
            self.link_auth_failures,
        );
        one(
            "tunnel_client_auth_failures_total",
            "counter",
            "Tunnel requests refused for missing or wrong client credentials (401).",
            self.client_auth_failures,
        );
        one(
            "tunnel_links_accepted_total",
            "counter",
            "Broker links authenticated.",
            self.links_accepted,
        );
        one(
            "tunnel_connections_closed_total",
            "counter",
            "Connections forgotten by the relay.",
            self.connections_closed,
        );
        let _ = writeln!(
            out,
            "# HELP tunnel_connects_rejected_total Connects refused, by reason."
        );
        let _ = writeln!(out, "# TYPE tunnel_connects_rejected_total counter");
        for reason in RejectReason::ALL {
            let value = match reason {
                RejectReason::BadRequest => self.connects_rejected_bad_request,
                RejectReason::NoServer => self.connects_rejected_no_server,
                RejectReason::Limit => self.connects_rejected_limit,
                RejectReason::LinkBusy => self.connects_rejected_link_busy,
            };
            let _ = writeln!(
                out,
                "tunnel_connects_rejected_total{{reason=\"{}\"}} {value}",
                reason.label()
            );
        }
        out
    }
}
