//! Fault matrix: several full-duplex transfers at once through the fault-injecting proxy
//! between client and relay, at 5 %, 10 % and 20 % drop rates, checking that every byte
//! arrives exactly once (length and SHA-256 at both ends, server-side byte counts) and that
//! the transfers finish. Every case runs in both downstream modes (docs/protocol.md §2.2):
//! polling (`--mode poll`) through the proxy buffering whole responses, and streaming
//! (`--mode stream`) through the proxy passing response bodies on as they come, where a
//! reset cuts a stream within its first 256 KiB; the relay there ends each stream after
//! 1 MiB, so that the faults hit dozens of streams per case. Each case checks from the relay's metrics
//! that the client used its mode.
//!
//! Each rate `r` applies to requests dropped before the relay AND to responses dropped after
//! it (so about `2r` of the requests fail), on top of fixed smaller rates of the other
//! faults: 2 % duplicated requests, 2 % responses cut mid-body, 10 % of requests delayed by
//! up to 50 ms (which reorders concurrent pushes and pulls).
//!
//! Size: 4 connections × 16 MiB each way (64 MiB each way per rate, 128 MiB moved). In the
//! dev profile (which this workspace builds with optimisation) the whole matrix, baseline
//! included, takes about 11 s on a 2-core machine (20 %: about 6 s), so the full figure is
//! the default.
//!
//! The client retransmits even without faults (about 100 packets per 64 MiB up): measured
//! in process, 4 pushes in flight (the default) give 47–102 retransmits per 32–64 MiB on a
//! clean path, 1 push in flight gives 0. Concurrent pushes overtake each other and the
//! sender takes the holes for losses; at 20 % faults the concurrency still pays (one
//! connection, 32 MiB each way: 9.7 s with 4 pushes, 34 s with 1).
//!
//! Each case prints one table row: bytes moved, bytes lost, time, faults injected by the
//! proxy, the client's retransmissions (from its log) and the relay's dropped packets.
//!
//! Needs the binaries: `cargo build --workspace --bins && cargo test -p tunnel-tests --test faults -- --nocapture`.

use std::time::Duration;

use tokio::sync::Mutex;
use tunnel_tests::transfer::{client_retransmits, parallel_exchanges, TransferOutcome};
use tunnel_tests::{
    free_addr, init_tracing, Chain, ChainOptions, FaultConfig, FaultProxy, SinkSourceServer,
};

/// Parallel connections per case.
const CONNECTIONS: u64 = 4;
/// Bytes each way per connection.
const BYTES_EACH_WAY: u64 = 16 << 20;
/// Deadline of each exchange: generous, since 2 cores are shared with other tests; the
/// measured times are printed.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(300);
/// Fixed rates of the faults other than drops.
const DUPLICATE_RATE: f64 = 0.02;
const RESET_RATE: f64 = 0.02;
const DELAY_RATE: f64 = 0.10;
const MAX_DELAY: Duration = Duration::from_millis(50);
/// Time the client has to log its closed connections after the exchanges end.
const LOG_WAIT: Duration = Duration::from_secs(5);

/// The cases run one at a time, so their timings do not include each other's load.
static SERIAL: Mutex<()> = Mutex::const_new(());

fn faults_at(rate: f64, seed: u64) -> FaultConfig {
    FaultConfig {
        drop_request: rate,
        drop_response: rate,
        duplicate_request: DUPLICATE_RATE,
        reset_mid_body: RESET_RATE,
        delay: DELAY_RATE,
        max_delay: MAX_DELAY,
        ..FaultConfig::none(seed)
    }
}

/// How the session's packets come down in a case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// `--mode poll`, through the proxy buffering whole responses.
    Poll,
    /// `--mode stream`, through the proxy passing response bodies on as they come.
    Stream,
}

/// The relay's `--stream-limit` in streaming cases.
const STREAM_LIMIT: usize = 1 << 20;

/// The relay's count of streamed pulls.
const STREAMS_METRIC: &str = "tunnel_requests_total{type=\"stream\"}";

/// Runs one case of the matrix and checks it; `faults` is `None` for the clean baseline.
async fn run_case(case: &str, mode: Mode, faults: Option<FaultConfig>) {
    init_tracing();
    let _serial = SERIAL.lock().await;
    let name = &format!("{case}, {mode:?}");
    let bytes = BYTES_EACH_WAY;
    let streaming = mode == Mode::Stream;
    let server = SinkSourceServer::start().await.unwrap();
    let relay_http = free_addr();
    let clean = FaultConfig {
        stream_responses: streaming,
        ..FaultConfig::none(1)
    };
    let proxy = FaultProxy::start(relay_http, clean).await.unwrap();
    let client_mode = if streaming { "stream" } else { "poll" };
    let options = ChainOptions {
        relay_http: Some(relay_http),
        client_relay_url: Some(proxy.url("/tunnel")),
        client_args: vec!["--mode".into(), client_mode.into()],
        // Streams end every MiB (and after 2 s idle) rather than every 64 MiB (20 s): a case
        // then opens dozens of streams, and the faults hit them, not only the pushes.
        relay_args: if streaming {
            vec![
                "--stream-limit".into(),
                STREAM_LIMIT.to_string(),
                "--pull-wait-ms".into(),
                "2000".into(),
            ]
        } else {
            Vec::new()
        },
        ..ChainOptions::forward_to_sink_source(server.addr())
    };
    let mut chain = Chain::start(options).await;
    // The chain's readiness probe is counted before the faults start: its server side may
    // finish a moment after its client side (a CI run counted it among the transfer's).
    let server_before = server.settled_stats().await;
    // Faults start once the chain is up, so start-up stays quick and deterministic.
    if let Some(faults) = faults.clone() {
        proxy.set_config(FaultConfig {
            stream_responses: streaming,
            ..faults
        });
    }
    let before = proxy.stats();
    let (_, retransmits_before) = client_log_retransmits(&chain);

    let outcome: TransferOutcome = parallel_exchanges(
        chain.client_addr(),
        CONNECTIONS,
        bytes,
        0xFA17_0000,
        EXCHANGE_TIMEOUT,
    )
    .await;

    let stats = proxy.stats();
    // The server counts an exchange complete once it has seen the client's end of stream,
    // which may come a moment after the client's side of the exchange returned.
    let settle = tokio::time::Instant::now() + LOG_WAIT;
    let mut server_after = server.stats();
    while server_after.completed - server_before.completed < CONNECTIONS
        && tokio::time::Instant::now() < settle
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
        server_after = server.stats();
    }
    let injected = (stats.dropped_requests - before.dropped_requests)
        + (stats.dropped_responses - before.dropped_responses)
        + (stats.duplicated - before.duplicated)
        + (stats.resets - before.resets);
    let retransmits = wait_for_client_logs(&chain, CONNECTIONS).await - retransmits_before;
    let relay_drops = chain.relay_metric("tunnel_packets_dropped_total").await;
    let streams: u64 = chain
        .relay_metric(STREAMS_METRIC)
        .await
        .parse()
        .unwrap_or_else(|e| panic!("{name}: {STREAMS_METRIC}: {e}"));
    eprintln!(
        "| {name} | {} MiB ({} conns x {} MiB each way) | {} bytes lost | {:.1} s | {:.1} MiB/s | \
         faults {injected} of {} requests (drop req {}, drop resp {}, dup {}, reset {}, delayed {}) | \
         client retransmits {retransmits} | relay queue drops {relay_drops} | streamed pulls {streams} |",
        outcome.verified >> 20,
        CONNECTIONS,
        bytes >> 20,
        outcome.lost(),
        outcome.elapsed.as_secs_f64(),
        outcome.mib_per_sec(),
        stats.requests - before.requests,
        stats.dropped_requests - before.dropped_requests,
        stats.dropped_responses - before.dropped_responses,
        stats.duplicated - before.duplicated,
        stats.resets - before.resets,
        stats.delayed - before.delayed,
    );

    assert!(
        outcome.failures.is_empty(),
        "{name}: {} of {CONNECTIONS} exchanges failed:\n{}",
        outcome.failures.len(),
        outcome.failures.join("\n")
    );
    assert_eq!(outcome.lost(), 0, "{name}: bytes lost");
    // Exactly once, counted at the server: duplicates delivered twice would overshoot.
    assert_eq!(
        server_after.bytes_received - server_before.bytes_received,
        CONNECTIONS * bytes,
        "{name}: bytes the server received ({server_after:?})"
    );
    assert_eq!(
        server_after.completed - server_before.completed,
        CONNECTIONS,
        "{name}: exchanges the server completed ({server_after:?})"
    );
    assert_eq!(
        server_after.failed, server_before.failed,
        "{server_after:?}"
    );
    if faults.is_some() {
        assert!(
            stats.dropped_requests > before.dropped_requests
                && stats.dropped_responses > before.dropped_responses,
            "{name}: no drop was injected, so nothing was tested: {stats:?}"
        );
    }
    if streaming {
        // 64 MiB down in streams of at most 1 MiB, and in push answers (which carry queued
        // packets too): measured 31-46 streams per case.
        assert!(streams >= 16, "{name}: {streams} streamed pulls");
    } else {
        assert_eq!(streams, 0, "{name}: the client streamed");
    }
    chain.assert_alive();
}

fn client_log_retransmits(chain: &Chain) -> (u64, u64) {
    chain
        .client
        .as_ref()
        .map_or((0, 0), |c| client_retransmits(&c.log_contents()))
}

/// The client logs a connection's counters when it ends, shortly after the exchange; waits
/// for `connections` more such lines (beyond the probe's) and returns the retransmit total.
async fn wait_for_client_logs(chain: &Chain, connections: u64) -> u64 {
    let deadline = tokio::time::Instant::now() + LOG_WAIT;
    loop {
        let (logged, retransmits) = client_log_retransmits(chain);
        // +2: the chain's port probe and its sink/source probe are connections too.
        if logged >= connections + 2 || tokio::time::Instant::now() >= deadline {
            return retransmits;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn baseline_without_faults() {
    run_case("no faults", Mode::Poll, None).await;
    run_case("no faults", Mode::Stream, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drops_at_5_percent() {
    run_case("5% drops", Mode::Poll, Some(faults_at(0.05, 0x0505))).await;
    run_case("5% drops", Mode::Stream, Some(faults_at(0.05, 0x0506))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drops_at_10_percent() {
    run_case("10% drops", Mode::Poll, Some(faults_at(0.10, 0x1010))).await;
    run_case("10% drops", Mode::Stream, Some(faults_at(0.10, 0x1011))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drops_at_20_percent() {
    run_case("20% drops", Mode::Poll, Some(faults_at(0.20, 0x2020))).await;
    run_case("20% drops", Mode::Stream, Some(faults_at(0.20, 0x2021))).await;
}
