//! The streamed upstream of a session (docs/protocol.md §2.3):
//! `POST ?Type=push&Session=N&Stream=1`, made over HTTP/2, is a request whose body stays open
//! and carries the client's packets as it writes them, with no new request per batch.
//!
//! - The relay answers 200 at once, before any of the body, so the client can tell a path
//!   that passes the request on as it comes from one that holds the body back (the client
//!   then keeps pushing).
//! - The body is read as it arrives; each run of whole packets is applied as a push body is
//!   (`session_http::apply_push`). The answers a push would carry (ATTACH answers,
//!   CONN_ABORTs, last words) go down the session's pull instead.
//! - The response carries nothing. It ends when the request body ends, after `pull_wait`
//!   without a byte, when the session is gone or the relay stops; a malformed packet resets
//!   the stream.
//!
//! The reading runs inside the response body's `poll_frame`, on the task that serves the
//! stream: no task in between, and a slow broker link holds the reading back (HTTP/2 flow
//! control then holds the client back).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tunnel_proto::warn_limit::WarningLimit;
use tunnel_proto::{decode_all, DecodeError, Decoder};

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

/// The (empty) response body of a streamed upstream, which reads the request body while it
/// is polled.
pub(crate) struct SessionUpstream {
    run: Run,
    ended: bool,
}

impl SessionUpstream {
    pub(crate) fn new(shared: Arc<Shared>, key: SessionKey, body: Incoming) -> SessionUpstream {
        SessionUpstream {
            run: Box::pin(read(shared, key, body)),
            ended: false,
        }
    }
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
            let run = decoder.take_whole()?;
            if run.is_empty() {
                break;
            }
            let list = decode_all(run.clone(), config.max_packet_size)?;
            shared.metrics.received_up(run.len());
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
    type Data = Bytes;
    type Error = UpstreamError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, UpstreamError>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        match self.run.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(result) => {
                self.ended = true;
                match result {
                    Ok(()) => Poll::Ready(None),
                    Err(error) => {
                        tracing::debug!(%error, "session upstream reset");
                        Poll::Ready(Some(Err(error)))
                    }
                }
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
