//! `TunnelListener`: the server-side entry point, shaped like a TCP listener.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tunnel_proto::connection::StreamError;
use tunnel_proto::driver::TunnelStream;
use tunnel_proto::payload::{Capacity, InstanceId, ListenMode, ListenState};

use crate::config::BrokerConfig;
use crate::dial::{dial, DialError, Link};
use crate::shared::{abort_packet, Accepted, Shared};
use crate::supervisor::supervise;
use tunnel_proto::backoff::Backoff;

/// Who opened an accepted connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientInfo {
    /// The connection's id on the relay (also in logs of the relay and the client).
    pub conn_id: u32,
    /// The client's address as the relay saw it (may be a proxy's).
    pub client_addr: String,
}

/// Reason sent to clients whose connections are cut by [`TunnelListener::shutdown`].
pub const SHUTDOWN_REASON: &str = "broker shutting down";

/// Accepts tunnel connections for one server name from one relay.
///
/// Dropping the listener stops accepting; the link stays up for the connections already
/// accepted and closes after the last of them ends.
pub struct TunnelListener {
    shared: Arc<Shared>,
    accept_rx: tokio::sync::Mutex<mpsc::Receiver<Accepted>>,
    supervisor: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for TunnelListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelListener")
            .field("relay", &self.shared.config.relay_addr)
            .field("name", &self.shared.config.server_name)
            .field("live_connections", &self.shared.table.len())
            .finish()
    }
}

impl TunnelListener {
    /// Dials the relay and registers `config.server_name`. Returns once the relay has
    /// acknowledged the link. Errors:
    /// - `InvalidInput`: the configuration is unusable (empty name, oversized secret, …);
    /// - `PermissionDenied`: the relay refused the link, with its reason;
    /// - otherwise (`TimedOut`, `ConnectionRefused`, …): no link could be set up within
    ///   `config.handshake_timeout`, retrying with back-off meanwhile; the message names the
    ///   relay and the last error.
    pub async fn bind(config: BrokerConfig) -> io::Result<TunnelListener> {
        config.validate()?;
        let link = first_link(&config).await?;
        tracing::info!(relay = %config.relay_addr, name = %config.server_name,
            instance = %config.instance_id, capacity = config.max_connections, "link up");
        let (accept_tx, accept_rx) = mpsc::channel(config.accept_backlog);
        let shared = Shared::new(config, accept_tx);
        let queue = crate::link::install(&shared);
        tokio::spawn(Arc::clone(&shared).report_capacity());
        let supervisor = tokio::spawn(supervise(Arc::clone(&shared), link, queue));
        Ok(TunnelListener {
            shared,
            accept_rx: tokio::sync::Mutex::new(accept_rx),
            supervisor: Mutex::new(Some(supervisor)),
        })
    }

    /// The next connection opened by a client. Fails only once the listener is shut down.
    /// Several tasks may call it at once; each connection goes to one of them.
    pub async fn accept(&self) -> io::Result<(TunnelStream, ClientInfo)> {
        let mut stop = self.shared.stop_signal();
        let mut rx = self.accept_rx.lock().await;
        tokio::select! {
            biased;
            _ = crate::shared::stopped(&mut stop) => Err(shut_down()),
            next = rx.recv() => next.ok_or_else(shut_down),
        }
    }

    /// The server name clients use to reach this listener.
    pub fn local_name(&self) -> &str {
        &self.shared.config.server_name
    }

    /// This listener's instance id among the brokers serving its name (docs/protocol.md §5.1).
    pub fn instance_id(&self) -> InstanceId {
        self.shared.config.instance_id
    }

    /// The relay's link address this listener dials.
    pub fn relay_addr(&self) -> &str {
        &self.shared.config.relay_addr
    }

    /// Stops (`false`) or resumes (`true`) accepting new connections: the relay is told with
    /// LISTEN_STATE, and CONN_INITs that still arrive are rejected "not accepting".
    /// Connections already accepted go on.
    pub fn set_accepting(&self, accepting: bool) {
        self.shared.set_accepting(accepting);
    }

    /// Whether the listener takes new connections now (see [`set_accepting`](Self::set_accepting)).
    pub fn is_accepting(&self) -> bool {
        self.shared.is_accepting()
    }

    /// Whether a link to the relay is up right now (false while redialing).
    pub fn is_link_up(&self) -> bool {
        self.shared.is_link_up()
    }

    /// Connections accepted (or waiting in the backlog) and not yet ended.
    pub fn live_connections(&self) -> usize {
        self.shared.table.len()
    }

    /// Drains this instance for planned maintenance and stops: tells the relay it is
    /// draining (LISTEN_STATE mode 2, so the relay places new connections on the name's other
    /// instances and answers 503 with `Retry-After`, not 404, while there are none), lets
    /// live connections go on until they end or `limit` passes, then [`shutdown`]s (which
    /// aborts the ones left). Returns whether every connection ended by itself.
    ///
    /// [`shutdown`]: Self::shutdown
    pub async fn drain(&self, limit: Duration) -> bool {
        self.start_drain();
        let all_closed = self.wait_connections_closed(limit).await;
        if !all_closed {
            tracing::warn!(
                live = self.live_connections(),
                "drain time over; aborting the remaining connections"
            );
        }
        self.shutdown().await;
        all_closed
    }

    /// Starts a drain without waiting: no new connections (LISTEN_STATE mode 2), live ones go
    /// on. Undo with `set_accepting(true)`; finish with [`drain`](Self::drain) or
    /// [`shutdown`](Self::shutdown).
    pub fn start_drain(&self) {
        self.shared.set_mode(ListenMode::Draining);
    }

    /// Whether the listener is draining (see [`drain`](Self::drain)).
    pub fn is_draining(&self) -> bool {
        self.shared.mode() == ListenMode::Draining
    }

    /// Waits until every live connection has ended, at most `limit`; true if they all did.
    /// For a graceful stop: `set_accepting(false)`, this, then `shutdown()`.
    pub async fn wait_connections_closed(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        // Polling keeps the table free of waiter bookkeeping; a stop is not latency critical.
        while self.shared.table.len() > 0 {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        true
    }

    /// Stops accepting, aborts every live connection (CONN_ABORT "broker shutting down" to
    /// the relay, reset errors to local readers and writers), flushes and closes the link and
    /// stops redialing. Waits at most the link write timeout for the flush. Idempotent.
    pub async fn shutdown(&self) {
        if self.shared.is_stopped() {
            return;
        }
        self.shared.set_accepting(false);
        let live = self.shared.table.drain();
        if !live.is_empty() {
            tracing::info!(count = live.len(), "aborting live connections");
        }
        for (conn_id, entry) in live {
            self.shared
                .send_on_link(abort_packet(conn_id, SHUTDOWN_REASON))
                .await;
            entry
                .handle
                .fail(StreamError::AbortedLocally(SHUTDOWN_REASON.into()));
        }
        self.shared.stop();
        let task = self
            .supervisor
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(task) = task {
            let limit = self.shared.config.link_write_timeout;
            if tokio::time::timeout(limit, task).await.is_err() {
                tracing::warn!("link did not close within {limit:?}");
            }
        }
    }
}

impl Drop for TunnelListener {
    fn drop(&mut self) {
        self.shared.set_accepting(false);
        self.shared.listener_dropped.store(true, Ordering::SeqCst);
        self.shared.stop_if_orphaned();
    }
}

fn shut_down() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "tunnel listener is shut down")
}

/// Dials until a link is up, the relay refuses, or the handshake timeout has passed. Gives up
/// early when the next back-off would start past the deadline, and then says so: the message
/// gives the time actually spent and the attempts made, not only the limit.
async fn first_link(config: &BrokerConfig) -> io::Result<Link> {
    let limit = config.handshake_timeout;
    let started = tokio::time::Instant::now();
    let deadline = started + limit;
    let mut backoff = Backoff::new(config.redial_initial, config.redial_max);
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let state = ListenState {
            mode: ListenMode::Accepting,
            capacity: Some(Capacity {
                max_connections: config.max_connections,
                live_connections: 0,
            }),
        };
        let last = match tokio::time::timeout_at(deadline, dial(config, Vec::new(), state)).await {
            Ok(Ok(link)) => return Ok(link),
            Ok(Err(DialError::Rejected(reason))) => {
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!(
                        "relay {} rejected the link for {:?}: {reason}",
                        config.relay_addr, config.server_name
                    ),
                ))
            }
            Ok(Err(e)) => e,
            Err(_) => DialError::Timeout(limit),
        };
        tracing::debug!(relay = %config.relay_addr, error = %last, "dial failed");
        let wake = tokio::time::Instant::now() + backoff.next_delay();
        if wake >= deadline {
            let kind = match &last {
                DialError::Io { source, .. } => source.kind(),
                _ => io::ErrorKind::TimedOut,
            };
            let spent = started.elapsed();
            return Err(io::Error::new(
                kind,
                format!(
                    "relay {} unreachable: {attempts} dial attempt(s) failed in {:.1} s, and the \
                     next one would start past the handshake timeout of {limit:?} \
                     (BrokerConfig::handshake_timeout); last error: {last}",
                    config.relay_addr,
                    spent.as_secs_f64()
                ),
            ));
        }
        tokio::time::sleep_until(wake).await;
    }
}
