//! The client side of the HTTP tunnel.
//!
//! - [`stream`]: [`TunnelStream`], the async byte stream over a `tunnel_proto::Connection`,
//!   and its driver (shared with the broker).
//! - [`TunnelStream::connect`] opens one through a relay over HTTP(S): [`config`] holds every
//!   tunable, [`http`] the relay's HTTP interface; `push`/`pull` are the two directions.
//! - [`forward`]: copying a local TCP connection to a tunnel connection and back.

pub mod auth;
pub mod backoff;
pub mod config;
mod connect;
pub mod error;
pub mod forward;
pub mod http;
mod pull;
mod push;
mod session;
pub mod stream;

pub use auth::RelayAuth;
pub use config::{ClientConfig, HttpVersion, ProxyConfig};
pub use connect::TunnelClient;
pub use error::ConnectError;
pub use stream::{ConnHandle, PacketSink, StreamConfig, TunnelStream};
