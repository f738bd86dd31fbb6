//! The plain-TCP baseline: a forwarder that accepts on one port and relays each connection to
//! a target with `tokio::io::copy_bidirectional_with_sizes` and [`COPY_BUFFER`]-sized buffers.
//! The bench runs each hop as a separate process (itself, with
//! `--forwarder-listen/--forwarder-to`) so the three-hop chain has the same process structure
//! as client → relay → broker.
//!
//! A baseline must be the best plain forwarder we can build, or it flatters the tunnel:
//! `copy_bidirectional`'s default 8 KiB buffers cost a system call per 8 KiB each way and
//! held the chain to about half of what socat with 128 KiB buffers moves on the same hops.

use std::io;
use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};

/// Bytes each direction of a forwarded connection reads and writes at once.
pub const COPY_BUFFER: usize = 256 * 1024;

/// Serves forever: every connection accepted on `listen` is joined to a new one to `to`.
pub async fn run(listen: SocketAddr, to: SocketAddr) -> io::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    loop {
        let (mut inbound, _) = match listener.accept().await {
            Ok(pair) => pair,
            Err(e) => {
                eprintln!("forwarder {listen}: accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                continue;
            }
        };
        tokio::spawn(async move {
            let _ = inbound.set_nodelay(true);
            let mut outbound = match TcpStream::connect(to).await {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("forwarder {listen}: connect {to} failed: {e}");
                    return;
                }
            };
            let _ = outbound.set_nodelay(true);
            let _ = tokio::io::copy_bidirectional_with_sizes(
                &mut inbound,
                &mut outbound,
                COPY_BUFFER,
                COPY_BUFFER,
            )
            .await;
        });
    }
}
