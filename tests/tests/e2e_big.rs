//! Acceptance figure: 256 MiB each way at once through ONE tunnel connection, SHA-256
//! checked, reporting MiB/s. Ignored by default (it is a measurement, and slow in the dev
//! profile); run it with the release binaries:
//!
//! ```text
//! cargo build --release --workspace --bins
//! TUNNEL_BIN_DIR=target/release cargo test --release -p tunnel-tests --test e2e_big -- --ignored --nocapture
//! ```

use std::time::{Duration, Instant};

use tunnel_tests::{
    init_tracing, sink_source_exchange, Chain, ChainOptions, ExchangeSpec, SinkSourceServer,
};

/// Bytes each way; `TUNNEL_BIG_MIB` overrides the 256 MiB of the acceptance figure.
fn bytes_each_way() -> u64 {
    std::env::var("TUNNEL_BIG_MIB")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(256)
        << 20
}

/// Deadline of the whole transfer: wide, it is a measurement and the dev profile is slow.
const TIMEOUT: Duration = Duration::from_secs(900);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "acceptance measurement (256 MiB each way); run with --ignored, ideally TUNNEL_BIN_DIR=target/release"]
async fn big_transfer_through_one_connection() {
    init_tracing();
    let len = bytes_each_way();
    let server = SinkSourceServer::start().await.unwrap();
    let mut chain = Chain::start(ChainOptions::forward_to_sink_source(server.addr())).await;

    let stream = chain.connect().await.unwrap();
    let started = Instant::now();
    let report = sink_source_exchange(stream, &ExchangeSpec::symmetric(len, 256), TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("big transfer failed: {e}"));
    let secs = started.elapsed().as_secs_f64();
    let mib = (len >> 20) as f64;
    eprintln!(
        "{} MiB each way through one connection in {:.2} s: {:.1} MiB/s each way, {:.1} MiB/s both together (binaries: {}); relay dropped {} packets",
        len >> 20,
        secs,
        mib / secs,
        2.0 * mib / secs,
        tunnel_tests::bins::bin_dir().display(),
        chain.relay_metric("tunnel_packets_dropped_total").await
    );
    assert_eq!((report.sent, report.received), (len, len));
    chain.assert_alive();
}
