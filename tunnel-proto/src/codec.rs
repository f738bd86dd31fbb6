//! Decoding packets from bytes as they arrive.
//!
//! Two entry points share one header check (the crate-private `packet::Header`):
//! - [`Decoder`] for a stream (the broker link, an HTTP body read chunk by chunk): feed bytes,
//!   take whole packets out; a partial packet waits for more bytes.
//! - [`decode_all`] for a body already held whole as `Bytes`: every payload is a slice of it.
//!
//! The size field is checked against the configured maximum as soon as the header is in, so a
//! hostile size never makes us reserve memory for it.

use bytes::{Bytes, BytesMut};

use crate::chunks::Chunks;
use crate::error::DecodeError;
use crate::packet::{Header, Packet, DEFAULT_MAX_PACKET_SIZE, HEADER_LEN};

/// Streaming packet decoder with a bounded buffer. After its first error it stays failed,
/// because the stream has lost its framing (docs/protocol.md §1). `Default` uses
/// [`DEFAULT_MAX_PACKET_SIZE`].
#[derive(Debug)]
pub struct Decoder {
    /// Bytes fed by copy (`feed`, `buffer_mut`), or the start of a packet that a chunk given
    /// by [`Decoder::feed_bytes`] cut off. Comes before `chunk` in the stream.
    buf: BytesMut,
    /// The rest of a chunk given by [`Decoder::feed_bytes`], taken from without a copy.
    chunk: Bytes,
    max_packet_size: usize,
    /// Set after the first error: the stream has lost its framing for good.
    failed: Option<DecodeError>,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder::new(DEFAULT_MAX_PACKET_SIZE)
    }
}

impl Decoder {
    /// A decoder that rejects packets larger than `max_packet_size` bytes (header included;
    /// values below 24 are raised to 24).
    pub fn new(max_packet_size: usize) -> Decoder {
        Decoder {
            buf: BytesMut::new(),
            chunk: Bytes::new(),
            max_packet_size: max_packet_size.max(HEADER_LEN),
            failed: None,
        }
    }

    /// Appends received bytes. The buffer never holds more than one packet's worth of
    /// undecoded bytes plus what the caller feeds between calls to [`Decoder::next_packet`].
    pub fn feed(&mut self, bytes: &[u8]) {
        self.spill_chunk();
        self.buf.extend_from_slice(bytes);
    }

    /// Appends a received chunk (an HTTP body's frame) without copying it: the packets
    /// that lie whole in it are handed out as slices of it. Only a packet cut by the chunk's
    /// edges is copied, into the buffer, from where the next chunk completes it (a profile
    /// of a download found the copy of every chunk at a tenth of the client's time). Take
    /// the packets out before feeding the next chunk, or that one is copied.
    pub fn feed_bytes(&mut self, mut bytes: Bytes) {
        self.spill_chunk();
        // Complete the packet begun in the buffer with just the bytes it lacks.
        while !self.buf.is_empty() && !bytes.is_empty() {
            let lacking = self.wanted();
            if lacking == 0 {
                break;
            }
            let take = lacking.min(bytes.len());
            self.buf.extend_from_slice(&bytes.split_to(take));
        }
        self.chunk = bytes;
    }

    /// Moves the rest of a chunk into the buffer (copying it), so that the buffer again
    /// holds everything not yet taken.
    fn spill_chunk(&mut self) {
        if !self.chunk.is_empty() {
            let chunk = std::mem::take(&mut self.chunk);
            self.buf.extend_from_slice(&chunk);
        }
    }

    /// Direct access to the buffer, for reading from a socket straight into it
    /// (`AsyncReadExt::read_buf`).
    pub fn buffer_mut(&mut self) -> &mut BytesMut {
        self.spill_chunk();
        &mut self.buf
    }

    /// Bytes received but not yet returned as packets.
    pub fn buffered(&self) -> usize {
        self.buf.len() + self.chunk.len()
    }

    /// Where the next packet is read from: the buffer while it holds anything (a packet
    /// begun there is completed there), else the chunk. A packet that the chunk does not
    /// hold whole moves to the buffer, so the buffer is the one place partial packets wait.
    fn settle(&mut self) {
        if self.buf.is_empty() && !self.chunk.is_empty() {
            let whole = self.chunk.len() >= HEADER_LEN
                && Header::parse(&self.chunk, self.max_packet_size)
                    .map_or(true, |h| self.chunk.len() >= h.size);
            if !whole {
                self.spill_chunk();
            }
        } else if !self.buf.is_empty() && self.wanted() > 0 {
            self.spill_chunk();
        }
    }

    /// How many more bytes are needed before the next packet can be returned (at least 1
    /// when a packet is incomplete, 0 when one is ready or nothing is buffered).
    pub fn wanted(&self) -> usize {
        let next: &[u8] = if self.buf.is_empty() {
            &self.chunk
        } else {
            &self.buf
        };
        if next.len() < HEADER_LEN {
            return if next.is_empty() {
                0
            } else {
                HEADER_LEN - next.len()
            };
        }
        match Header::parse(next, self.max_packet_size) {
            Ok(h) => h.size.saturating_sub(next.len()),
            Err(_) => 0,
        }
    }

    /// The next whole packet, `Ok(None)` if more bytes are needed, or the error that ended the
    /// stream (returned again on every later call).
    pub fn next_packet(&mut self) -> Result<Option<Packet>, DecodeError> {
        Ok(self.next_packet_and_wire()?.map(|(packet, _)| packet))
    }

    /// As [`Decoder::next_packet`], with the bytes the packet was decoded from (header
    /// included; the payload is a slice of them), for a relay that passes the packet on
    /// unchanged: writing those bytes out again costs no encoding and no second checksum.
    pub fn next_packet_and_wire(&mut self) -> Result<Option<(Packet, Bytes)>, DecodeError> {
        if let Some(err) = &self.failed {
            return Err(err.clone());
        }
        self.settle();
        let result = if self.buf.is_empty() {
            if self.chunk.is_empty() {
                return Ok(None);
            }
            // Whole in the chunk (see `settle`): a slice of it.
            Header::parse(&self.chunk, self.max_packet_size).and_then(|header| {
                let bytes = self.chunk.split_to(header.size);
                header.finish(bytes.clone()).map(|p| Some((p, bytes)))
            })
        } else {
            if self.buf.len() < HEADER_LEN {
                return Ok(None);
            }
            Header::parse(&self.buf, self.max_packet_size).and_then(|header| {
                if self.buf.len() < header.size {
                    // Reserve for the rest of this packet only; bounded by max_packet_size.
                    self.buf.reserve(header.size - self.buf.len());
                    return Ok(None);
                }
                let bytes = self.buf.split_to(header.size).freeze();
                header.finish(bytes.clone()).map(|p| Some((p, bytes)))
            })
        };
        if let Err(err) = &result {
            self.fail(err.clone());
        }
        result
    }

    /// The stream has lost its framing: nothing more is decoded.
    fn fail(&mut self, err: DecodeError) {
        self.failed = Some(err);
        self.buf = BytesMut::new();
        self.chunk = Bytes::new();
    }

    /// The whole packets buffered so far, back to back as they came (empty if none is whole
    /// yet), for a caller that forwards them as they are and decodes them with
    /// [`decode_all`]. Only the headers are checked here (sizes, version, type); a bad one
    /// fails the stream as [`Decoder::next_packet`] would, once the whole packets before it
    /// are taken.
    pub fn take_whole(&mut self) -> Result<Bytes, DecodeError> {
        if let Some(err) = &self.failed {
            return Err(err.clone());
        }
        self.settle();
        let from_chunk = self.buf.is_empty();
        let next: &[u8] = if from_chunk { &self.chunk } else { &self.buf };
        let mut whole = 0;
        let mut lacking = 0;
        while next.len() - whole >= HEADER_LEN {
            match Header::parse(&next[whole..], self.max_packet_size) {
                Ok(header) if next.len() - whole >= header.size => whole += header.size,
                Ok(header) => {
                    lacking = header.size - (next.len() - whole);
                    break;
                }
                // The packets before a bad header are handed out first; the next call
                // fails on it (so errors come in stream order, as with `next_packet`).
                Err(_) if whole > 0 => break,
                Err(err) => {
                    self.fail(err.clone());
                    return Err(err);
                }
            }
        }
        if from_chunk {
            let run = self.chunk.split_to(whole);
            // The packet the chunk cut off waits in the buffer for the next chunk.
            self.spill_chunk();
            self.buf.reserve(lacking);
            Ok(run)
        } else {
            self.buf.reserve(lacking);
            Ok(self.buf.split_to(whole).freeze())
        }
    }

    /// Call at the end of the stream: an error if a packet was cut off.
    pub fn finish(&self) -> Result<(), DecodeError> {
        if let Some(err) = &self.failed {
            return Err(err.clone());
        }
        match self.buffered() {
            0 => Ok(()),
            n => Err(DecodeError::Truncated {
                missing: self.wanted().max(1).max(HEADER_LEN.saturating_sub(n)),
            }),
        }
    }
}

/// Decodes a complete body of back-to-back packets, each at most `max_packet_size` bytes
/// (header included). Payloads are slices of `body`. The first bad packet fails the whole
/// body, and a body that ends inside a packet is [`DecodeError::Truncated`].
pub fn decode_all(mut body: Bytes, max_packet_size: usize) -> Result<Vec<Packet>, DecodeError> {
    let mut packets = Vec::new();
    while !body.is_empty() {
        if body.len() < HEADER_LEN {
            return Err(DecodeError::Truncated {
                missing: HEADER_LEN - body.len(),
            });
        }
        let header = Header::parse(&body, max_packet_size)?;
        if body.len() < header.size {
            return Err(DecodeError::Truncated {
                missing: header.size - body.len(),
            });
        }
        let bytes = body.split_to(header.size);
        packets.push(header.finish(bytes)?);
    }
    Ok(packets)
}

/// Encodes packets back to back into one body.
pub fn encode_all<'a>(packets: impl IntoIterator<Item = &'a Packet>) -> Bytes {
    let mut out = BytesMut::new();
    for p in packets {
        p.encode(&mut out);
    }
    out.freeze()
}

impl From<PacketParts> for Chunks {
    fn from(parts: PacketParts) -> Chunks {
        Chunks::from(parts.into_parts())
    }
}

/// Payloads at least this long are referenced by [`PacketParts`], not copied.
const SHARED_PAYLOAD: usize = 4 * 1024;

/// Packets encoded back to back as a list of buffers whose concatenation is the wire
/// format, for a write with vectored I/O (the client's push bodies, the broker's link
/// writer): headers and short payloads are copied into shared buffers, long payloads are
/// referenced as they are (their `Bytes` share the sender's memory). [`encode_all`] copies
/// every payload into one buffer; profiles found that copy at a tenth of the client's time
/// during an upload and 5 % of the broker's during a download.
#[derive(Debug, Default)]
pub struct PacketParts {
    parts: Vec<Bytes>,
    /// Headers and short payloads since the last long payload.
    tail: BytesMut,
    len: usize,
}

impl PacketParts {
    /// No packets yet.
    pub fn new() -> PacketParts {
        PacketParts::default()
    }

    /// Appends one encoded packet.
    pub fn push(&mut self, packet: &Packet) {
        self.len += packet.wire_len();
        if packet.payload.len() < SHARED_PAYLOAD {
            packet.encode(&mut self.tail);
            return;
        }
        packet.encode_header(&mut self.tail);
        self.parts.push(self.tail.split().freeze());
        self.parts.push(packet.payload.clone());
    }

    /// Appends packets already encoded, as they were received (a relay passing a broker's
    /// packets on): from 4 KiB up they are referenced, shorter ones copied.
    pub fn push_encoded(&mut self, wire: Bytes) {
        self.len += wire.len();
        if wire.len() < SHARED_PAYLOAD {
            self.tail.extend_from_slice(&wire);
            return;
        }
        if !self.tail.is_empty() {
            self.parts.push(self.tail.split().freeze());
        }
        self.parts.push(wire);
    }

    /// Bytes on the wire so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no packet was pushed.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The buffers, in wire order (none empty).
    pub fn into_parts(mut self) -> Vec<Bytes> {
        if !self.tail.is_empty() {
            self.parts.push(self.tail.freeze());
        }
        self.parts
    }

    /// The packets as one buffer, for a body sent whole: copied together unless they are
    /// one buffer already. A body that can be a list of buffers takes [`Chunks`] instead
    /// (`From<PacketParts>`), without the copy.
    pub fn into_bytes(self) -> Bytes {
        let mut parts = self.into_parts();
        match parts.len() {
            0 => Bytes::new(),
            1 => parts.pop().unwrap_or_default(),
            _ => {
                let mut out = BytesMut::with_capacity(parts.iter().map(Bytes::len).sum());
                for part in &parts {
                    out.extend_from_slice(part);
                }
                out.freeze()
            }
        }
    }
}
