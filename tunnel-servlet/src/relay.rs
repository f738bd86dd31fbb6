//! The relay as a whole: binds both listeners, runs the HTTP accept loop, the link listener
//! and the sweeper, and stops them gracefully on request.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use tunnel_servlet::{Relay, RelayConfig};
//! let mut config = RelayConfig::default();
//! config.link_secret = b"secret".to_vec();
//! let relay = Relay::bind(config).await?.spawn();
//! println!("HTTP on {}, links on {}", relay.http_addr(), relay.link_addr());
//! relay.shutdown().await;
//! # Ok(()) }
//! ```

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use crate::config::RelayConfig;
use crate::metrics::MetricsSnapshot;
use crate::state::{accept_until_stopped, run_sweeper, stopped, Shared};
use crate::{admin, first_byte, http, link, tls};

/// Largest HTTP/2 frame the relay accepts: a few whole packets (HTTP/2's default is 16 KiB).
const MAX_FRAME_SIZE: u32 = 256 * 1024;

/// Asks a relay to stop. Cloneable; stopping twice is harmless.
#[derive(Clone)]
pub struct ShutdownHandle {
    stop: Arc<watch::Sender<bool>>,
}

impl ShutdownHandle {
    /// Starts the graceful stop: listeners close, held pulls are answered, open HTTP
    /// exchanges get `shutdown_drain` to finish.
    pub fn shutdown(&self) {
        self.stop.send_replace(true);
    }
}

/// A relay whose listeners are bound but not yet serving.
pub struct Relay {
    shared: Arc<Shared>,
    stop: Arc<watch::Sender<bool>>,
    http: TcpListener,
    link: TcpListener,
    admin: Option<TcpListener>,
    http_tls: Option<TlsAcceptor>,
    link_tls: Option<TlsAcceptor>,
}

impl Relay {
    /// Validates `config`, loads TLS material and binds both listeners (port 0 picks a free
    /// port; see [`Relay::http_addr`]).
    pub async fn bind(config: RelayConfig) -> io::Result<Relay> {
        config
            .validate()
            .map_err(|msg| io::Error::new(io::ErrorKind::InvalidInput, msg))?;
        let http_tls = match &config.http_tls {
            Some(files) => Some(tls::acceptor(files, &[b"h2", b"http/1.1"], None)?),
            None => None,
        };
        let link_tls = match &config.link_tls {
            Some(files) => Some(tls::acceptor(
                files,
                &[],
                config.link_tls_client_ca.as_deref(),
            )?),
            None => None,
        };
        let http = listen(config.http_listen, config.listen_backlog)?;
        let link = listen(config.link_listen, config.listen_backlog)?;
        let admin = match config.admin_listen {
            Some(addr) => Some(listen(addr, config.listen_backlog)?),
            None => None,
        };
        let (stop, stopping) = watch::channel(false);
        Ok(Relay {
            shared: Arc::new(Shared::new(config, stopping)),
            stop: Arc::new(stop),
            http,
            link,
            admin,
            http_tls,
            link_tls,
        })
    }

    /// The bound HTTP address.
    pub fn http_addr(&self) -> SocketAddr {
        self.http
            .local_addr()
            .expect("bound listener has an address")
    }

    /// The bound link address.
    pub fn link_addr(&self) -> SocketAddr {
        self.link
            .local_addr()
            .expect("bound listener has an address")
    }

    /// The bound admin address, if the admin listener is configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin
            .as_ref()
            .map(|l| l.local_addr().expect("bound listener has an address"))
    }

    /// A handle that stops the relay (see [`ShutdownHandle`]).
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {
            stop: self.stop.clone(),
        }
    }

    /// Current counters and gauges.
    pub fn metrics(&self) -> MetricsSnapshot {
        self.shared.snapshot()
    }

    /// Serves until a [`ShutdownHandle`] asks to stop, then stops gracefully.
    pub async fn run(self) -> io::Result<()> {
        let shared = self.shared;
        let sweeper = tokio::spawn(run_sweeper(shared.clone()));
        let links = tokio::spawn(link::run_listener(self.link, self.link_tls, shared.clone()));
        let admin = self.admin.map(|listener| {
            let slots = Arc::new(Semaphore::new(shared.config.admin_max_connections));
            tokio::spawn(serve_http(
                listener,
                None,
                slots,
                Site::Admin,
                shared.clone(),
            ))
        });
        let slots = shared.http_slots.clone();
        serve_http(
            self.http,
            self.http_tls,
            slots,
            Site::Public,
            shared.clone(),
        )
        .await;
        // Stopping: answer every held pull now instead of at the end of its wait.
        shared.table().wake_all();
        let _ = links.await;
        if let Some(admin) = admin {
            let _ = admin.await;
        }
        let _ = sweeper.await;
        Ok(())
    }

    /// Runs the relay on a task and returns a handle to it.
    pub fn spawn(self) -> RunningRelay {
        let http_addr = self.http_addr();
        let link_addr = self.link_addr();
        let admin_addr = self.admin_addr();
        let shared = self.shared.clone();
        let shutdown = self.shutdown_handle();
        let task = tokio::spawn(self.run());
        RunningRelay {
            http_addr,
            link_addr,
            admin_addr,
            shared,
            shutdown,
            task,
        }
    }
}

/// A relay running on its own task.
pub struct RunningRelay {
    http_addr: SocketAddr,
    link_addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    shared: Arc<Shared>,
    shutdown: ShutdownHandle,
    task: JoinHandle<io::Result<()>>,
}

impl RunningRelay {
    /// The address clients' HTTP requests reach.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The address brokers dial to link in.
    pub fn link_addr(&self) -> SocketAddr {
        self.link_addr
    }

    /// The admin listener's address, if configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// `http://{http_addr}{base_path}`: the URL clients are given.
    pub fn tunnel_url(&self) -> String {
        format!("http://{}{}", self.http_addr, self.shared.config.base_path)
    }

    /// The counters and gauges now.
    pub fn metrics(&self) -> MetricsSnapshot {
        self.shared.snapshot()
    }

    /// A handle that stops the relay (see [`ShutdownHandle`]).
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.shutdown.clone()
    }

    /// Stops the relay gracefully and waits (at most the drain time plus a second) for it.
    pub async fn shutdown(self) {
        self.shutdown.shutdown();
        let wait = self.shared.config.shutdown_drain + Duration::from_secs(1);
        let mut task = self.task;
        if tokio::time::timeout(wait, &mut task).await.is_err() {
            task.abort();
        }
    }

    /// Stops at once, without draining (simulates a crash in tests): every task ends, every
    /// socket closes.
    pub fn abort(self) {
        self.shutdown.shutdown();
        self.task.abort();
    }
}

/// Which routes a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Site {
    /// The tunnel, `/healthz` and (with `public_metrics`) `/metrics`.
    Public,
    /// `/metrics`, `/healthz`, `/status`, `/status.json`.
    Admin,
}

/// Accepts HTTP connections until stopped, at most one per permit of `slots` at once;
/// returns once the open ones have drained.
async fn serve_http(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    slots: Arc<Semaphore>,
    site: Site,
    shared: Arc<Shared>,
) {
    let config = &shared.config;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(config.header_read_timeout))
        .keep_alive_timeout(config.header_read_timeout)
        // A client process multiplexes all its tunnel connections on one HTTP/2 connection,
        // each with a held pull and a few pushes: a low stream limit would queue pulls
        // behind each other. Streams cost memory only while open.
        .max_concurrent_streams(max_streams(config.max_connections))
        // Streamed upstreams carry packets of up to 256 KiB + 24 (64 KiB from older clients):
        // with the default 16 KiB frames nearly every packet is cut and copied back together.
        // 256 KiB frames cut the largest in two; 1 MiB frames measured no faster (h2c and
        // HTTPS uploads +4 %, within noise; BENCHMARKS.md) and cost HTTP/2 a 1 MiB buffer.
        .max_frame_size(MAX_FRAME_SIZE);
    let builder = Arc::new(builder);
    let mut stopping = shared.stopping.clone();
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let slot = tokio::select! {
            _ = stopped(&mut stopping) => break,
            slot = slots.clone().acquire_owned() => slot,
        };
        let Ok(slot) = slot else {
            break;
        };
        // Reap connection tasks as they finish, also while waiting for the next accept: a
        // finished task keeps its memory (the connection's future, a few KiB) until it is
        // joined, and after a burst no accept may come for a long time. Measured with the
        // soak bench: 49 MB of live heap left after a churn of 47,000 connections without
        // this, 4.5 MB with it.
        let accepted = loop {
            tokio::select! {
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                accepted = accept_until_stopped(&listener, &mut stopping, "HTTP") => break accepted,
            }
        };
        let Some((tcp, peer)) = accepted else {
            break;
        };
        let _ = tcp.set_nodelay(true);
        let (shared, builder, tls) = (shared.clone(), builder.clone(), tls.clone());
        tasks.spawn(async move {
            let _slot = slot;
            match tls {
                None => {
                    if first_byte::arrives_within(&tcp, shared.config.header_read_timeout).await {
                        serve_connection(tcp, peer, &builder, site, shared).await
                    } else {
                        tracing::debug!(%peer, "nothing received within the header timeout; closed");
                    }
                }
                Some(acceptor) => {
                    let handshake = acceptor.accept(tcp);
                    match tokio::time::timeout(shared.config.header_read_timeout, handshake).await {
                        Ok(Ok(stream)) => {
                            serve_connection(stream, peer, &builder, site, shared).await
                        }
                        Ok(Err(err)) => {
                            tracing::debug!(%peer, error = %err, "TLS handshake failed")
                        }
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }
            }
        });
    }
    drop(listener);
    shared.table().wake_all();
    let drain = tokio::time::timeout(config.shutdown_drain, async {
        while tasks.join_next().await.is_some() {}
    });
    if drain.await.is_err() {
        tracing::info!(
            open = tasks.len(),
            "drain time over; closing remaining HTTP connections"
        );
        tasks.abort_all();
    }
}

/// Serves one HTTP connection (HTTP/1.1 or HTTP/2, detected from its first bytes).
async fn serve_connection<S>(
    io: S,
    peer: SocketAddr,
    builder: &auto::Builder<TokioExecutor>,
    site: Site,
    shared: Arc<Shared>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut stopping = shared.stopping.clone();
    let service = {
        let shared = shared.clone();
        service_fn(move |req| {
            let shared = shared.clone();
            async move {
                match site {
                    Site::Public => http::handle(req, peer, shared).await,
                    Site::Admin => admin::handle(req, peer, shared).await,
                }
            }
        })
    };
    let conn = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(err) = result {
                tracing::debug!(%peer, error = %err, "HTTP connection ended with an error");
            }
        }
        _ = stopped(&mut stopping) => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// HTTP/2 streams one connection may have open: a held pull and up to four pushes for every
/// tunnel connection the relay allows.
fn max_streams(max_connections: usize) -> u32 {
    u32::try_from(max_connections.saturating_mul(5).max(256)).unwrap_or(u32::MAX)
}

/// Binds a listener with an explicit accept backlog: the standard library's 128 overflows
/// when hundreds of clients connect at once, and the kernel then drops or resets them.
fn listen(addr: SocketAddr, backlog: u32) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}
