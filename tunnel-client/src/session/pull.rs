//! The session's pull loop: keeps one pull held at the relay while the session has
//! connections, and dispatches what comes back. The next pull is sent before the packets of
//! the last one are handed out, so the relay is (almost) never without a held pull.

use std::sync::Arc;

use tokio::task::JoinHandle;
use tunnel_proto::backoff::Backoff;
use tunnel_proto::Packet;

use super::ClientSession;
use crate::http::{Failure, RequestError, SessionKey};

type PullResult = Result<Vec<Packet>, RequestError>;

/// A pull in flight, with the session it was made in.
struct Held {
    key: Arc<SessionKey>,
    task: JoinHandle<PullResult>,
}

fn start_pull(session: &Arc<ClientSession>, key: Arc<SessionKey>) -> Held {
    let task = {
        let session = session.clone();
        let key = key.clone();
        tokio::spawn(async move { session.relay.session_pull(&key).await })
    };
    Held { key, task }
}

/// Waits for the held pull; `None` (the pull aborted) when the session is over meanwhile.
async fn held_until_done(
    session: &ClientSession,
    mut task: JoinHandle<PullResult>,
) -> Option<Result<PullResult, tokio::task::JoinError>> {
    loop {
        tokio::select! {
            joined = &mut task => return Some(joined),
            _ = session.idle_wake.notified() => {
                if session.is_over() {
                    task.abort();
                    return None;
                }
            }
        }
    }
}

/// Runs until the session has no connection.
pub(super) async fn run(session: Arc<ClientSession>) {
    let config = &session.config;
    let mut backoff = Backoff::new(config.retry_initial, config.retry_max);
    let mut held: Option<Held> = None;
    loop {
        let Held { key, task } = match held.take() {
            Some(h) => h,
            None => {
                if session.pull_may_stop() {
                    if session.is_over() {
                        session.close().await;
                    }
                    return;
                }
                match session.key().await {
                    Ok(key) => start_pull(&session, key),
                    Err(error) => {
                        session.note_failure(&error, "opening a session");
                        tokio::time::sleep(backoff.next_delay()).await;
                        continue;
                    }
                }
            }
        };
        let Some(joined) = held_until_done(&session, task).await else {
            // Nobody can use the session any more: end it at the relay now rather than
            // after its idle timeout.
            session.close().await;
            session.pull_may_stop();
            return;
        };
        let result = match joined {
            Ok(result) => result,
            Err(e) => Err(RequestError::Network(format!("pull task ended: {e}"))),
        };
        match result {
            Ok(packets) => {
                backoff.reset();
                session.request_succeeded();
                // Re-arm first, so the relay always has a pull to answer.
                if !session.pull_may_stop() {
                    held = Some(start_pull(&session, key.clone()));
                }
                session.dispatch(packets, key.generation);
                if held.is_none() {
                    return;
                }
            }
            Err(error) => match error.failure() {
                Failure::Gone => session.forget(&key, "pull"),
                _ => {
                    session.note_failure(&error, "pull");
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            },
        }
    }
}
