//! Configuration of a [`crate::TunnelListener`]: where the relay is, who we are, and every
//! bound and deadline of the link.

use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use tunnel_proto::payload::InstanceId;
use tunnel_proto::ConnectionConfig;

use crate::tls::LinkTls;

/// Everything a [`crate::TunnelListener`] needs. Build it with [`BrokerConfig::new`] and
/// adjust fields; every field has a documented default.
#[derive(Clone)]
pub struct BrokerConfig {
    /// The link port of every relay to link to, each `HOST:PORT`: one relay, or every relay
    /// of a pool (docs/protocol.md §5.2). A host name that resolves to several addresses is
    /// one relay per address. Names are resolved again every
    /// [`relay_resolve_interval`](Self::relay_resolve_interval), so relays that move or join
    /// are found. Default: `["127.0.0.1:8081"]`.
    pub relays: Vec<String>,
    /// How often the names in [`relays`](Self::relays) are resolved again; a relay whose
    /// address is gone from the answer is no longer redialed once its link is down.
    /// Default: 30 s.
    pub relay_resolve_interval: Duration,
    /// The name clients use to reach this broker (`ServerName=`), 1..=255 bytes of UTF-8.
    /// Default: `echo`.
    pub server_name: String,
    /// The shared secret the relay checks in LINK_INIT. Default: empty.
    pub link_secret: Bytes,
    /// TLS for the link; `None` (the default) is plain TCP.
    pub tls: Option<LinkTls>,
    /// First delay before redialing a lost or refused link. Default: 200 ms.
    pub redial_initial: Duration,
    /// Ceiling of the redial delay, which doubles after each failed attempt. Default: 1 s, so
    /// a relay that comes back after an outage of any length is linked again within a second
    /// (one dial a second is no load for a relay).
    /// Up to a quarter of each delay is taken off at random (jitter), so many
    /// brokers cut off together do not redial in lock step.
    pub redial_max: Duration,
    /// Limit for one dial: TCP connect, TLS handshake, LINK_INIT and its answer. `bind`
    /// keeps trying for this long before it reports the relays unreachable. Default: 10 s.
    pub handshake_timeout: Duration,
    /// A NO_OP is sent when nothing was written to the link for this long, and a link from
    /// which nothing was read for three of these is taken as dead and redialed. Default: 10 s.
    pub keepalive_interval: Duration,
    /// Longest time one write to the link may take before the link is taken as stalled and
    /// redialed. Default: 30 s.
    pub link_write_timeout: Duration,
    /// Packets waiting for the link writer, across all connections; a full queue makes
    /// connections wait (backpressure). Default: 1024.
    pub link_write_queue: usize,
    /// Most bytes the link writer encodes into one write. Default: 256 KiB.
    pub link_write_batch_bytes: usize,
    /// Largest packet accepted from the relay, header included. Default: 24 + 1 MiB.
    pub max_packet_size: usize,
    /// Connections opened by clients but not yet taken by `accept`; when full, new ones are
    /// answered CONN_REJECTED "backlog full". Default: 1024.
    pub accept_backlog: usize,
    /// Tunables of each accepted connection (windows, buffers, retransmission, idle timeout).
    /// Default: [`ConnectionConfig::default`].
    pub connection: ConnectionConfig,
    /// This broker's identity among the instances serving `server_name` (docs/protocol.md
    /// §5.1): links with the same id replace each other, links with another id join the
    /// name's pool. Default: 16 random bytes drawn when the configuration is made, so every
    /// process (and every `BrokerConfig::new`) is its own instance and keeps its id across
    /// redials. Must not be all zero (the id of brokers without the pool extension).
    pub instance_id: InstanceId,
    /// Capacity reported to the relay: how many connections this instance serves at once.
    /// The relay places new connections by unused capacity and sends none beyond it. 0 means
    /// not limited (the relay then treats the instance as having room). Default: 0.
    pub max_connections: u32,
}

impl BrokerConfig {
    /// A configuration with all defaults but the relay address, name and secret. For a pool
    /// of relays, set [`relays`](Self::relays) to all of them.
    ///
    /// The secret is compared byte for byte with the relay's. The relay reads it from a file
    /// (`--link-secret-file`) without its trailing line end; read the broker's copy with
    /// [`read_link_secret_file`](crate::read_link_secret_file) so both agree (the raw bytes
    /// of `std::fs::read` keep the newline and fail with "bad link secret").
    ///
    /// ```
    /// # mod doc_support { include!(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/doc_support/echo_tunnel.rs")); }
    /// use tunnel_broker::{read_link_secret_file, BrokerConfig, TunnelListener};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> std::io::Result<()> {
    /// # let relay = doc_support::DocRelay::start().await?;
    /// # let relay_link = relay.link_addr();
    /// # let dir = std::env::temp_dir().join(format!("tunnel-broker-doc-{}", std::process::id()));
    /// # std::fs::create_dir_all(&dir)?;
    /// # let secret_file = dir.join("link-secret");
    /// # std::fs::write(&secret_file, [doc_support::LINK_SECRET, b"\n"].concat())?;
    /// // The same file the relay was started with (`tunnel-servlet --link-secret-file`).
    /// let secret = read_link_secret_file(&secret_file)?;
    /// let config = BrokerConfig::new(relay_link, "redis", secret);
    /// let listener = TunnelListener::bind(config).await?;
    /// assert!(listener.is_link_up());
    /// # std::fs::remove_dir_all(&dir)?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn new(
        relay_addr: impl Into<String>,
        server_name: impl Into<String>,
        link_secret: impl Into<Bytes>,
    ) -> BrokerConfig {
        BrokerConfig {
            relays: vec![relay_addr.into()],
            server_name: server_name.into(),
            link_secret: link_secret.into(),
            ..BrokerConfig::default()
        }
    }

    /// Checks what can be checked before dialing, so a typo fails `bind` at once.
    pub(crate) fn validate(&self) -> std::io::Result<()> {
        let invalid = |msg: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, msg);
        let name_len = self.server_name.len();
        if name_len == 0 || name_len > tunnel_proto::payload::MAX_SERVER_NAME_LEN {
            return Err(invalid(format!(
                "server name must be 1..={} bytes, got {name_len}",
                tunnel_proto::payload::MAX_SERVER_NAME_LEN
            )));
        }
        if self.link_secret.len() > tunnel_proto::payload::MAX_LINK_SECRET_LEN {
            return Err(invalid(format!(
                "link secret must be at most {} bytes",
                tunnel_proto::payload::MAX_LINK_SECRET_LEN
            )));
        }
        if self.relays.is_empty() || self.relays.iter().any(String::is_empty) {
            return Err(invalid("relay address is empty".into()));
        }
        if self.relay_resolve_interval.is_zero() {
            return Err(invalid("relay resolve interval must be non-zero".into()));
        }
        if self.keepalive_interval.is_zero() || self.handshake_timeout.is_zero() {
            return Err(invalid(
                "keepalive interval and handshake timeout must be non-zero".into(),
            ));
        }
        if self.instance_id == InstanceId::LEGACY {
            return Err(invalid("instance id must not be all zero".into()));
        }
        if self.link_write_queue == 0 || self.accept_backlog == 0 {
            return Err(invalid(
                "link write queue and accept backlog must be non-zero".into(),
            ));
        }
        Ok(())
    }

    /// How long the link may be silent before it is taken as dead.
    pub(crate) fn link_dead_after(&self) -> Duration {
        self.keepalive_interval.saturating_mul(3)
    }
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            relays: vec!["127.0.0.1:8081".into()],
            relay_resolve_interval: Duration::from_secs(30),
            server_name: "echo".into(),
            link_secret: Bytes::new(),
            tls: None,
            redial_initial: Duration::from_millis(200),
            redial_max: Duration::from_secs(1),
            handshake_timeout: Duration::from_secs(10),
            keepalive_interval: Duration::from_secs(10),
            link_write_timeout: Duration::from_secs(30),
            link_write_queue: 1024,
            link_write_batch_bytes: 256 * 1024,
            max_packet_size: tunnel_proto::packet::DEFAULT_MAX_PACKET_SIZE,
            accept_backlog: 1024,
            connection: ConnectionConfig::default(),
            instance_id: InstanceId::random(),
            max_connections: 0,
        }
    }
}

// Written by hand so the link secret never reaches a log.
impl fmt::Debug for BrokerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BrokerConfig")
            .field("relays", &self.relays)
            .field("relay_resolve_interval", &self.relay_resolve_interval)
            .field("server_name", &self.server_name)
            .field(
                "link_secret",
                &format_args!("<{} bytes>", self.link_secret.len()),
            )
            .field("tls", &self.tls)
            .field("redial_initial", &self.redial_initial)
            .field("redial_max", &self.redial_max)
            .field("handshake_timeout", &self.handshake_timeout)
            .field("keepalive_interval", &self.keepalive_interval)
            .field("link_write_timeout", &self.link_write_timeout)
            .field("link_write_queue", &self.link_write_queue)
            .field("link_write_batch_bytes", &self.link_write_batch_bytes)
            .field("max_packet_size", &self.max_packet_size)
            .field("accept_backlog", &self.accept_backlog)
            .field("connection", &self.connection)
            .field("instance_id", &self.instance_id)
            .field("max_connections", &self.max_connections)
            .finish()
    }
}
