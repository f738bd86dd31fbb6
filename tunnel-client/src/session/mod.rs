//! The session transport (docs/protocol.md §2.1): all connections of one `TunnelClient` share
//! one session at the relay, so one held pull and at most `max_pushes_in_flight` pushes carry
//! the packets of all of them, and opening connections waits for one of
//! `max_connects_in_flight` slots instead of taking an HTTP connection each.
//!
//! - [`registry`]: the connections of the session, and where the relay's packets for each go.
//! - [`outbox`]: the packets connections hand over, waiting for a push (bounded).
//! - [`pusher`]: the task that batches the outbox (and re-attaches) into pushes.
//! - [`pull`]: the loop that keeps the session's one pull held and dispatches what comes back.
//! - [`open`]: opening a connection in the session.
//! - [`mode`]: whether the pull loop streams or polls (docs/protocol.md §2.2).
//! - [`upstream`]: the streamed upstream that carries the pusher's batches where the path
//!   allows (§2.3).
//!
//! Session state at the relay is soft. When a request is answered 404 the session is
//! forgotten here too ([`ClientSession::forget`]); the next request opens a new one, and the
//! pusher re-attaches every live connection with its connection token (ATTACH) before it
//! sends their packets again.

mod mode;
mod open;
mod outbox;
mod pull;
mod pusher;
mod registry;
mod upstream;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;
use tunnel_proto::connection::StreamError;
use tunnel_proto::payload::SessionRequest;
use tunnel_proto::{Packet, PacketType};

use crate::config::ClientConfig;
use crate::http::{Failure, Relay, RequestError, SessionKey};
use tunnel_proto::warn_limit::WarningLimit;

use mode::ModeChoice;
pub use mode::{Downstream, SessionStats, TransportMode};
pub(crate) use open::connect;
use outbox::Outbox;
use registry::Registry;
pub use upstream::Upstream;
use upstream::UpstreamState;

/// The session of one `TunnelClient` and everything its connections share.
pub(crate) struct ClientSession {
    relay: Relay,
    config: ClientConfig,
    /// The session in use; `None` before the first request and after the relay forgot it.
    key: Mutex<Option<Arc<SessionKey>>>,
    /// One open request at a time; the others wait for its result.
    opening: tokio::sync::Mutex<()>,
    /// Sessions opened so far (the generation of the newest).
    generations: AtomicU64,
    /// The relay answered `Type=session` with 400: it predates sessions, and this client
    /// uses the per-connection requests instead.
    unsupported: AtomicBool,
    registry: Mutex<Registry>,
    outbox: Outbox,
    /// One permit per push request in flight.
    push_slots: Arc<Semaphore>,
    /// One permit per connect request in flight.
    connect_slots: Semaphore,
    /// Wakes the pusher: packets queued, or connections to attach. Its own `Arc` so that the
    /// pusher can wait on it without keeping the session alive.
    pusher_wake: Arc<Notify>,
    pusher_started: AtomicBool,
    /// Whether the pull loop runs (it stops when the session has no connection).
    pull_running: AtomicBool,
    /// Since when every request of the session has failed (`None`: the last one succeeded).
    failing_since: Mutex<Option<Instant>>,
    /// Every `TunnelClient` of the session is gone: once its last connection ends, the
    /// session is closed at the relay and its tasks stop.
    abandoned: AtomicBool,
    /// Wakes the pull loop when the session may be over: its last connection ended, or its
    /// last `TunnelClient` was dropped.
    idle_wake: Notify,
    /// Whether the pull loop streams or polls.
    mode: ModeChoice,
    /// The streamed upstream, where the path carries one.
    upstream: UpstreamState,
}

/// The `TunnelClient`s' share of a session: when the last clone is dropped, the session is
/// closed once its connections have ended (connections keep the session itself alive).
#[derive(Debug)]
pub(crate) struct SessionOwner(pub(crate) Arc<ClientSession>);

impl Drop for SessionOwner {
    fn drop(&mut self) {
        self.0.abandoned.store(true, Ordering::Release);
        self.0.idle_wake.notify_one();
    }
}

impl std::fmt::Debug for ClientSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientSession")
            .field("session_id", &self.current().map(|k| k.id))
            .field("connections", &self.lock_registry().len())
            .finish_non_exhaustive()
    }
}

impl ClientSession {
    pub(crate) fn new(relay: Relay, config: ClientConfig) -> ClientSession {
        ClientSession {
            outbox: Outbox::new(config.session_outbox.max(1)),
            push_slots: Arc::new(Semaphore::new(config.max_pushes_in_flight.max(1))),
            connect_slots: Semaphore::new(config.max_connects_in_flight.max(1)),
            relay,
            key: Mutex::new(None),
            opening: tokio::sync::Mutex::new(()),
            generations: AtomicU64::new(0),
            unsupported: AtomicBool::new(false),
            registry: Mutex::new(Registry::default()),
            pusher_wake: Arc::new(Notify::new()),
            pusher_started: AtomicBool::new(false),
            pull_running: AtomicBool::new(false),
            failing_since: Mutex::new(None),
            abandoned: AtomicBool::new(false),
            idle_wake: Notify::new(),
            mode: ModeChoice::new(config.mode, config.stream_reprobe_interval),
            upstream: UpstreamState::default(),
            config,
        }
    }

    /// How the session's downstream and upstream went so far.
    pub(crate) fn stats(&self) -> SessionStats {
        SessionStats {
            upstream: self.upstream.current(),
            upstreams: self.upstream.opened(),
            upstream_fallbacks: self.upstream.fallbacks(),
            ..self.mode.stats()
        }
    }

    /// Whether the relay turned sessions down (the client then opens connections with the
    /// per-connection requests).
    pub(crate) fn unsupported(&self) -> bool {
        self.unsupported.load(Ordering::Relaxed)
    }

    fn lock_registry(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn current(&self) -> Option<Arc<SessionKey>> {
        self.key.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The session in use, opening one if there is none (one open request at a time).
    async fn key(&self) -> Result<Arc<SessionKey>, RequestError> {
        if let Some(key) = self.current() {
            return Ok(key);
        }
        let _one_at_a_time = self.opening.lock().await;
        if let Some(key) = self.current() {
            return Ok(key);
        }
        let allowance = self.config.peer_silence_allowance();
        let request = SessionRequest {
            idle_timeout_ms: u32::try_from(allowance.as_millis()).unwrap_or(u32::MAX),
        };
        let init = Packet::new(PacketType::SessionInit, 0, request.encode());
        let opened = match self.relay.open_session(&init).await {
            Ok(opened) => opened,
            Err(e) => {
                if e.status() == Some(reqwest::StatusCode::BAD_REQUEST)
                    && !self.unsupported.swap(true, Ordering::Relaxed)
                {
                    tracing::warn!(relay = %self.relay.display_url(),
                        "the relay does not serve sessions ({e}); using per-connection requests");
                }
                return Err(e);
            }
        };
        let id = opened.id;
        let generation = self.generations.fetch_add(1, Ordering::Relaxed) + 1;
        let mut key = SessionKey::new(&self.relay, id, opened.token, generation);
        key.queue_limit = opened.queue_limit;
        let key = Arc::new(key);
        self.upstream.set_http2(opened.http2);
        *self.key.lock().unwrap_or_else(|e| e.into_inner()) = Some(key.clone());
        if generation > 1 {
            let (count, handles) = {
                let mut registry = self.lock_registry();
                (
                    registry.note_new_session(generation),
                    registry.live_handles(),
                )
            };
            // The relay may be another one (a pool) or the same one restarted with another
            // `--queue-limit`: each connection's window follows what this relay holds.
            let recv_window = self.config.recv_window_for(opened.queue_limit);
            for handle in &handles {
                handle.set_recv_window(recv_window);
            }
            tracing::info!(
                session = id,
                connections = count,
                recv_window,
                "opened a new session at the relay; re-attaching the live connections"
            );
            self.pusher_wake.notify_one();
        } else {
            tracing::debug!(session = id, relay = %self.relay.display_url(),
                queue_limit = ?opened.queue_limit,
                recv_window = self.config.recv_window_for(opened.queue_limit), "session opened");
        }
        Ok(key)
    }

    /// The relay answered 404 to a request of session `key`: it no longer knows it (it
    /// restarted, or the session outlived its idle timeout). The next request opens a new
    /// one.
    fn forget(&self, key: &SessionKey, what: &str) {
        let mut current = self.key.lock().unwrap_or_else(|e| e.into_inner());
        if current
            .as_ref()
            .is_some_and(|k| k.generation == key.generation)
        {
            *current = None;
            tracing::info!(
                session = key.id,
                "{what}: the relay no longer knows the session; opening a new one"
            );
        }
    }

    /// A request of the session succeeded; after an outage, the connections recover at once.
    fn request_succeeded(&self) {
        let was_failing = self
            .failing_since
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .is_some();
        if was_failing {
            for handle in self.lock_registry().live_handles() {
                handle.path_restored();
            }
        }
    }

    /// Records a transient failure; `Some(duration)` once requests have failed for longer
    /// than the outage grace.
    fn request_failed(&self) -> Option<Duration> {
        let now = Instant::now();
        let since = *self
            .failing_since
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(now);
        let failing = now - since;
        (failing > self.config.outage_grace).then_some(failing)
    }

    /// Ends every connection of the session with `error` (the relay stayed unreachable past
    /// the outage grace, or refused the session for good).
    fn fail_all(&self, error: StreamError) {
        let handles = self.lock_registry().take_all();
        for handle in handles {
            handle.fail(error.clone());
        }
    }

    /// Hands the packets of an answer (pull or push) to their connections. `generation` is
    /// that of the session the request was made in (ATTACH confirmations count for it).
    fn dispatch(&self, packets: Vec<Packet>, generation: u64) {
        if packets.iter().all(|p| p.kind == PacketType::NoOp) {
            return;
        }
        let routed = self.lock_registry().route(packets, generation);
        for (handle, packets) in routed.deliveries {
            handle.deliver_all(packets);
        }
        for handle in routed.attached {
            handle.path_restored();
        }
    }

    /// Starts the pusher (once) and the pull loop (if it is not running).
    fn ensure_tasks(self: &Arc<Self>) {
        if !self.pusher_started.swap(true, Ordering::AcqRel) {
            tokio::spawn(pusher::run(
                Arc::downgrade(self),
                self.pusher_wake.clone(),
                self.push_slots.clone(),
            ));
        }
        if !self.pull_running.swap(true, Ordering::AcqRel) {
            tokio::spawn(pull::run(self.clone()));
        }
    }

    /// A connection of the session ended.
    fn connection_ended(&self, conn_id: u32) {
        let empty = {
            let mut registry = self.lock_registry();
            registry.remove(conn_id);
            registry.is_empty()
        };
        if empty {
            self.idle_wake.notify_one();
        }
    }

    /// Whether the session is over: no connection, and no `TunnelClient` to open more.
    fn is_over(&self) -> bool {
        self.abandoned.load(Ordering::Acquire) && self.lock_registry().is_empty()
    }

    /// Closes the session at the relay (best effort), so it does not wait there for its
    /// idle timeout.
    async fn close(&self) {
        let key = self.key.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(key) = key {
            match self.relay.close_session(&key).await {
                Ok(()) => tracing::debug!(session = key.id, "session closed"),
                Err(e) => tracing::debug!(session = key.id, "could not close the session: {e}"),
            }
        }
    }

    /// Whether the pull loop should stop: the session has no connection. Decided under the
    /// registry's lock, so a connection registered meanwhile finds the loop stopped and
    /// starts it again.
    fn pull_may_stop(&self) -> bool {
        let registry = self.lock_registry();
        if registry.is_empty() {
            self.pull_running.store(false, Ordering::Release);
            true
        } else {
            false
        }
    }
}

impl ClientSession {
    /// A request of the session failed with something other than 404: a transient failure
    /// counts toward the outage grace (past it every connection fails), a permanent one
    /// (401, 403, a TLS certificate refused) fails every connection at once.
    fn note_failure(&self, error: &RequestError, what: &str) {
        static WARNINGS: WarningLimit = WarningLimit::new(Duration::from_secs(10));
        match error.failure() {
            Failure::Transient | Failure::Gone => {
                if let Some(after) = self.request_failed() {
                    tracing::error!(
                        "{what}: requests failing for {after:?} ({error}); giving up on the connections of the session"
                    );
                    self.fail_all(StreamError::TimedOut(after));
                } else {
                    tunnel_proto::warn_limited!(WARNINGS, "{what} failed ({error}); retrying");
                }
            }
            Failure::Permanent => {
                let connections = self.lock_registry().len();
                if connections > 0 {
                    tracing::error!(
                        connections,
                        "{what} refused: {error}; giving up on the connections of the session"
                    );
                }
                self.fail_all(StreamError::AbortedLocally(format!(
                    "{what} refused: {error}"
                )));
            }
        }
    }
}
