//! Fairness among the connections of one client: a connection whose application stopped
//! reading must not slow the other connections of the same `TunnelClient` (with sessions,
//! they share one held pull and the same pushes; docs/protocol.md §2.1, "Pulls in a
//! session").
//!
//! Relay and broker run in the test process (`tunnel_tests::inproc`), the broker splicing
//! every connection to an echo server. Connection A writes 64 MiB and reads nothing: the echo
//! comes back toward the client until every window and queue on the way is full and the
//! broker side cannot write more. While A is stalled, 20 other connections of the same client
//! do echo round trips and one more moves 4 MiB each way; all must finish within a generous
//! bound. Then A is read again and must deliver all 64 MiB intact (SHA-256).
//!
//! `cargo test -p tunnel-tests --test session_fairness` (no binaries needed).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tunnel_client::{TunnelClient, TunnelStream};
use tunnel_tests::data::{hex, seeded_sha256};
use tunnel_tests::inproc::InProcessTunnel;
use tunnel_tests::transfer::join_all_until;
use tunnel_tests::{init_tracing, sha256, SeededBytes};

/// What the stalled connection's writer sends (and so what comes back at it): far more
/// than the buffers between the application and the echo server and back hold (measured:
/// about 30 MiB in all: the client's 4 MiB send buffer, the broker's 4 MiB window and 4 MiB
/// send buffer, loopback socket buffers, the relay's 1 MiB queue, the client's 1 MiB
/// window).
const STALL_BYTES: u64 = 64 << 20;
/// Seed of the stalled connection's bytes.
const STALL_SEED: u64 = 0xA;
/// The stall is in force once neither the writer nor the echo server has moved a byte for
/// this long.
const STALL_QUIET: Duration = Duration::from_secs(1);
/// Longest wait for the stall to set in.
const STALL_SETTLE_LIMIT: Duration = Duration::from_secs(60);
/// Connections doing round trips beside the stalled one.
const OTHERS: usize = 20;
/// Round trips each of them does.
const ROUND_TRIPS: usize = 10;
/// Bytes of one round trip (a distinct payload per connection and per round trip).
const ROUND_TRIP_BYTES: usize = 1024;
/// Bytes the transfer connection moves each way.
const TRANSFER_BYTES: u64 = 4 << 20;
/// Generous bound for the other connections' work (connects included), on a debug build and
/// two shared cores; without the stalled connection it takes a second or two.
const OTHERS_DEADLINE: Duration = Duration::from_secs(60);
/// How much longer than without the stall the other connections may take: far above the
/// noise of a loaded machine, far below a held pull's wait (20 s) that an unfair session
/// would make them sit out.
const SLOWDOWN_ALLOWANCE: Duration = Duration::from_secs(10);
/// Bound for reading the stalled connection's 64 MiB once it is read again.
const DRAIN_DEADLINE: Duration = Duration::from_secs(90);

/// Connects through `client`, with a deadline.
async fn connect(client: &TunnelClient, what: &str) -> TunnelStream {
    tokio::time::timeout(Duration::from_secs(30), client.connect())
        .await
        .unwrap_or_else(|_| panic!("{what}: connect did not return within 30 s"))
        .unwrap_or_else(|e| panic!("{what}: connect failed: {e}"))
}

/// `ROUND_TRIPS` echoes of a payload of its own on one connection, each compared.
async fn round_trips(client: TunnelClient, index: usize) -> Result<Duration, String> {
    let started = Instant::now();
    let mut stream = client
        .connect()
        .await
        .map_err(|e| format!("connection {index}: connect: {e}"))?;
    let mut payload = SeededBytes::new(1_000 + index as u64);
    let mut back = vec![0u8; ROUND_TRIP_BYTES];
    for round in 0..ROUND_TRIPS {
        let sent = payload.take_vec(ROUND_TRIP_BYTES);
        stream
            .write_all(&sent)
            .await
            .map_err(|e| format!("connection {index} round {round}: write: {e}"))?;
        stream
            .read_exact(&mut back)
            .await
            .map_err(|e| format!("connection {index} round {round}: read: {e}"))?;
        if back != sent {
            return Err(format!(
                "connection {index} round {round}: the echo differs"
            ));
        }
    }
    stream
        .shutdown()
        .await
        .map_err(|e| format!("connection {index}: shutdown: {e}"))?;
    Ok(started.elapsed())
}

/// Writes `len` seeded bytes and reads the echo at the same time; both SHA-256 must match.
async fn echo_transfer(stream: TunnelStream, seed: u64, len: u64) -> Result<(), String> {
    let (mut rd, mut wr) = tokio::io::split(stream);
    let send = async {
        let digest = SeededBytes::new(seed)
            .write_to(&mut wr, len)
            .await
            .map_err(|e| format!("write: {e}"))?;
        wr.shutdown().await.map_err(|e| format!("shutdown: {e}"))?;
        Ok::<_, String>(digest)
    };
    let receive = async {
        let mut received = Vec::with_capacity(len as usize);
        rd.read_to_end(&mut received)
            .await
            .map_err(|e| format!("read after {} bytes: {e}", received.len()))?;
        Ok::<_, String>(received)
    };
    let (sent_digest, received) = tokio::try_join!(send, receive)?;
    if received.len() as u64 != len || sha256(&received) != sent_digest {
        return Err(format!(
            "{} of {len} bytes came back, SHA-256 {} (sent {})",
            received.len(),
            hex(&sha256(&received)),
            hex(&sent_digest)
        ));
    }
    Ok(())
}

/// The other connections' work: `OTHERS` round-trip connections and one 4 MiB transfer, all
/// at once. Returns the time until the last one finished, or every failure.
async fn others_work(client: &TunnelClient, label: &str) -> Result<Duration, Vec<String>> {
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for index in 0..OTHERS {
        let client = client.clone();
        tasks.spawn(async move { round_trips(client, index).await.map(|_| ()) });
    }
    let transfer_client = client.clone();
    tasks.spawn(async move {
        let stream = transfer_client
            .connect()
            .await
            .map_err(|e| format!("transfer connect: {e}"))?;
        echo_transfer(stream, 0xB, TRANSFER_BYTES)
            .await
            .map_err(|e| format!("transfer: {e}"))
    });
    let failures = join_all_until(&mut tasks, started + OTHERS_DEADLINE).await;
    let elapsed = started.elapsed();
    eprintln!(
        "[report] {label}: {OTHERS} connections x {ROUND_TRIPS} round trips of \
         {ROUND_TRIP_BYTES} B and one {} MiB echo transfer in {elapsed:.2?}; {} failures",
        TRANSFER_BYTES >> 20,
        failures.len()
    );
    if failures.is_empty() {
        Ok(elapsed)
    } else {
        Err(failures)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_reader_does_not_slow_the_other_connections_of_its_client() {
    init_tracing();
    let (tunnel, echo) = InProcessTunnel::start_echo().await.unwrap();
    // One client, so one session (when the client uses sessions) for every connection.
    let client = TunnelClient::new(tunnel.client_config(&tunnel.relay_url())).unwrap();

    // The same work without a stalled connection, for the report.
    let unstalled = others_work(&client, "without a stalled connection")
        .await
        .unwrap_or_else(|f| panic!("the other connections fail even without a stall: {f:#?}"));

    // Connection A: its writer sends STALL_BYTES, its reader reads nothing (yet).
    let stalled = connect(&client, "stalled connection").await;
    let (mut stalled_rd, mut stalled_wr) = tokio::io::split(stalled);
    let written = Arc::new(AtomicU64::new(0));
    let writer = {
        let written = Arc::clone(&written);
        tokio::spawn(async move {
            let mut gen = SeededBytes::new(STALL_SEED);
            let mut chunk = vec![0u8; 16 * 1024];
            let mut left = STALL_BYTES;
            while left > 0 {
                let n = left.min(chunk.len() as u64) as usize;
                gen.fill(&mut chunk[..n]);
                stalled_wr.write_all(&chunk[..n]).await?;
                written.fetch_add(n as u64, Ordering::Relaxed);
                left -= n as u64;
            }
            stalled_wr.shutdown().await
        })
    };
    // Wait until nothing moves any more: the echo server cannot write more toward the
    // client, so it stops reading, and the writer is held back by flow control.
    let settle_started = Instant::now();
    let mut last = (u64::MAX, u64::MAX);
    let mut quiet_since = Instant::now();
    loop {
        let now = (written.load(Ordering::Relaxed), echo.stats().bytes);
        if now != last {
            last = now;
            quiet_since = Instant::now();
        } else if quiet_since.elapsed() >= STALL_QUIET {
            break;
        }
        assert!(
            settle_started.elapsed() < STALL_SETTLE_LIMIT,
            "the stalled connection's traffic did not settle within {STALL_SETTLE_LIMIT:?} \
             (written {}, echoed {})",
            now.0,
            now.1
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (written_at_stall, echoed_at_stall) = last;
    eprintln!(
        "[report] stall in force after {:.2?}: the application wrote {written_at_stall} of \
         {STALL_BYTES} bytes and read none; the echo server sent {echoed_at_stall} bytes back",
        settle_started.elapsed()
    );
    // Otherwise the windows took everything and nothing is stalled: the test would prove
    // nothing.
    assert!(
        written_at_stall < STALL_BYTES,
        "all {STALL_BYTES} bytes were written without a read: nothing is held back by the \
         stalled reader; raise STALL_BYTES"
    );
    assert!(
        echoed_at_stall > 0,
        "the echo server echoed nothing: the broker side never wrote to the stalled connection"
    );

    let with_stall = others_work(&client, "with a stalled connection").await;
    // Still stalled: nothing of A was read, so the writer cannot have finished.
    let still = written.load(Ordering::Relaxed);

    // Read A again: all of it, intact.
    let drain_started = Instant::now();
    let drained = tokio::time::timeout(DRAIN_DEADLINE, async {
        let mut received = Vec::with_capacity(STALL_BYTES as usize);
        stalled_rd
            .read_to_end(&mut received)
            .await
            .map(|_| received)
    })
    .await;
    let writer_result = tokio::time::timeout(Duration::from_secs(10), writer).await;

    let elapsed = with_stall.unwrap_or_else(|failures| {
        panic!(
            "with connection A stalled, the other connections of its client did not all \
             finish (without the stall they took {unstalled:.2?}): {failures:#?}"
        )
    });
    assert!(
        elapsed <= unstalled + SLOWDOWN_ALLOWANCE,
        "with connection A stalled the other connections took {elapsed:.2?}, without it \
         {unstalled:.2?}: more than {SLOWDOWN_ALLOWANCE:?} slower"
    );
    assert!(
        still < STALL_BYTES,
        "the stalled connection's writer finished while nothing was read"
    );
    let received = drained
        .unwrap_or_else(|_| {
            panic!("the stalled connection did not deliver its bytes within {DRAIN_DEADLINE:?}")
        })
        .unwrap_or_else(|e| panic!("reading the stalled connection again failed: {e}"));
    match writer_result {
        Ok(Ok(Ok(()))) => {}
        other => panic!("the stalled connection's writer did not finish: {other:?}"),
    }
    assert_eq!(
        received.len() as u64,
        STALL_BYTES,
        "bytes the stalled connection delivered"
    );
    assert_eq!(
        hex(&sha256(&received)),
        hex(&seeded_sha256(STALL_SEED, STALL_BYTES)),
        "SHA-256 of what the stalled connection delivered"
    );
    eprintln!(
        "[report] others with A stalled: {elapsed:.2?} (without: {unstalled:.2?}); A then \
         delivered all {STALL_BYTES} bytes intact (SHA-256) in {:.2?}",
        drain_started.elapsed()
    );
    assert_eq!(echo.stats().failed, 0, "echo connections that failed");
}
