//! One relay's link over its life: dial, run, and when it is lost redial with back-off,
//! re-announcing the connections that are on it, until the broker stops or the relay's
//! address is retired.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tunnel_proto::backoff::Backoff;

use crate::dial::{dial, DialError};
use crate::link::{self, LinkEnd};
use crate::relays::Target;
use crate::shared::{stopped, Shared};

/// The outcome of one dial, for `bind`, which waits for the first link up.
#[derive(Debug)]
pub(crate) struct DialReport {
    pub target: String,
    pub outcome: Result<(), DialError>,
}

/// Keeps a link to `target` up until the broker stops. Each dial's outcome goes to `reports`
/// while its receiver lives.
pub(crate) async fn supervise(
    shared: Arc<Shared>,
    target: Target,
    mut reports: Option<mpsc::Sender<DialReport>>,
) {
    let config = &shared.config;
    let mut backoff = Backoff::new(config.redial_initial, config.redial_max);
    let mut stop = shared.stop_signal();
    let mut outage = Outage::default();
    loop {
        let announced = shared.table.announce(target.id);
        let reannounced = announced.len();
        let attempt = tokio::select! {
            attempt = dial(config, target.addr, announced, shared.listen_state()) => attempt,
            _ = stopped(&mut stop) => break,
        };
        match attempt {
            Ok(link) => {
                let queue = link::install(&shared, target.id, target.addr, &link);
                // After the install: `bind` returns on this report, with the link up.
                report(&mut reports, &target, Ok(())).await;
                // What was sent while the link was down is lost: resend it now rather than
                // after timeouts that backed off during the outage.
                shared.table.path_restored(target.id);
                let relay_id = link.hello.relay_id;
                match outage.ended() {
                    None => tracing::info!(relay = %target, relay_id, name = %config.server_name,
                        reannounced, "link up"),
                    Some((down, attempts)) => tracing::info!(relay = %target, relay_id,
                        name = %config.server_name, reannounced, attempts,
                        "link up again after {:.1} s", down.as_secs_f64()),
                }
                let up_since = Instant::now();
                match link::run(&shared, target.id, link, queue).await {
                    LinkEnd::Stopped => {
                        tracing::info!(relay = %target, "link closed: broker stopped");
                        break;
                    }
                    LinkEnd::Lost(reason) => {
                        if shared.is_stopped() {
                            break;
                        }
                        let on_link = shared.table.announce(target.id).len();
                        tracing::warn!(relay = %target, %reason, connections = on_link, "link down; redialing");
                        outage.started();
                    }
                }
                // Only a link that held for a while earns a quick redial; one that the relay
                // drops right after the handshake keeps backing off.
                if up_since.elapsed() >= config.redial_max {
                    backoff.reset();
                }
            }
            Err(e) => {
                outage.failed(&target, &e);
                report(&mut reports, &target, Err(e)).await;
            }
        }
        if target.is_retired() {
            tracing::info!(relay = %target, "relay address retired; no more redials");
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff.next_delay()) => {}
            _ = stopped(&mut stop) => break,
        }
    }
    shared.relays.forget(&target);
}

async fn report(
    reports: &mut Option<mpsc::Sender<DialReport>>,
    target: &Target,
    outcome: Result<(), DialError>,
) {
    if let Some(tx) = reports {
        let report = DialReport {
            target: target.to_string(),
            outcome,
        };
        // `bind` stopped listening once it returned: report no more.
        if tx.send(report).await.is_err() {
            *reports = None;
        }
    }
}

/// Turns a run of failed dials to one relay into a few log lines: the first failure, each
/// change of error, and the recovery with how long it took. A relay down for an hour logs
/// three lines, not one per redial.
#[derive(Debug, Default)]
struct Outage {
    since: Option<Instant>,
    attempts: u32,
    last_error: Option<String>,
}

impl Outage {
    /// The link was lost after being up.
    fn started(&mut self) {
        *self = Outage {
            since: Some(Instant::now()),
            ..Outage::default()
        };
    }

    fn failed(&mut self, target: &Target, error: &DialError) {
        self.since.get_or_insert_with(Instant::now);
        self.attempts += 1;
        let text = error.to_string();
        if self.last_error.as_deref() == Some(text.as_str()) {
            tracing::debug!(relay = %target, %error, attempts = self.attempts, "redial failed again");
        } else if let DialError::Rejected(reason) = error {
            tracing::error!(relay = %target, %reason, "relay rejected the link; retrying");
        } else {
            tracing::warn!(relay = %target, %error, "cannot link to the relay; retrying");
        }
        self.last_error = Some(text);
    }

    /// A link is up: how long the relay was unreachable and how many dials failed, if it was.
    fn ended(&mut self) -> Option<(Duration, u32)> {
        let since = self.since.take()?;
        let attempts = std::mem::take(&mut self.attempts);
        self.last_error = None;
        Some((since.elapsed(), attempts))
    }
}
