//! The streamed pull of a session (docs/protocol.md §2.2):
//! `GET ?Type=pull&Session=N&Stream=1` is answered with a response that stays open and
//! carries the session's packets as they are queued, each batch one chunk (HTTP/1.1) or one
//! DATA frame (HTTP/2), with no new request per batch.
//!
//! - It opens with a packet at once (what is queued, or a NO_OP), so the client can tell a
//!   path that passes it on from one that buffers it.
//! - It ends after the pull wait or `stream_limit` bytes, so proxies that cap a response's
//!   time or size still work; the client opens the next one at once.
//! - A newer pull or stream of the session ends it, as it answers a held pull.
//!
//! The body is filled in `poll_frame`, on the task that writes the response: when the broker
//! link queues a packet, the session's waiter wakes that task directly, with no task in
//! between. Packets leave the connection queues only when hyper asks for the next frame, so
//! a slow reader leaves them queued (bounded there) instead of buffered here.
//!
//! A batch is one frame (one chunk over HTTP/1.1) made of several buffers ([`Chunks`]): the
//! packets a broker sent, from 4 KiB up, as the bytes they came in over the link, and the
//! short ones between them copied together (`PacketParts`). Copying every batch into one
//! buffer was 4 % of the relay's time during a download; a frame per buffer instead cost the
//! client more over HTTP/1.1 (chunk headers) than it saved the relay (BENCHMARKS.md).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::sync::oneshot;
use tokio::time::Sleep;
use tunnel_proto::chunks::Chunks;
use tunnel_proto::codec::PacketParts;
use tunnel_proto::{Packet, PacketType};

use crate::session_http::SessionKey;
use crate::state::Shared;
use crate::table::{Waiter, Wake};

/// The body of a streamed pull.
pub(crate) struct SessionStream {
    shared: Arc<Shared>,
    key: SessionKey,
    /// This stream's id among the session's pulls (`Table::next_id`).
    id: u64,
    /// When it ends at the latest (the pull wait), and the timer that wakes it then.
    deadline_at: tokio::time::Instant,
    deadline: Pin<Box<Sleep>>,
    /// Bytes it may still carry (`stream_limit`).
    budget: usize,
    /// Nothing was sent yet: the first frame goes at once, a NO_OP if nothing is queued.
    first: bool,
    /// Registered as the session's waiter: woken when packets are queued, by a newer pull,
    /// or when the session or the relay goes away.
    woken: Option<oneshot::Receiver<Wake>>,
    ended: bool,
}

/// What the stream does next.
enum Step {
    Send(Chunks),
    Wait(oneshot::Receiver<Wake>),
    End,
}

impl SessionStream {
    /// A stream for session `key`, which the caller checked exists. Claims the session's
    /// downstream, ending a held pull or an older stream.
    pub(crate) fn open(shared: Arc<Shared>, key: SessionKey) -> Option<SessionStream> {
        let config = &shared.config;
        let id = {
            let mut table = shared.table();
            let id = table.next_id();
            let session = table.session_mut(key.id, &key.token, Instant::now())?;
            session.claim_pull(id);
            id
        };
        let deadline_at = tokio::time::Instant::now() + config.pull_wait;
        let deadline = Box::pin(tokio::time::sleep_until(deadline_at));
        let budget = config.stream_limit;
        Some(SessionStream {
            shared,
            key,
            id,
            deadline_at,
            deadline,
            budget,
            first: true,
            woken: None,
            ended: false,
        })
    }

    /// Takes what is queued, or registers to be woken; `End` when the stream is done.
    fn next_step(&mut self) -> Step {
        let shared = &self.shared;
        let config = &shared.config;
        let mut table = shared.table();
        let Some(session) = table.session_mut(self.key.id, &self.key.token, Instant::now()) else {
            return Step::End;
        };
        let over = self.budget == 0 || tokio::time::Instant::now() >= self.deadline_at;
        if !session.claim_pull(self.id) || (over && !self.first) {
            return Step::End;
        }
        if table.session_has_ready(self.key.id) {
            let limit = config.response_limit.min(self.budget);
            let out = table.drain_session(self.key.id, PacketParts::new(), limit);
            if !out.is_empty() {
                drop(table);
                self.budget = self.budget.saturating_sub(out.len());
                self.first = false;
                shared.metrics.sent_down(out.len());
                return Step::Send(Chunks::from(out));
            }
        }
        if self.first {
            self.first = false;
            let no_op = Packet::new(PacketType::NoOp, 0, Bytes::new()).to_bytes();
            return Step::Send(Chunks::from(no_op));
        }
        if shared.is_stopping() {
            return Step::End;
        }
        let Some(session) = table.session_mut(self.key.id, &self.key.token, Instant::now()) else {
            return Step::End;
        };
        let (tx, rx) = oneshot::channel();
        session.waiter = Some(Waiter { id: self.id, tx });
        Step::Wait(rx)
    }
}

impl Body for SessionStream {
    type Data = Chunks;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Chunks>, Infallible>>> {
        let this = &mut *self;
        loop {
            if this.ended {
                return Poll::Ready(None);
            }
            if let Some(woken) = this.woken.as_mut() {
                match Pin::new(woken).poll(cx) {
                    Poll::Ready(Ok(Wake::Superseded)) => {
                        this.ended = true;
                        continue;
                    }
                    // Data: take it. Closed or dropped: the next step finds out why.
                    Poll::Ready(_) => this.woken = None,
                    Poll::Pending => {
                        if this.deadline.as_mut().poll(cx).is_ready() {
                            this.woken = None;
                            this.ended = true;
                            continue;
                        }
                        return Poll::Pending;
                    }
                }
            }
            match this.next_step() {
                Step::Send(batch) => return Poll::Ready(Some(Ok(Frame::data(batch)))),
                Step::Wait(rx) => this.woken = Some(rx),
                Step::End => this.ended = true,
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}
