//! Sends every line typed on standard input through the tunnel and prints what the server
//! answers: a line-based client in a few lines of tokio, with the tunnel's stream in place of
//! a `TcpStream`.
//!
//! Start a relay and a broker (`bash scripts/demo.sh` shows how; its broker echoes), then:
//!
//! ```text
//! cargo run -p tunnel-client --example send_lines -- http://127.0.0.1:8080/tunnel echo
//! ```
//!
//! Arguments: the relay's tunnel URL (default `http://127.0.0.1:8080/tunnel`) and the server
//! name (default `echo`). End the input with Ctrl-D: the tunnel is half-closed and the
//! program prints the rest of the answer before it exits. `RUST_LOG=debug` shows the
//! client's log.

use std::io;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tunnel_client::{ClientConfig, TunnelClient};

#[tokio::main]
async fn main() -> io::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(io::stderr)
        .init();
    let mut args = std::env::args().skip(1);
    let relay_url = args
        .next()
        .unwrap_or_else(|| "http://127.0.0.1:8080/tunnel".into());
    let server = args.next().unwrap_or_else(|| "echo".into());

    let client = TunnelClient::new(ClientConfig::new(relay_url, server))?;
    // A failed connect is a ConnectError; `?` turns it into an io::Error that says why.
    let stream = client.connect().await?;
    eprintln!("connected (connection {})", stream.conn_id());

    let (from_server, mut to_server) = tokio::io::split(stream);
    let printer = tokio::spawn(async move {
        let mut answers = BufReader::new(from_server).lines();
        while let Some(line) = answers.next_line().await? {
            println!("{line}");
        }
        Ok::<_, io::Error>(())
    });

    let mut input = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = input.next_line().await? {
        to_server.write_all(line.as_bytes()).await?;
        to_server.write_all(b"\n").await?;
    }
    // End of input: half-close, so the server sees end of stream and can finish its answer.
    to_server.shutdown().await?;
    printer.await.map_err(io::Error::other)??;
    Ok(())
}
