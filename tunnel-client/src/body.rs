//! Request bodies made of several buffers sent one after another: a push's packets as
//! [`PacketParts`](tunnel_proto::PacketParts) encodes them, headers and short payloads in
//! shared buffers and long payloads as the connection's own `Bytes`. HTTP/1.1 writes the
//! buffers with vectored writes and HTTP/2 as DATA frames that point at them, so no payload
//! is copied into a body buffer on the way. The exact length goes in `Content-Length`.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};

/// The buffers of one request body. Cloning is cheap (the buffers are shared), so a failed
/// request can be sent again.
#[derive(Debug, Clone, Default)]
pub struct PartsBody {
    parts: Vec<Bytes>,
    /// The first part not yet handed out.
    next: usize,
    remaining: u64,
}

impl PartsBody {
    /// A body of `parts`, in order.
    pub fn new(parts: Vec<Bytes>) -> PartsBody {
        let remaining = parts.iter().map(|p| p.len() as u64).sum();
        PartsBody {
            parts,
            next: 0,
            remaining,
        }
    }

    /// Bytes not yet handed out (all of them before the body is sent).
    pub fn len(&self) -> usize {
        self.remaining as usize
    }

    /// Whether nothing is left to send.
    pub fn is_empty(&self) -> bool {
        self.remaining == 0
    }

    /// The next non-empty buffer, if any.
    pub fn next_part(&mut self) -> Option<Bytes> {
        while let Some(part) = self.parts.get_mut(self.next) {
            self.next += 1;
            if !part.is_empty() {
                self.remaining -= part.len() as u64;
                return Some(std::mem::take(part));
            }
        }
        None
    }
}

impl From<Bytes> for PartsBody {
    fn from(bytes: Bytes) -> PartsBody {
        PartsBody::new(vec![bytes])
    }
}

impl http_body::Body for PartsBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.get_mut().next_part().map(|part| Ok(Frame::data(part))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn the_parts_come_out_in_order_with_their_exact_length() {
        let body = PartsBody::new(vec![
            Bytes::from_static(b"ab"),
            Bytes::new(),
            Bytes::from_static(b"cde"),
        ]);
        assert_eq!(http_body::Body::size_hint(&body).exact(), Some(5));
        let again = body.clone();
        let collected = body.collect().await.unwrap().to_bytes();
        assert_eq!(&collected[..], b"abcde");
        // A clone taken before sending sends everything again (a retried push).
        let mut frames = Vec::new();
        let mut again = again;
        while let Some(part) = again.next_part() {
            frames.push(part);
        }
        assert_eq!(frames, [&b"ab"[..], &b"cde"[..]]);
        assert!(http_body::Body::is_end_stream(&again));
    }
}
