//! A queue of buffers read as one ([`Chunks`]), for vectored writes of data that is already
//! in several `Bytes`: received payloads going to a socket, encoded packets
//! ([`PacketParts`](crate::codec::PacketParts)) going to a link. Writing them with
//! `write_all_buf` gathers them into one `writev` instead of copying them into one buffer.

use std::collections::VecDeque;
use std::io::IoSlice;

use bytes::{Buf, Bytes};

/// Buffers in order, read as one [`Buf`] whose `chunks_vectored` lists them all.
#[derive(Debug, Default)]
pub struct Chunks {
    queue: VecDeque<Bytes>,
    len: usize,
}

impl Chunks {
    /// Appends a buffer (an empty one is skipped).
    pub fn push(&mut self, chunk: Bytes) {
        if !chunk.is_empty() {
            self.len += chunk.len();
            self.queue.push_back(chunk);
        }
    }

    /// How many buffers are left.
    pub fn count(&self) -> usize {
        self.queue.len()
    }
}

impl From<Bytes> for Chunks {
    fn from(chunk: Bytes) -> Chunks {
        let mut chunks = Chunks::default();
        chunks.push(chunk);
        chunks
    }
}

impl From<Vec<Bytes>> for Chunks {
    fn from(parts: Vec<Bytes>) -> Chunks {
        let mut chunks = Chunks::default();
        for part in parts {
            chunks.push(part);
        }
        chunks
    }
}

impl Buf for Chunks {
    fn remaining(&self) -> usize {
        self.len
    }

    fn chunk(&self) -> &[u8] {
        self.queue.front().map_or(&[], |c| c.as_ref())
    }

    fn chunks_vectored<'a>(&'a self, dst: &mut [IoSlice<'a>]) -> usize {
        let mut n = 0;
        for (slot, chunk) in dst.iter_mut().zip(&self.queue) {
            *slot = IoSlice::new(chunk);
            n += 1;
        }
        n
    }

    fn advance(&mut self, mut cnt: usize) {
        self.len -= cnt;
        while cnt > 0 {
            let Some(front) = self.queue.front_mut() else {
                return;
            };
            if front.len() > cnt {
                front.advance(cnt);
                return;
            }
            cnt -= front.len();
            self.queue.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_one_buffer_across_their_parts() {
        let mut chunks = Chunks::from(vec![Bytes::from_static(b"abc"), Bytes::new()]);
        chunks.push(Bytes::from_static(b"defg"));
        assert_eq!(chunks.count(), 2, "the empty one is skipped");
        let mut slices = [IoSlice::new(&[]); 4];
        assert_eq!(chunks.chunks_vectored(&mut slices), 2);
        assert_eq!(&*slices[1], b"defg");
        chunks.advance(4);
        assert_eq!((chunks.remaining(), chunks.chunk()), (3, &b"efg"[..]));
        chunks.advance(3);
        assert_eq!((chunks.remaining(), chunks.chunk()), (0, &b""[..]));
    }
}
