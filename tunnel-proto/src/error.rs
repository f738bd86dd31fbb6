//! Typed errors of the codec and of the payload decoders.

use thiserror::Error;

/// Why a packet could not be decoded. After any of these the byte stream it came from has
/// lost its framing and must be dropped (an HTTP body answered with 400, a link closed).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    #[error("unsupported protocol version {0} (expected 1)")]
    BadVersion(u16),
    #[error("packet size {0} is below the 24-byte header")]
    SizeTooSmall(u32),
    #[error("packet size {size} exceeds the maximum of {max} bytes")]
    SizeTooLarge { size: u32, max: usize },
    #[error("checksum mismatch: packet carries {carried:#010x}, content gives {computed:#010x}")]
    BadChecksum { carried: u32, computed: u32 },
    #[error("unknown packet type {0}")]
    UnknownType(u16),
    #[error("body ends inside a packet ({missing} more bytes were expected)")]
    Truncated { missing: usize },
}

/// Why the payload of a well-formed packet does not have the shape its type requires.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PayloadError {
    #[error("{what}: payload ends early (needed {needed} more bytes)")]
    Truncated { what: &'static str, needed: usize },
    #[error("{what}: {extra} unexpected bytes after the payload")]
    TrailingBytes { what: &'static str, extra: usize },
    #[error("{what}: not valid UTF-8")]
    BadUtf8 { what: &'static str },
    #[error("{what}: length {len} outside {min}..={max}")]
    BadLength {
        what: &'static str,
        len: usize,
        min: usize,
        max: usize,
    },
    #[error("{what}: invalid value {value}")]
    BadValue { what: &'static str, value: u32 },
    #[error("expected a {expected:?} packet, got {got:?}")]
    WrongType {
        expected: crate::PacketType,
        got: crate::PacketType,
    },
}
