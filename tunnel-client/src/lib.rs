//! The client side of the HTTP tunnel: a [`TunnelStream`] is a TCP-like byte stream (tokio
//! `AsyncRead` + `AsyncWrite`) to a named server, carried over ordinary HTTP(S) requests to a
//! relay, through HTTP proxies if need be.
//!
//! - [`connect`] opens one connection; a [`TunnelClient`] opens many that
//!   share one pool of HTTP connections (and TLS sessions) to the relay.
//! - [`ClientConfig`] holds every tunable with its default: the relay URL and server name,
//!   proxies ([`ProxyConfig`], or the environment's `HTTP_PROXY`/`HTTPS_PROXY`/`NO_PROXY`),
//!   a PAC script ([`PacSource`]), relay credentials ([`RelayAuth`]), TLS trust, timeouts
//!   and bounds.
//! - A failed connect is a [`ConnectError`]; it converts into `std::io::Error` for `?`.
//!
//! The wire protocol is described in the repository's `docs/protocol.md` (§2: the relay's
//! HTTP interface, §3: opening a connection). The reliable connection itself and its async
//! driver live in `tunnel-proto` and are shared with the broker.
//!
//! # Example: one connection
//!
//! The relay and the broker (here an echo server) run elsewhere; the hidden lines of this
//! example start both inside the test process.
//!
//! ```
//! # mod doc_support { include!(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/doc_support/echo_tunnel.rs")); }
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//! use tunnel_client::{ClientConfig, TunnelStream};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> std::io::Result<()> {
//! # let tunnel = doc_support::EchoTunnel::start().await?;
//! # let relay_url = tunnel.relay_url();
//! // relay_url is e.g. "https://relay.example.com/tunnel"
//! let config = ClientConfig::new(relay_url, "echo");
//! let mut stream = tunnel_client::connect(config).await?; // ConnectError -> io::Error
//! stream.write_all(b"hello through the tunnel").await?;
//! stream.shutdown().await?; // half-close: the server sees end of stream
//! let mut answer = Vec::new();
//! stream.read_to_end(&mut answer).await?;
//! assert_eq!(answer, b"hello through the tunnel");
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

mod auth;
mod body;
mod check;
mod config;
mod connect;
mod error;
mod http;
mod pac;
mod per_conn;
mod proxy_auth;
mod pull;
mod push;
mod session;

pub use auth::RelayAuth;
pub use check::{check, CheckReport};
pub use config::{
    ClientConfig, HttpVersion, ProxyConfig, DEFAULT_CLIENT_MAX_DATA_PAYLOAD,
    DEFAULT_CLIENT_MAX_RECV_WINDOW, DEFAULT_CLIENT_RECV_WINDOW, DEFAULT_OUTAGE_GRACE,
};
pub use connect::{connect, TunnelClient};
pub use error::ConnectError;
pub use pac::PacSource;
pub use proxy_auth::ProxyAuthConfig;
pub use session::{Downstream, SessionStats, TransportMode, Upstream};
pub use tunnel_proto::connection::{Stats, StreamError};
pub use tunnel_proto::driver::{StreamConfig, TunnelStream};
pub use tunnel_proto::ConnectionConfig;
