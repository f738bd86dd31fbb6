//! How the session fetches the relay's packets (docs/protocol.md §2.2): one streamed pull
//! that carries packets as the relay queues them, or completed long polls, which every path
//! delivers, buffering proxies included.
//!
//! In [`TransportMode::Auto`] the session streams first. A stream that delivers no byte
//! within the probe deadline (the relay writes one at once) means something on the path holds
//! the response back: the session then polls, and tries streaming again after the re-probe
//! interval. The first decision, and every change after it, is logged once at info level.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Which downstream mode a session may use ([`ClientConfig::mode`](crate::ClientConfig::mode)).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TransportMode {
    /// Stream where the path delivers a stream at once; poll where it buffers (decided per
    /// session, re-checked every `stream_reprobe_interval`).
    #[default]
    Auto,
    /// Always stream, whatever the path does (a buffering proxy then delays every packet
    /// until the stream ends, up to the relay's pull wait).
    Stream,
    /// Always poll: one completed response per batch of packets, as relays before streamed
    /// pulls serve them.
    Poll,
}

/// What a session does now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Downstream {
    /// One long-lived response carries the relay's packets as they come.
    Streaming,
    /// Each batch of packets comes in a completed response to a pull of its own.
    Polling,
}

impl std::fmt::Display for Downstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Downstream::Streaming => "streaming",
            Downstream::Polling => "polling",
        })
    }
}

/// How a session's downstream went so far ([`TunnelClient::session_stats`](crate::TunnelClient::session_stats)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionStats {
    /// The mode in use now (before the first pull: the one the session will try first).
    pub downstream: Downstream,
    /// Streamed pulls opened.
    pub streams: u64,
    /// Completed pulls made.
    pub polls: u64,
    /// Times a stream was found buffered and the session fell back to polling.
    pub fallbacks: u64,
    /// How the session's packets go up now (docs/protocol.md §2.3).
    pub upstream: super::Upstream,
    /// Streamed upstreams opened.
    pub upstreams: u64,
    /// Times a streamed upstream got no answer in time (or was refused) and the session
    /// kept pushing.
    pub upstream_fallbacks: u64,
}

/// The session's choice of downstream mode.
#[derive(Debug)]
pub(crate) struct ModeChoice {
    mode: TransportMode,
    reprobe_interval: Duration,
    state: Mutex<State>,
    streams: AtomicU64,
    polls: AtomicU64,
    fallbacks: AtomicU64,
}

#[derive(Debug)]
struct State {
    /// Polling since a stream was found buffered, until this instant (`Auto` only).
    polling_until: Option<Instant>,
    /// What was last logged: nothing yet, streaming, or polling.
    logged: Option<Downstream>,
}

impl ModeChoice {
    pub(crate) fn new(mode: TransportMode, reprobe_interval: Duration) -> ModeChoice {
        ModeChoice {
            mode,
            reprobe_interval,
            state: Mutex::new(State {
                polling_until: None,
                logged: None,
            }),
            streams: AtomicU64::new(0),
            polls: AtomicU64::new(0),
            fallbacks: AtomicU64::new(0),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The mode the next pull uses.
    pub(crate) fn current(&self) -> Downstream {
        match self.mode {
            TransportMode::Stream => Downstream::Streaming,
            TransportMode::Poll => Downstream::Polling,
            TransportMode::Auto => match self.state().polling_until {
                Some(until) if Instant::now() < until => Downstream::Polling,
                _ => Downstream::Streaming,
            },
        }
    }

    /// Whether a stream that delivers nothing in time is given up (`Auto` only: a forced
    /// stream waits as long as the request's deadline allows).
    pub(crate) fn probes(&self) -> bool {
        self.mode == TransportMode::Auto
    }

    pub(crate) fn stream_opened(&self) {
        self.streams.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn poll_made(&self) {
        self.polls.fetch_add(1, Ordering::Relaxed);
    }

    /// A stream delivered its first bytes within the probe deadline.
    pub(crate) fn stream_works(&self, session: u32) {
        let mut state = self.state();
        state.polling_until = None;
        if state.logged != Some(Downstream::Streaming) {
            state.logged = Some(Downstream::Streaming);
            tracing::info!(
                session,
                "the path delivers streamed responses; the session streams"
            );
        }
    }

    /// A stream delivered nothing within `waited`: something on the path buffers responses.
    pub(crate) fn stream_buffered(&self, session: u32, waited: Duration) {
        self.fallbacks.fetch_add(1, Ordering::Relaxed);
        let mut state = self.state();
        state.polling_until = Some(Instant::now() + self.reprobe_interval);
        if state.logged != Some(Downstream::Polling) {
            state.logged = Some(Downstream::Polling);
            tracing::info!(
                session,
                "a streamed response delivered nothing in {waited:?}: the path buffers \
                 responses (or the relay does not stream); the session polls, and tries \
                 streaming again in {:?}",
                self.reprobe_interval
            );
        } else {
            tracing::debug!(
                session,
                "the path still buffers streamed responses; polling"
            );
        }
    }

    /// The stream given up by the probe got no answer at all but an error: the path failed
    /// rather than buffered, so the fall-back is taken back (the next pull streams again).
    pub(crate) fn probe_unanswered(&self, session: u32, error: &dyn std::fmt::Display) {
        tracing::debug!(
            session,
            "the probing stream failed ({error}); streaming is tried again"
        );
        self.state().polling_until = None;
    }

    pub(crate) fn stats(&self) -> SessionStats {
        SessionStats {
            downstream: self.current(),
            streams: self.streams.load(Ordering::Relaxed),
            polls: self.polls.load(Ordering::Relaxed),
            fallbacks: self.fallbacks.load(Ordering::Relaxed),
            upstream: super::Upstream::Pushing,
            upstreams: 0,
            upstream_fallbacks: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn auto_streams_falls_back_and_probes_again() {
        let choice = ModeChoice::new(TransportMode::Auto, Duration::from_secs(300));
        assert_eq!(choice.current(), Downstream::Streaming);
        choice.stream_buffered(1, Duration::from_secs(2));
        assert_eq!(choice.current(), Downstream::Polling);
        assert_eq!(choice.stats().fallbacks, 1);
        tokio::time::advance(Duration::from_secs(299)).await;
        assert_eq!(choice.current(), Downstream::Polling);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(choice.current(), Downstream::Streaming);
        choice.stream_works(1);
        assert_eq!(choice.current(), Downstream::Streaming);
    }

    #[test]
    fn forced_modes_never_change() {
        let stream = ModeChoice::new(TransportMode::Stream, Duration::from_secs(1));
        assert!(!stream.probes());
        assert_eq!(stream.current(), Downstream::Streaming);
        let poll = ModeChoice::new(TransportMode::Poll, Duration::from_secs(1));
        assert_eq!(poll.current(), Downstream::Polling);
    }
}
