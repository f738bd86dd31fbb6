//! The `tunnel-servlet` binary: the relay with its configuration from flags or environment
//! variables, logging through `tracing` (RUST_LOG, default info), and a graceful stop on
//! Ctrl-C or SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use tunnel_servlet::{Cidr, ClientAuth, Relay, RelayConfig, TlsFiles};

/// Parses a duration given as whole milliseconds.
fn millis(s: &str) -> Result<Duration, String> {
    s.parse::<u64>()
        .map(Duration::from_millis)
        .map_err(|e| format!("expected milliseconds: {e}"))
}

#[derive(Parser, Debug)]
#[command(
    name = "tunnel-servlet",
    version,
    about = "HTTP tunnel relay: serves tunnel clients over HTTP and brokers over TCP links"
)]
struct Args {
    /// Address of the HTTP interface.
    #[arg(long, env = "TUNNEL_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Address brokers dial to link in.
    #[arg(long, env = "TUNNEL_LINK_LISTEN", default_value = "127.0.0.1:8081")]
    link_listen: SocketAddr,
    /// File holding the secret brokers must present (trailing newline ignored).
    #[arg(long, env = "TUNNEL_LINK_SECRET_FILE")]
    link_secret_file: PathBuf,
    /// File of `name:secret` lines: brokers of a listed name must present that secret (the
    /// shared one is refused for it); other names use --link-secret-file.
    #[arg(long, env = "TUNNEL_LINK_SECRETS_FILE")]
    link_secrets_file: Option<PathBuf>,
    /// Path of the tunnel requests.
    #[arg(long, env = "TUNNEL_BASE_PATH", default_value = "/tunnel")]
    base_path: String,
    /// How long a pull is held while nothing is queued, in ms.
    #[arg(long, env = "TUNNEL_PULL_WAIT_MS", default_value = "20000", value_parser = millis)]
    pull_wait_ms: Duration,
    /// Most bytes of packets in one response.
    #[arg(long, env = "TUNNEL_RESPONSE_LIMIT", default_value_t = 1024 * 1024)]
    response_limit: usize,
    /// Worker threads (0: tokio's default, TOKIO_WORKER_THREADS or one per core; 1: every
    /// task on the main thread, tokio's current-thread scheduler). One per core suits a
    /// relay of many clients; on a small machine shared with the broker, 1 gives shorter
    /// round trips (BENCHMARKS.md).
    #[arg(long, env = "TUNNEL_WORKER_THREADS", default_value_t = 0)]
    worker_threads: usize,
    /// Most bytes of packets in one streamed pull (it also ends after the pull wait).
    #[arg(long, env = "TUNNEL_STREAM_LIMIT", default_value_t = 64 * 1024 * 1024)]
    stream_limit: usize,
    /// Largest request body; larger get 413.
    #[arg(long, env = "TUNNEL_MAX_BODY", default_value_t = 4 * 1024 * 1024)]
    max_body: usize,
    /// Largest packet, header included.
    #[arg(long, env = "TUNNEL_MAX_PACKET", default_value_t = tunnel_proto::packet::DEFAULT_MAX_PACKET_SIZE)]
    max_packet: usize,
    /// Most virtual connections; connects beyond get 503.
    #[arg(long, env = "TUNNEL_MAX_CONNECTIONS", default_value_t = 20_000)]
    max_connections: usize,
    /// Bytes a connection's downstream queue holds before packets are dropped.
    #[arg(long, env = "TUNNEL_QUEUE_LIMIT", default_value_t = tunnel_servlet::config::DEFAULT_QUEUE_LIMIT)]
    queue_limit: usize,
    /// Default client inactivity timeout, in ms (CONN_OPTION 2 overrides it per connection).
    #[arg(long, env = "TUNNEL_INACTIVITY_MS", default_value = "60000", value_parser = millis)]
    inactivity_ms: Duration,
    /// How long a broker's connections wait for it to link again, in ms.
    #[arg(long, env = "TUNNEL_BROKER_GRACE_MS", default_value = "30000", value_parser = millis)]
    broker_grace_ms: Duration,
    /// How long after a name last had a linked broker instance (or after the relay started)
    /// connects to it get 503 with Retry-After instead of 404, in ms.
    #[arg(long, env = "TUNNEL_NAME_GRACE_MS", default_value = "30000", value_parser = millis)]
    name_grace_ms: Duration,
    /// Link keepalive interval in ms; a link silent for three is dead.
    #[arg(long, env = "TUNNEL_LINK_KEEPALIVE_MS", default_value = "10000", value_parser = millis)]
    link_keepalive_ms: Duration,
    /// Time a new link has to send LINK_INIT, in ms.
    #[arg(long, env = "TUNNEL_LINK_HANDSHAKE_MS", default_value = "10000", value_parser = millis)]
    link_handshake_ms: Duration,
    /// Time a client has to send its request headers, in ms.
    #[arg(long, env = "TUNNEL_HEADER_TIMEOUT_MS", default_value = "10000", value_parser = millis)]
    header_timeout_ms: Duration,
    /// Time a client has to send a whole request body, in ms (slow bodies get 408).
    #[arg(long, env = "TUNNEL_BODY_TIMEOUT_MS", default_value = "30000", value_parser = millis)]
    body_timeout_ms: Duration,
    /// TLS certificate chain (PEM) for the HTTP interface; needs --tls-key.
    #[arg(long, env = "TUNNEL_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM) for the HTTP interface; needs --tls-cert.
    #[arg(long, env = "TUNNEL_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// TLS certificate chain (PEM) for the link listener; needs --link-tls-key.
    #[arg(long, env = "TUNNEL_LINK_TLS_CERT", requires = "link_tls_key")]
    link_tls_cert: Option<PathBuf>,
    /// TLS private key (PEM) for the link listener; needs --link-tls-cert.
    #[arg(long, env = "TUNNEL_LINK_TLS_KEY", requires = "link_tls_cert")]
    link_tls_key: Option<PathBuf>,
    /// PEM file of the CA(s) that sign brokers' client certificates: the link then requires
    /// mutual TLS (brokers without such a certificate are refused). Needs --link-tls-cert.
    #[arg(long, env = "TUNNEL_LINK_TLS_CLIENT_CA", requires = "link_tls_cert")]
    link_tls_client_ca: Option<PathBuf>,
    /// File of bearer tokens clients must present (`Authorization: Bearer TOKEN`), one per
    /// line (at least 16 characters; blank lines and # comments skipped). With it or
    /// --client-basic-auth-file every connect, push and pull needs credentials (401 without).
    #[arg(long, env = "TUNNEL_CLIENT_TOKENS_FILE")]
    client_tokens_file: Option<PathBuf>,
    /// File of `user:password` lines for HTTP basic authentication of clients.
    #[arg(long, env = "TUNNEL_CLIENT_BASIC_AUTH_FILE")]
    client_basic_auth_file: Option<PathBuf>,
    /// A network (CIDR, or one address) of reverse proxies in front of the relay;
    /// repeatable, comma-separated in the environment variable. Only requests from these
    /// peers may name the client with X-Forwarded-For or Forwarded (the right-most address
    /// there that is not itself trusted is the client). Default none: the TCP peer is the
    /// client. Behind nginx on the same host: --trusted-proxy 127.0.0.1/32.
    #[arg(
        long = "trusted-proxy",
        env = "TUNNEL_TRUSTED_PROXIES",
        value_name = "CIDR",
        value_delimiter = ','
    )]
    trusted_proxies: Vec<Cidr>,
    /// Address of the admin listener (/metrics, /healthz, /status, /status.json). Default
    /// none: no admin listener. Keep it on loopback or a management network.
    #[arg(long, env = "TUNNEL_ADMIN_LISTEN", value_name = "ADDR")]
    admin_listen: Option<SocketAddr>,
    /// Whether the public listener (--listen) serves /metrics too (/healthz stays public
    /// either way). Default true for compatibility; set false once scrapers use
    /// --admin-listen.
    #[arg(
        long,
        env = "TUNNEL_PUBLIC_METRICS",
        default_value_t = true,
        action = clap::ArgAction::Set,
        value_name = "BOOL"
    )]
    public_metrics: bool,
    /// Most HTTP connections the admin listener serves at once.
    #[arg(long, env = "TUNNEL_ADMIN_MAX_CONNECTIONS", default_value_t = 16)]
    admin_max_connections: usize,
    /// Most sessions held at once; session openings beyond get 503.
    #[arg(long, env = "TUNNEL_MAX_SESSIONS", default_value_t = 10_000)]
    max_sessions: usize,
    /// Most connections in one session; connects in it beyond get 503.
    #[arg(long, env = "TUNNEL_MAX_SESSION_CONNECTIONS", default_value_t = 10_000)]
    max_session_connections: usize,
    /// Bytes all the connections of one session may hold queued together before DATA, ACK
    /// and NO_OP are dropped.
    #[arg(long, env = "TUNNEL_MAX_SESSION_QUEUE", default_value_t = 16 * 1024 * 1024)]
    max_session_queue: usize,
    /// This relay's id in a pool of relays behind a load balancer, 1..=255, distinct per
    /// relay: every connection and session id it makes starts with it, so the balancer can
    /// route a session's requests to its relay (see deploy/haproxy/). 0: not in a pool.
    #[arg(long, env = "TUNNEL_RELAY_ID", default_value_t = 0)]
    relay_id: u8,
}

fn tls_pair(cert: Option<PathBuf>, key: Option<PathBuf>) -> Option<TlsFiles> {
    Some(TlsFiles {
        cert: cert?,
        key: key?,
    })
}

/// The client credentials from the two files, if either is given.
fn client_auth(
    tokens: Option<&PathBuf>,
    basic: Option<&PathBuf>,
) -> Result<Option<ClientAuth>, String> {
    if tokens.is_none() && basic.is_none() {
        return Ok(None);
    }
    let mut auth = ClientAuth::new();
    if let Some(path) = tokens {
        auth.load_bearer_file(path).map_err(|e| e.to_string())?;
    }
    if let Some(path) = basic {
        auth.load_basic_file(path).map_err(|e| e.to_string())?;
    }
    auth.validate()?;
    tracing::info!(
        bearer_tokens = auth.bearer_token_count(),
        basic_users = auth.basic_user_count(),
        "client authentication required"
    );
    Ok(Some(auth))
}

impl Args {
    fn into_config(self) -> Result<RelayConfig, String> {
        let client_auth = client_auth(
            self.client_tokens_file.as_ref(),
            self.client_basic_auth_file.as_ref(),
        )?;
        let secret = tunnel_proto::secret::read_link_secret_file(&self.link_secret_file)
            .map_err(|e| e.to_string())?
            .to_vec();
        let mut link_secrets = tunnel_servlet::LinkSecrets::new();
        if let Some(path) = &self.link_secrets_file {
            link_secrets.load_file(path).map_err(|e| e.to_string())?;
        }
        Ok(RelayConfig {
            http_listen: self.listen,
            link_listen: self.link_listen,
            base_path: self.base_path,
            link_secret: secret,
            link_secrets,
            pull_wait: self.pull_wait_ms,
            response_limit: self.response_limit,
            stream_limit: self.stream_limit,
            max_body_size: self.max_body,
            max_packet_size: self.max_packet,
            max_connections: self.max_connections,
            queue_limit: self.queue_limit,
            client_inactivity_timeout: self.inactivity_ms,
            broker_grace: self.broker_grace_ms,
            name_grace: self.name_grace_ms,
            link_keepalive: self.link_keepalive_ms,
            link_handshake_timeout: self.link_handshake_ms,
            header_read_timeout: self.header_timeout_ms,
            body_read_timeout: self.body_timeout_ms,
            http_tls: tls_pair(self.tls_cert, self.tls_key),
            link_tls: tls_pair(self.link_tls_cert, self.link_tls_key),
            link_tls_client_ca: self.link_tls_client_ca,
            client_auth,
            trusted_proxies: self.trusted_proxies,
            admin_listen: self.admin_listen,
            public_metrics: self.public_metrics,
            admin_max_connections: self.admin_max_connections,
            max_sessions: self.max_sessions,
            max_session_connections: self.max_session_connections,
            max_session_queue: self.max_session_queue,
            relay_id: self.relay_id,
            ..RelayConfig::default()
        })
    }
}

/// Resolves on Ctrl-C or (on Unix) SIGTERM.
async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    tunnel_proto::malloc::keep_freed_memory();
    match tunnel_proto::runtime::build(args.worker_threads) {
        Ok(runtime) => runtime.block_on(async_main(args)),
        Err(e) => {
            eprintln!("tokio runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn async_main(args: Args) -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        // Colours only on a terminal: logs redirected to files stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let config = match args.into_config() {
        Ok(config) => config,
        Err(msg) => {
            tracing::error!("{msg}");
            return ExitCode::FAILURE;
        }
    };
    let relay = match Relay::bind(config).await {
        Ok(relay) => relay,
        Err(err) => {
            tracing::error!(error = %err, "cannot start the relay");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(http = %relay.http_addr(), link = %relay.link_addr(), "relay listening");
    if let Some(admin) = relay.admin_addr() {
        tracing::info!(%admin, "admin listener (/metrics, /healthz, /status, /status.json)");
    }
    let shutdown = relay.shutdown_handle();
    tokio::spawn(async move {
        stop_signal().await;
        tracing::info!("stop requested; draining");
        shutdown.shutdown();
    });
    match relay.run().await {
        Ok(()) => {
            tracing::info!("relay stopped");
            ExitCode::SUCCESS
        }
        Err(err) => {
            tracing::error!(error = %err, "relay failed");
            ExitCode::FAILURE
        }
    }
}
