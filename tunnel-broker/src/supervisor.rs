//! The link's life: run it, and when it is lost redial with back-off, re-announcing the
//! live connections, until the broker stops.

use std::sync::Arc;
use std::time::Instant;

use crate::dial::{dial, DialError, Link};
use crate::link::{self, LinkEnd, LinkQueue};
use crate::shared::Shared;
use tunnel_proto::backoff::Backoff;

/// Runs `first` (the link `bind` established), then keeps a link up until stopped.
pub(crate) async fn supervise(shared: Arc<Shared>, first: Link, queue: LinkQueue) {
    let config = &shared.config;
    let mut backoff = Backoff::new(config.redial_initial, config.redial_max);
    let mut stop = shared.stop_signal();
    let mut next = Some((first, queue));
    loop {
        if let Some((link, queue)) = next.take() {
            let up_since = Instant::now();
            match link::run(&shared, link, queue).await {
                LinkEnd::Stopped => {
                    tracing::info!(relay = %config.relay_addr, "link closed: broker stopped");
                    return;
                }
                LinkEnd::Lost(reason) => {
                    if shared.is_stopped() {
                        return;
                    }
                    tracing::warn!(relay = %config.relay_addr, %reason, live = shared.table.len(), "link down; redialing");
                }
            }
            // Only a link that held for a while earns a quick redial; one that the relay
            // drops right after the handshake keeps backing off.
            if up_since.elapsed() >= config.redial_max {
                backoff.reset();
            }
        }

        let delay = backoff.next_delay();
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = crate::shared::stopped(&mut stop) => return,
        }
        let announced = shared.table.announce();
        let count = announced.len();
        let attempt = tokio::select! {
            attempt = dial(config, announced, shared.listen_state()) => attempt,
            _ = crate::shared::stopped(&mut stop) => return,
        };
        match attempt {
            Ok(link) => {
                tracing::info!(relay = %config.relay_addr, name = %config.server_name, reannounced = count, "link up");
                next = Some((link, link::install(&shared)));
                // What was sent while the link was down is lost: resend it now rather than
                // after timeouts that backed off during the outage.
                shared.table.path_restored();
            }
            Err(DialError::Rejected(reason)) => {
                tracing::error!(relay = %config.relay_addr, name = %config.server_name, %reason, "relay rejected the link; will retry");
            }
            Err(e) => {
                tracing::warn!(relay = %config.relay_addr, error = %e, "redial failed");
            }
        }
    }
}
