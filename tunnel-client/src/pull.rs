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
use crate::per_conn::PerConn;
use tunnel_proto::backoff::Backoff;
use tunnel_proto::driver::ConnHandle;
use tunnel_proto::warn_limit::WarningLimit;

type PullResult = Result<Vec<Packet>, RequestError>;

/// At most one "pull failed; retrying" warning per this interval for the whole process: while
/// the relay is unreachable every connection's pull fails and retries, and one warning per
/// retry per connection would flood the log. The others go to debug and are counted in the
/// next warning.
const RETRY_WARNING_INTERVAL: Duration = Duration::from_secs(10);

static RETRY_WARNINGS: WarningLimit = WarningLimit::new(RETRY_WARNING_INTERVAL);

fn start_pull(per_conn: &Arc<PerConn>) -> JoinHandle<PullResult> {
    let per_conn = per_conn.clone();
    tokio::spawn(async move { per_conn.relay.pull(per_conn.conn_id, &per_conn.token).await })
}

/// Aborts the held pull if the loop is dropped before it ends (the runtime is stopping).
struct HeldPull(Option<JoinHandle<PullResult>>);

impl Drop for HeldPull {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}

/// Runs until the connection's driver has ended or the relay is given up on.
pub async fn run(per_conn: Arc<PerConn>, handle: ConnHandle) {
    let config = &per_conn.config;
    let mut backoff = Backoff::new(config.retry_initial, config.retry_max);
    let mut failing_since: Option<Instant> = None;
    let mut held = HeldPull(None);
    loop {
        let mut task = held.0.take().unwrap_or_else(|| start_pull(&per_conn));
        let result = tokio::select! {
            _ = handle.closed() => {
                // Let the held pull end on its own, detached: the relay answers it when it
                // forgets the connection (about when our TIME-WAIT ends), and the request's
                // own deadline (`pull_timeout`) bounds it. Aborting it would reset the
                // request: over HTTP/2 a stream reset, and under churn h2's limits on reset
                // streams then close the shared connection with every tunnel connection's
                // requests on it; over HTTP/1.1 a closed TCP connection instead of one
                // returned to the pool.
                drop(task);
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
                    held.0 = Some(start_pull(&per_conn));
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
                    handle.fail(StreamError::AbortedByPeer(
                        "relay no longer knows the connection".into(),
                    ));
                    log_gone(&handle, "pull", &error);
                    break;
                }
                Failure::Permanent => {
                    tracing::error!(
                        conn_id = per_conn.conn_id,
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
                            conn_id = per_conn.conn_id,
                            "pull failing for {failing:?} ({error}); giving up on the connection"
                        );
                        handle.fail(StreamError::TimedOut(failing));
                        break;
                    }
                    let delay = backoff.next_delay();
                    tunnel_proto::warn_limited!(
                        RETRY_WARNINGS,
                        conn_id = per_conn.conn_id,
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

/// Logs a 404 from the relay, after [`ConnHandle::fail`] has judged it. After both closes the
/// relay forgetting the connection is its normal end (the relay drops it once both sides have
/// finished, and our held pull or a last push may still be on the way): `fail` leaves no error
/// then, and this is a debug line. Otherwise the connection failed, and its close line
/// (`log_close`) is the one warning; this line adds the HTTP detail.
pub(crate) fn log_gone(handle: &ConnHandle, what: &str, error: &RequestError) {
    let conn_id = handle.conn_id();
    match handle.error() {
        None => tracing::debug!(
            conn_id,
            "{what}: {error}; the relay has forgotten the connection after its clean end"
        ),
        Some(_) => tracing::info!(conn_id, "{what}: {error}; the connection is gone"),
    }
}

fn pull_period(handle: &ConnHandle) -> Option<Duration> {
    match handle.peer_options().pull_period_ms {
        Some(ms) if ms > 0 => Some(Duration::from_millis(u64::from(ms))),
        _ => None,
    }
}
