//! The relay and a broker as libraries inside the test process, with a `SinkSourceServer`
//! behind the broker: the tests that put real proxies or TLS in front of the relay configure
//! both ends (TLS files, pull wait, keepalives) directly and see what the broker was told
//! about each client (`ClientInfo`).
//!
//! ```text
//! TunnelStream::connect ──HTTP(S)──▶ [proxy] ──▶ Relay (in process) ◀──link (TLS?)── TunnelListener ──TCP──▶ SinkSourceServer
//! ```

use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tunnel_broker::{BrokerConfig, ClientInfo, LinkTls, TunnelListener};
use tunnel_client::ClientConfig;
use tunnel_proto::{ConnectionConfig, Packet, PacketType};
use tunnel_servlet::{Relay, RelayConfig, RunningRelay};

use crate::servers::echo::EchoServer;
use crate::servers::sink_source::SinkSourceServer;

/// Server name the broker registers.
pub const SERVER_NAME: &str = "inproc";

/// Link secret shared by the in-process relay and broker.
pub const LINK_SECRET: &[u8] = b"tunnel-tests in-process link secret";

/// Buffer for the first read from an accepted connection, before the target is dialed.
const FIRST_READ_BYTES: usize = 64 * 1024;

/// Time the broker has to link (TCP, TLS, LINK_INIT) before `start` fails.
pub const LINK_TIMEOUT: Duration = Duration::from_secs(10);

/// How the in-process tunnel is set up.
#[derive(Debug, Clone)]
pub struct InProcessOptions {
    /// The relay's configuration; `http_listen`/`link_listen` default to port 0 on loopback
    /// and `link_secret` is overwritten with [`LINK_SECRET`].
    pub relay: RelayConfig,
    /// TLS of the broker's link; must match `relay.link_tls`.
    pub broker_tls: Option<LinkTls>,
    /// The broker side's connection tunables (keepalive, idle timeout, …).
    pub broker_connection: ConnectionConfig,
    /// Where the broker splices accepted connections; `None` (the default): the tunnel's own
    /// `SinkSourceServer`. Tests that need an echo peer give an `EchoServer`'s address.
    pub forward_to: Option<std::net::SocketAddr>,
}

impl Default for InProcessOptions {
    fn default() -> Self {
        InProcessOptions {
            relay: RelayConfig {
                http_listen: ([127, 0, 0, 1], 0).into(),
                link_listen: ([127, 0, 0, 1], 0).into(),
                ..RelayConfig::default()
            },
            broker_tls: None,
            broker_connection: ConnectionConfig::default(),
            forward_to: None,
        }
    }
}

/// A running in-process relay + broker + sink/source server. Dropping it stops them.
pub struct InProcessTunnel {
    relay: Option<RunningRelay>,
    listener: Arc<TunnelListener>,
    accept_loop: JoinHandle<()>,
    server: SinkSourceServer,
    clients: Arc<Mutex<Vec<ClientInfo>>>,
    base_path: String,
    https: bool,
}

impl std::fmt::Debug for InProcessTunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InProcessTunnel")
            .field("relay_http", &self.relay_http_addr())
            .field("https", &self.https)
            .finish_non_exhaustive()
    }
}

impl InProcessTunnel {
    /// Starts a tunnel whose relay serves HTTPS with a certificate for 127.0.0.1/localhost
    /// from a fresh CA named `ca_name`; returns it and the CA file clients must trust.
    pub async fn start_https(
        dir: &std::path::Path,
        ca_name: &str,
        mut options: InProcessOptions,
    ) -> io::Result<(InProcessTunnel, std::path::PathBuf)> {
        use crate::certs::{TestCa, Usage, LOOPBACK_NAMES};
        let ca = TestCa::new(ca_name)?;
        let ca_file = ca.write_cert(&dir.join("ca.pem"))?;
        let relay_cert = ca.issue(LOOPBACK_NAMES, Usage::Server, dir, "relay")?;
        options.relay.http_tls = Some(tunnel_servlet::TlsFiles {
            cert: relay_cert.cert,
            key: relay_cert.key,
        });
        Ok((InProcessTunnel::start(options).await?, ca_file))
    }

    /// Starts a tunnel with default options whose broker splices every connection to a new
    /// [`EchoServer`]; returns both.
    pub async fn start_echo() -> io::Result<(InProcessTunnel, EchoServer)> {
        let echo = EchoServer::start().await?;
        let tunnel = InProcessTunnel::start(InProcessOptions {
            forward_to: Some(echo.addr()),
            ..InProcessOptions::default()
        })
        .await?;
        Ok((tunnel, echo))
    }

    /// Starts the relay, links the broker to it (within [`LINK_TIMEOUT`]) and serves every
    /// accepted tunnel connection by splicing it to the sink/source server.
    pub async fn start(options: InProcessOptions) -> io::Result<InProcessTunnel> {
        let mut relay_config = options.relay;
        relay_config.link_secret = LINK_SECRET.to_vec();
        let base_path = relay_config.base_path.clone();
        let https = relay_config.http_tls.is_some();
        let relay = Relay::bind(relay_config).await?.spawn();
        let listener = match Self::bind_broker(
            &relay.link_addr().to_string(),
            options.broker_tls,
            options.broker_connection,
        )
        .await
        {
            Ok(listener) => Arc::new(listener),
            Err(e) => {
                relay.abort();
                return Err(e);
            }
        };
        let server = SinkSourceServer::start().await?;
        let clients = Arc::new(Mutex::new(Vec::new()));
        let target = options.forward_to.unwrap_or(server.addr());
        let accept_loop = tokio::spawn(serve(listener.clone(), target, clients.clone()));
        Ok(InProcessTunnel {
            relay: Some(relay),
            listener,
            accept_loop,
            server,
            clients,
            base_path,
            https,
        })
    }

    /// Links a broker for [`SERVER_NAME`] to the relay's link port `relay_link`, within
    /// [`LINK_TIMEOUT`]; the error is what the broker reports (TLS failures included).
    pub async fn bind_broker(
        relay_link: &str,
        tls: Option<LinkTls>,
        connection: ConnectionConfig,
    ) -> io::Result<TunnelListener> {
        let mut config = BrokerConfig::new(relay_link, SERVER_NAME, LINK_SECRET.to_vec());
        config.tls = tls;
        config.connection = connection;
        config.handshake_timeout = LINK_TIMEOUT;
        TunnelListener::bind(config).await
    }

    pub fn relay(&self) -> &RunningRelay {
        self.relay.as_ref().expect("relay runs until drop")
    }

    pub fn relay_http_addr(&self) -> std::net::SocketAddr {
        self.relay().http_addr()
    }

    pub fn relay_link_addr(&self) -> std::net::SocketAddr {
        self.relay().link_addr()
    }

    /// The relay's tunnel URL, direct: `http(s)://127.0.0.1:<port><base>`.
    pub fn relay_url(&self) -> String {
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://{}{}", self.relay_http_addr(), self.base_path)
    }

    /// The relay's base path.
    pub fn base_path(&self) -> &str {
        &self.base_path
    }

    /// A client configuration for `relay_url` and this broker, ignoring the environment's
    /// proxies (tests set proxies explicitly).
    pub fn client_config(&self, relay_url: &str) -> ClientConfig {
        let mut config = ClientConfig::new(relay_url, SERVER_NAME);
        config.env_proxy = false;
        config
    }

    pub fn server(&self) -> &SinkSourceServer {
        &self.server
    }

    /// What the broker was told about each accepted connection, in accept order.
    pub fn accepted_clients(&self) -> Vec<ClientInfo> {
        self.clients.lock().expect("clients lock").clone()
    }

    pub fn listener(&self) -> &TunnelListener {
        &self.listener
    }

    /// Opens a connection with one raw connect request to `relay_url` (the relay, or a
    /// proxy in front of it) carrying the extra `headers`, and returns the client address
    /// the broker was given for it (within [`LINK_TIMEOUT`]).
    pub async fn client_addr_of_raw_connect(
        &self,
        relay_url: &str,
        headers: &[(&str, &str)],
    ) -> io::Result<String> {
        let before = self.accepted_clients().len();
        raw_connect(relay_url, SERVER_NAME, headers).await?;
        let deadline = tokio::time::Instant::now() + LINK_TIMEOUT;
        loop {
            if let Some(info) = self.accepted_clients().get(before) {
                return Ok(info.client_addr.clone());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("the broker accepted no connection within {LINK_TIMEOUT:?}"),
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Sends one connect request (a bare CONN_INIT, window 16) for `server_name` to `relay_url`
/// with the extra `headers`; an error unless the relay answers 200. The connection is left
/// open (it ends at the relay's inactivity timeout).
pub async fn raw_connect(
    relay_url: &str,
    server_name: &str,
    headers: &[(&str, &str)],
) -> io::Result<()> {
    let init = Packet::new(PacketType::ConnInit, 0, Bytes::new()).with_window(16);
    let mut req = crate::net::direct_http_client()
        .post(format!("{relay_url}?Type=connect&ServerName={server_name}"))
        .body(init.to_bytes());
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let resp = req.send().await.map_err(io::Error::other)?;
    if !resp.status().is_success() {
        return Err(io::Error::other(format!(
            "connect with {headers:?}: {}",
            resp.status()
        )));
    }
    Ok(())
}

impl Drop for InProcessTunnel {
    fn drop(&mut self) {
        self.accept_loop.abort();
        if let Some(relay) = self.relay.take() {
            relay.abort();
        }
    }
}

/// Accepts tunnel connections and splices each to `target` until aborted.
async fn serve(
    listener: Arc<TunnelListener>,
    target: std::net::SocketAddr,
    clients: Arc<Mutex<Vec<ClientInfo>>>,
) {
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        while tasks.try_join_next().is_some() {}
        let (mut stream, info) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "in-process broker stopped accepting");
                return;
            }
        };
        tracing::debug!(?info, "in-process broker accepted a connection");
        clients.lock().expect("clients lock").push(info);
        tasks.spawn(async move {
            // The target is dialed at the first byte from the client, not at accept: the
            // sink/source server drops a connection that sends no header within its header
            // timeout (30 s), and long-poll tests keep a tunnel connection idle longer. The
            // wait is bounded by the tunnel connection's own idle timeout.
            let mut first = vec![0u8; FIRST_READ_BYTES];
            let n = match stream.read(&mut first).await {
                Ok(0) => {
                    let _ = stream.shutdown().await;
                    return;
                }
                Ok(n) => n,
                Err(e) => {
                    tracing::debug!(error = %e, "in-process broker: connection ended before data");
                    return;
                }
            };
            let mut tcp = match TcpStream::connect(target).await {
                Ok(tcp) => tcp,
                Err(e) => {
                    tracing::warn!(error = %e, "in-process broker cannot reach its target");
                    return;
                }
            };
            let _ = tcp.set_nodelay(true);
            if let Err(e) = tcp.write_all(&first[..n]).await {
                tracing::warn!(error = %e, "in-process broker cannot write to its target");
                return;
            }
            if let Err(e) = tokio::io::copy_bidirectional(&mut stream, &mut tcp).await {
                tracing::debug!(error = %e, "in-process broker splice ended with an error");
            }
        });
    }
}

/// Connects with `config`, expecting a failure within `within`; returns it.
pub async fn expect_connect_error(
    case: &str,
    config: ClientConfig,
    within: Duration,
) -> tunnel_client::ConnectError {
    let started = std::time::Instant::now();
    let result = tokio::time::timeout(within, tunnel_client::connect(config))
        .await
        .unwrap_or_else(|_| panic!("{case}: connect hung for {within:?}"));
    let err = match result {
        Ok(_) => panic!("{case}: connect succeeded"),
        Err(e) => e,
    };
    eprintln!(
        "[report] {case}: refused after {:.2?}: {err}",
        started.elapsed()
    );
    err
}
