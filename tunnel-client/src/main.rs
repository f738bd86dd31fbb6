//! `tunnel-client`: forwards a local TCP port through the HTTP tunnel to a server behind a
//! relay. Every accepted local connection becomes one tunnel connection.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tunnel_proto::warn_limit::WarningLimit;

use clap::Parser;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tunnel_client::{
    ClientConfig, HttpVersion, PacSource, ProxyAuthConfig, ProxyConfig, RelayAuth, TransportMode,
    TunnelClient,
};
use tunnel_proto::splice::splice_until;

/// Parses a duration flag: a whole number with an optional unit (`ms`, `s`, `m`, `h`); no
/// unit means seconds, as the client's flags always took.
fn mode(text: &str) -> Result<TransportMode, String> {
    match text.trim() {
        "auto" => Ok(TransportMode::Auto),
        "stream" => Ok(TransportMode::Stream),
        "poll" => Ok(TransportMode::Poll),
        other => Err(format!("{other:?}: expected auto, stream or poll")),
    }
}

fn duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?}: expected a number with an optional unit (ms, s, m, h)"))?;
    let millis_per_unit = match unit.trim() {
        "ms" => 1,
        "" | "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        other => return Err(format!("{text:?}: unknown unit {other:?} (ms, s, m, h)")),
    };
    n.checked_mul(millis_per_unit)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("{text:?}: too long"))
}

#[derive(Debug, Parser)]
#[command(
    name = "tunnel-client",
    version,
    about = "Forward a local TCP port through an HTTP tunnel relay"
)]
struct Args {
    /// The relay's tunnel URL, base path included (http:// or https://).
    #[arg(
        long,
        env = "TUNNEL_CLIENT_RELAY",
        default_value = "http://127.0.0.1:8080/tunnel"
    )]
    relay: String,

    /// Name of the server (broker) to reach through the relay.
    #[arg(long, env = "TUNNEL_CLIENT_SERVER", default_value = "echo")]
    server: String,

    /// Local address to accept connections on.
    #[arg(long, env = "TUNNEL_CLIENT_LISTEN", default_value = "127.0.0.1:7000")]
    listen: SocketAddr,

    /// HTTP proxy URL. Without it, HTTP_PROXY / HTTPS_PROXY / NO_PROXY from the environment apply.
    #[arg(long, env = "TUNNEL_CLIENT_PROXY")]
    proxy: Option<String>,

    /// PAC file whose FindProxyForURL chooses the proxies for the relay URL, tried in its
    /// order (PROXY a; PROXY b; DIRECT). Replaces HTTP_PROXY / HTTPS_PROXY / NO_PROXY.
    #[arg(long, env = "TUNNEL_CLIENT_PAC_FILE", conflicts_with_all = ["proxy", "pac_url"])]
    pac_file: Option<PathBuf>,

    /// Like --pac-file, fetched from an http:// URL (directly, not through a proxy) at start.
    #[arg(long, env = "TUNNEL_CLIENT_PAC_URL", conflicts_with = "proxy")]
    pac_url: Option<String>,

    /// Deadline for fetching the PAC script and, separately, for running it.
    #[arg(long, env = "TUNNEL_CLIENT_PAC_TIMEOUT", default_value = "5s", value_parser = duration)]
    pac_timeout: Duration,

    /// Ignore HTTP_PROXY / HTTPS_PROXY / ALL_PROXY from the environment and connect directly.
    #[arg(long, env = "TUNNEL_CLIENT_NO_ENV_PROXY", conflicts_with = "proxy")]
    no_env_proxy: bool,

    /// User name for the proxy: DOMAIN\user for NTLM, the plain name for Basic. The scheme
    /// is chosen from the proxy's challenges: Negotiate (Kerberos, from the credential cache
    /// kinit fills, KRB5CCNAME; needs no user), then NTLM, then Basic.
    #[arg(long, env = "TUNNEL_CLIENT_PROXY_USER", requires = "proxy")]
    proxy_user: Option<String>,

    /// Password for the proxy (prefer --proxy-password-env: command lines are visible to others).
    #[arg(
        long,
        env = "TUNNEL_CLIENT_PROXY_PASSWORD",
        hide_env_values = true,
        requires = "proxy_user"
    )]
    proxy_password: Option<String>,

    /// Name of an environment variable holding the proxy password.
    #[arg(
        long,
        env = "TUNNEL_CLIENT_PROXY_PASSWORD_ENV",
        requires = "proxy_user",
        conflicts_with = "proxy_password"
    )]
    proxy_password_env: Option<String>,

    /// Connections open at once to the proxy through the proxy-authentication forwarder
    /// (NTLM, Negotiate; used with --proxy-user or a Kerberos ticket).
    #[arg(
        long,
        env = "TUNNEL_CLIENT_PROXY_MAX_CONNECTIONS",
        default_value_t = 1024
    )]
    proxy_max_connections: usize,

    /// Deadline for the proxy authentication handshake of one proxy connection.
    #[arg(long, env = "TUNNEL_CLIENT_PROXY_HANDSHAKE_TIMEOUT", default_value = "20s", value_parser = duration)]
    proxy_handshake_timeout: Duration,

    /// Largest HTTP head (and 407 error page) the proxy-authentication forwarder reads.
    #[arg(long, env = "TUNNEL_CLIENT_PROXY_MAX_HEADER_BYTES", default_value_t = 64 * 1024)]
    proxy_max_header_bytes: usize,

    /// How long the proxy-authentication forwarder keeps a connection idle between two
    /// requests (Basic through the forwarder, http:// relay).
    #[arg(long, env = "TUNNEL_CLIENT_PROXY_IDLE_TIMEOUT", default_value = "5m", value_parser = duration)]
    proxy_idle_timeout: Duration,

    /// Name of an environment variable holding a bearer token for a relay that requires
    /// client authentication (sent as `Authorization: Bearer`). The token itself is never
    /// a flag: command lines are visible to other users.
    #[arg(
        long,
        env = "TUNNEL_CLIENT_RELAY_TOKEN_ENV",
        conflicts_with = "relay_user"
    )]
    relay_token_env: Option<String>,

    /// User name for the relay's basic authentication; needs --relay-password-env.
    #[arg(
        long,
        env = "TUNNEL_CLIENT_RELAY_USER",
        requires = "relay_password_env"
    )]
    relay_user: Option<String>,

    /// Name of an environment variable holding the relay password (with --relay-user).
    #[arg(
        long,
        env = "TUNNEL_CLIENT_RELAY_PASSWORD_ENV",
        requires = "relay_user"
    )]
    relay_password_env: Option<String>,

    /// PEM file of extra CA certificates to trust (in addition to the system's).
    #[arg(long, env = "TUNNEL_CLIENT_CA_FILE")]
    ca_file: Option<PathBuf>,

    /// Speak HTTP/2 with prior knowledge (h2c on http://); the relay must support it.
    #[arg(long, env = "TUNNEL_CLIENT_HTTP2", conflicts_with = "http1")]
    http2: bool,

    /// Speak HTTP/1.1 only, even where HTTP/2 could be negotiated.
    #[arg(long, env = "TUNNEL_CLIENT_HTTP1")]
    http1: bool,

    /// How long to wait for the relay and the server to accept a new connection. Durations
    /// are a number with an optional unit: ms, s (the default), m or h ("90", "5m").
    #[arg(long, env = "TUNNEL_CLIENT_CONNECT_TIMEOUT", default_value = "30s", value_parser = duration)]
    connect_timeout: Duration,

    /// How long an open connection survives without any path to the relay (laptop sleep,
    /// network change, proxy restart). The relay and the server are told to wait as long
    /// (the relay caps it at its maximum inactivity timeout, 1 h by default).
    #[arg(long, env = "TUNNEL_CLIENT_OUTAGE_GRACE", default_value = "5m", value_parser = duration)]
    outage_grace: Duration,

    /// Deadline of one pull request; must exceed the relay's pull wait (20 s by default),
    /// and a proxy in between must let a request last that long.
    #[arg(long, env = "TUNNEL_CLIENT_PULL_TIMEOUT", default_value = "30s", value_parser = duration)]
    pull_timeout: Duration,

    /// Deadline of one connect or push request.
    #[arg(long, env = "TUNNEL_CLIENT_REQUEST_TIMEOUT", default_value = "30s", value_parser = duration)]
    request_timeout: Duration,

    /// Deadline for opening one TCP (and TLS) connection to the relay or the proxy.
    #[arg(long, env = "TUNNEL_CLIENT_TCP_CONNECT_TIMEOUT", default_value = "10s", value_parser = duration)]
    tcp_connect_timeout: Duration,

    /// Receive window announced to the server, in packets of up to 64 KiB, where the relay
    /// does not say what its per-connection queue holds (older relays, `--no-session`), and
    /// the least announced in a session. Keep the bytes it stands for within the relay's
    /// per-connection queue limit, or the relay drops packets (they are retransmitted, at a
    /// cost in speed).
    #[arg(long, env = "TUNNEL_CLIENT_RECV_WINDOW", default_value_t = tunnel_client::DEFAULT_CLIENT_RECV_WINDOW)]
    recv_window: u16,

    /// Largest receive window announced in a session, in packets of up to 64 KiB: as many as
    /// the relay says its per-connection queue holds (`tunnel-servlet --queue-limit`), up to
    /// this. A larger window lets one connection's download use a longer round trip.
    #[arg(long, env = "TUNNEL_CLIENT_MAX_RECV_WINDOW", default_value_t = tunnel_client::DEFAULT_CLIENT_MAX_RECV_WINDOW, value_parser = clap::value_parser!(u16).range(1..))]
    max_recv_window: u16,

    /// Largest DATA payload the client sends, in bytes. Larger packets cost less per byte;
    /// lower it only for a relay (`--max-packet`) or a broker (`max_packet_size`) that takes
    /// smaller packets than the default 24 bytes + 1 MiB (a packet is the payload plus a
    /// 24-byte header).
    #[arg(long, env = "TUNNEL_CLIENT_MAX_DATA_PAYLOAD", default_value_t = tunnel_client::DEFAULT_CLIENT_MAX_DATA_PAYLOAD)]
    max_data_payload: usize,

    /// Affinity key sent with every connect: where several broker instances serve the name,
    /// connections with the same key go to the same instance (a room, a tenant). Not a secret:
    /// it travels in the URL.
    #[arg(long, env = "TUNNEL_CLIENT_AFFINITY")]
    affinity: Option<String>,

    /// Use one pull request per connection (the per-connection requests every relay
    /// version serves) instead of one session for all of them. A session needs a handful of
    /// HTTP connections to the proxy and the relay however many tunnel connections are open.
    #[arg(long, env = "TUNNEL_CLIENT_NO_SESSION")]
    no_session: bool,

    /// In a session, how the relay's packets come down: `auto` streams them in one
    /// long-lived response where the path delivers it at once and falls back to completed
    /// long polls where a proxy buffers (logged at info); `stream` or `poll` forces one.
    /// Over HTTP/2, packets up stream too (one long-lived request body) unless `poll`.
    #[arg(long, env = "TUNNEL_CLIENT_MODE", default_value = "auto", value_parser = mode)]
    mode: TransportMode,

    /// Push every batch in a request of its own instead of streaming packets up in one
    /// long-lived request body where the path carries it.
    #[arg(long, env = "TUNNEL_CLIENT_NO_STREAM_UPSTREAM")]
    no_stream_upstream: bool,

    /// In `auto` mode: how long a streamed response may take to deliver its first bytes
    /// before the path is taken to buffer and the session polls.
    #[arg(long, env = "TUNNEL_CLIENT_STREAM_PROBE_TIMEOUT", default_value = "2s", value_parser = duration)]
    stream_probe_timeout: Duration,

    /// In a session: connect requests in flight at once (more wait their turn).
    #[arg(
        long,
        env = "TUNNEL_CLIENT_MAX_CONNECTS_IN_FLIGHT",
        default_value_t = 2
    )]
    max_connects_in_flight: usize,

    /// Probe the path to the relay with one connection to --server, print a report (route
    /// and how it was chosen, proxy authentication scheme, HTTP version, the relay
    /// certificate's issuer, how long a held pull lasted and whether it came back intact)
    /// and exit: 0 if the path works.
    #[arg(long)]
    check: bool,

    /// Worker threads of the process (0: one per core; 1: every task on the main thread,
    /// tokio's current-thread scheduler). One is best for a forwarding client (measured: a
    /// shorter round trip at the same throughput, BENCHMARKS.md).
    #[arg(long, env = "TUNNEL_CLIENT_WORKER_THREADS", default_value_t = 1)]
    worker_threads: usize,

    /// Seconds after Ctrl-C during which open connections may finish before they are aborted.
    #[arg(long, env = "TUNNEL_CLIENT_SHUTDOWN_GRACE", default_value_t = 10)]
    shutdown_grace: u64,
}

/// Reads a secret from the environment variable named `var`; the error names the flag and
/// the variable, never a value.
fn secret_from_env(flag: &str, var: &str) -> Result<String, String> {
    match std::env::var(var) {
        Ok(value) if !value.is_empty() => Ok(value),
        Ok(_) => Err(format!("{flag} {var}: the variable is empty")),
        Err(e) => Err(format!("{flag} {var}: {e}")),
    }
}

fn relay_auth_from(args: &Args) -> Result<Option<RelayAuth>, String> {
    if let Some(var) = &args.relay_token_env {
        return Ok(Some(RelayAuth::Bearer(secret_from_env(
            "--relay-token-env",
            var,
        )?)));
    }
    match (&args.relay_user, &args.relay_password_env) {
        (Some(user), Some(var)) => Ok(Some(RelayAuth::Basic {
            user: user.clone(),
            password: secret_from_env("--relay-password-env", var)?,
        })),
        _ => Ok(None),
    }
}

fn config_from(args: &Args) -> Result<ClientConfig, String> {
    let password = match (&args.proxy_password, &args.proxy_password_env) {
        (Some(p), _) => Some(p.clone()),
        (None, Some(var)) => {
            Some(std::env::var(var).map_err(|e| format!("--proxy-password-env {var}: {e}"))?)
        }
        (None, None) => None,
    };
    let proxy = args.proxy.as_ref().map(|url| ProxyConfig {
        url: url.clone(),
        username: args.proxy_user.clone(),
        password,
    });
    let pac = match (&args.pac_file, &args.pac_url) {
        (Some(path), _) => Some(PacSource::File(path.clone())),
        (None, Some(url)) => Some(PacSource::Url(url.clone())),
        (None, None) => None,
    };
    let mut config = ClientConfig {
        proxy,
        pac,
        pac_timeout: args.pac_timeout,
        proxy_auth: ProxyAuthConfig {
            max_connections: args.proxy_max_connections,
            handshake_timeout: args.proxy_handshake_timeout,
            max_header_bytes: args.proxy_max_header_bytes,
            idle_timeout: args.proxy_idle_timeout,
        },
        env_proxy: !args.no_env_proxy,
        relay_auth: relay_auth_from(args)?,
        ca_file: args.ca_file.clone(),
        http_version: if args.http2 {
            HttpVersion::Http2PriorKnowledge
        } else if args.http1 {
            HttpVersion::Http1Only
        } else {
            HttpVersion::Auto
        },
        connect_timeout: args.connect_timeout,
        outage_grace: args.outage_grace,
        pull_timeout: args.pull_timeout,
        request_timeout: args.request_timeout,
        tcp_connect_timeout: args.tcp_connect_timeout,
        affinity: args.affinity.clone(),
        session: !args.no_session,
        stream_upstream: !args.no_stream_upstream,
        mode: args.mode,
        stream_probe_timeout: args.stream_probe_timeout,
        max_connects_in_flight: args.max_connects_in_flight.max(1),
        ..ClientConfig::new(args.relay.clone(), args.server.clone())
    };
    config.connection.recv_window = args.recv_window;
    config.max_recv_window = args.max_recv_window;
    config.connection.max_data_payload = args.max_data_payload;
    Ok(config)
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    tunnel_proto::malloc::keep_freed_memory();
    match tunnel_proto::runtime::build(args.worker_threads) {
        Ok(runtime) => runtime.block_on(async_main(args)),
        Err(e) => {
            eprintln!("tokio runtime: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn async_main(args: Args) -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        // Colours only on a terminal: logs redirected to files stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    let config = config_from(&args)?;
    if args.check {
        let report = tunnel_client::check(config)
            .await
            .map_err(|e| e.to_string())?;
        println!("{report}");
        return if report.ok {
            Ok(())
        } else {
            Err("the path to the relay does not work (see the report)".into())
        };
    }
    // Fail at start, not on the first connection, when the configuration cannot work. One
    // client for all connections: they share its pool of HTTP connections to the relay.
    let client = TunnelClient::new(config).map_err(|e| e.to_string())?;
    let listener = listen(args.listen, LISTEN_BACKLOG)
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    tracing::info!(listen = %args.listen, relay = %args.relay, server = %args.server,
        route = client.route(), "forwarding local connections through the tunnel");

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((socket, peer)) => {
                    connections.spawn(handle(socket, peer, client.clone(), stop_rx.clone()));
                }
                Err(e) => {
                    // Typically out of file descriptors: wait a little instead of spinning.
                    static ACCEPT_FAILURES: WarningLimit = WarningLimit::new(Duration::from_secs(10));
                    tunnel_proto::warn_limited!(ACCEPT_FAILURES, "accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            _ = &mut ctrl_c => break,
        }
    }

    drop(listener);
    tracing::info!(
        open = connections.len(),
        "shutting down: closing open connections"
    );
    let _ = stop_tx.send(true);
    let grace = tokio::time::sleep(Duration::from_secs(args.shutdown_grace));
    tokio::pin!(grace);
    loop {
        tokio::select! {
            next = connections.join_next() => if next.is_none() { break },
            _ = &mut grace => {
                tracing::warn!(open = connections.len(), "grace period over: aborting the remaining connections");
                connections.abort_all();
                // Give the drivers a moment to send their CONN_ABORTs.
                tokio::time::sleep(Duration::from_millis(500)).await;
                break;
            }
        }
    }
    Ok(())
}

async fn handle(
    socket: TcpStream,
    peer: SocketAddr,
    client: TunnelClient,
    stop: watch::Receiver<bool>,
) {
    let _ = socket.set_nodelay(true);
    let tunnel = match client.connect().await {
        Ok(t) => t,
        Err(e) => {
            // While the relay or the server is down, every local connection fails alike.
            static OPEN_FAILURES: WarningLimit = WarningLimit::new(Duration::from_secs(10));
            tunnel_proto::warn_limited!(OPEN_FAILURES, %peer, "could not open a tunnel connection: {e}");
            return;
        }
    };
    let conn_id = tunnel.conn_id();
    let closed = tunnel.closed();
    tracing::info!(%peer, conn_id, "local connection opened");
    let mut socket = socket;
    let copied = splice_until(tunnel, &mut socket, stop).await;
    let (bytes_up, bytes_down) = (copied.to_tunnel, copied.from_tunnel);
    match copied.result {
        Ok(()) => tracing::info!(%peer, conn_id, bytes_up, bytes_down, "local connection closed"),
        Err(e) => {
            tracing::warn!(%peer, conn_id, bytes_up, bytes_down,
                "local connection ended with an error: {e}");
            // The tunnel was reset: reset the local connection too (RST, not FIN), so the
            // application does not take a broken connection for a clean end of stream.
            let _ = socket.set_zero_linger();
        }
    }
    drop(socket);
    // Let the tunnel finish its close (acks) before the task ends, within the stream's linger.
    let _ = tokio::time::timeout(Duration::from_secs(5), closed).await;
}

/// Accept backlog of the local listener: the standard library's 128 overflows when an
/// application opens hundreds of connections at once (the kernel then resets some).
const LISTEN_BACKLOG: u32 = 4096;

fn listen(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_an_optional_unit_and_default_to_seconds() {
        assert_eq!(duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(duration("20s"), Ok(Duration::from_secs(20)));
        assert_eq!(duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(duration("2h"), Ok(Duration::from_secs(7200)));
        assert!(duration("5 minutes").is_err());
        assert!(duration("m").is_err());
        assert!(duration("-1s").is_err());
    }
}
