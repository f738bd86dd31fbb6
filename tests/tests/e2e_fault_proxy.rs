//! The three binaries with the fault-injecting proxy between client and relay: buffering
//! whole responses (the client, in its default mode, falls back to polling) or passing them
//! on (it streams).
//!
//! Needs the binaries: `cargo build --workspace --bins && cargo test -p tunnel-tests --test e2e_fault_proxy`.

use std::time::Duration;

use tunnel_tests::{
    free_addr, init_tracing, sink_source_exchange, Chain, ChainOptions, ExchangeSpec, FaultConfig,
    FaultProxy, SinkSourceServer,
};

const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(120);

/// Starts a sink/source server, a proxy in front of a relay address chosen up front, and a
/// chain whose client talks to the relay only through the proxy.
async fn chain_behind_proxy(config: FaultConfig) -> (SinkSourceServer, FaultProxy, Chain) {
    let server = SinkSourceServer::start().await.unwrap();
    let relay_http = free_addr();
    let proxy = FaultProxy::start(relay_http, config).await.unwrap();
    let options = ChainOptions {
        relay_http: Some(relay_http),
        client_relay_url: Some(proxy.url("/tunnel")),
        ..ChainOptions::forward_to_sink_source(server.addr())
    };
    let chain = Chain::start(options).await;
    (server, proxy, chain)
}

/// Runs `connections` exchanges of `bytes` each way at once; panics listing every failure.
async fn run_exchanges(chain: &Chain, connections: u64, bytes: u64, seed: u64) {
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..connections {
        let stream = chain.connect().await.unwrap();
        tasks.spawn(async move {
            let spec = ExchangeSpec::symmetric(bytes, seed + i);
            (
                i,
                sink_source_exchange(stream, &spec, EXCHANGE_TIMEOUT).await,
            )
        });
    }
    let mut failures = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        let (i, result) = joined.expect("exchange task panicked");
        if let Err(e) = result {
            failures.push(format!("connection {i}: {e}"));
        }
    }
    failures.sort();
    assert!(
        failures.is_empty(),
        "{} exchanges failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn works_through_a_buffering_proxy_without_faults() {
    init_tracing();
    let (_server, proxy, mut chain) = chain_behind_proxy(FaultConfig::none(1)).await;
    run_exchanges(&chain, 5, 1 << 20, 100).await;
    let stats = proxy.stats();
    eprintln!("proxy: {stats:?}");
    assert!(
        stats.delivered > 0,
        "no traffic went through the proxy: {stats:?}"
    );
    assert_eq!(stats.upstream_errors, 0, "{stats:?}");
    // The client (in its default mode, auto) tried a stream, found it held back, and polls.
    assert_downstream(&chain, "the session polls").await;
    chain.assert_alive();
}

/// The same proxy passing response bodies on as they come: the client streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_through_a_proxy_that_passes_responses_on() {
    init_tracing();
    let config = FaultConfig {
        stream_responses: true,
        ..FaultConfig::none(3)
    };
    let (_server, proxy, mut chain) = chain_behind_proxy(config).await;
    run_exchanges(&chain, 5, 1 << 20, 300).await;
    let stats = proxy.stats();
    eprintln!("proxy: {stats:?}");
    assert_eq!(stats.upstream_errors, 0, "{stats:?}");
    assert_downstream(&chain, "the session streams").await;
    chain.assert_alive();
}

/// Checks the client's log line of its downstream decision (and that it is the only one),
/// and that the relay served at least one streamed pull (the probe, in either case).
async fn assert_downstream(chain: &Chain, line: &str) {
    let log = chain
        .client
        .as_ref()
        .map(|c| c.log_contents())
        .unwrap_or_default();
    assert!(log.contains(line), "client log lacks {line:?}:\n{log}");
    let decisions =
        log.matches("the session polls").count() + log.matches("the session streams").count();
    assert_eq!(decisions, 1, "one decision logged:\n{log}");
    let streams = chain
        .relay_metric("tunnel_requests_total{type=\"stream\"}")
        .await;
    assert!(
        streams.parse::<u64>().is_ok_and(|n| n >= 1),
        "streamed pulls at the relay: {streams}"
    );
}

/// A few percent of every fault at once: each must be repaired by retries and retransmission
/// without losing, duplicating or reordering a byte.
/// (This found the lost-CONN_INIT_ACK bug, fixed by the relay resending it until the client's
/// first push.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_dropped_duplicated_delayed_and_cut_requests() {
    init_tracing();
    let config = FaultConfig {
        delay: 0.2,
        max_delay: Duration::from_millis(50),
        drop_request: 0.05,
        duplicate_request: 0.05,
        drop_response: 0.05,
        reset_mid_body: 0.05,
        ..FaultConfig::none(0xFA17)
    };
    let (_server, proxy, mut chain) = chain_behind_proxy(FaultConfig::none(2)).await;
    // Faults only after the chain is up, so start-up stays quick and deterministic.
    proxy.set_config(config);
    run_exchanges(&chain, 4, 512 << 10, 200).await;
    let stats = proxy.stats();
    eprintln!("proxy: {stats:?}");
    let injected =
        stats.dropped_requests + stats.dropped_responses + stats.duplicated + stats.resets;
    assert!(
        injected > 0,
        "no fault was injected, so nothing was tested: {stats:?}"
    );
    chain.assert_alive();
}
