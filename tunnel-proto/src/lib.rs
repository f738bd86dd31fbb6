//! The wire protocol of the HTTP tunnel, without any I/O.
//!
//! - [`packet`]: the 24-byte-header packet and its thirteen types.
//! - [`codec`]: decoding packets from a byte stream or a whole body, with typed errors.
//! - [`payload`]: typed payloads (LINK_INIT, CONN_INIT, options, selective acks, reasons).
//! - [`connection`]: the reliable, flow-controlled connection as a sans-IO state machine,
//!   shared by the client and the broker.

pub mod codec;
pub mod connection;
pub mod error;
pub mod packet;
pub mod payload;
pub mod seq;

pub use codec::{decode_all, encode_all, Decoder};
pub use connection::{Connection, ConnectionConfig};
pub use error::{DecodeError, PayloadError};
pub use packet::{Packet, PacketType};
pub use payload::Token;
