//! The broker side of the HTTP tunnel: a [`TunnelListener`] that a server uses like a TCP
//! listener. It dials the relay's link port (PROTOCOL.md §5), authenticates with LINK_INIT,
//! and hands out one [`TunnelStream`] per client connection (§3). When the link is lost it
//! redials with back-off and re-announces its live connections, which keep running meanwhile.
//!
//! Modules, one job each:
//! - [`config`]: [`BrokerConfig`] and its defaults; [`tls`]: TLS for the link.
//! - `dial`: one dial and handshake; `link`: reading and writing one established link;
//!   `demux`: routing packets read from the link; `supervisor`: redialing.
//! - `table`: the live connections; `sink`: how a connection's packets reach the link.
//! - [`splice`]: joining a tunnel stream to a TCP stream (used by the binary).

pub mod config;
pub mod splice;
pub mod tls;

mod demux;
mod dial;
mod link;
mod listener;
mod shared;
mod sink;
mod supervisor;
mod table;

pub use config::BrokerConfig;
pub use listener::{ClientInfo, TunnelListener, SHUTDOWN_REASON};
pub use tls::LinkTls;
pub use tunnel_client::stream::TunnelStream;
pub use tunnel_proto::ConnectionConfig;
