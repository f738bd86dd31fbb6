//! Connection churn through the real binaries, the short version of the bench's `soak`
//! section (same code: `tunnel_tests::soak`): 32 workers connect to the client's port, echo
//! 2 KiB through the tunnel to an echo server behind the broker, close, and start over, for
//! 20 s over HTTP/1.1, then 10 s over HTTP/2. Every connection must succeed, none of the
//! three processes may log a WARN or ERROR line (a clean end is not an operator's business,
//! whatever races with it), and the descriptors must come back to their idle level once the
//! closed connections have lingered.

use std::time::Duration;

use tunnel_tests::soak::{self, SoakConfig, Watched};
use tunnel_tests::{init_tracing, Chain, ChainOptions, EchoServer};

/// Long enough for thousands of connections in a debug build and for the relay's and the
/// client's 5 s TIME-WAIT to turn over several times; short enough for CI.
const CHURN: Duration = Duration::from_secs(20);
/// Bound of the settle wait (it ends as soon as the descriptors are back, 11 to 15 s in
/// practice). It must outlast the client's HTTP pool idle timeout: pooled keep-alive
/// connections to the relay close 10 s after their last use, when the pool's reaper next runs
/// (up to another 10 s), in the client and in the relay; and the 5 s TIME-WAIT of the last
/// tunnel connections.
const SETTLE: Duration = Duration::from_secs(30);
/// Descriptors allowed above the idle level after settling: none. The idle level is read
/// right after the chain's readiness probe, while its tunnel connection (in TIME-WAIT) and
/// its pooled HTTP connections are still open, so it is a few descriptors above the true idle
/// level; a leak of one descriptor in a thousand connections would still show by dozens.
const FD_TOLERANCE: usize = 0;
/// Each tunnel connection keeps an HTTP/1.1 connection (its held pull) in the client and in
/// the relay through its 5 s TIME-WAIT: about 7,000 descriptors each at 1,400 connections/s.
/// The binaries inherit this limit from the test; below `MIN_NOFILE` the churn would fail on
/// EMFILE, and the test says so instead.
const NOFILE: u64 = 65_536;
const MIN_NOFILE: u64 = 16_384;

/// Churn over HTTP/2 (h2c): shorter, its descriptors settle at once (one TCP connection).
/// It catches stream resets piling up: h2 closes the shared connection past its limits.
const CHURN_H2: Duration = Duration::from_secs(10);

/// The two churns share the machine's cores: one at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn churn_over_http1_leaves_no_failure_no_warning_and_no_descriptor() {
    let _one = ONE_AT_A_TIME.lock().await;
    churn(&[], CHURN).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn churn_over_http2_leaves_no_failure_no_warning_and_no_descriptor() {
    let _one = ONE_AT_A_TIME.lock().await;
    churn(&["--http2"], CHURN_H2).await;
}

async fn churn(client_args: &[&str], duration: Duration) {
    init_tracing();
    let limit = tunnel_tests::fdlimit::raise_nofile_limit(NOFILE).expect("RLIMIT_NOFILE");
    assert!(
        limit >= MIN_NOFILE,
        "open-file limit {limit} (hard limit too low to raise): the churn needs {MIN_NOFILE}"
    );
    let echo = EchoServer::start().await.expect("echo server");
    let mut options = ChainOptions::forward_to_echo(echo.addr());
    // WARN and ERROR lines are what the test counts; info lines would only slow the debug
    // binaries down.
    options.rust_log = "warn".into();
    options
        .client_args
        .extend(client_args.iter().map(|a| a.to_string()));
    let chain = Chain::start(options).await;
    let watched: Vec<Watched> = [
        ("relay", &chain.relay),
        ("broker", &chain.broker),
        ("client", &chain.client),
    ]
    .into_iter()
    .map(|(role, process)| {
        Watched::of(role, process.as_ref().expect("process started")).expect("process running")
    })
    .collect();

    let mut config = SoakConfig::new(chain.client_addr());
    config.duration = duration;
    config.warmup = (duration / 3).min(Duration::from_secs(8));
    config.settle_timeout = SETTLE;
    config.fd_tolerance = FD_TOLERANCE;
    let report = soak::run(&config, &watched, |line| println!("soak: {line}"))
        .await
        .expect("reading the processes");

    println!(
        "{client_args:?}: {} connections in {:.1} s ({:.0}/s), {} failed; settled in {:.1} s",
        report.connections,
        report.elapsed.as_secs_f64(),
        report.connections_per_second(),
        report.failures,
        report.settle_time.as_secs_f64()
    );
    for role in report.roles() {
        let (idle, after) = (report.idle_before[&role], report.after_settle[&role]);
        println!(
            "{role}: RSS {:.1} -> {:.1} MiB ({:.2} MiB per 100,000 connections after warm-up), \
             descriptors idle {} peak {} settled {}, WARN {} ERROR {}",
            idle.rss_bytes as f64 / 1048576.0,
            after.rss_bytes as f64 / 1048576.0,
            report.rss_growth_per_100k(&role) / 1048576.0,
            idle.fds,
            report.peak_fds(&role),
            after.fds,
            report.logs[&role].warn,
            report.logs[&role].error
        );
    }

    assert!(
        report.connections >= 500,
        "only {} connections in {duration:?}: the churn did not run",
        report.connections
    );
    assert_eq!(
        report.failures, 0,
        "failed connections, first ones: {:#?}",
        report.failure_examples
    );
    let noisy: Vec<String> = report
        .logs
        .iter()
        .flat_map(|(role, levels)| levels.examples.iter().map(move |l| format!("{role}: {l}")))
        .collect();
    assert_eq!(
        report.warnings_and_errors(),
        0,
        "WARN/ERROR lines during a clean churn, first ones: {noisy:#?}"
    );
    let not_back = report.fds_not_back();
    assert!(
        not_back.is_empty(),
        "descriptors not back to idle: {not_back:#?}"
    );
    drop(chain);
}
