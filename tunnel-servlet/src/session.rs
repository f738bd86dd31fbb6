//! Sessions (docs/protocol.md §2.1): one client's connections to this relay, fetched by one
//! held pull and posted by a few pushes.
//!
//! A session is an entry of the connection [`Table`](crate::table::Table), under the same
//! lock, so a connection and its session never disagree. It holds no packets itself: each
//! connection keeps its own queue, and the session keeps the **ready list**, the connections
//! that have something to hand out, each at most once (the connection's `ready` flag says
//! whether it is listed). A session answer visits the ready list in turn (round-robin), at
//! most [`VISIT_LIMIT`] bytes per visit, so a connection with a deep queue cannot starve the
//! others of one answer.

use std::collections::{HashSet, VecDeque};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tunnel_proto::Token;

use crate::table::{Waiter, Wake};

/// Most bytes one connection adds to a session answer per visit (at least one packet).
pub(crate) const VISIT_LIMIT: usize = 64 * 1024;

/// Most bytes of answers to a streamed upstream's packets waiting for the session's pull
/// (about 200 CONN_ABORTs); past it answers are dropped, and the client asks again.
pub(crate) const MAX_ANSWERS: usize = 16 * 1024;

/// One session.
pub(crate) struct Session {
    pub(crate) token: Token,
    /// The connections that belong to it.
    pub(crate) conns: HashSet<u32>,
    /// How many of `conns` were closed both ways (they do not count against the
    /// session's connection limit; see `Table::note_close`).
    pub(crate) released: usize,
    /// Connections with something to hand out, in the order of their turns; each at most
    /// once (`ConnEntry::ready`).
    pub(crate) ready: VecDeque<u32>,
    /// The held pull or stream, if any; a newer pull supersedes it.
    pub(crate) waiter: Option<Waiter>,
    /// Answers to packets of a streamed upstream (ATTACH answers, CONN_ABORTs, last words),
    /// which has no response of its own to carry them: the next pull hands them out first.
    /// At most [`MAX_ANSWERS`] bytes.
    pub(crate) answers: BytesMut,
    /// The id of the newest pull or stream of the session (`Table::next_id`, growing with
    /// time): an older one that is not waiting when a newer one arrives finds out here.
    newest_pull: u64,
    /// Bytes queued over all its connections (bounded by `max_session_queue`).
    pub(crate) queued_bytes: usize,
    /// When its client last made a request in it.
    pub(crate) last_activity: Instant,
    /// Forgotten after this long without a request (a held pull counts as one).
    pub(crate) idle_timeout: Duration,
    /// The client's address at the opening, for log lines.
    pub(crate) client_addr: Box<str>,
}

impl Session {
    pub(crate) fn new(token: Token, now: Instant, idle_timeout: Duration, client: &str) -> Self {
        Session {
            token,
            conns: HashSet::new(),
            released: 0,
            ready: VecDeque::new(),
            waiter: None,
            answers: BytesMut::new(),
            newest_pull: 0,
            queued_bytes: 0,
            last_activity: now,
            idle_timeout,
            client_addr: client.into(),
        }
    }

    pub(crate) fn wake(&mut self, why: Wake) {
        if let Some(waiter) = self.waiter.take() {
            let _ = waiter.tx.send(why);
        }
    }

    /// Claims the session's downstream for the pull or stream with id `id`: false when a
    /// newer one has claimed it (this one then ends). A new claim wakes the held one with
    /// [`Wake::Superseded`].
    pub(crate) fn claim_pull(&mut self, id: u64) -> bool {
        if self.newest_pull > id {
            return false;
        }
        if self.newest_pull < id {
            self.newest_pull = id;
            self.wake(Wake::Superseded);
        }
        true
    }

    /// Whether a pull is held now by a client that is still there: it counts as activity.
    pub(crate) fn pull_held(&self) -> bool {
        matches!(&self.waiter, Some(w) if !w.tx.is_closed())
    }

    /// Whether the session made no request for its idle timeout at `now`.
    pub(crate) fn is_idle(&self, now: Instant) -> bool {
        !self.pull_held() && now.saturating_duration_since(self.last_activity) >= self.idle_timeout
    }

    /// Takes connection `id` off the ready list (it left the session or went away).
    pub(crate) fn unlist(&mut self, id: u32) {
        self.ready.retain(|r| *r != id);
    }
}

/// What an ATTACH gets (docs/protocol.md §2.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AttachOutcome {
    /// Known with that token and name: now in the session. Answered with an empty ATTACH.
    Attached,
    /// The relay has a link of that name and no such connection: answered CONN_ABORT.
    Unknown,
    /// The session holds its maximum of connections: answered CONN_ABORT with that reason.
    SessionFull,
    /// No link of that name yet (re-linking after a restart): no answer, the client retries.
    NotYet,
}
