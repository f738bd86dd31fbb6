//! The session's pull loop: keeps one pull (streamed or polled, see [`super::mode`]) held at
//! the relay while the session has connections, and dispatches what comes back.
//!
//! - **Polling**: the next pull is sent before the packets of the last one are handed out,
//!   so the relay is (almost) never without a held pull.
//! - **Streaming**: the packets of a stream are handed out chunk by chunk as they arrive;
//!   when the relay ends the stream (after its pull wait or size limit), the next one is
//!   opened at once.

use bytes::Bytes;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;
use tunnel_proto::backoff::Backoff;
use tunnel_proto::{Decoder, Packet};

use super::mode::Downstream;
use super::ClientSession;
use crate::http::{Failure, Relay, RequestError, SessionKey};

/// How one pull ended.
enum Fetched {
    /// A completed pull, with its packets (not yet handed out).
    Polled(Vec<Packet>),
    /// A stream ended by the relay; its packets were handed out as they came.
    StreamEnded,
    /// A stream delivered nothing within the probe deadline (after waiting this long): the
    /// path buffers. Whatever it still brings is handed out by a task of its own.
    StreamBuffered(Duration),
}

type FetchResult = Result<Fetched, RequestError>;

/// A pull in flight, with the session it was made in.
struct Held {
    key: Arc<SessionKey>,
    task: JoinHandle<FetchResult>,
}

/// Sends the next pull, streamed or polled as the mode says.
fn start_pull(session: &Arc<ClientSession>, key: Arc<SessionKey>) -> Held {
    let task = {
        let session = session.clone();
        let key = key.clone();
        match session.mode.current() {
            Downstream::Streaming => tokio::spawn(async move { stream(session, key).await }),
            Downstream::Polling => tokio::spawn(async move {
                session.mode.poll_made();
                session.relay.session_pull(&key).await.map(Fetched::Polled)
            }),
        }
    };
    Held { key, task }
}

/// Reads one streamed pull, handing out its packets as they arrive.
///
/// The probe (`Auto` mode): the relay writes a packet at once, so the response's headers and
/// first bytes must come within the probe timeout of sending the request. A proxy that
/// buffers holds back the headers or the body until the stream ends.
async fn stream(session: Arc<ClientSession>, key: Arc<SessionKey>) -> FetchResult {
    let config = &session.config;
    let probe_deadline = session
        .mode
        .probes()
        .then(|| Instant::now() + config.stream_probe_timeout);
    session.mode.stream_opened();
    let sent = Instant::now();
    let mut reader = StreamReader::new(config.max_packet_size);
    let mut opening = {
        let (session, key) = (session.clone(), key.clone());
        Box::pin(async move { session.relay.session_stream(&key).await })
    };
    let mut response = match probe_deadline {
        None => opening.await?,
        Some(deadline) => match tokio::time::timeout_at(deadline, &mut opening).await {
            Ok(response) => response?,
            Err(_) => {
                // Wait for the answer in the background: the pull that replaces this stream
                // makes the relay end it, and the proxy then delivers what it held.
                let (session, key) = (session.clone(), key.clone());
                tokio::spawn(async move {
                    match opening.await {
                        Ok(response) => drain(session, key, response, reader).await,
                        // No answer at all: the path failed, it did not buffer.
                        Err(e) => session.mode.probe_unanswered(key.id, &e),
                    }
                });
                return Ok(Fetched::StreamBuffered(sent.elapsed()));
            }
        },
    };
    loop {
        let chunk = match probe_deadline.filter(|_| !reader.got_bytes) {
            Some(deadline) => {
                match tokio::time::timeout_at(deadline, Relay::stream_chunk(&mut response)).await {
                    Ok(chunk) => chunk?,
                    Err(_) => {
                        tokio::spawn(drain(session.clone(), key.clone(), response, reader));
                        return Ok(Fetched::StreamBuffered(sent.elapsed()));
                    }
                }
            }
            None => Relay::stream_chunk(&mut response).await?,
        };
        let Some(chunk) = chunk else {
            reader.finish()?;
            if probe_deadline.is_some() && !reader.got_bytes {
                // The relay writes a packet at once: an empty answer is not a stream.
                return Ok(Fetched::StreamBuffered(sent.elapsed()));
            }
            return Ok(Fetched::StreamEnded);
        };
        let first = !reader.got_bytes;
        let packets = reader.feed(chunk)?;
        if first && reader.got_bytes {
            session.request_succeeded();
            if probe_deadline.is_some() {
                session.mode.stream_works(key.id);
            }
        }
        session.dispatch(packets, key.generation);
    }
}

/// Hands out what is left of a stream given up by the probe, until it ends or fails.
async fn drain(
    session: Arc<ClientSession>,
    key: Arc<SessionKey>,
    mut response: reqwest::Response,
    mut reader: StreamReader,
) {
    while let Ok(Some(chunk)) = Relay::stream_chunk(&mut response).await {
        match reader.feed(chunk) {
            Ok(packets) => session.dispatch(packets, key.generation),
            Err(_) => return,
        }
    }
}

/// Packets out of a stream's chunks.
struct StreamReader {
    decoder: Decoder,
    got_bytes: bool,
}

impl StreamReader {
    fn new(max_packet_size: usize) -> StreamReader {
        StreamReader {
            decoder: Decoder::new(max_packet_size),
            got_bytes: false,
        }
    }

    /// The whole packets `chunk` completes.
    fn feed(&mut self, chunk: Bytes) -> Result<Vec<Packet>, RequestError> {
        self.got_bytes |= !chunk.is_empty();
        self.decoder.feed_bytes(chunk);
        let mut packets = Vec::new();
        while let Some(packet) = self.decoder.next_packet().map_err(bad_body)? {
            packets.push(packet);
        }
        Ok(packets)
    }

    /// The stream ended: it must not end inside a packet.
    fn finish(&self) -> Result<(), RequestError> {
        self.decoder.finish().map_err(bad_body)
    }
}

fn bad_body(e: tunnel_proto::DecodeError) -> RequestError {
    RequestError::BadBody(format!("streamed pull: {e}"))
}

/// Waits for the held pull; `None` (the pull aborted) when the session is over meanwhile.
async fn held_until_done(
    session: &ClientSession,
    mut task: JoinHandle<FetchResult>,
) -> Option<Result<FetchResult, tokio::task::JoinError>> {
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
            Ok(fetched) => {
                backoff.reset();
                let packets = match fetched {
                    Fetched::Polled(packets) => {
                        session.request_succeeded();
                        packets
                    }
                    Fetched::StreamEnded => Vec::new(),
                    Fetched::StreamBuffered(waited) => {
                        session.mode.stream_buffered(key.id, waited);
                        Vec::new()
                    }
                };
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
