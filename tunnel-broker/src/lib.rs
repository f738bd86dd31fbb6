//! The broker side of the HTTP tunnel: a [`TunnelListener`] that a server uses like a TCP
//! listener. It dials the link port of its relay, or of every relay of a pool
//! (`docs/protocol.md` §5 and §5.2 in the repository), authenticates with the link secret,
//! and hands out one [`TunnelStream`] per client connection (§3), a tokio `AsyncRead` +
//! `AsyncWrite` like a `TcpStream`. When a link is lost it redials with back-off and
//! re-announces the connections on it, which keep running meanwhile; when a client's session
//! moves to another relay of the pool, its connections move to that relay's link.
//!
//! The public API: [`TunnelListener`] (bind, accept, listen state, graceful stop),
//! [`BrokerConfig`] with every bound and deadline, [`LinkTls`] for a TLS link,
//! [`read_link_secret_file`] to read the secret as the relay does, and [`ClientInfo`], what
//! the relay said about who connected.
//!
//! # Example: one accept loop for TCP and tunnel clients
//!
//! The server below serves plain TCP clients and tunnel clients with the same handler. The
//! hidden lines start a relay inside the test process, and one client of each kind.
//!
//! ```
//! # mod doc_support { include!(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/doc_support/echo_tunnel.rs")); }
//! use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
//! use tokio::net::TcpListener;
//! use tunnel_broker::{BrokerConfig, TunnelListener};
//!
//! /// The application: echo, over any byte stream.
//! async fn serve(mut stream: impl AsyncRead + AsyncWrite + Unpin) -> std::io::Result<()> {
//!     let (mut from, mut to) = tokio::io::split(&mut stream);
//!     tokio::io::copy(&mut from, &mut to).await?;
//!     to.shutdown().await
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> std::io::Result<()> {
//! # let relay = doc_support::DocRelay::start().await?;
//! # let (relay_link, secret) = (relay.link_addr(), doc_support::LINK_SECRET);
//! // relay_link is the relay's link port, e.g. "relay.example.com:8081"
//! let tcp = TcpListener::bind("127.0.0.1:0").await?;
//! let tunnel = TunnelListener::bind(BrokerConfig::new(relay_link, "echo", secret)).await?;
//! # let tcp_addr = tcp.local_addr()?;
//! # async fn ping(mut s: impl AsyncRead + AsyncWrite + Unpin) -> std::io::Result<()> {
//! #     s.write_all(b"ping").await?;
//! #     s.shutdown().await?;
//! #     let mut got = Vec::new();
//! #     s.read_to_end(&mut got).await?;
//! #     assert_eq!(got, b"ping");
//! #     Ok(())
//! # }
//! # let clients = tokio::spawn(async move {
//! #     ping(tokio::net::TcpStream::connect(tcp_addr).await?).await?;
//! #     let config = tunnel_client::ClientConfig::new(relay.relay_url(), "echo");
//! #     ping(tunnel_client::connect(config).await?).await
//! # });
//! # for _ in 0..2 {
//! tokio::select! {
//!     accepted = tcp.accept() => {
//!         let (stream, peer) = accepted?;
//!         println!("TCP client {peer}");
//!         tokio::spawn(serve(stream));
//!     }
//!     accepted = tunnel.accept() => {
//!         let (stream, client) = accepted?;
//!         println!("tunnel client {} (connection {})", client.client_addr, client.conn_id);
//!         tokio::spawn(serve(stream));
//!     }
//! }
//! # }
//! # clients.await??;
//! # Ok(())
//! # }
//! ```
//!
//! `examples/dual_accept.rs` is the same server as a program.

#![warn(missing_docs)]

mod config;
mod demux;
mod dial;
mod link;
mod listener;
mod relays;
mod shared;
mod sink;
mod supervisor;
mod table;
mod tls;

pub use config::BrokerConfig;
pub use listener::{ClientInfo, TunnelListener, SHUTDOWN_REASON};
pub use shared::CAPACITY_UPDATE_INTERVAL;
pub use tls::LinkTls;
pub use tunnel_proto::connection::{Stats, StreamError};
pub use tunnel_proto::driver::TunnelStream;
pub use tunnel_proto::payload::InstanceId;
pub use tunnel_proto::secret::read_link_secret_file;
pub use tunnel_proto::ConnectionConfig;
