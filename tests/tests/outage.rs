//! Outages of minutes (`tunnel-client --outage-grace`): the fault proxy between the client and
//! the relay drops every request for a while in the middle of a transfer.
//!
//! Why these durations: the timeouts that used to end a connection during an outage are the
//! client's transient-failure timeout, the relay's client inactivity timeout and the broker's
//! connection idle timeout, all 60 s by default. The surviving test keeps every one of them at
//! its default and cuts the path for 75 s, longer than any of them, with `--outage-grace 2m`:
//! only the grace (announced to the relay and the broker with CONN_OPTION 2) can keep the
//! connection alive. (Checked by hand: with the client sending 0 in the option, this test
//! fails after 60 s of outage with "connection aborted by peer: idle for 60s", the broker's
//! idle timeout.) Scaling the timeouts down instead would need a flag for the broker's idle
//! timeout, which the broker binary does not have, and would leave the real defaults
//! untested. The companion test shows the same outage mechanism ending a connection whose
//! grace is shorter than the outage (5 s against 15 s, to stay quick).
//!
//! Needs the binaries: `cargo build --workspace --bins && cargo test -p tunnel-tests --test outage`.

mod support_raw;

use std::time::{Duration, Instant};

use support_raw::vm_rss_kib;

use tunnel_tests::{
    free_addr, init_tracing, sink_source_exchange, Chain, ChainOptions, DropStyle, ExchangeSpec,
    FaultConfig, FaultProxy, SinkSourceServer,
};

/// Bytes each way: enough that the transfer is still running when the outage begins.
const TRANSFER_BYTES: u64 = 16 << 20;

/// Most a process's resident memory may grow during the outage: what the client may buffer
/// (4 MiB send buffer, 1 MiB receive window, pushes in flight) and the relay's 1 MiB queue
/// per connection, with room for the allocator; a queue or retry list that grew with the
/// outage's length would pass it.
const MAX_RSS_GROWTH_KIB: u64 = 32 * 1024;

/// Requests the proxy must have delivered after the transfer began before the path is cut,
/// so the outage falls in the middle of the transfer.
const REQUESTS_BEFORE_OUTAGE: u64 = 4;

/// Bytes the server must have received of the transfer before the path is cut: the
/// connection's first pushes (with its CONN_OPTION 2, the grace the broker must know) have
/// gone through. Counting requests alone let the cut come before any of them once fewer
/// requests carried only ACKs.
const BYTES_BEFORE_OUTAGE: u64 = 1 << 20;

/// Starts a sink/source server, the fault proxy in front of the relay, and a chain whose
/// client reaches the relay only through the proxy, with `client_args` added.
async fn chain_behind_proxy(client_args: &[&str]) -> (SinkSourceServer, FaultProxy, Chain) {
    let server = SinkSourceServer::start().await.unwrap();
    let relay_http = free_addr();
    let proxy = FaultProxy::start(relay_http, FaultConfig::none(13))
        .await
        .unwrap();
    let options = ChainOptions {
        relay_http: Some(relay_http),
        client_relay_url: Some(proxy.url("/tunnel")),
        client_args: client_args.iter().map(|a| a.to_string()).collect(),
        ..ChainOptions::forward_to_sink_source(server.addr())
    };
    let chain = Chain::start(options).await;
    (server, proxy, chain)
}

/// Resident memory of the client and the relay (KiB) at the start of the outage and at its
/// peak, sampled every second.
#[derive(Debug, Default)]
struct OutageMemory {
    client_start: u64,
    client_peak: u64,
    relay_start: u64,
    relay_peak: u64,
}

/// Waits until the transfer has made progress through the proxy, then drops every request
/// (the connection is closed without an answer) for `outage`, then lets traffic through again.
/// Returns when the outage began and the memory of the client and relay during it.
async fn cut_path_mid_transfer(
    server: &SinkSourceServer,
    proxy: &FaultProxy,
    chain: &Chain,
    outage: Duration,
) -> (Instant, OutageMemory) {
    let before = proxy.stats().delivered;
    let bytes_before = server.stats().bytes_received;
    let deadline = Instant::now() + Duration::from_secs(30);
    while proxy.stats().delivered < before + REQUESTS_BEFORE_OUTAGE
        || server.stats().bytes_received < bytes_before + BYTES_BEFORE_OUTAGE
    {
        assert!(
            Instant::now() < deadline,
            "the transfer made no progress through the proxy: {:?}",
            proxy.stats()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    proxy.set_config(FaultConfig {
        drop_request: 1.0,
        drop_style: DropStyle::Close,
        ..FaultConfig::none(14)
    });
    let began = Instant::now();
    let pid = |p: &Option<tunnel_tests::ChildProcess>| p.as_ref().and_then(|p| p.id()).unwrap();
    let (client, relay) = (pid(&chain.client), pid(&chain.relay));
    let rss = |pid| vm_rss_kib(pid).unwrap_or(0);
    let mut memory = OutageMemory {
        client_start: rss(client),
        relay_start: rss(relay),
        ..OutageMemory::default()
    };
    while began.elapsed() < outage {
        memory.client_peak = memory.client_peak.max(rss(client));
        memory.relay_peak = memory.relay_peak.max(rss(relay));
        let left = outage.saturating_sub(began.elapsed());
        tokio::time::sleep(Duration::from_secs(1).min(left)).await;
    }
    proxy.set_config(FaultConfig::none(15));
    eprintln!(
        "path restored after {:?}: {:?}; memory (KiB) {memory:?}",
        began.elapsed(),
        proxy.stats()
    );
    (began, memory)
}

/// 75 s without any path to the relay, mid-transfer, with every other timeout at its 60 s
/// default: the connection survives and both directions arrive intact (the sink/source
/// exchange checks length and SHA-256 each way), and neither the client's nor the relay's
/// memory grows by more than what they may buffer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_survives_an_outage_longer_than_the_default_timeouts() {
    init_tracing();
    const OUTAGE: Duration = Duration::from_secs(75);
    let (server, proxy, mut chain) = chain_behind_proxy(&["--outage-grace", "2m"]).await;
    let stream = chain.connect().await.unwrap();
    let started = Instant::now();
    let spec = ExchangeSpec::symmetric(TRANSFER_BYTES, 1300);
    let exchange =
        tokio::spawn(
            async move { sink_source_exchange(stream, &spec, Duration::from_secs(240)).await },
        );
    let (outage_began, memory) = cut_path_mid_transfer(&server, &proxy, &chain, OUTAGE).await;
    let report = exchange
        .await
        .expect("exchange task panicked")
        .unwrap_or_else(|e| panic!("the transfer did not survive the outage: {e}"));
    eprintln!("exchange: {report:?}; proxy: {:?}", proxy.stats());
    assert_eq!(report.sent, TRANSFER_BYTES);
    assert!(
        started + report.elapsed > outage_began + OUTAGE,
        "the transfer ended before the outage did ({:?} after its start): it was not cut mid-transfer",
        report.elapsed
    );
    assert!(
        proxy.stats().dropped_requests > 0,
        "no request was dropped: the outage tested nothing"
    );
    assert!(
        memory.client_peak <= memory.client_start + MAX_RSS_GROWTH_KIB
            && memory.relay_peak <= memory.relay_start + MAX_RSS_GROWTH_KIB,
        "memory grew during the outage (KiB): {memory:?}"
    );
    chain.assert_alive();
}

/// The same kind of outage, longer than the client's grace: the client gives up, the
/// transfer fails instead of hanging, and the client says why in its log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_fails_when_the_outage_outlasts_the_grace() {
    init_tracing();
    const OUTAGE: Duration = Duration::from_secs(15);
    let (server, proxy, mut chain) = chain_behind_proxy(&["--outage-grace", "5s"]).await;
    let stream = chain.connect().await.unwrap();
    let spec = ExchangeSpec::symmetric(TRANSFER_BYTES, 1400);
    let exchange =
        tokio::spawn(
            async move { sink_source_exchange(stream, &spec, Duration::from_secs(120)).await },
        );
    cut_path_mid_transfer(&server, &proxy, &chain, OUTAGE).await;
    let result = exchange.await.expect("exchange task panicked");
    assert!(
        result.is_err(),
        "the transfer survived an outage three times longer than the grace: {result:?}"
    );
    let log = chain.client.as_ref().unwrap().log_contents();
    assert!(
        log.contains("giving up on the connection"),
        "the client log does not say it gave up:\n{log}"
    );
    chain.assert_alive();
}
