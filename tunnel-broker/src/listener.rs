//! `TunnelListener`: the server-side entry point, shaped like a TCP listener.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tunnel_proto::connection::StreamError;
use tunnel_proto::driver::TunnelStream;
use tunnel_proto::payload::{InstanceId, ListenMode};

use crate::config::BrokerConfig;
use crate::dial::DialError;
use crate::relays;
use crate::shared::{abort_packet, Accepted, Shared};
use crate::supervisor::DialReport;

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
}

impl std::fmt::Debug for TunnelListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelListener")
            .field("relays", &self.shared.config.relays)
            .field("name", &self.shared.config.server_name)
            .field("live_connections", &self.shared.table.len())
            .finish()
    }
}

impl TunnelListener {
    /// Dials every relay of `config.relays` and registers `config.server_name` with each.
    /// Returns once one relay has acknowledged its link; the others are linked in the
    /// background, each redialed with back-off until it answers. Errors:
    /// - `InvalidInput`: the configuration is unusable (empty name, oversized secret, …);
    /// - `PermissionDenied`: every relay refused the link, with its reason;
    /// - otherwise (`TimedOut`, `ConnectionRefused`, …): no link could be set up within
    ///   `config.handshake_timeout`, retrying with back-off meanwhile; the message names each
    ///   relay and its last error.
    pub async fn bind(config: BrokerConfig) -> io::Result<TunnelListener> {
        config.validate()?;
        let resolved = relays::resolve(&config.relays).await;
        let (accept_tx, accept_rx) = mpsc::channel(config.accept_backlog);
        let shared = Shared::new(config, accept_tx);
        let targets = shared.relays.update(&resolved);
        if targets.is_empty() {
            shared.stop();
            return Err(unresolved(&resolved));
        }
        let names: Vec<String> = targets.iter().map(ToString::to_string).collect();
        let (report_tx, report_rx) = mpsc::channel(REPORTS_QUEUE);
        relays::supervise_all(&shared, targets, Some(&report_tx));
        drop(report_tx);
        if let Err(e) = first_link(&shared.config, &names, report_rx).await {
            shared.stop();
            return Err(e);
        }
        let config = &shared.config;
        tracing::info!(relays = ?config.relays, name = %config.server_name,
            instance = %config.instance_id, capacity = config.max_connections, "listening");
        tokio::spawn(Arc::clone(&shared).report_capacity());
        tokio::spawn(relays::keep_resolving(Arc::clone(&shared)));
        Ok(TunnelListener {
            shared,
            accept_rx: tokio::sync::Mutex::new(accept_rx),
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

    /// The relays this listener links to, as configured (`BrokerConfig::relays`).
    pub fn relays(&self) -> &[String] {
        &self.shared.config.relays
    }

    /// How many relays it has a link to right now.
    pub fn links_up(&self) -> usize {
        self.shared.links_up()
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

    /// Whether a link to at least one relay is up right now (false while redialing).
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
                .send_on_link(entry.link, abort_packet(conn_id, SHUTDOWN_REASON))
                .await;
            entry
                .handle
                .fail(StreamError::AbortedLocally(SHUTDOWN_REASON.into()));
        }
        self.shared.stop();
        let limit = self.shared.config.link_write_timeout;
        if !self.shared.relays.wait_all_ended(limit).await {
            tracing::warn!("links did not close within {limit:?}");
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

/// Room for dial reports while `bind` waits.
const REPORTS_QUEUE: usize = 64;

/// What `bind` heard of one relay while waiting for its first link.
#[derive(Default)]
struct Tally {
    attempts: u32,
    last: Option<DialError>,
}

/// Waits for the first link up, as reported by the supervisors of `names`. Fails when every
/// relay refused the link, or when the handshake timeout has passed; the message gives each
/// relay's attempts and last error, and the time actually spent.
async fn first_link(
    config: &BrokerConfig,
    names: &[String],
    mut reports: mpsc::Receiver<DialReport>,
) -> io::Result<()> {
    let limit = config.handshake_timeout;
    let started = tokio::time::Instant::now();
    let mut tallies: Vec<Tally> = names.iter().map(|_| Tally::default()).collect();
    loop {
        let report = match tokio::time::timeout_at(started + limit, reports.recv()).await {
            Ok(Some(report)) => report,
            // Every supervisor ended (the broker stopped) or the time is up.
            Ok(None) | Err(_) => break,
        };
        let Err(error) = report.outcome else {
            return Ok(());
        };
        tracing::debug!(relay = %report.target, %error, "dial failed");
        if let Some(i) = names.iter().position(|n| *n == report.target) {
            tallies[i].attempts += 1;
            tallies[i].last = Some(error);
        }
        let all_rejected = tallies
            .iter()
            .all(|t| matches!(t.last, Some(DialError::Rejected(_))));
        if all_rejected {
            let reasons: Vec<String> = names
                .iter()
                .zip(&tallies)
                .map(|(name, t)| match &t.last {
                    Some(DialError::Rejected(reason)) => format!(
                        "relay {name} rejected the link for {:?}: {reason}",
                        config.server_name
                    ),
                    _ => unreachable!("all rejected"),
                })
                .collect();
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                reasons.join("; "),
            ));
        }
    }
    let spent = started.elapsed().as_secs_f64();
    let kind = tallies
        .iter()
        .find_map(|t| match &t.last {
            Some(DialError::Io { source, .. }) => Some(source.kind()),
            _ => None,
        })
        .unwrap_or(io::ErrorKind::TimedOut);
    let each: Vec<String> = names
        .iter()
        .zip(&tallies)
        .map(|(name, t)| match &t.last {
            None => format!("relay {name} unreachable: no answer within {limit:?}"),
            Some(last) => format!(
                "relay {name} unreachable: {} dial attempt(s) failed in {spent:.1} s; last error: {last}",
                t.attempts
            ),
        })
        .collect();
    Err(io::Error::new(
        kind,
        format!(
            "{} (no link within the handshake timeout of {limit:?}, \
             BrokerConfig::handshake_timeout)",
            each.join("; ")
        ),
    ))
}

/// The error for relay names none of which resolved.
fn unresolved(resolved: &[relays::Resolved]) -> io::Error {
    let mut kind = io::ErrorKind::NotFound;
    let each: Vec<String> = resolved
        .iter()
        .filter_map(|(name, result)| {
            let e = result.as_ref().err()?;
            kind = e.kind();
            Some(format!("cannot resolve relay {name}: {e}"))
        })
        .collect();
    io::Error::new(kind, each.join("; "))
}
