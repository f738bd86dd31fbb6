//! The client side of the HTTP tunnel.
//!
//! - [`stream`]: [`TunnelStream`], the async byte stream over a `tunnel_proto::Connection`,
//!   and its driver (shared with the broker).

pub mod stream;

pub use stream::{ConnHandle, PacketSink, TunnelStream};
