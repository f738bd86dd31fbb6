//! One echo server, two transports: plain TCP clients and tunnel clients are taken by the
//! same accept loop and served by the same generic handler. Whether a server is reachable
//! directly or through the tunnel is a deployment choice, not a code change.
//!
//! Run a relay (link port 127.0.0.1:8081), then:
//!
//! ```text
//! TUNNEL_LINK_SECRET=secret cargo run -p tunnel-broker --example dual_accept -- 127.0.0.1:7000
//! ```
//!
//! Arguments: TCP listen address (default 127.0.0.1:7000), relay link address (default
//! 127.0.0.1:8081), server name (default "echo"). The link secret comes from
//! `TUNNEL_LINK_SECRET`.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tunnel_broker::{BrokerConfig, TunnelListener};

/// The whole application: echo, over any byte stream.
async fn handle<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S) -> io::Result<u64> {
    let mut buf = vec![0u8; 16 * 1024];
    let mut total = 0;
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            stream.shutdown().await?;
            return Ok(total);
        }
        stream.write_all(&buf[..n]).await?;
        total += n as u64;
    }
}

#[tokio::main]
async fn main() -> io::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let mut args = std::env::args().skip(1);
    let tcp_addr = args.next().unwrap_or_else(|| "127.0.0.1:7000".into());
    let relay = args.next().unwrap_or_else(|| "127.0.0.1:8081".into());
    let name = args.next().unwrap_or_else(|| "echo".into());
    let secret = std::env::var("TUNNEL_LINK_SECRET").unwrap_or_default();

    let tcp = TcpListener::bind(&tcp_addr).await?;
    let tunnel = TunnelListener::bind(BrokerConfig::new(relay, name, secret)).await?;
    tracing::info!(tcp = %tcp.local_addr()?, tunnel = tunnel.local_name(), "echo server up");

    loop {
        tokio::select! {
            accepted = tcp.accept() => {
                let (stream, peer) = accepted?;
                tokio::spawn(async move {
                    let result = handle(stream).await;
                    tracing::info!(transport = "tcp", %peer, ?result, "done");
                });
            }
            accepted = tunnel.accept() => {
                let (stream, client) = accepted?;
                tokio::spawn(async move {
                    let result = handle(stream).await;
                    tracing::info!(transport = "tunnel", conn_id = client.conn_id, client = %client.client_addr, ?result, "done");
                });
            }
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    tunnel.shutdown().await;
    Ok(())
}
