//! The three binaries end to end on loopback: relay, broker, client.
//!
//! Needs the binaries: `cargo build --workspace --bins && cargo test -p tunnel-tests --test e2e_basic`.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tunnel_tests::transfer::parallel_exchanges;
use tunnel_tests::{init_tracing, Chain, ChainOptions, SeededBytes, SinkSourceServer};

/// Deadline of one whole exchange; generous because the machine has two cores shared by
/// three processes and the test itself.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_round_trip_through_the_three_binaries() {
    init_tracing();
    let mut chain = Chain::start(ChainOptions::echo()).await;

    // Bigger than one DATA packet (64 KiB) and not a multiple of it.
    let sent = SeededBytes::new(11).take_vec(300_001);
    let mut stream = chain.connect().await.unwrap();
    let (mut rd, mut wr) = stream.split();
    let write = async {
        wr.write_all(&sent).await?;
        wr.shutdown().await
    };
    let read = async {
        let mut back = Vec::with_capacity(sent.len());
        rd.read_to_end(&mut back).await.map(|_| back)
    };
    let (written, back) =
        tokio::time::timeout(EXCHANGE_TIMEOUT, async { tokio::join!(write, read) })
            .await
            .expect("echo round trip timed out");
    written.expect("writing to the tunnel");
    let back = back.expect("reading the echo");
    assert_eq!(back.len(), sent.len(), "echoed length");
    assert!(back == sent, "echoed bytes differ from those sent");
    chain.assert_alive();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_concurrent_connections_move_2_mib_each_way() {
    init_tracing();
    const CONNECTIONS: u64 = 20;
    const BYTES_EACH_WAY: u64 = 2 << 20;
    let server = SinkSourceServer::start().await.unwrap();
    let mut chain = Chain::start(ChainOptions::forward_to_sink_source(server.addr())).await;
    let baseline = server.settled_stats().await;

    let outcome = parallel_exchanges(
        chain.client_addr(),
        CONNECTIONS,
        BYTES_EACH_WAY,
        0xBA51C,
        EXCHANGE_TIMEOUT,
    )
    .await;
    outcome.assert_complete(&server, &baseline);
    eprintln!(
        "moved {} MiB through the tunnel in {:?} ({:.1} MiB/s both directions together)",
        outcome.verified >> 20,
        outcome.elapsed,
        outcome.mib_per_sec()
    );
    // Not asserted (loopback loses nothing, but the relay may shed queue overflow by design):
    // shown so a slow run can be told apart from a lossy one.
    eprintln!(
        "relay: tunnel_packets_dropped_total = {}",
        chain.relay_metric("tunnel_packets_dropped_total").await
    );
    // The client binary is one TunnelClient: all twenty connections (and the chain's
    // readiness probe) travelled in one session (docs/protocol.md §2.1).
    assert_eq!(
        chain.relay_metric("tunnel_sessions_opened_total").await,
        "1",
        "one session for the whole client"
    );
    chain.assert_alive();
}

/// The per-connection requests (docs/protocol.md §2), which simple clients and older client
/// versions use, keep working: `--no-session` opens no session and moves the same traffic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_connection_transport_still_moves_twenty_connections() {
    init_tracing();
    const CONNECTIONS: u64 = 20;
    const BYTES_EACH_WAY: u64 = 1 << 20;
    let server = SinkSourceServer::start().await.unwrap();
    let mut options = ChainOptions::forward_to_sink_source(server.addr());
    options.client_args.push("--no-session".into());
    let mut chain = Chain::start(options).await;
    let baseline = server.settled_stats().await;

    let outcome = parallel_exchanges(
        chain.client_addr(),
        CONNECTIONS,
        BYTES_EACH_WAY,
        0x5E55,
        EXCHANGE_TIMEOUT,
    )
    .await;
    outcome.assert_complete(&server, &baseline);
    assert_eq!(
        chain.relay_metric("tunnel_sessions_opened_total").await,
        "0",
        "--no-session must not open a session"
    );
    chain.assert_alive();
}
