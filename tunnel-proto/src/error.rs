//! Typed errors of the codec ([`DecodeError`]) and of the payload decoders ([`PayloadError`]),
//! as described in docs/protocol.md §1 ("Decoding rules").

use thiserror::Error;

/// Why a packet could not be decoded. After any of these the byte stream it came from has
/// lost its framing and must be dropped (an HTTP body answered with 400, a link closed).
///
/// A decoder checks the header's version, then its size, then its type, before it buffers
/// any payload, and the checksum once the whole packet is in (docs/protocol.md §1).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    /// The header's version field (bytes 0–1, carried here) is not 1.
    #[error("unsupported protocol version {0} (expected 1)")]
    BadVersion(u16),
    /// The header's size field (carried here) is below 24, the length of the header alone.
    #[error("packet size {0} is below the 24-byte header")]
    SizeTooSmall(u32),
    /// The header's size field is above the decoder's configured maximum; nothing is
    /// reserved for such a packet.
    #[error("packet size {size} exceeds the maximum of {max} bytes")]
    SizeTooLarge {
        /// Whole-packet size the header announces, in bytes.
        size: u32,
        /// Largest whole packet the decoder accepts, in bytes, header included.
        max: usize,
    },
    /// The CRC-32 in the header does not match the one computed over the received header
    /// (checksum field zeroed) and payload: the packet was corrupted.
    #[error("checksum mismatch: packet carries {carried:#010x}, content gives {computed:#010x}")]
    BadChecksum {
        /// Checksum the packet's header carries.
        carried: u32,
        /// Checksum computed over what was received.
        computed: u32,
    },
    /// The header's type field (carried here) is not one of the codes 1–16.
    #[error("unknown packet type {0}")]
    UnknownType(u16),
    /// A complete body (or a stream at its end) stops inside a packet.
    #[error("body ends inside a packet ({missing} more bytes were expected)")]
    Truncated {
        /// Bytes still missing to complete the packet (or its header, when the header
        /// itself is cut off).
        missing: usize,
    },
}

/// Why the payload of a well-formed packet does not have the shape its type requires.
///
/// The packet itself decoded fine, so the stream keeps its framing: the receiver drops or
/// refuses this one packet. In every variant, `what` names the payload being decoded, such as
/// `"LINK_INIT"` or `"CONN_OPTION"`.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PayloadError {
    /// The payload ends before a field it must contain.
    #[error("{what}: payload ends early (needed {needed} more bytes)")]
    Truncated {
        /// The payload being decoded.
        what: &'static str,
        /// Bytes missing to complete the field being read.
        needed: usize,
    },
    /// Bytes are left over after the last field. For ACK, the payload is not a whole number
    /// of 8-byte selective-ack blocks.
    #[error("{what}: {extra} unexpected bytes after the payload")]
    TrailingBytes {
        /// The payload being decoded.
        what: &'static str,
        /// Number of bytes left over.
        extra: usize,
    },
    /// A string field (server name, client address) is not valid UTF-8.
    #[error("{what}: not valid UTF-8")]
    BadUtf8 {
        /// The payload being decoded.
        what: &'static str,
    },
    /// A u16 length prefix is outside the range allowed for its field (for example a server
    /// name of 0 or more than 255 bytes).
    #[error("{what}: length {len} outside {min}..={max}")]
    BadLength {
        /// The payload being decoded.
        what: &'static str,
        /// Length the prefix announces, in bytes.
        len: usize,
        /// Smallest length allowed, in bytes.
        min: usize,
        /// Largest length allowed, in bytes.
        max: usize,
    },
    /// A field holds a value outside the ones it allows (a LISTEN_STATE byte other than 0 or 1).
    #[error("{what}: invalid value {value}")]
    BadValue {
        /// The payload being decoded.
        what: &'static str,
        /// The value found.
        value: u32,
    },
    /// The packet is not of the type whose payload the caller wanted to decode. The payload
    /// decoders of this crate do not check the type themselves and never return it; it is for
    /// callers that do.
    #[error("expected a {expected:?} packet, got {got:?}")]
    WrongType {
        /// The type the caller expected.
        expected: crate::PacketType,
        /// The type the packet has.
        got: crate::PacketType,
    },
}
