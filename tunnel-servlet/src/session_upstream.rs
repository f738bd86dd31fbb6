//! The streamed upstream of a session (docs/protocol.md §2.3):
//! `POST ?Type=push&Session=N&Stream=1`, over HTTP/2 or HTTP/1.1 (chunked), is a request
//! whose body stays open and carries the client's packets as it writes them, with no new
//! request per batch.
//!
//! - The relay answers 200 at once, before any of the body, so the client can tell a path
//!   that passes the request on as it comes from one that holds the body back (the client
//!   then keeps pushing).
//! - The body is read as it arrives; each run of whole packets is applied as a push body is
//!   (`session_http::apply_push`). The answers a push would carry (ATTACH answers,
//!   CONN_ABORTs, last words) go down the session's pull instead.
//! - A NOOP with conn_id 0 in the body is a probe: the relay answers it with a NOOP in the
//!   response, so a client can tell that its body's bytes get through as they are written
//!   (over HTTP/1.1 a proxy may pass the request head on and hold the body). Probes that
//!   arrive while an answer is still waiting to be written share it. Nothing else goes
//!   down the response. It ends when the request body ends, after `pull_wait` without a
//!   byte, when the session is gone or the relay stops; a malformed packet resets the
//!   stream.
//!
//! The reading runs inside the response body's `poll_frame`, on the task that serves the
//! stream: no task in between, and a slow broker link holds the reading back (HTTP/2 flow
//! control then holds the client back).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tunnel_proto::chunks::Chunks;
use tunnel_proto::warn_limit::WarningLimit;
use tunnel_proto::{decode_all, encode_all, DecodeError, Decoder, Packet, PacketType};

use crate::session_http::{apply_push, PushRefused, SessionKey};
use crate::state::Shared;

/// Why a streamed upstream was reset rather than ended.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UpstreamError {
    #[error("malformed packets in the upstream: {0}")]
    Decode(#[from] DecodeError),
    #[error("session upstream refused: {0}")]
    Refused(&'static str),
    #[error("reading the upstream failed: {0}")]
    Read(#[from] hyper::Error),
}

type Run = Pin<Box<dyn Future<Output = Result<(), UpstreamError>> + Send>>;

/// The response body of a streamed upstream, which reads the request body while it is
/// polled and carries nothing but the answers to probes.
pub(crate) struct SessionUpstream {
    run: Run,
    /// A probe came that is not answered yet (set by `read`, inside `poll_frame`).
    probed: Arc<AtomicBool>,
    ended: bool,
}

impl SessionUpstream {
    pub(crate) fn new(shared: Arc<Shared>, key: SessionKey, body: Incoming) -> SessionUpstream {
        let probed = Arc::new(AtomicBool::new(false));
        SessionUpstream {
            run: Box::pin(read(shared, key, body, probed.clone())),
            probed,
            ended: false,
        }
    }

    /// The answer to the probes that came since the last one, if any did.
    fn probe_answer(&self) -> Option<Frame<Chunks>> {
        self.probed.swap(false, Ordering::AcqRel).then(|| {
            let no_op = Packet::new(PacketType::NoOp, 0, Bytes::new()).to_bytes();
            Frame::data(Chunks::from(no_op))
        })
    }
}

/// Whether `packet` is a probe of the upstream (answered, not applied).
fn is_probe(packet: &Packet) -> bool {
    packet.kind == PacketType::NoOp && packet.conn_id == 0
}

/// What one frame wait brought.
enum Next {
    Data(Bytes),
    End,
    Silent,
    Stopping,
}

/// Reads the upstream until it ends, applying its packets run by run.
async fn read(
    shared: Arc<Shared>,
    key: SessionKey,
    mut body: Incoming,
    probed: Arc<AtomicBool>,
) -> Result<(), UpstreamError> {
    static LINK_BUSY: WarningLimit = WarningLimit::new(Duration::from_secs(10));
    let config = &shared.config;
    let mut decoder = Decoder::new(config.max_packet_size);
    let mut stopping = shared.stopping.clone();
    loop {
        let next = tokio::select! {
            frame = tokio::time::timeout(config.pull_wait, body.frame()) => match frame {
                Err(_) => Next::Silent,
                Ok(None) => Next::End,
                Ok(Some(frame)) => match frame?.into_data() {
                    Ok(data) => Next::Data(data),
                    // Trailers carry nothing for us.
                    Err(_) => continue,
                },
            },
            _ = crate::state::stopped(&mut stopping) => Next::Stopping,
        };
        let data = match next {
            Next::Data(data) => data,
            Next::End => return decoder.finish().map_err(UpstreamError::from),
            Next::Silent => {
                tracing::debug!(
                    session = key.id,
                    "session upstream silent for the pull wait; ended"
                );
                return Ok(());
            }
            Next::Stopping => return Ok(()),
        };
        decoder.feed_bytes(data);
        loop {
            let mut run = decoder.take_whole()?;
            if run.is_empty() {
                break;
            }
            let mut list = decode_all(run.clone(), config.max_packet_size)?;
            shared.metrics.received_up(run.len());
            // A probe comes alone, as the first bytes of an upstream (or between batches).
            if list.iter().any(is_probe) {
                list.retain(|p| !is_probe(p));
                probed.store(true, Ordering::Release);
                if list.is_empty() {
                    continue;
                }
                run = encode_all(&list);
            }
            match apply_push(&shared, key, vec![run], list).await {
                Ok(answers) if answers.is_empty() => {}
                Ok(answers) => shared.table().queue_session_answers(key.id, &answers),
                // Lost like a push that failed; the connections retransmit.
                Err(PushRefused::LinkBusy(why)) => {
                    tunnel_proto::warn_limited!(
                        LINK_BUSY,
                        session = key.id,
                        "{why}; packets of a session upstream dropped"
                    );
                }
                Err(refused @ PushRefused::Malformed(_)) => {
                    return Err(UpstreamError::Refused(refused.reason()))
                }
                Err(PushRefused::UnknownSession) => return Ok(()),
            }
        }
    }
}

impl Body for SessionUpstream {
    type Data = Chunks;
    type Error = UpstreamError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Chunks>, UpstreamError>>> {
        if !self.ended {
            match self.run.as_mut().poll(cx) {
                Poll::Pending => {}
                Poll::Ready(Ok(())) => self.ended = true,
                Poll::Ready(Err(error)) => {
                    self.ended = true;
                    tracing::debug!(%error, "session upstream reset");
                    return Poll::Ready(Some(Err(error)));
                }
            }
        }
        // Probes read during this poll are answered, also by an upstream that just ended.
        if let Some(answer) = self.probe_answer() {
            return Poll::Ready(Some(Ok(answer)));
        }
        if self.ended {
            Poll::Ready(None)
        } else {
            Poll::Pending
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended && !self.probed.load(Ordering::Acquire)
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}
