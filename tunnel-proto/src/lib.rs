//! The wire protocol of the HTTP tunnel (`docs/protocol.md` in the repository), without any
//! I/O, and with the `driver` feature the one async driver that client and broker share.
//!
//! - [`packet`]: the 24-byte-header packet and its thirteen types (§1).
//! - [`codec`]: decoding packets from a byte stream or a whole body, with typed errors,
//!   and encoding them as buffers for vectored writes ([`chunks`]).
//! - [`payload`]: typed payloads (LINK_INIT, CONN_INIT, options, selective acks, reasons).
//! - [`connection`]: the reliable, flow-controlled connection as a sans-IO state machine
//!   (§4, §6): time and packets go in as arguments, packets to send and bytes come out.
//! - [`seq`]: serial-number arithmetic on sequence numbers.
//! - [`secret`]: reading a link secret file the way the relay and broker binaries do.
//! - [`warn_limit`]: at most one warning of a kind per interval ([`warn_limited!`]).
//! - [`malloc`]: the allocator settings the binaries apply at start (fewer page faults).
//! - With the `driver` feature: [`driver`] ([`TunnelStream`], a tokio `AsyncRead` +
//!   `AsyncWrite` over any packet transport), [`splice`] (joining a tunnel stream to a
//!   socket with half-close, without copies) and [`backoff`] (retry delays).
//! - With the `runtime` feature: [`runtime`] (the tokio runtime the binaries build from
//!   their `--worker-threads`; one worker is the current-thread scheduler).
//!
//! # Example: a packet on the wire and back
//!
//! ```
//! use bytes::Bytes;
//! use tunnel_proto::{decode_all, encode_all, Packet, PacketType};
//!
//! let data = Packet::new(PacketType::Data, 7, Bytes::from_static(b"hello"));
//! let body = encode_all(&[data.clone()]); // what an HTTP body or the link carries
//! assert_eq!(body.len(), 24 + 5);
//! let decoded = decode_all(body, tunnel_proto::packet::DEFAULT_MAX_PACKET_SIZE).unwrap();
//! assert_eq!(decoded, vec![data]);
//! ```

#![warn(missing_docs)]

pub mod chunks;
pub mod codec;
pub mod connection;
pub mod error;
pub mod malloc;
pub mod packet;
pub mod payload;
pub mod secret;
pub mod seq;
pub mod warn_limit;

#[cfg(feature = "driver")]
pub mod backoff;
#[cfg(feature = "driver")]
pub mod driver;
#[cfg(feature = "runtime")]
pub mod runtime;
#[cfg(feature = "driver")]
pub mod splice;

pub use codec::{decode_all, encode_all, Decoder, PacketParts};
pub use connection::{Connection, ConnectionConfig};
#[cfg(feature = "driver")]
pub use driver::TunnelStream;
pub use error::{DecodeError, PayloadError};
pub use packet::{Packet, PacketType};
pub use payload::Token;
