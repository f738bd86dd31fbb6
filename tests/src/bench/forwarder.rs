//! The plain-TCP baseline: a forwarder that accepts on one port and relays each connection to
//! a target with `tokio::io::copy_bidirectional`. The bench runs each hop as a separate
//! process (itself, with `--forwarder-listen/--forwarder-to`) so the three-hop chain has the
//! same process structure as client → relay → broker.

use std::io;
use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};

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
            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
        });
    }
}
