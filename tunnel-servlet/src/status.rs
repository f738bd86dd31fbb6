//! The relay at one moment, for the admin listener: one [`StatusSnapshot`], gathered in one
//! short lock of the table, rendered as the `/status` page (`status_html`), as
//! `/status.json` (`status_json`) and as `/metrics` ([`StatusSnapshot::render_prometheus`]).
//! It holds no secret: no link secret, no token, no credential, no client address.

use std::net::SocketAddr;
use std::time::{Instant, UNIX_EPOCH};

use crate::metrics::{family, labels, MetricsSnapshot};
use crate::state::Shared;
use tunnel_proto::payload::ListenMode;

/// The relay's version, as built.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Everything the status page shows.
#[derive(Debug, Clone)]
pub struct StatusSnapshot {
    /// The relay's version ([`VERSION`]).
    pub version: &'static str,
    /// Wall-clock start, seconds since the Unix epoch.
    pub started_unix_seconds: u64,
    /// Seconds since the relay started.
    pub uptime_seconds: u64,
    /// The relay-wide counters and gauges (the same as `/metrics`).
    pub totals: MetricsSnapshot,
    /// Bytes queued for clients over all connections.
    pub queued_bytes: u64,
    /// HTTP connections the public listener serves now.
    pub http_connections: u64,
    /// Broker names, linked or in their grace period, sorted by name.
    pub brokers: Vec<BrokerStatus>,
    /// Bounds that fill up, with how full they are.
    pub limits: Vec<LimitUse>,
    /// Configured values worth seeing next to the figures.
    pub settings: Vec<Setting>,
}

/// One broker name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerStatus {
    /// The server name the broker registered.
    pub name: String,
    /// The broker instance among those serving the name, 32 hex digits (all zero for a
    /// broker that does not send the pool extension, docs/protocol.md §5).
    pub instance: String,
    /// The instance's listen mode: `accepting`, `not_accepting` or `draining`.
    pub mode: &'static str,
    /// The capacity the instance reported (0: not limited or not known).
    pub capacity: u64,
    /// The live connections the instance reported.
    pub reported_live: u64,
    /// Connections placed on the instance (punted ones included).
    pub placements: u64,
    /// Connects the instance refused (or lost with its link) before accepting them, which
    /// the relay offered to another instance.
    pub punts: u64,
    /// The live link, or `None` while the relay waits out the grace period.
    pub link: Option<LinkStatus>,
    /// Seconds left of the grace period, when the link is lost.
    pub grace_left_seconds: Option<u64>,
    /// Connections the relay holds for this instance now.
    pub connections: u64,
    /// Connections opened to it, and packet bytes its clients pushed (up) and fetched
    /// (down), since the instance first linked.
    pub connections_opened: u64,
    /// Packet bytes pushed by this broker's clients (see `connections_opened`).
    pub bytes_up: u64,
    /// Packet bytes fetched by this broker's clients (see `connections_opened`).
    pub bytes_down: u64,
}

impl BrokerStatus {
    /// Metric labels of this instance (`server`, `instance` as 32 hex digits), then `extra`.
    fn labels(&self, extra: &[(&str, &str)]) -> String {
        let mut pairs = vec![("server", self.name.as_str()), ("instance", &self.instance)];
        pairs.extend_from_slice(extra);
        labels(&pairs)
    }
}

/// A broker's live link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkStatus {
    /// The link's TCP peer.
    pub peer: SocketAddr,
    /// Seconds since the link was authenticated.
    pub age_seconds: u64,
    /// Whether the broker accepts new connections (LISTEN_STATE).
    pub listening: bool,
}

/// A bound and its use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitUse {
    /// Stable identifier (JSON key, metric label).
    pub name: &'static str,
    /// What it bounds, for people.
    pub what: &'static str,
    /// How much of it is in use now.
    pub used: u64,
    /// The configured bound.
    pub max: u64,
}

/// A configured value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setting {
    /// Stable identifier (JSON key), the configuration field's name.
    pub name: &'static str,
    /// Its value; secrets are shown only as on/off.
    pub value: SettingValue,
}

/// The value of a [`Setting`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SettingValue {
    /// A count, size in bytes or duration in milliseconds (the name says which).
    Number(u64),
    /// A switch.
    Bool(bool),
    /// Anything else (addresses, lists).
    Text(String),
}

impl StatusSnapshot {
    /// Copies the relay's state. The table's lock is taken once, for one pass over the
    /// connections (see `Table::view`); rendering happens after it is released.
    pub(crate) fn gather(shared: &Shared) -> StatusSnapshot {
        let now = Instant::now();
        let view = shared.table().view();
        let config = &shared.config;
        let totals = shared.metrics.snapshot(
            view.connections,
            view.brokers.iter().filter(|b| b.link.is_some()).count() as u64,
            view.sessions,
        );
        let brokers = view
            .brokers
            .iter()
            .map(|row| BrokerStatus {
                name: row.name.to_string(),
                instance: row.instance.to_hex(),
                mode: match row.mode {
                    ListenMode::Accepting => "accepting",
                    ListenMode::NotAccepting => "not_accepting",
                    ListenMode::Draining => "draining",
                },
                capacity: u64::from(row.capacity.max_connections),
                reported_live: u64::from(row.capacity.live_connections),
                placements: row.traffic.placements,
                punts: row.traffic.punts,
                link: row.link.map(|(peer, since)| LinkStatus {
                    peer,
                    age_seconds: now.saturating_duration_since(since).as_secs(),
                    listening: row.listening,
                }),
                grace_left_seconds: match (&row.link, row.lost_at) {
                    (None, Some(lost)) => Some(
                        (lost + config.broker_grace)
                            .saturating_duration_since(now)
                            .as_secs(),
                    ),
                    _ => None,
                },
                connections: row.connections,
                connections_opened: row.traffic.connections_opened,
                bytes_up: row.traffic.bytes_up,
                bytes_down: row.traffic.bytes_down,
            })
            .collect();
        let in_use = |max: usize, available: usize| max.saturating_sub(available) as u64;
        let http_connections = in_use(
            config.max_http_connections,
            shared.http_slots.available_permits(),
        );
        let limits = vec![
            LimitUse {
                name: "connections",
                what: "virtual connections held",
                used: view.connections,
                max: config.max_connections as u64,
            },
            LimitUse {
                name: "sessions",
                what: "sessions held",
                used: view.sessions,
                max: config.max_sessions as u64,
            },
            LimitUse {
                name: "http_connections",
                what: "HTTP connections served by the public listener",
                used: http_connections,
                max: config.max_http_connections as u64,
            },
            LimitUse {
                name: "links_in_handshake",
                what: "broker links before LINK_INIT",
                used: in_use(
                    config.max_pending_links,
                    shared.link_handshake_slots.available_permits(),
                ),
                max: config.max_pending_links as u64,
            },
            LimitUse {
                name: "fullest_queue_bytes",
                what: "bytes in the fullest downstream queue",
                used: view.largest_queue_bytes,
                max: config.queue_limit as u64,
            },
        ];
        let ms = |d: std::time::Duration| SettingValue::Number(d.as_millis() as u64);
        let settings = vec![
            Setting {
                name: "pull_wait_ms",
                value: ms(config.pull_wait),
            },
            Setting {
                name: "client_inactivity_timeout_ms",
                value: ms(config.client_inactivity_timeout),
            },
            Setting {
                name: "broker_grace_ms",
                value: ms(config.broker_grace),
            },
            Setting {
                name: "name_grace_ms",
                value: ms(config.name_grace),
            },
            Setting {
                name: "link_keepalive_ms",
                value: ms(config.link_keepalive),
            },
            Setting {
                name: "max_body_bytes",
                value: SettingValue::Number(config.max_body_size as u64),
            },
            Setting {
                name: "response_limit_bytes",
                value: SettingValue::Number(config.response_limit as u64),
            },
            Setting {
                name: "stream_limit_bytes",
                value: SettingValue::Number(config.stream_limit as u64),
            },
            Setting {
                name: "relay_id",
                value: SettingValue::Number(u64::from(config.relay_id)),
            },
            Setting {
                name: "client_auth",
                value: SettingValue::Bool(config.client_auth.is_some()),
            },
            Setting {
                name: "names_with_own_link_secret",
                value: SettingValue::Number(config.link_secrets.len() as u64),
            },
            Setting {
                name: "link_tls",
                value: SettingValue::Bool(config.link_tls.is_some()),
            },
            Setting {
                name: "http_tls",
                value: SettingValue::Bool(config.http_tls.is_some()),
            },
            Setting {
                name: "trusted_proxies",
                value: SettingValue::Text(
                    config
                        .trusted_proxies
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", "),
                ),
            },
            Setting {
                name: "public_metrics",
                value: SettingValue::Bool(config.public_metrics),
            },
        ];
        StatusSnapshot {
            version: VERSION,
            started_unix_seconds: shared
                .started_wall
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            uptime_seconds: now.saturating_duration_since(shared.started).as_secs(),
            totals,
            queued_bytes: view.queued_bytes,
            http_connections,
            brokers,
            limits,
            settings,
        }
    }

    /// `/metrics`: the relay-wide families, then per-broker and per-limit series and the
    /// build and start time (Prometheus conventions: `_info` with value 1, `_seconds`).
    pub fn render_prometheus(&self) -> String {
        let mut out = String::with_capacity(4096 + 512 * self.brokers.len());
        self.totals.render_into(&mut out);
        family(
            &mut out,
            "tunnel_http_connections",
            "gauge",
            "HTTP connections the public listener serves.",
            [(String::new(), self.http_connections)],
        );
        family(
            &mut out,
            "tunnel_queued_bytes",
            "gauge",
            "Bytes queued for clients over all connections.",
            [(String::new(), self.queued_bytes)],
        );
        family(
            &mut out,
            "tunnel_limit",
            "gauge",
            "Configured bounds, by name (compare with tunnel_limit_used).",
            self.limits
                .iter()
                .map(|l| (labels(&[("limit", l.name)]), l.max)),
        );
        family(
            &mut out,
            "tunnel_limit_used",
            "gauge",
            "Use of each configured bound, by name.",
            self.limits
                .iter()
                .map(|l| (labels(&[("limit", l.name)]), l.used)),
        );
        family(
            &mut out,
            "tunnel_broker_link_up",
            "gauge",
            "1 if the broker instance's link is up, 0 during its grace period, by broker name \
             and instance.",
            self.brokers
                .iter()
                .map(|b| (b.labels(&[]), u64::from(b.link.is_some()))),
        );
        family(
            &mut out,
            "tunnel_broker_capacity",
            "gauge",
            "Most connections the broker instance serves at once, as it reported (0: not \
             limited or not known), by broker name and instance.",
            self.brokers.iter().map(|b| (b.labels(&[]), b.capacity)),
        );
        family(
            &mut out,
            "tunnel_broker_placements_total",
            "counter",
            "Connections placed on the broker instance, by broker name and instance.",
            self.brokers.iter().map(|b| (b.labels(&[]), b.placements)),
        );
        family(
            &mut out,
            "tunnel_broker_punts_total",
            "counter",
            "Connects the broker instance refused before accepting them and the relay offered \
             to another instance, by broker name and instance.",
            self.brokers.iter().map(|b| (b.labels(&[]), b.punts)),
        );
        family(
            &mut out,
            "tunnel_broker_open_connections",
            "gauge",
            "Virtual connections held, by broker name and instance.",
            self.brokers.iter().map(|b| (b.labels(&[]), b.connections)),
        );
        family(
            &mut out,
            "tunnel_broker_connects_total",
            "counter",
            "Connections opened, by broker name and instance.",
            self.brokers
                .iter()
                .map(|b| (b.labels(&[]), b.connections_opened)),
        );
        family(
            &mut out,
            "tunnel_broker_bytes_total",
            "counter",
            "Packet bytes exchanged with clients, by broker name, instance and direction (up = \
             pushed by clients, down = fetched by clients).",
            self.brokers.iter().flat_map(|b| {
                [
                    (b.labels(&[("direction", "up")]), b.bytes_up),
                    (b.labels(&[("direction", "down")]), b.bytes_down),
                ]
            }),
        );
        family(
            &mut out,
            "tunnel_start_time_seconds",
            "gauge",
            "Start time of the relay, seconds since the Unix epoch.",
            [(String::new(), self.started_unix_seconds)],
        );
        family(
            &mut out,
            "tunnel_build_info",
            "gauge",
            "Always 1; the relay's version as a label.",
            [(labels(&[("version", self.version)]), 1)],
        );
        out
    }
}
