//! The pull loop: keeps one pull request held at the relay for the whole life of the
//! connection and delivers what comes back.
//!
//! With a continuous long-poll (no pull period), the next pull is sent as soon as the previous
//! one is answered, before its packets are handed to the connection, so the relay is (almost)
//! never without a held pull. With a pull period set by the peer (CONN_OPTION 1), the loop
//! sleeps that long after a pull that brought nothing but NO_OP.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;
use tunnel_proto::connection::StreamError;
use tunnel_proto::{Packet, PacketType};

use crate::http::{Failure, RequestError};
use crate::session::Session;
use tunnel_proto::backoff::Backoff;
use tunnel_proto::driver::ConnHandle;

type PullResult = Result<Vec<Packet>, RequestError>;

fn start_pull(session: &Arc<Session>) -> JoinHandle<PullResult> {
    let session = session.clone();
    tokio::spawn(async move { session.relay.pull(session.conn_id, &session.token).await })
}

/// Aborts the held pull when the loop ends (the relay then sees the request go away).
struct HeldPull(Option<JoinHandle<PullResult>>);

impl Drop for HeldPull {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}

/// Runs until the connection's driver has ended or the relay is given up on.
pub async fn run(session: Arc<Session>, handle: ConnHandle) {
    let config = &session.config;
    let mut backoff = Backoff::new(config.retry_initial, config.retry_max);
    let mut failing_since: Option<Instant> = None;
    let mut held = HeldPull(None);
    loop {
        let mut task = held.0.take().unwrap_or_else(|| start_pull(&session));
        let result = tokio::select! {
            _ = handle.closed() => {
                task.abort();
                break;
            }
            joined = &mut task => match joined {
                Ok(result) => result,
                Err(e) => Err(RequestError::Network(format!("pull task ended: {e}"))),
            },
        };
        match result {
            Ok(packets) => {
                backoff.reset();
                if failing_since.take().is_some() {
                    // The relay answers again (it may have restarted): recover at once.
                    handle.path_restored();
                }
                let period = pull_period(&handle);
                if period.is_none() {
                    // Re-arm first, so the relay always has a pull to answer.
                    held.0 = Some(start_pull(&session));
                }
                let empty = packets.iter().all(|p| p.kind == PacketType::NoOp);
                if !empty {
                    handle.deliver_all(packets.into_iter().filter(|p| p.kind != PacketType::NoOp));
                }
                if let (true, Some(period)) = (empty, period) {
                    tokio::select! {
                        _ = handle.closed() => break,
                        _ = tokio::time::sleep(period) => {}
                    }
                }
            }
            Err(error) => match error.failure() {
                Failure::Gone => {
                    tracing::warn!(
                        conn_id = session.conn_id,
                        "pull: {error}; the connection is gone"
                    );
                    handle.fail(StreamError::AbortedByPeer(
                        "relay no longer knows the connection".into(),
                    ));
                    break;
                }
                Failure::Permanent => {
                    tracing::error!(
                        conn_id = session.conn_id,
                        "pull refused: {error}; giving up"
                    );
                    handle.fail(StreamError::AbortedLocally(format!(
                        "pull refused: {error}"
                    )));
                    break;
                }
                Failure::Transient => {
                    let since = *failing_since.get_or_insert_with(Instant::now);
                    let failing = since.elapsed();
                    if failing > config.outage_grace {
                        tracing::error!(
                            conn_id = session.conn_id,
                            "pull failing for {failing:?} ({error}); giving up on the connection"
                        );
                        handle.fail(StreamError::TimedOut(failing));
                        break;
                    }
                    let delay = backoff.next_delay();
                    tracing::warn!(
                        conn_id = session.conn_id,
                        "pull failed ({error}); retrying in {delay:?}"
                    );
                    tokio::select! {
                        _ = handle.closed() => break,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            },
        }
    }
}

fn pull_period(handle: &ConnHandle) -> Option<Duration> {
    match handle.peer_options().pull_period_ms {
        Some(ms) if ms > 0 => Some(Duration::from_millis(u64::from(ms))),
        _ => None,
    }
}
