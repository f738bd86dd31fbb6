//! Configuration of the relay: every bound and every deadline is a named field here, with its
//! default documented on the field and applied by [`RelayConfig::default`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use tunnel_proto::packet::DEFAULT_MAX_PACKET_SIZE;

use crate::auth::{ClientAuth, LinkSecrets};
use crate::cidr::Cidr;

/// Default of [`RelayConfig::queue_limit`]: a whole window of the client's largest default
/// window, 64 DATA packets of 64 KiB with their 24-byte headers (4,195,840 bytes), and room
/// for the ACK and NO_OPs queued beside them. The relay announces it when a session opens
/// (`tunnel-queue-limit`), and a client announces no larger window than it holds: a packet
/// beyond it is dropped and retransmitted whenever the client reads more slowly than its
/// broker sends (at exactly 1 MiB with a window of 16, the sixteenth packet of every full
/// window was; BENCHMARKS.md).
pub const DEFAULT_QUEUE_LIMIT: usize = 64 * (64 * 1024 + 24) + 4 * 1024;

/// PEM files of a TLS certificate chain and its private key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// Certificate chain, leaf first (PEM).
    pub cert: PathBuf,
    /// Private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// Everything the relay needs to run. Build it with `RelayConfig::default()` and override
/// fields; [`RelayConfig::validate`] is called by `Relay::bind`.
#[derive(Clone)]
pub struct RelayConfig {
    /// Where the HTTP interface listens. Default `127.0.0.1:8080`.
    pub http_listen: SocketAddr,
    /// Where brokers dial in. Default `127.0.0.1:8081`.
    pub link_listen: SocketAddr,
    /// Path the tunnel requests go to. Default `/tunnel`.
    pub base_path: String,
    /// The secret every broker must present in LINK_INIT, unless its name has its own in
    /// `link_secrets`. No default: must not be empty.
    pub link_secret: Vec<u8>,
    /// Names with their own link secret (`--link-secrets-file`); a broker of a listed name
    /// must present that one, and the shared secret is refused for it. Default: none.
    pub link_secrets: LinkSecrets,
    /// How long a pull is held while nothing is queued. Default 20 s.
    pub pull_wait: Duration,
    /// Most bytes of packets put into one push or pull response (at least one packet is
    /// always sent). Default 1 MiB.
    pub response_limit: usize,
    /// Most bytes of packets one streamed pull carries before the relay ends it and the
    /// client opens the next (docs/protocol.md §2.2); it also ends after `pull_wait`.
    /// Default 64 MiB.
    pub stream_limit: usize,
    /// Largest accepted request body; larger ones get 413. Default 4 MiB.
    pub max_body_size: usize,
    /// Largest packet, header included, accepted from a client or a broker.
    /// Default 24 + 1 MiB.
    pub max_packet_size: usize,
    /// Most virtual connections held at once; connects beyond get 503. Connections closed both
    /// ways (waiting only for their last acknowledgements) do not count, but the table holds
    /// at most twice this many entries. Default 20,000.
    pub max_connections: usize,
    /// Bytes a connection's downstream queue may hold, headers included; DATA/ACK packets
    /// beyond are dropped (and counted) so one slow client never stalls its broker's link.
    /// Default [`DEFAULT_QUEUE_LIMIT`], 4 MiB + 5.5 KiB.
    pub queue_limit: usize,
    /// Extra room beyond `queue_limit` for the few control packets that must not be dropped
    /// (CONN_INIT_ACK, CONN_REJECTED, CONN_ABORT, CONN_CLOSE, CONN_OPTION). Default 64 KiB.
    pub queue_control_slack: usize,
    /// A connection whose client made no request for this long is aborted, unless the
    /// connection set its own value with CONN_OPTION 2. Default 60 s.
    pub client_inactivity_timeout: Duration,
    /// Largest inactivity timeout a connection may ask for with CONN_OPTION 2, so a vanished
    /// client cannot pin an entry for ever. Default 1 h.
    pub max_client_inactivity_timeout: Duration,
    /// How long a broker's connections are kept after its link is lost. Default 30 s.
    pub broker_grace: Duration,
    /// How long after a name last had a linked broker instance, or after the relay started,
    /// a connect that no instance can take gets 503 with `Retry-After` instead of 404, so
    /// clients retry through a re-link or a rolling restart. Default 30 s.
    pub name_grace: Duration,
    /// How long an ended connection (CONN_ABORT/CONN_REJECTED/CONN_SHUTDOWN queued) waits for
    /// its client to fetch the rest of its queue before it is forgotten. Default 30 s.
    pub ending_linger: Duration,
    /// Idle time after which the relay sends NO_OP on a link; a link silent for three of
    /// these, or whose writes stall that long, is dead. Default 10 s.
    pub link_keepalive: Duration,
    /// Time a new link has to deliver LINK_INIT. Default 10 s.
    pub link_handshake_timeout: Duration,
    /// Most links in their handshake at once; more are closed at accept. Default 64.
    pub max_pending_links: usize,
    /// Bytes waiting to be written to one link; HTTP requests wait for room. Default 8 MiB.
    pub link_write_buffer: usize,
    /// How long an HTTP request waits for room in the link writer before answering 503.
    /// Default 5 s.
    pub link_send_timeout: Duration,
    /// Time a client has to send its request headers (and a TLS handshake to finish).
    /// Default 10 s.
    pub header_read_timeout: Duration,
    /// Time a client has to send a whole request body. Default 30 s.
    pub body_read_timeout: Duration,
    /// Most HTTP connections (TCP) served at once; more wait in the kernel backlog.
    /// Default 30,000.
    pub max_http_connections: usize,
    /// Accept backlog of the HTTP and link listeners (the kernel caps it at
    /// `net.core.somaxconn`). Default 4096.
    pub listen_backlog: u32,
    /// How often the sweeper checks inactivity, grace and linger deadlines. Default 500 ms.
    pub sweep_interval: Duration,
    /// How long a graceful stop waits for open HTTP exchanges to finish. Default 5 s.
    pub shutdown_drain: Duration,
    /// TLS for the HTTP interface (ALPN h2 and http/1.1). Default none (plain HTTP).
    pub http_tls: Option<TlsFiles>,
    /// TLS for the link listener. Default none (plain TCP).
    pub link_tls: Option<TlsFiles>,
    /// PEM file of the CA certificate(s) a broker's client certificate must chain to: with
    /// it the link listener requires mutual TLS and refuses brokers without such a
    /// certificate before they can send LINK_INIT. Needs `link_tls`. Default none (brokers
    /// prove themselves with the link secret only).
    pub link_tls_client_ca: Option<PathBuf>,
    /// Credentials every tunnel request (connect, push, pull) must carry in its
    /// `Authorization` header; others get 401 with `WWW-Authenticate`. `/healthz` and
    /// `/metrics` stay open. Default none (anyone who reaches the relay may connect; the
    /// per-connection token still guards each connection).
    pub client_auth: Option<ClientAuth>,
    /// Networks of the reverse proxies in front of the relay. Only a request whose TCP peer
    /// is in one of them may name the client with `X-Forwarded-For` or `Forwarded`; the
    /// right-most address in those headers that is not itself trusted is the client (see
    /// `forwarded.rs`). Default empty: the TCP peer is always the client.
    pub trusted_proxies: Vec<Cidr>,
    /// Where the admin listener serves `/metrics`, `/healthz`, `/status` and `/status.json`.
    /// Default none (no admin listener).
    pub admin_listen: Option<SocketAddr>,
    /// Whether the public listener serves `/metrics` too. Default true, as before the admin
    /// listener existed; set it to false once scrapers use the admin listener.
    pub public_metrics: bool,
    /// Most HTTP connections the admin listener serves at once; more wait in the kernel
    /// backlog. Default 16.
    pub admin_max_connections: usize,
    /// Most sessions (docs/protocol.md §2.1) held at once; openings beyond get 503.
    /// Default 10,000.
    pub max_sessions: usize,
    /// Most connections in one session; connects in it beyond get 503 (and ATTACHes a
    /// CONN_ABORT). Default 10,000.
    pub max_session_connections: usize,
    /// Bytes all the connections of one session may hold queued together; beyond it DATA,
    /// ACK and NO_OP are dropped as for a full connection queue, and control packets may use
    /// `queue_control_slack` more. Default 16 MiB.
    pub max_session_queue: usize,
    /// This relay's id in a pool of relays (docs/protocol.md §5.2), 1 ..= 255: every
    /// connection and session id it makes has it in its top byte, so a load balancer routes
    /// each request to the relay that made its id. 0 (the default) is a relay outside any
    /// pool, whose ids use all 32 bits. Relays of one pool must have distinct ids.
    pub relay_id: u8,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            http_listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            link_listen: SocketAddr::from(([127, 0, 0, 1], 8081)),
            base_path: "/tunnel".to_string(),
            link_secret: Vec::new(),
            link_secrets: LinkSecrets::new(),
            pull_wait: Duration::from_secs(20),
            response_limit: 1024 * 1024,
            stream_limit: 64 * 1024 * 1024,
            max_body_size: 4 * 1024 * 1024,
            max_packet_size: DEFAULT_MAX_PACKET_SIZE,
            max_connections: 20_000,
            queue_limit: DEFAULT_QUEUE_LIMIT,
            queue_control_slack: 64 * 1024,
            client_inactivity_timeout: Duration::from_secs(60),
            max_client_inactivity_timeout: Duration::from_secs(3600),
            broker_grace: Duration::from_secs(30),
            name_grace: Duration::from_secs(30),
            ending_linger: Duration::from_secs(30),
            link_keepalive: Duration::from_secs(10),
            link_handshake_timeout: Duration::from_secs(10),
            max_pending_links: 64,
            link_write_buffer: 8 * 1024 * 1024,
            link_send_timeout: Duration::from_secs(5),
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            max_http_connections: 30_000,
            listen_backlog: 4096,
            sweep_interval: Duration::from_millis(500),
            shutdown_drain: Duration::from_secs(5),
            http_tls: None,
            link_tls: None,
            link_tls_client_ca: None,
            client_auth: None,
            trusted_proxies: Vec::new(),
            admin_listen: None,
            public_metrics: true,
            admin_max_connections: 16,
            max_sessions: 10_000,
            max_session_connections: 10_000,
            max_session_queue: 16 * 1024 * 1024,
            relay_id: 0,
        }
    }
}

impl std::fmt::Debug for RelayConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Written by hand so the link secret never reaches a log.
        f.debug_struct("RelayConfig")
            .field("http_listen", &self.http_listen)
            .field("link_listen", &self.link_listen)
            .field("base_path", &self.base_path)
            .field(
                "link_secret",
                &format_args!("<{} bytes>", self.link_secret.len()),
            )
            .field("link_secrets", &self.link_secrets)
            .field("pull_wait", &self.pull_wait)
            .field("response_limit", &self.response_limit)
            .field("stream_limit", &self.stream_limit)
            .field("max_body_size", &self.max_body_size)
            .field("max_packet_size", &self.max_packet_size)
            .field("max_connections", &self.max_connections)
            .field("queue_limit", &self.queue_limit)
            .field("client_inactivity_timeout", &self.client_inactivity_timeout)
            .field("broker_grace", &self.broker_grace)
            .field("name_grace", &self.name_grace)
            .field("link_keepalive", &self.link_keepalive)
            .field("http_tls", &self.http_tls)
            .field("link_tls", &self.link_tls)
            .field("link_tls_client_ca", &self.link_tls_client_ca)
            .field("client_auth", &self.client_auth)
            .field("trusted_proxies", &self.trusted_proxies)
            .field("admin_listen", &self.admin_listen)
            .field("public_metrics", &self.public_metrics)
            .field("max_sessions", &self.max_sessions)
            .field("max_session_connections", &self.max_session_connections)
            .field("max_session_queue", &self.max_session_queue)
            .field("relay_id", &self.relay_id)
            .finish_non_exhaustive()
    }
}

impl RelayConfig {
    /// The inactivity timeout a CONN_OPTION 2 (or a session's SESSION_INIT) of `ms`
    /// milliseconds asks for: 0 means the default, anything else is capped at
    /// `max_client_inactivity_timeout`.
    pub(crate) fn inactivity_timeout_for(&self, ms: u32) -> Duration {
        if ms == 0 {
            self.client_inactivity_timeout
        } else {
            Duration::from_millis(u64::from(ms)).min(self.max_client_inactivity_timeout)
        }
    }

    /// Checks the values that would make the relay misbehave rather than merely be slow.
    pub fn validate(&self) -> Result<(), String> {
        if self.link_secret.is_empty() {
            return Err("the link secret must not be empty".into());
        }
        if !self.base_path.starts_with('/') {
            return Err(format!(
                "base path {:?} must start with '/'",
                self.base_path
            ));
        }
        let nonzero = [
            ("pull_wait", self.pull_wait),
            ("link_keepalive", self.link_keepalive),
            ("link_handshake_timeout", self.link_handshake_timeout),
            ("sweep_interval", self.sweep_interval),
            ("header_read_timeout", self.header_read_timeout),
            ("body_read_timeout", self.body_read_timeout),
            ("link_send_timeout", self.link_send_timeout),
        ];
        for (name, value) in nonzero {
            if value.is_zero() {
                return Err(format!("{name} must be greater than zero"));
            }
        }
        let sizes = [
            ("response_limit", self.response_limit),
            ("stream_limit", self.stream_limit),
            ("max_body_size", self.max_body_size),
            ("max_connections", self.max_connections),
            ("queue_limit", self.queue_limit),
            ("max_pending_links", self.max_pending_links),
            ("max_http_connections", self.max_http_connections),
            ("admin_max_connections", self.admin_max_connections),
            ("max_sessions", self.max_sessions),
            ("max_session_connections", self.max_session_connections),
            ("max_session_queue", self.max_session_queue),
        ];
        for (name, value) in sizes {
            if value == 0 {
                return Err(format!("{name} must be greater than zero"));
            }
        }
        if self.max_packet_size < tunnel_proto::packet::HEADER_LEN {
            return Err("max_packet_size must be at least 24".into());
        }
        if self.link_tls_client_ca.is_some() && self.link_tls.is_none() {
            return Err("link_tls_client_ca needs link_tls (a certificate for the link)".into());
        }
        if let Some(auth) = &self.client_auth {
            auth.validate()?;
        }
        if self.link_write_buffer < self.max_body_size {
            return Err("link_write_buffer must be at least max_body_size".into());
        }
        Ok(())
    }
}
