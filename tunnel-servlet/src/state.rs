//! State shared by every task of one relay: configuration, counters, the connection table,
//! the stop signal, and the sweeper task that applies the table's deadlines.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime};
use tunnel_proto::warn_limit::WarningLimit;

use tokio::sync::{watch, Semaphore};

use crate::config::RelayConfig;
use crate::metrics::{Metrics, MetricsSnapshot};
use crate::table::{AttachLimits, QueueLimits, SweepRules, Table};

/// Everything the HTTP handlers, the link tasks and the sweeper share.
pub(crate) struct Shared {
    pub(crate) config: RelayConfig,
    pub(crate) metrics: Arc<Metrics>,
    table: Mutex<Table>,
    /// Becomes true when the relay is asked to stop.
    pub(crate) stopping: watch::Receiver<bool>,
    /// One permit per HTTP connection the public listener may serve at once.
    pub(crate) http_slots: Arc<Semaphore>,
    /// One permit per broker link allowed in its handshake at once.
    pub(crate) link_handshake_slots: Arc<Semaphore>,
    /// When the relay was created, for uptime (monotonic) and the start time (wall clock).
    pub(crate) started: Instant,
    pub(crate) started_wall: SystemTime,
}

impl Shared {
    pub(crate) fn new(config: RelayConfig, stopping: watch::Receiver<bool>) -> Shared {
        let metrics = Arc::new(Metrics::default());
        let relay_id = config.relay_id;
        Shared {
            http_slots: Arc::new(Semaphore::new(config.max_http_connections)),
            link_handshake_slots: Arc::new(Semaphore::new(config.max_pending_links)),
            config,
            table: Mutex::new(Table::new(metrics.clone()).with_relay_id(relay_id)),
            metrics,
            stopping,
            started: Instant::now(),
            started_wall: SystemTime::now(),
        }
    }

    /// Locks the table. A panic while it was held (a bug) must not take the relay down, so
    /// a poisoned lock is used as is: the table's methods keep it consistent step by step.
    pub(crate) fn table(&self) -> MutexGuard<'_, Table> {
        self.table
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn queue_limits(&self) -> QueueLimits {
        QueueLimits::of(&self.config)
    }

    pub(crate) fn attach_limits(&self) -> AttachLimits {
        AttachLimits {
            session_connections: self.config.max_session_connections,
            connections: self.config.max_connections,
            // A move is one small entry per connection being re-attached; the relay's
            // connection limit bounds them as it bounds connections.
            pending_moves: self.config.max_connections,
        }
    }

    pub(crate) fn is_stopping(&self) -> bool {
        *self.stopping.borrow()
    }

    pub(crate) fn snapshot(&self) -> MetricsSnapshot {
        let (open, links, sessions) = {
            let table = self.table();
            (
                table.connection_count(),
                table.links_up(),
                table.session_count(),
            )
        };
        self.metrics
            .snapshot(open as u64, links as u64, sessions as u64)
    }
}

/// Resolves once `stopping` becomes true (or its sender is gone). Takes the receiver by
/// reference and drops the watch guard inside, so callers' futures stay `Send`.
pub(crate) async fn stopped(stopping: &mut watch::Receiver<bool>) {
    let _ = stopping.wait_for(|s| *s).await;
}

/// The next accepted connection, or `None` once the relay is stopping. A failed accept
/// (typically: out of file descriptors) is logged and retried after a pause, not spun on.
pub(crate) async fn accept_until_stopped(
    listener: &tokio::net::TcpListener,
    stopping: &mut watch::Receiver<bool>,
    what: &str,
) -> Option<(tokio::net::TcpStream, std::net::SocketAddr)> {
    loop {
        let accepted = tokio::select! {
            _ = stopped(stopping) => return None,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok(pair) => return Some(pair),
            Err(err) => {
                // Typically out of descriptors, which lasts: one warning per 10 s.
                static ACCEPT_FAILURES: WarningLimit =
                    WarningLimit::new(std::time::Duration::from_secs(10));
                tunnel_proto::warn_limited!(ACCEPT_FAILURES, error = %err, "{what} accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

/// Applies inactivity, grace and linger deadlines every `sweep_interval` until the relay
/// stops. One task for all connections: no per-connection timers.
pub(crate) async fn run_sweeper(shared: Arc<Shared>) {
    let rules = SweepRules {
        broker_grace: shared.config.broker_grace,
        name_grace: shared.config.name_grace,
        ending_linger: shared.config.ending_linger,
    };
    let mut stopping = shared.stopping.clone();
    let mut tick = tokio::time::interval(shared.config.sweep_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stopped(&mut stopping) => break,
            _ = tick.tick() => {}
        }
        let aborts = shared.table().sweep(Instant::now(), &rules);
        for (link, packet) in aborts {
            // Never wait here: a broker that cannot take a CONN_ABORT now learns of the
            // end from its own timeouts.
            if link.try_send_packet(&packet).is_err() {
                tracing::debug!(
                    conn_id = packet.conn_id,
                    "link full; CONN_ABORT to broker not sent"
                );
            }
        }
    }
}
