//! The per-connection transport (docs/protocol.md §2): what the pull loop and the push sink of
//! one connection share: the relay, the connection's id and token, the configuration, and the
//! push side's failure clock.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;
use tunnel_proto::Token;

use crate::config::ClientConfig;
use crate::http::Relay;

pub struct PerConn {
    pub relay: Relay,
    pub config: ClientConfig,
    pub conn_id: u32,
    /// The connection's secret; `Token`'s `Debug` never shows it.
    pub token: Token,
    /// Since when every push has failed (`None`: the last one succeeded).
    push_failing_since: Mutex<Option<Instant>>,
}

impl PerConn {
    pub fn new(relay: Relay, config: ClientConfig, conn_id: u32, token: Token) -> PerConn {
        PerConn {
            relay,
            config,
            conn_id,
            token,
            push_failing_since: Mutex::new(None),
        }
    }

    pub fn push_succeeded(&self) {
        *self.lock_failing() = None;
    }

    /// Records a transient push failure; `Some(duration)` once pushes have failed for longer
    /// than the outage grace.
    pub fn push_failed(&self) -> Option<Duration> {
        let now = Instant::now();
        let since = *self.lock_failing().get_or_insert(now);
        let failing = now - since;
        (failing > self.config.outage_grace).then_some(failing)
    }

    fn lock_failing(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        self.push_failing_since
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }
}
