//! The session's streamed upstream (docs/protocol.md §2.3): one request whose body stays
//! open carries the pusher's batches (DATA frames over HTTP/2, chunks over HTTP/1.1),
//! instead of a push request each.
//!
//! - Not in [`TransportMode::Poll`](super::TransportMode::Poll), and not with
//!   `ClientConfig::stream_upstream` off.
//! - The relay answers an upstream's headers at once. Over HTTP/1.1, where a proxy may pass
//!   the request head on and hold the body, the body starts with a probe (a NOOP with
//!   conn_id 0) that the relay answers down the response; the upstream counts as answered
//!   once that answer comes (over HTTP/2, once the headers come). Until it is answered,
//!   batches keep going in pushes. No answer within the probe deadline means the path holds
//!   request bodies back (a proxy that buffers them, or a relay without streamed upstreams):
//!   the session keeps pushing, and tries again after the re-probe interval. The decision
//!   is logged once at info level.
//! - The client ends an upstream after [`UPSTREAM_IDLE`] without a batch, or after
//!   [`UPSTREAM_LIMIT`] bytes: it lets go of the channel's sender, so what is queued still
//!   goes, then the body ends. The next batch opens a new one.
//! - A batch in an upstream that fails is lost like a push that failed; the connections
//!   retransmit.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::time::Instant;

use tunnel_proto::{Packet, PacketType};

use super::ClientSession;
use crate::body::PartsBody;
use crate::http::{Failure, Relay, RequestError, SessionKey};

/// An upstream that carried no batch for this long is ended by the client, ahead of the
/// relay, which ends one silent for its pull wait (20 s by default).
pub(crate) const UPSTREAM_IDLE: Duration = Duration::from_secs(10);

/// Bytes after which an upstream is ended and the next batch opens a new one (a bound for
/// proxies that count a request's size). Checked every [`CHECK_EVERY`], so a fast upstream
/// may carry a second's worth more.
pub(crate) const UPSTREAM_LIMIT: usize = 64 * 1024 * 1024;

/// Batches queued for an upstream's body (each at most `max_push_body`). One: the pusher
/// builds the next batch while the body writes this one, which keeps the upstream busy. With
/// four, 100 busy connections over HTTP/1.1 fell into retransmission storms in about half the
/// bench's runs (every connection's timer fired within a few ms, each resent its window, and
/// the aggregate dropped from ~900 to 40–120 MiB/s): see BENCHMARKS.md.
const QUEUED_BATCHES: usize = 1;

/// How long after an upstream request failed without an answer the next one may be tried.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(1);

/// How often an open upstream checks whether it is idle or full.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// How the session's packets go up now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upstream {
    /// One long-lived request body carries the batches.
    Streaming,
    /// Each batch goes in a push request of its own.
    Pushing,
}

impl std::fmt::Display for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Upstream::Streaming => "streaming",
            Upstream::Pushing => "pushing",
        })
    }
}

/// The open upstream batches go to.
struct Open {
    /// The session generation it was opened in.
    generation: u64,
    tx: mpsc::Sender<PartsBody>,
    /// Bytes handed to it, and when the last batch was.
    sent: Arc<AtomicUsize>,
    last_batch: Arc<Mutex<Instant>>,
}

/// A place for one batch in the open upstream.
pub(super) struct UpstreamSlot {
    permit: mpsc::OwnedPermit<PartsBody>,
    sent: Arc<AtomicUsize>,
    last_batch: Arc<Mutex<Instant>>,
}

impl UpstreamSlot {
    pub(super) fn send(self, batch: PartsBody) {
        self.sent.fetch_add(batch.len(), Ordering::Relaxed);
        *self.last_batch.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        self.permit.send(batch);
    }
}

/// A slot of an open upstream to wait for (it keeps the upstream's queue open, not the
/// session alive).
pub(super) struct WaitingSlot {
    tx: mpsc::Sender<PartsBody>,
    sent: Arc<AtomicUsize>,
    last_batch: Arc<Mutex<Instant>>,
}

impl WaitingSlot {
    /// Waits for room; `None` if the upstream ended meanwhile.
    pub(super) async fn wait(self) -> Option<UpstreamSlot> {
        let permit = self.tx.reserve_owned().await.ok()?;
        Some(UpstreamSlot {
            permit,
            sent: self.sent,
            last_batch: self.last_batch,
        })
    }
}

/// The session's upstream state.
#[derive(Default)]
pub(crate) struct UpstreamState {
    open: Mutex<Option<Open>>,
    /// An upstream is being opened (one at a time).
    opening: AtomicBool,
    /// The path spoke HTTP/2 when the session opened (HTTP/1.1 upstreams are probed).
    http2: AtomicBool,
    /// Pushing since an upstream missed its probe deadline, until this instant.
    pushing_until: Mutex<Option<Instant>>,
    /// Whether the last logged decision was "streaming" (`None`: nothing logged yet).
    logged_streaming: Mutex<Option<bool>>,
    opened: AtomicU64,
    fallbacks: AtomicU64,
}

impl std::fmt::Debug for UpstreamState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamState")
            .field("open", &self.lock_open().is_some())
            .finish_non_exhaustive()
    }
}

impl UpstreamState {
    fn lock_open(&self) -> std::sync::MutexGuard<'_, Option<Open>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The session opened over HTTP/2 (`true`) or not.
    pub(super) fn set_http2(&self, http2: bool) {
        self.http2.store(http2, Ordering::Relaxed);
    }

    pub(super) fn current(&self) -> Upstream {
        if self.lock_open().is_some() {
            Upstream::Streaming
        } else {
            Upstream::Pushing
        }
    }

    pub(super) fn opened(&self) -> u64 {
        self.opened.load(Ordering::Relaxed)
    }

    pub(super) fn fallbacks(&self) -> u64 {
        self.fallbacks.load(Ordering::Relaxed)
    }

    /// A place in the open upstream of `key` if one is free now.
    pub(super) fn try_slot(&self, key: &SessionKey) -> Option<UpstreamSlot> {
        let waiting = self.waiting_slot(key)?;
        let permit = waiting.tx.try_reserve_owned().ok()?;
        Some(UpstreamSlot {
            permit,
            sent: waiting.sent,
            last_batch: waiting.last_batch,
        })
    }

    /// The open upstream of `key`, to wait on for room; `None` when there is none.
    pub(super) fn waiting_slot(&self, key: &SessionKey) -> Option<WaitingSlot> {
        let mut open = self.lock_open();
        // Its request ended (the body is gone) before its task cleared it: without this the
        // pusher would find it again at once, and spin.
        if open.as_ref().is_some_and(|o| o.tx.is_closed()) {
            *open = None;
        }
        let open = open.as_ref().filter(|o| o.generation == key.generation)?;
        Some(WaitingSlot {
            tx: open.tx.clone(),
            sent: open.sent.clone(),
            last_batch: open.last_batch.clone(),
        })
    }

    /// Lets go of the open upstream if it is the one with `sent`: its queued batches still
    /// go, then its body ends.
    fn close(&self, sent: &Arc<AtomicUsize>) {
        let mut open = self.lock_open();
        if open.as_ref().is_some_and(|o| Arc::ptr_eq(&o.sent, sent)) {
            *open = None;
        }
    }

    fn log_decision(&self, session: u32, streaming: bool, detail: impl FnOnce() -> String) {
        let mut logged = self
            .logged_streaming
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if *logged != Some(streaming) {
            *logged = Some(streaming);
            tracing::info!(session, "{}", detail());
        }
    }
}

impl ClientSession {
    /// Opens an upstream in the background if the session should have one and has none.
    pub(super) fn want_upstream(self: &Arc<Self>, key: &Arc<SessionKey>) {
        let state = &self.upstream;
        if self.config.mode == super::TransportMode::Poll || !self.config.stream_upstream {
            return;
        }
        {
            let mut open = state.lock_open();
            match open.as_ref() {
                Some(o) if o.generation == key.generation && !o.tx.is_closed() => return,
                // Opened in a session the relay has forgotten, or ended: let it go.
                Some(_) => *open = None,
                None => {}
            }
        }
        if let Some(until) = *state
            .pushing_until
            .lock()
            .unwrap_or_else(|e| e.into_inner())
        {
            if Instant::now() < until {
                return;
            }
        }
        if state.opening.swap(true, Ordering::AcqRel) {
            return;
        }
        tokio::spawn(run(Arc::downgrade(self), self.relay.clone(), key.clone()));
    }
}

/// Opens one upstream, serves it until it ends, and clears it.
async fn run(session: Weak<ClientSession>, relay: Relay, key: Arc<SessionKey>) {
    // An upstream is a request in flight like a push and takes one of the push slots for its
    // whole life (pushes go on beside it until its probe is answered, and an ending upstream
    // overlaps the next one). Without this, the held pull, an upstream, the pushes and the
    // connects were one HTTP/1.1 connection more than `ClientConfig::max_connects_in_flight`
    // documents, and a proxy that allows 8 connections per client denied some.
    let slots = match session.upgrade() {
        Some(s) => s.push_slots.clone(),
        None => return,
    };
    // Waits at most as long as a push in flight takes (`request_timeout`).
    let Ok(_slot) = slots.acquire_owned().await else {
        return;
    };
    let (tx, rx) = mpsc::channel(QUEUED_BATCHES);
    let (probe, http2) = {
        let Some(s) = session.upgrade() else { return };
        let probe = if s.config.mode == super::TransportMode::Auto {
            s.config.stream_probe_timeout
        } else {
            s.config.request_timeout
        };
        (probe, s.upstream.http2.load(Ordering::Relaxed))
    };
    // Over HTTP/1.1 a proxy may pass the request head on at once and still hold the body:
    // the upstream is used only once the relay has answered the probe its body starts with.
    let first = if http2 {
        PartsBody::default()
    } else {
        PartsBody::from(Packet::new(PacketType::NoOp, 0, Bytes::new()).to_bytes())
    };
    let sent_at = Instant::now();
    let opening = {
        let relay = relay.clone();
        let key = key.clone();
        async move {
            let mut response = relay
                .session_upstream(&key, reqwest::Body::wrap(ChannelBody { rx, batch: first }))
                .await?;
            if !http2 && Relay::stream_chunk(&mut response).await?.is_none() {
                return Ok(None);
            }
            Ok(Some(response))
        }
    };
    let answered = tokio::time::timeout(probe, opening).await;
    let Some(s) = session.upgrade() else { return };
    s.upstream.opening.store(false, Ordering::Release);
    let mut response = match answered {
        Ok(Ok(Some(response))) => response,
        Ok(Err(error)) => {
            upstream_refused(&s, &key, &error);
            return;
        }
        // The relay ended the upstream before answering its probe (it is stopping, or the
        // session is gone): not a verdict on the path.
        Ok(Ok(None)) => return,
        Err(_) => {
            s.upstream.fallbacks.fetch_add(1, Ordering::Relaxed);
            let interval = s.config.stream_reprobe_interval;
            *s.upstream
                .pushing_until
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = Some(Instant::now() + interval);
            s.upstream.log_decision(key.id, false, || {
                format!(
                    "a streamed upstream got no answer in {:?}: the path holds request bodies \
                     back (or the relay does not take streamed upstreams); the session pushes, \
                     and tries again in {interval:?}",
                    sent_at.elapsed()
                )
            });
            return;
        }
    };
    let sent = Arc::new(AtomicUsize::new(0));
    let last_batch = Arc::new(Mutex::new(Instant::now()));
    *s.upstream.lock_open() = Some(Open {
        generation: key.generation,
        tx,
        sent: sent.clone(),
        last_batch: last_batch.clone(),
    });
    s.upstream.opened.fetch_add(1, Ordering::Relaxed);
    s.upstream.log_decision(key.id, true, || {
        "the path carries streamed request bodies; the session's upstream streams".to_string()
    });
    // The upstream's batches may wait for it: wake the pusher.
    s.pusher_wake.notify_one();
    drop(s);
    let mut check = tokio::time::interval(CHECK_EVERY);
    loop {
        tokio::select! {
            chunk = Relay::stream_chunk(&mut response) => {
                match chunk {
                    // The relay sends nothing else down an upstream.
                    Ok(Some(_)) => continue,
                    Ok(None) => tracing::debug!(session = key.id, "session upstream ended by the relay"),
                    Err(error) => tracing::debug!(session = key.id, "session upstream failed: {error}"),
                }
                break;
            }
            _ = check.tick() => {
                let Some(s) = session.upgrade() else { return };
                let idle = last_batch.lock().unwrap_or_else(|e| e.into_inner()).elapsed() >= UPSTREAM_IDLE;
                if idle || sent.load(Ordering::Relaxed) >= UPSTREAM_LIMIT {
                    // Its body ends once the queued batches are out; the relay then ends
                    // the response.
                    s.upstream.close(&sent);
                }
            }
        }
    }
    if let Some(s) = session.upgrade() {
        s.upstream.close(&sent);
    }
}

/// The relay answered the upstream with an error: 404 (the session is gone) is the pull's
/// to handle; anything else means this relay or path does not take streamed upstreams.
fn upstream_refused(session: &ClientSession, key: &SessionKey, error: &RequestError) {
    if error.failure() == Failure::Gone {
        return;
    }
    if error.status().is_some() {
        session.upstream.fallbacks.fetch_add(1, Ordering::Relaxed);
        let interval = session.config.stream_reprobe_interval;
        *session
            .upstream
            .pushing_until
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(Instant::now() + interval);
        session.upstream.log_decision(key.id, false, || {
            format!("a streamed upstream was refused ({error}); the session pushes, and tries again in {interval:?}")
        });
    } else {
        // The path failed (the pushes see it too): not a verdict on streaming, but no new
        // attempt for a second, so an outage does not make one per batch.
        tracing::debug!(
            session = key.id,
            "opening a session upstream failed: {error}"
        );
        *session
            .upstream
            .pushing_until
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(Instant::now() + RETRY_AFTER_FAILURE);
    }
}

/// The body of an upstream request: the batches of its channel, each as it comes (a batch's
/// buffers one DATA frame each); it ends when the channel's senders are gone and it is
/// empty.
struct ChannelBody {
    rx: mpsc::Receiver<PartsBody>,
    /// What is left of the batch being sent.
    batch: PartsBody,
}

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        loop {
            if let Some(part) = self.batch.next_part() {
                return Poll::Ready(Some(Ok(http_body::Frame::data(part))));
            }
            match std::task::ready!(self.rx.poll_recv(cx)) {
                Some(batch) => self.batch = batch,
                None => return Poll::Ready(None),
            }
        }
    }
}
