//! `tunnel-broker`: exposes a local TCP service (or a built-in echo) to tunnel clients.
//! Each tunnel connection accepted from the relay is joined to a new TCP connection to
//! `--forward`.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tunnel_proto::warn_limit::WarningLimit;

use bytes::Bytes;
use clap::Parser;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tracing_subscriber::EnvFilter;
use tunnel_broker::{
    read_link_secret_file, BrokerConfig, ClientInfo, InstanceId, LinkTls, TunnelListener,
    TunnelStream,
};
use tunnel_proto::splice::{splice, COPY_BUFFER};

#[derive(Debug, Parser)]
#[command(
    name = "tunnel-broker",
    version,
    about = "Exposes a local TCP service to HTTP tunnel clients through a tunnel relay"
)]
struct Args {
    /// A relay's broker link address, HOST:PORT. Give it once per relay of a pool (the
    /// environment variable takes a comma-separated list); a host name that resolves to
    /// several addresses links to each of them.
    #[arg(
        long = "relay",
        env = "TUNNEL_RELAY",
        value_delimiter = ',',
        default_value = "127.0.0.1:8081"
    )]
    relays: Vec<String>,

    /// Worker threads (0: tokio's default, TOKIO_WORKER_THREADS or one per core; 1: every
    /// task on the main thread, tokio's current-thread scheduler). On a small machine shared
    /// with the relay, 1 gives shorter round trips (BENCHMARKS.md).
    #[arg(long, env = "TUNNEL_WORKER_THREADS", default_value_t = 0)]
    worker_threads: usize,

    /// Server name clients connect to (ServerName=...).
    #[arg(long, env = "TUNNEL_SERVER_NAME", default_value = "echo")]
    name: String,

    /// File holding the link secret the relay expects (a trailing newline is ignored).
    #[arg(long, env = "TUNNEL_LINK_SECRET_FILE", conflicts_with = "link_secret")]
    link_secret_file: Option<PathBuf>,

    /// The link secret itself; prefer the file or the environment variable, since command
    /// lines are visible to other local users.
    #[arg(long, env = "TUNNEL_LINK_SECRET", hide_env_values = true)]
    link_secret: Option<String>,

    /// TCP service each tunnel connection is forwarded to, HOST:PORT.
    #[arg(
        long,
        env = "TUNNEL_FORWARD",
        required_unless_present = "echo",
        conflicts_with = "echo"
    )]
    forward: Option<String>,

    /// Serve a built-in echo instead of forwarding (for demos and tests).
    #[arg(long, env = "TUNNEL_ECHO")]
    echo: bool,

    /// Time allowed to connect to the --forward target, in milliseconds.
    #[arg(
        long,
        env = "TUNNEL_FORWARD_CONNECT_TIMEOUT_MS",
        default_value_t = 10_000
    )]
    forward_connect_timeout_ms: u64,

    /// Most tunnel connections served at once, reported to the relay as this instance's
    /// capacity (the relay places connections on a name's instances by unused capacity and
    /// sends none beyond it); beyond it new ones wait in the accept backlog, and the relay is
    /// told "backlog full" when that is full too.
    #[arg(long, env = "TUNNEL_MAX_CONNECTIONS", default_value_t = 1024)]
    max_connections: u32,

    /// This instance's id among the brokers serving --name, 32 hex digits (default: random
    /// at each start). Brokers with the same id replace each other's link; with different
    /// ids they form a pool.
    #[arg(long, env = "TUNNEL_INSTANCE_ID", value_parser = instance_id)]
    instance_id: Option<InstanceId>,

    /// Connections opened by clients and not yet served.
    #[arg(long, env = "TUNNEL_ACCEPT_BACKLOG", default_value_t = 1024)]
    accept_backlog: usize,

    /// Link keepalive interval in seconds (a link silent for three is redialed).
    #[arg(long, env = "TUNNEL_LINK_KEEPALIVE_SECS", default_value_t = 10)]
    keepalive_secs: u64,

    /// On SIGTERM or Ctrl-C the broker drains: no new connections (the relay sends them to
    /// the name's other instances), and live ones get this long to finish before they are
    /// aborted, in seconds (a second signal aborts at once).
    #[arg(long, env = "TUNNEL_DRAIN_TIMEOUT_SECS", default_value_t = 30)]
    drain_timeout_secs: u64,

    /// Use TLS for the link.
    #[arg(long, env = "TUNNEL_RELAY_TLS")]
    tls: bool,

    /// PEM file of the CA(s) that sign the relay's certificate (default: system roots).
    #[arg(long, env = "TUNNEL_RELAY_TLS_CA", requires = "tls")]
    tls_ca: Option<PathBuf>,

    /// Name to verify in the relay's certificate and send as SNI (default: the host of
    /// --relay; required when the relays have different hosts, and then every relay's
    /// certificate must hold it).
    #[arg(long, env = "TUNNEL_RELAY_TLS_SERVER_NAME", requires = "tls")]
    tls_server_name: Option<String>,

    /// PEM client certificate chain, for relays that require mutual TLS.
    #[arg(long, env = "TUNNEL_RELAY_TLS_CERT", requires_all = ["tls", "tls_key"])]
    tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(long, env = "TUNNEL_RELAY_TLS_KEY", requires_all = ["tls", "tls_cert"])]
    tls_key: Option<PathBuf>,
}

/// What each accepted connection is joined to.
#[derive(Debug, Clone)]
enum Service {
    Forward {
        target: String,
        connect_timeout: Duration,
    },
    Echo,
}

fn main() {
    let args = Args::parse();
    tunnel_proto::malloc::keep_freed_memory();
    match tunnel_proto::runtime::build(args.worker_threads) {
        Ok(runtime) => runtime.block_on(async_main(args)),
        Err(e) => {
            eprintln!("tokio runtime: {e}");
            std::process::exit(1);
        }
    }
}

async fn async_main(args: Args) {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        // Colours only on a terminal: logs redirected to files stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if let Err(e) = run(args).await {
        tracing::error!("{e}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> io::Result<()> {
    let config = broker_config(&args)?;
    let service = match &args.forward {
        Some(target) => Service::Forward {
            target: target.clone(),
            connect_timeout: Duration::from_millis(args.forward_connect_timeout_ms),
        },
        None => Service::Echo,
    };
    let listener = Arc::new(TunnelListener::bind(config).await?);
    tracing::info!(relays = ?listener.relays(), links_up = listener.links_up(), name = %listener.local_name(), ?service, "accepting tunnel connections");

    let slots = Arc::new(Semaphore::new(args.max_connections.max(1) as usize));
    let accept_loop = {
        let listener = Arc::clone(&listener);
        async move {
            loop {
                // Wait for a free slot before taking a connection, so overload shows up as
                // a full backlog at the relay instead of unbounded tasks here.
                let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
                    return;
                };
                match listener.accept().await {
                    Ok((stream, client)) => {
                        let service = service.clone();
                        tokio::spawn(async move {
                            serve(stream, client, service).await;
                            drop(slot);
                        });
                    }
                    Err(e) => {
                        tracing::info!("accept loop ends: {e}");
                        return;
                    }
                }
            }
        }
    };

    // The accept loop keeps running through a drain, so connections already in the backlog
    // are still served; it ends when `shutdown` closes the listener.
    let mut accept_task = tokio::spawn(accept_loop);
    let mut signals = StopSignals::new()?;
    tokio::select! {
        _ = &mut accept_task => {}
        signal = signals.next() => {
            let drain = Duration::from_secs(args.drain_timeout_secs);
            tracing::info!(live = listener.live_connections(), "{signal}: draining; waiting up to {drain:?} for live connections (signal again to abort them)");
            tokio::select! {
                _ = listener.drain(drain) => {}
                signal = signals.next() => tracing::warn!("second {signal}; aborting live connections"),
            }
        }
    }
    listener.shutdown().await;
    accept_task.abort();
    Ok(())
}

fn broker_config(args: &Args) -> io::Result<BrokerConfig> {
    let secret = match (&args.link_secret_file, &args.link_secret) {
        (Some(path), _) => read_link_secret_file(path)?,
        (None, Some(secret)) => Bytes::from(secret.clone().into_bytes()),
        (None, None) => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "no link secret: give --link-secret-file FILE or set TUNNEL_LINK_SECRET",
            ))
        }
    };
    let mut config = BrokerConfig::new("", args.name.clone(), secret);
    config.relays = args.relays.clone();
    config.accept_backlog = args.accept_backlog;
    config.max_connections = args.max_connections;
    if let Some(id) = args.instance_id {
        config.instance_id = id;
    }
    config.keepalive_interval = Duration::from_secs(args.keepalive_secs.max(1));
    if args.tls {
        let server_name = match &args.tls_server_name {
            Some(name) => name.clone(),
            None => tls_name_from_relays(&args.relays)?,
        };
        let identity = args.tls_cert.as_deref().zip(args.tls_key.as_deref());
        config.tls = Some(LinkTls::from_files(
            &server_name,
            args.tls_ca.as_deref(),
            identity,
        )?);
    }
    Ok(config)
}

/// Parses `--instance-id`: 32 hex digits, not all zero.
fn instance_id(s: &str) -> Result<InstanceId, String> {
    match InstanceId::from_hex(s) {
        Some(InstanceId::LEGACY) => Err("the all-zero id is reserved".into()),
        Some(id) => Ok(id),
        None => Err("expected 32 hex digits".into()),
    }
}

/// SIGTERM (service managers, `kill`) and Ctrl-C (SIGINT), both of which drain the broker.
struct StopSignals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn new() -> io::Result<StopSignals> {
        Ok(StopSignals {
            #[cfg(unix)]
            term: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?,
        })
    }

    /// Waits for the next stop signal; returns its name.
    async fn next(&mut self) -> &'static str {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => "Ctrl-C",
                _ = self.term.recv() => "SIGTERM",
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            "Ctrl-C"
        }
    }
}

/// The one host every --relay names, for TLS when --tls-server-name is not given.
fn tls_name_from_relays(relays: &[String]) -> io::Result<String> {
    let mut hosts: Vec<&str> = relays.iter().map(|r| relay_host(r)).collect();
    hosts.sort_unstable();
    hosts.dedup();
    match hosts.as_slice() {
        [host] => Ok((*host).to_owned()),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the relays have different hosts: give --tls-server-name, a name every relay's certificate holds",
        )),
    }
}

/// The host part of HOST:PORT, without the brackets of an IPv6 literal.
fn relay_host(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(host, _)| host);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// While the forward target is down, every connection fails alike: one warning per 10 s.
static TARGET_FAILURES: WarningLimit = WarningLimit::new(Duration::from_secs(10));

/// Serves one tunnel connection and logs its end with byte counts.
async fn serve(stream: TunnelStream, client: ClientInfo, service: Service) {
    let started = Instant::now();
    // For the counters at the end: the stream itself is handed to the copy.
    let handle = stream.handle();
    tracing::info!(conn_id = client.conn_id, client = %client.client_addr, "connection opened");
    let (from_client, to_client, result) = match service {
        Service::Echo => echo(stream).await,
        Service::Forward {
            target,
            connect_timeout,
        } => {
            let connect = tokio::time::timeout(connect_timeout, TcpStream::connect(&target)).await;
            let tcp = match connect {
                Ok(Ok(tcp)) => tcp,
                Ok(Err(e)) => {
                    tunnel_proto::warn_limited!(TARGET_FAILURES, conn_id = client.conn_id, client = %client.client_addr, %target, error = %e, "forward target refused; tunnel connection aborted");
                    stream.abort("forward target refused the connection");
                    return;
                }
                Err(_) => {
                    tunnel_proto::warn_limited!(TARGET_FAILURES, conn_id = client.conn_id, client = %client.client_addr, %target, "forward target did not answer within {connect_timeout:?}; tunnel connection aborted");
                    stream.abort("forward target did not answer");
                    return;
                }
            };
            let _ = tcp.set_nodelay(true);
            let mut tcp = tcp;
            let outcome = splice(stream, &mut tcp).await;
            if outcome.result.is_err() {
                // The tunnel connection was reset: reset the service's connection too (RST,
                // not FIN), so it does not take a broken connection for a clean close.
                let _ = tcp.set_zero_linger();
            }
            (outcome.from_tunnel, outcome.to_tunnel, outcome.result)
        }
    };
    let elapsed = started.elapsed();
    let stats = handle.stats();
    let (retransmits, tail_probes) = (stats.retransmits, stats.tail_probes);
    match result {
        Ok(()) => {
            tracing::info!(conn_id = client.conn_id, client = %client.client_addr, from_client, to_client, retransmits, tail_probes, ?elapsed, "connection closed")
        }
        Err(e) => {
            tracing::info!(conn_id = client.conn_id, client = %client.client_addr, from_client, to_client, retransmits, tail_probes, ?elapsed, error = %e, "connection ended with an error")
        }
    }
}

/// Sends back whatever arrives; half-closes after the client does.
async fn echo<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S) -> (u64, u64, io::Result<()>) {
    let mut buf = vec![0u8; COPY_BUFFER];
    let mut total = 0u64;
    let result = async {
        loop {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                return stream.shutdown().await;
            }
            stream.write_all(&buf[..n]).await?;
            total += n as u64;
        }
    }
    .await;
    (total, total, result)
}
