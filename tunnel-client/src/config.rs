//! Configuration of a tunnel client connection. Every bound and deadline the HTTP transport
//! uses is a field here, with its default documented.

use std::path::PathBuf;
use std::time::Duration;

use tunnel_proto::packet::DEFAULT_MAX_PACKET_SIZE;
use tunnel_proto::ConnectionConfig;

use crate::auth::RelayAuth;
use crate::pac::PacSource;
use crate::proxy_auth::ProxyAuthConfig;
use crate::session::TransportMode;
use tunnel_proto::driver::StreamConfig;

/// The client's default receive window where the relay does not say how much it holds for a
/// connection (relays before the `tunnel-queue-limit` header, and connections outside a
/// session), in packets: 16 × 64 KiB = 1 MiB, what every relay's default per-connection queue
/// holds. A larger window lets the broker send more than the relay will hold for the client;
/// the relay then drops and the connection retransmits. Measured on loopback against a 1 MiB
/// queue: 16 moves 50 MB each way in ~0.2 s, 64 takes 3–7 s.
pub const DEFAULT_CLIENT_RECV_WINDOW: u16 = 16;

/// The client's default largest receive window, in packets: 64 × 64 KiB = 4 MiB, announced in
/// a session whose relay says its per-connection queue holds that much (the relay's default
/// does). One connection's download is bounded by the window over the round trip: on a
/// 2-core VM whose loopback round trip under load is long, 64 against 16 took one
/// connection's download from 0.68 to 0.74 of the plain chain over HTTP/1.1 (BENCHMARKS.md),
/// and over a 50 ms path a window of 1 MiB allows at most 20 MiB/s.
pub const DEFAULT_CLIENT_MAX_RECV_WINDOW: u16 = 64;

/// Bytes of a relay's queue kept for the ACK and NO_OPs beside a full window of DATA.
const QUEUE_ROOM_FOR_CONTROL: u64 = 1024;

/// The client's default largest DATA payload: 256 KiB, four times what the broker sends.
/// Fewer, larger packets cost less per byte in all three processes: on a 2-core VM, one
/// connection's upload went from 608 to 761 MiB/s over HTTP/1.1 (BENCHMARKS.md). The broker
/// keeps 64 KiB: its packets count against the client's receive window of 16 packets, which
/// the relay's 1 MiB per-connection queue must hold. Any relay and broker decode packets up
/// to 24 bytes + 1 MiB by default.
pub const DEFAULT_CLIENT_MAX_DATA_PAYLOAD: usize = 256 * 1024;

/// Default of [`ClientConfig::outage_grace`]: long enough for a laptop's short sleep, a move
/// to another network or a proxy restart.
pub const DEFAULT_OUTAGE_GRACE: Duration = Duration::from_secs(5 * 60);

/// Which HTTP versions to speak to the relay (or the proxy).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum HttpVersion {
    /// HTTP/1.1 for `http://`, HTTP/2 when TLS ALPN offers it for `https://`.
    #[default]
    Auto,
    /// Only HTTP/1.1 (some proxies mangle HTTP/2).
    Http1Only,
    /// HTTP/2 without upgrade negotiation (h2c for `http://`); the relay must speak it.
    Http2PriorKnowledge,
}

/// An explicit HTTP proxy.
#[derive(Clone, PartialEq, Eq)]
pub struct ProxyConfig {
    /// `http://host:port` (or `https://`), used for both `http://` and `https://` relays.
    pub url: String,
    /// User name toward the proxy: `DOMAIN\user` (or `user`) for NTLM, the plain name for
    /// Basic; the scheme is the one the proxy offers (Negotiate, then NTLM, then Basic).
    /// Negotiate (Kerberos) needs no user: it uses the credential cache (`kinit`,
    /// `KRB5CCNAME`).
    pub username: Option<String>,
    /// Password for NTLM or Basic authentication toward the proxy; never logged.
    pub password: Option<String>,
}

impl std::fmt::Debug for ProxyConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The password never goes to logs.
        f.debug_struct("ProxyConfig")
            .field("url", &self.url)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// Everything `tunnel_client::connect` needs.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The relay's tunnel endpoint, base path included. Default: `http://127.0.0.1:8080/tunnel`.
    pub relay_url: String,
    /// The broker to reach (its registered server name). Default: `echo`.
    pub server_name: String,
    /// Explicit proxy. `None` (default): the standard environment variables apply
    /// (`HTTP_PROXY`, `HTTPS_PROXY`, `ALL_PROXY`, `NO_PROXY`).
    pub proxy: Option<ProxyConfig>,
    /// With no explicit `proxy`: a PAC script whose `FindProxyForURL` picks the proxies for
    /// the relay URL, tried in the order it gives (`PROXY a; PROXY b; DIRECT`: the next one
    /// when a proxy does not answer). Replaces the environment's proxy variables. Evaluated
    /// once, when the client is made. Default: none.
    pub pac: Option<PacSource>,
    /// Bounds of the forwarder that runs NTLM and Negotiate handshakes with an explicit
    /// `http://` proxy (see [`ProxyAuthConfig`]).
    pub proxy_auth: ProxyAuthConfig,
    /// Deadline for downloading the PAC script and, separately, for running it (a script
    /// that loops is stopped). Default: 5 s.
    pub pac_timeout: Duration,
    /// With no explicit `proxy` and no `pac`: whether the environment's proxy variables apply (default:
    /// true). False connects directly.
    pub env_proxy: bool,
    /// Credentials for a relay that requires client authentication, sent as the
    /// `Authorization` header of every request (not to the proxy: that is `proxy`'s
    /// username/password). Default: none.
    pub relay_auth: Option<RelayAuth>,
    /// Extra PEM file of CA certificates trusted in addition to the system roots.
    /// Default: none.
    pub ca_file: Option<PathBuf>,
    /// Default: [`HttpVersion::Auto`].
    pub http_version: HttpVersion,
    /// The whole connect (connect request with its retries, then waiting for the broker's
    /// CONN_INIT_ACK) must succeed within this. Default: 30 s.
    pub connect_timeout: Duration,
    /// Deadline for establishing one TCP (+TLS) connection to the relay or proxy.
    /// Default: 10 s.
    pub tcp_connect_timeout: Duration,
    /// Deadline of one pull request. The relay holds a pull up to its pull wait (default
    /// 20 s), so this must be longer. Default: 30 s.
    pub pull_timeout: Duration,
    /// Deadline of one connect or push request. Default: 30 s.
    pub request_timeout: Duration,
    /// Push requests in flight at once: per connection, or in a session (see
    /// [`ClientConfig::session`]) for all connections together, where a session's streamed
    /// upstream takes one of them; the driver waits for a free slot (back-pressure).
    /// Default: 4.
    pub max_pushes_in_flight: usize,
    /// Idle HTTP connections kept open to the relay for reuse (shared by all connections of
    /// a `TunnelClient`). Over HTTP/1.1 each held pull occupies a connection of its own; without
    /// this bound the pool also kept the connection of every connection's last push, doubling
    /// what an idle tunnel connection costs the relay. Default: 64.
    pub http_pool_max_idle: usize,
    /// How long an idle pooled HTTP connection is kept. Default: 10 s.
    pub http_pool_idle_timeout: Duration,
    /// Largest push body in bytes; the relay answers 413 above its limit (default 1 MiB).
    /// A single packet larger than this still goes alone. Default: 1 MiB.
    pub max_push_body: usize,
    /// Attempts of one push body before it is dropped (the connection retransmits what was
    /// in it). Default: 3.
    pub push_attempts: u32,
    /// Largest response body read from the relay (pull answers and piggybacked push
    /// answers); the relay's own limit is 1 MiB plus one packet. Default: 4 MiB.
    pub max_response_body: usize,
    /// Largest packet accepted from the relay. Default: 24 + 1 MiB.
    pub max_packet_size: usize,
    /// First delay after a failed request; doubled on each further failure. Default: 100 ms.
    pub retry_initial: Duration,
    /// Ceiling of the retry delay. Default: 1 s, so traffic resumes within a second of the
    /// path coming back after an outage of any length (a relay restart, a relay of a pool
    /// dying); one request a second per session during an outage costs the relay little.
    pub retry_max: Duration,
    /// How long an established connection survives without any path to the relay (laptop
    /// sleep, network change, proxy restart): the client gives up after this long of
    /// continuous transient failures (5xx, time-outs, network errors) of its pulls or pushes.
    /// The relay and the broker are told to wait as long (see
    /// [`ClientConfig::peer_silence_allowance`]). Default: 5 min ([`DEFAULT_OUTAGE_GRACE`]).
    pub outage_grace: Duration,
    /// Largest receive window announced in a session, in packets: a connection announces
    /// as many packets of the broker's default 64 KiB as the relay says its per-connection
    /// queue holds (the `tunnel-queue-limit` header of the session's opening, docs/protocol.md
    /// §2.1), up to this, and never fewer than `connection.recv_window`. Default:
    /// [`DEFAULT_CLIENT_MAX_RECV_WINDOW`].
    pub max_recv_window: u16,
    /// The reliable connection's tunables. Default: `ConnectionConfig::default()` except
    /// `recv_window` = [`DEFAULT_CLIENT_RECV_WINDOW`] (the window where the relay does not say
    /// what it holds; see `max_recv_window`) and `max_data_payload` =
    /// [`DEFAULT_CLIENT_MAX_DATA_PAYLOAD`] (at most `max_packet_size` less the 24-byte
    /// header, and no more than the relay's and the broker's largest packet allow).
    pub connection: ConnectionConfig,
    /// Affinity key sent with every connect (`Affinity=` in the query; docs/protocol.md §2):
    /// when several broker instances serve the name, the relay places connections with the
    /// same key on the same instance while it lives (a room, a tenant, a user). It travels in
    /// the URL, so it must not be a secret; at most 255 bytes. Default: none.
    pub affinity: Option<String>,
    /// The stream driver's tunables (its batch size is capped at `max_push_body`).
    pub stream: StreamConfig,
    /// Carry all connections of a [`TunnelClient`](crate::TunnelClient) in one session
    /// (docs/protocol.md §2.1): one held pull and at most `max_pushes_in_flight` pushes for
    /// all of them, so that hundreds of connections need a handful of HTTP connections to
    /// the proxy and the relay. `false` uses the per-connection requests (one held pull per
    /// connection), which relays of every version serve. Default: `true`.
    pub session: bool,
    /// In a session: connect requests in flight at once; further connects wait their turn,
    /// so opening many connections at once needs no HTTP connection each. With the held
    /// pull and `max_pushes_in_flight` (4), a session needs at most 7 HTTP/1.1 connections,
    /// within the 8 per client that strict proxies allow. Default: 2.
    pub max_connects_in_flight: usize,
    /// In a session: bytes of packets waiting for a push slot, over all connections; a
    /// connection's driver waits while it is full (back-pressure). Default: 4 MiB.
    pub session_outbox: usize,
    /// In a session: how the relay's packets come down (docs/protocol.md §2.2): streamed
    /// where the path allows, polled where it buffers ([`TransportMode::Auto`]), or either
    /// one forced. Default: `Auto`.
    pub mode: TransportMode,
    /// In `Auto` mode: a streamed pull must deliver its headers and first bytes (the relay
    /// writes a packet at once) within this of sending the request, or the path is taken to
    /// buffer responses and the session polls. Default: 2 s.
    pub stream_probe_timeout: Duration,
    /// In `Auto` mode, after a fall-back to polling: when to try streaming again (a proxy
    /// may have changed, or the route). Default: 5 min.
    pub stream_reprobe_interval: Duration,
    /// In a session, unless `mode` is `Poll`: send packets up in one streamed request body
    /// (docs/protocol.md §2.3) where the path answers it within the probe deadline (over
    /// HTTP/1.1, once the relay answered the probe the body starts with). `false` sends every
    /// batch in a push request of its own. Default: `true`.
    pub stream_upstream: bool,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            relay_url: "http://127.0.0.1:8080/tunnel".to_string(),
            server_name: "echo".to_string(),
            proxy: None,
            pac: None,
            proxy_auth: ProxyAuthConfig::default(),
            pac_timeout: Duration::from_secs(5),
            env_proxy: true,
            relay_auth: None,
            ca_file: None,
            http_version: HttpVersion::Auto,
            connect_timeout: Duration::from_secs(30),
            tcp_connect_timeout: Duration::from_secs(10),
            pull_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(30),
            max_pushes_in_flight: 4,
            http_pool_max_idle: 64,
            http_pool_idle_timeout: Duration::from_secs(10),
            max_push_body: 1024 * 1024,
            push_attempts: 3,
            max_response_body: 4 * 1024 * 1024,
            max_packet_size: DEFAULT_MAX_PACKET_SIZE,
            affinity: None,
            retry_initial: Duration::from_millis(100),
            retry_max: Duration::from_secs(1),
            outage_grace: DEFAULT_OUTAGE_GRACE,
            connection: ConnectionConfig {
                recv_window: DEFAULT_CLIENT_RECV_WINDOW,
                max_data_payload: DEFAULT_CLIENT_MAX_DATA_PAYLOAD,
                ..ConnectionConfig::default()
            },
            max_recv_window: DEFAULT_CLIENT_MAX_RECV_WINDOW,
            stream: StreamConfig::default(),
            session: true,
            max_connects_in_flight: 2,
            session_outbox: 4 * 1024 * 1024,
            mode: TransportMode::Auto,
            stream_probe_timeout: Duration::from_secs(2),
            stream_reprobe_interval: Duration::from_secs(5 * 60),
            stream_upstream: true,
        }
    }
}

impl ClientConfig {
    /// Defaults with the given relay URL and server name.
    pub fn new(relay_url: impl Into<String>, server_name: impl Into<String>) -> ClientConfig {
        ClientConfig {
            relay_url: relay_url.into(),
            server_name: server_name.into(),
            ..ClientConfig::default()
        }
    }

    /// How long the other ends must tolerate hearing nothing from this client: the outage
    /// grace plus one pull timeout (an outage may begin right after a request the relay
    /// counted as activity). Sent as CONN_OPTION 2 (docs/protocol.md §6), which sets the
    /// relay's inactivity timeout for the connection (capped by the relay's maximum, 1 h by
    /// default) and raises the broker's idle timeout; the client's own connection idle
    /// timeout is raised to it too. So the client, which sees the outage, is the one that
    /// decides when to give up.
    pub fn peer_silence_allowance(&self) -> Duration {
        self.outage_grace.saturating_add(self.pull_timeout)
    }

    /// The receive window a connection announces, in packets, given the per-connection queue
    /// limit the relay announced (`None`: it did not): as many of the broker's default packets
    /// (64 KiB and a 24-byte header) as the queue holds beside its ACK, within
    /// `max_recv_window`, and at least `connection.recv_window`.
    pub fn recv_window_for(&self, relay_queue_limit: Option<u64>) -> u16 {
        let floor = self.connection.recv_window;
        let Some(limit) = relay_queue_limit else {
            return floor;
        };
        let packet = (tunnel_proto::packet::DEFAULT_MAX_DATA_PAYLOAD
            + tunnel_proto::packet::HEADER_LEN) as u64;
        let held = limit.saturating_sub(QUEUE_ROOM_FOR_CONTROL) / packet;
        let held = u16::try_from(held).unwrap_or(u16::MAX);
        held.min(self.max_recv_window).max(floor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_is_what_the_relay_queue_holds_within_the_bounds() {
        let config = ClientConfig::default();
        // A relay that does not say: the window every relay's default queue holds.
        assert_eq!(config.recv_window_for(None), DEFAULT_CLIENT_RECV_WINDOW);
        // Today's relay default (64 packets and room) and the old one (16 and 4 KiB).
        assert_eq!(config.recv_window_for(Some(64 * 65_560 + 4096)), 64);
        assert_eq!(config.recv_window_for(Some(16 * 65_560 + 4096)), 16);
        // 33 whole packets and 1,000 bytes: the ACK needs its room too.
        assert_eq!(config.recv_window_for(Some(33 * 65_560 + 1000)), 32);
        assert_eq!(config.recv_window_for(Some(33 * 65_560 + 1024)), 33);
        // Never above the largest, never below the configured floor.
        assert_eq!(
            config.recv_window_for(Some(1 << 40)),
            DEFAULT_CLIENT_MAX_RECV_WINDOW
        );
        assert_eq!(config.recv_window_for(Some(0)), DEFAULT_CLIENT_RECV_WINDOW);
        let vouched = ClientConfig {
            connection: ConnectionConfig {
                recv_window: 40,
                ..ConnectionConfig::default()
            },
            ..ClientConfig::default()
        };
        assert_eq!(vouched.recv_window_for(Some(16 * 65_560 + 4096)), 40);
    }
}
