//! The packet: a 24-byte header and a payload (docs/protocol.md §1).
//!
//! ```text
//! offset size  field
//! 0      2     version    1
//! 2      2     type
//! 4      4     size       whole packet, header included
//! 8      4     conn_id
//! 12     4     seq        sequence number, or acknowledged number on ACK
//! 16     2     window     the sender's receive window, in packets
//! 18     2     flags      0 in version 1, ignored on receipt
//! 20     4     checksum   CRC-32 of the header (this field zeroed) and the payload
//! ```
//!
//! All integers are big-endian; packets follow each other with no other framing.
//!
//! Encoding writes into a `BytesMut`; decoding (see [`crate::codec`]) hands out payloads as
//! `Bytes` slices of the received buffer, so payload bytes are never copied.

use byteorder::{BigEndian, ByteOrder};
use bytes::{BufMut, Bytes, BytesMut};

use crate::error::DecodeError;

/// The only protocol version this crate speaks.
pub const VERSION: u16 = 1;
/// Length of the fixed header, in bytes.
pub const HEADER_LEN: usize = 24;
/// Default largest DATA payload this end sends, in bytes (64 KiB); see
/// [`ConnectionConfig::max_data_payload`](crate::ConnectionConfig::max_data_payload).
pub const DEFAULT_MAX_DATA_PAYLOAD: usize = 64 * 1024;
/// Default largest whole packet a decoder accepts, in bytes: header + 1 MiB (the relay's
/// `--max-packet`, docs/protocol.md §7).
pub const DEFAULT_MAX_PACKET_SIZE: usize = HEADER_LEN + 1024 * 1024;

const CHECKSUM_OFFSET: usize = 20;

/// The packet types of version 1 and their wire codes (the table in docs/protocol.md §1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum PacketType {
    /// 1: opens a connection. Client→relay with an empty payload (the connect request),
    /// relay→client with the token as payload, relay→broker with a
    /// [`BrokerConnInit`](crate::payload::BrokerConnInit) payload (docs/protocol.md §3).
    ConnInit = 1,
    /// 2: the broker accepts the connection; `window` is its first receive window. Empty
    /// payload.
    ConnInitAck = 2,
    /// 3: the broker refuses a connection, or the relay refuses a link (docs/protocol.md §5); the
    /// payload is a UTF-8 reason.
    ConnRejected = 3,
    /// 4: sequenced stream bytes, 1 ..= the sender's max data payload.
    Data = 4,
    /// 5: sequenced half-close: its sender sends no more DATA (docs/protocol.md §6). Empty
    /// payload.
    ConnClose = 5,
    /// 6: cumulative ack in `seq`, receive window in `window`, optional selective-ack blocks as
    /// payload (docs/protocol.md §4).
    Ack = 6,
    /// 7: broker→relay: the connection ended at the broker; the relay forgets it once its
    /// queue is delivered (docs/protocol.md §6). Empty payload.
    ConnShutdown = 7,
    /// 8: broker→relay, first packet on a link: server name, secret and the connections the
    /// broker still holds ([`LinkInit`](crate::payload::LinkInit), docs/protocol.md §5).
    LinkInit = 8,
    /// 9: ends a connection at once, from any part; optional UTF-8 reason. Not sequenced:
    /// undelivered data is discarded (docs/protocol.md §6).
    ConnAbort = 9,
    /// 10: sequenced connection option, u32 option and u32 value
    /// ([`ConnOption`](crate::payload::ConnOption), docs/protocol.md §6).
    ConnOption = 10,
    /// 11: broker→relay: whether the broker accepts new connections, one byte, 1 or 0
    /// (docs/protocol.md §5).
    ListenState = 11,
    /// 12: filler and keepalive, empty payload; answers a pull held with nothing queued.
    NoOp = 12,
    /// 13: relay→broker: the link is authenticated. Empty payload.
    LinkInitAck = 13,
    /// 14: opens a session (docs/protocol.md §2.1). Client→relay: conn_id 0, payload the
    /// idle timeout asked for ([`SessionRequest`](crate::payload::SessionRequest));
    /// relay→client: conn_id = the session id, payload the 16-byte session token.
    SessionInit = 14,
    /// 15: moves a connection into the session of the push that carries it (docs/protocol.md
    /// §2.1). Client→relay: the connection's token and server name
    /// ([`Attach`](crate::payload::Attach)); relay→client: empty payload, "attached".
    Attach = 15,
    /// 16: moves a connection between the links of a broker's relays (docs/protocol.md
    /// §5.2). Relay→broker: the connection's token ([`MoveRequest`](crate::payload::MoveRequest));
    /// broker→relay: the outcome ([`MoveAnswer`](crate::payload::MoveAnswer)).
    ConnMove = 16,
}

impl PacketType {
    /// Every type, in code order.
    pub const ALL: [PacketType; 16] = [
        PacketType::ConnInit,
        PacketType::ConnInitAck,
        PacketType::ConnRejected,
        PacketType::Data,
        PacketType::ConnClose,
        PacketType::Ack,
        PacketType::ConnShutdown,
        PacketType::LinkInit,
        PacketType::ConnAbort,
        PacketType::ConnOption,
        PacketType::ListenState,
        PacketType::NoOp,
        PacketType::LinkInitAck,
        PacketType::SessionInit,
        PacketType::Attach,
        PacketType::ConnMove,
    ];

    /// The type with wire code `code`, or `None` outside 1–16.
    pub fn from_code(code: u16) -> Option<PacketType> {
        match code {
            1..=16 => Some(Self::ALL[usize::from(code) - 1]),
            _ => None,
        }
    }

    /// The wire code, 1–16, written in header bytes 2–3.
    pub fn code(self) -> u16 {
        self as u16
    }

    /// Whether packets of this type carry a sequence number and are delivered reliably
    /// (DATA, CONN_CLOSE, CONN_OPTION).
    pub fn is_sequenced(self) -> bool {
        matches!(
            self,
            PacketType::Data | PacketType::ConnClose | PacketType::ConnOption
        )
    }
}

/// One decoded or to-be-encoded packet. The version, size and checksum header fields are not
/// stored: encoding writes them and decoding checks them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    /// The packet type (header bytes 2–3).
    pub kind: PacketType,
    /// The virtual connection the packet belongs to; 0 before the relay assigns one, and on
    /// link-level packets (LINK_INIT, LINK_INIT_ACK, LISTEN_STATE, a link's NO_OP).
    pub conn_id: u32,
    /// Sequence number (DATA, CONN_CLOSE, CONN_OPTION) or cumulative ack (ACK: everything up
    /// to and including this number has arrived); 0 otherwise.
    pub seq: u32,
    /// The sender's current receive window, in packets past its cumulative ack
    /// (docs/protocol.md §4).
    pub window: u16,
    /// Zero in version 1; ignored on receipt.
    pub flags: u16,
    /// Everything after the 24-byte header; its layout depends on `kind` (see
    /// [`crate::payload`]). Decoded packets share the received buffer.
    pub payload: Bytes,
}

impl Packet {
    /// A packet with zero seq, window and flags.
    pub fn new(kind: PacketType, conn_id: u32, payload: Bytes) -> Packet {
        Packet {
            kind,
            conn_id,
            seq: 0,
            window: 0,
            flags: 0,
            payload,
        }
    }

    /// The packet with `seq` set: a sequence number, or the cumulative ack on ACK.
    pub fn with_seq(mut self, seq: u32) -> Packet {
        self.seq = seq;
        self
    }

    /// The packet with `window` set, in packets. [`Connection`](crate::Connection) overwrites
    /// it with its own receive window on every packet it sends.
    pub fn with_window(mut self, window: u16) -> Packet {
        self.window = window;
        self
    }

    /// Size on the wire in bytes, header included: the value of the header's size field.
    pub fn wire_len(&self) -> usize {
        HEADER_LEN + self.payload.len()
    }

    /// Appends the encoded packet to `out`, with version 1, the size and the CRC-32 checksum
    /// filled in.
    ///
    /// Panics only if the payload exceeds `u32::MAX - 24` bytes, which no caller in this
    /// project can produce (payloads are bounded far below that).
    pub fn encode(&self, out: &mut BytesMut) {
        out.reserve(self.wire_len());
        self.encode_header(out);
        out.put_slice(&self.payload);
    }

    /// Appends the packet's header alone, checksum included, for a caller that sends the
    /// payload from its own buffer right after it (see
    /// [`PacketParts`](crate::codec::PacketParts)). Panics as [`encode`](Self::encode) does.
    pub fn encode_header(&self, out: &mut BytesMut) {
        let size = u32::try_from(self.wire_len()).expect("packet larger than 4 GiB");
        let start = out.len();
        out.put_u16(VERSION);
        out.put_u16(self.kind.code());
        out.put_u32(size);
        out.put_u32(self.conn_id);
        out.put_u32(self.seq);
        out.put_u16(self.window);
        out.put_u16(self.flags);
        out.put_u32(0);
        let sum = checksum(&out[start..start + HEADER_LEN], &self.payload);
        BigEndian::write_u32(&mut out[start + CHECKSUM_OFFSET..start + HEADER_LEN], sum);
    }

    /// The encoded packet as one buffer.
    pub fn to_bytes(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(self.wire_len());
        self.encode(&mut out);
        out.freeze()
    }
}

/// CRC-32 of a header whose checksum field is zero (or is zeroed here) followed by the payload.
fn checksum(header: &[u8], payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&header[..CHECKSUM_OFFSET]);
    hasher.update(&[0u8; 4]);
    hasher.update(payload);
    hasher.finalize()
}

/// A header parsed and checked for everything that can be checked before the payload has
/// arrived: version, size bounds and type.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Header {
    pub kind: PacketType,
    pub size: usize,
    pub conn_id: u32,
    pub seq: u32,
    pub window: u16,
    pub flags: u16,
    pub checksum: u32,
}

impl Header {
    /// Parses the first [`HEADER_LEN`] bytes of `buf`, which must hold at least that many.
    pub(crate) fn parse(buf: &[u8], max_size: usize) -> Result<Header, DecodeError> {
        debug_assert!(buf.len() >= HEADER_LEN);
        let version = BigEndian::read_u16(&buf[0..2]);
        if version != VERSION {
            return Err(DecodeError::BadVersion(version));
        }
        let size = BigEndian::read_u32(&buf[4..8]);
        if (size as usize) < HEADER_LEN {
            return Err(DecodeError::SizeTooSmall(size));
        }
        if size as usize > max_size {
            return Err(DecodeError::SizeTooLarge {
                size,
                max: max_size,
            });
        }
        let code = BigEndian::read_u16(&buf[2..4]);
        let kind = PacketType::from_code(code).ok_or(DecodeError::UnknownType(code))?;
        Ok(Header {
            kind,
            size: size as usize,
            conn_id: BigEndian::read_u32(&buf[8..12]),
            seq: BigEndian::read_u32(&buf[12..16]),
            window: BigEndian::read_u16(&buf[16..18]),
            flags: BigEndian::read_u16(&buf[18..20]),
            checksum: BigEndian::read_u32(&buf[20..24]),
        })
    }

    /// Checks the checksum over the whole packet `bytes` (header + payload, `self.size` long)
    /// and builds the packet, whose payload is a slice of `bytes`.
    pub(crate) fn finish(self, bytes: Bytes) -> Result<Packet, DecodeError> {
        debug_assert_eq!(bytes.len(), self.size);
        let actual = checksum(&bytes[..HEADER_LEN], &bytes[HEADER_LEN..]);
        if actual != self.checksum {
            return Err(DecodeError::BadChecksum {
                carried: self.checksum,
                computed: actual,
            });
        }
        Ok(Packet {
            kind: self.kind,
            conn_id: self.conn_id,
            seq: self.seq,
            window: self.window,
            flags: self.flags,
            payload: bytes.slice(HEADER_LEN..),
        })
    }
}
