//! Connections survive a crash of the relay: it is killed with SIGKILL and started again on
//! the same ports; the broker redials and re-announces its connections, the client's
//! requests fail (connection refused, then 503) and recover, and the bytes arrive intact.
//!
//! Needs the binaries: `cargo build --workspace --bins && cargo test -p tunnel-tests --test e2e_restart`.

use std::io;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tunnel_tests::transfer::parallel_exchanges;
use tunnel_tests::{init_tracing, Chain, ChainOptions, SeededBytes, SinkSourceServer};

/// Deadline of the whole transfer across the restart. The client's outage grace (5 min by
/// default) bounds the outage it survives; the transfer itself is seconds on loopback, so
/// this is wide on purpose for slow CI machines.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(400);
/// How long the relay stays dead: long enough that the client sees refused connections and
/// the broker's link redial backs off at least once.
const OUTAGE: Duration = Duration::from_secs(3);
/// Deadline for the progress the test waits for before killing the relay.
const PROGRESS_TIMEOUT: Duration = Duration::from_secs(120);

/// Acceptance criterion: SIGKILL the relay in the middle of 64 MiB each way on two
/// connections, start it again on the same ports, and both transfers complete with matching
/// SHA-256 at both ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_killed_mid_transfer_and_restarted_transfer_completes() {
    init_tracing();
    const CONNECTIONS: u64 = 2;
    const BYTES_EACH_WAY: u64 = 64 << 20;
    let server = SinkSourceServer::start().await.unwrap();
    let mut chain = Chain::start(ChainOptions::forward_to_sink_source(server.addr())).await;
    let baseline = server.settled_stats().await;

    let started = Instant::now();
    let transfers = tokio::spawn(parallel_exchanges(
        chain.client_addr(),
        CONNECTIONS,
        BYTES_EACH_WAY,
        0x5E57_0000,
        TRANSFER_TIMEOUT,
    ));

    // Kill once a good part has moved up and down, well before the end. Progress is read on
    // the server side (received) and, for the down direction, from what it has sent.
    let total = CONNECTIONS * BYTES_EACH_WAY;
    let (kill_at_up, kill_at_down) = (total / 4, total / 4);
    let deadline = Instant::now() + PROGRESS_TIMEOUT;
    loop {
        let stats = server.stats();
        let up = stats.bytes_received - baseline.bytes_received;
        let down = stats.bytes_sent - baseline.bytes_sent;
        if up >= kill_at_up && down >= kill_at_down {
            eprintln!(
                "killing the relay after {:?}: {} MiB up, {} MiB down of {} MiB each way",
                started.elapsed(),
                up >> 20,
                down >> 20,
                total >> 20
            );
            assert!(
                up < total && down < total,
                "the transfer finished before the kill; make it bigger ({stats:?})"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no progress to {kill_at_up} bytes each way within {PROGRESS_TIMEOUT:?}: {stats:?}"
        );
        if transfers.is_finished() {
            panic!("transfers ended before the kill: {stats:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    chain.kill_relay().await.expect("SIGKILL the relay");
    tokio::time::sleep(OUTAGE).await;
    let at_restart = server.stats();
    chain
        .start_relay()
        .await
        .expect("restarting the relay on the same ports");
    let restarted = Instant::now();
    // How long traffic takes to resume once the relay is back (the client's retries and the
    // broker's redials are capped at 1 s): both directions moving again at the server.
    let resumed = loop {
        let now = server.stats();
        if now.bytes_received > at_restart.bytes_received && now.bytes_sent > at_restart.bytes_sent
        {
            break Some(restarted.elapsed());
        }
        if transfers.is_finished() || restarted.elapsed() > TRANSFER_TIMEOUT {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    eprintln!("relay down {OUTAGE:?}; traffic both ways resumed {resumed:?} after the restart");

    let outcome = transfers.await.expect("transfer task panicked");
    eprintln!("server at restart: {at_restart:?}");
    outcome.assert_complete(&server, &baseline);
    eprintln!(
        "both transfers completed {:?} after the restart ({:?} in all)",
        restarted.elapsed(),
        started.elapsed()
    );
    chain.assert_alive();
}

async fn echo_exchange(s: &mut tokio::net::TcpStream, data: &[u8]) -> io::Result<Vec<u8>> {
    s.write_all(data).await?;
    let mut back = vec![0u8; data.len()];
    s.read_exact(&mut back).await?;
    Ok(back)
}

/// A connection opened before an idle relay restart still works after it; new connections
/// work too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_survives_an_idle_relay_restart() {
    init_tracing();
    let mut chain = Chain::start(ChainOptions::echo()).await;
    let step = Duration::from_secs(30);

    let mut s = chain.connect().await.unwrap();
    let before = SeededBytes::new(41).take_vec(300_000);
    let back = tokio::time::timeout(step, echo_exchange(&mut s, &before))
        .await
        .expect("echo before the restart timed out")
        .expect("echo before the restart");
    assert!(back == before, "echo before the restart differs");

    chain.kill_relay().await.expect("SIGKILL the relay");
    tokio::time::sleep(OUTAGE).await;
    chain.start_relay().await.expect("restarting the relay");

    // The broker must relink and re-announce before the old connection can move; the
    // client's pulls see 503 meanwhile and retry. The deadline covers the broker's backoff.
    let after = SeededBytes::new(42).take_vec(300_000);
    let back = tokio::time::timeout(Duration::from_secs(90), echo_exchange(&mut s, &after))
        .await
        .expect("echo on the old connection after the restart timed out")
        .expect("echo on the old connection after the restart");
    assert!(back == after, "echo after the restart differs");
    // A clean close still works end to end.
    s.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(step, s.read_to_end(&mut rest))
        .await
        .expect("close after the restart timed out")
        .expect("close after the restart");
    assert!(rest.is_empty(), "{} unexpected bytes", rest.len());

    // New connections too.
    chain
        .wait_path_ready(step)
        .await
        .expect("new connection after the restart");
    chain.assert_alive();
}
