//! Proxy auto-configuration (`--pac-file`, `ClientConfig::pac`) with real squids: PAC's
//! fail-over order past a proxy that is down, a PAC answering DIRECT, and broken or endless
//! PAC scripts failing the client at start with a clear message.
//!
//! Needs squid (Debian package `squid`; `.ci/run` installs it) and the binaries:
//! `cargo build --workspace --bins && cargo test -p tunnel-tests --test pac`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tunnel_client::{ClientConfig, PacSource};
use tunnel_tests::inproc::{InProcessOptions, InProcessTunnel};
use tunnel_tests::services::{wait_for_log, Squid};
use tunnel_tests::{
    bin_path, free_addr, init_tracing, sink_source_exchange, ChildProcess, ExchangeSpec, TestDir,
};

const BYTES: u64 = 1 << 20;

fn write_pac(dir: &TestDir, name: &str, script: &str) -> PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, script).unwrap();
    path
}

/// Connects with `config` and moves `BYTES` each way, SHA-256 checked on both ends.
async fn exchange(case: &str, config: ClientConfig, seed: u64) {
    let stream = tokio::time::timeout(Duration::from_secs(60), tunnel_client::connect(config))
        .await
        .unwrap_or_else(|_| panic!("{case}: connect did not return within 60 s"))
        .unwrap_or_else(|e| panic!("{case}: connect failed: {e}"));
    let spec = ExchangeSpec::symmetric(BYTES, seed);
    let report = sink_source_exchange(stream, &spec, Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("{case}: exchange failed: {e}"));
    assert_eq!(report.sent, BYTES, "{case}");
}

/// The PAC script lists two squids and DIRECT; the first squid is down (started, then
/// killed): the client moves on to the second, and squid's access log shows the tunnel's
/// requests went through it (not DIRECT).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pac_fails_over_to_the_second_squid_when_the_first_is_down() {
    init_tracing();
    let dir = TestDir::new("pac-two-squids").unwrap();
    std::fs::create_dir_all(dir.path().join("a")).unwrap();
    std::fs::create_dir_all(dir.path().join("b")).unwrap();
    let mut first = Squid::start(&dir.path().join("a"), None).await.unwrap();
    let second = Squid::start(&dir.path().join("b"), None).await.unwrap();
    first.process().kill9().await.unwrap();

    let tunnel = InProcessTunnel::start(InProcessOptions::default())
        .await
        .unwrap();
    let pac = write_pac(
        &dir,
        "proxy.pac",
        &format!(
            "function FindProxyForURL(url, host) {{\n\
               if (isInNet(host, '127.0.0.0', '255.0.0.0') && shExpMatch(url, '*/tunnel*'))\n\
                 return 'PROXY {}; PROXY {}; DIRECT';\n\
               return 'DIRECT';\n\
             }}",
            first.addr(),
            second.addr()
        ),
    );
    let mut config = tunnel.client_config(&tunnel.relay_url());
    config.pac = Some(PacSource::File(pac));
    exchange("PAC, first squid down", config, 21).await;
    let connect_line = format!("POST {}?Type=connect", tunnel.relay_url());
    wait_for_log(
        "second squid's access.log",
        || second.access_log(),
        &connect_line,
    )
    .await;
}

/// A PAC script answering DIRECT only: the client reaches the relay without a proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pac_answering_direct_connects_directly() {
    init_tracing();
    let dir = TestDir::new("pac-direct").unwrap();
    let tunnel = InProcessTunnel::start(InProcessOptions::default())
        .await
        .unwrap();
    let pac = write_pac(
        &dir,
        "direct.pac",
        "function FindProxyForURL(url, host) { return 'DIRECT'; }",
    );
    let mut config = tunnel.client_config(&tunnel.relay_url());
    config.pac = Some(PacSource::File(pac));
    exchange("PAC DIRECT", config, 22).await;
}

/// Runs the client binary with `args`; it must exit with failure within 20 s, and its log is
/// returned.
async fn client_start_failure(dir: &TestDir, label: &str, args: &[String]) -> String {
    let mut client =
        ChildProcess::spawn(label, &bin_path("tunnel-client"), args, &[], dir.path()).unwrap();
    let status = client.wait_exit(Duration::from_secs(20)).await.unwrap();
    let log = client.log_contents();
    assert!(!status.success(), "{label}: the client started:\n{log}");
    log
}

/// A PAC script with a syntax error, and one that never returns, stop the client at start
/// with a message that says what is wrong (the endless one within its --pac-timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_and_endless_pac_scripts_fail_the_client_clearly() {
    init_tracing();
    let dir = TestDir::new("pac-broken").unwrap();
    let listen = free_addr().to_string();
    let broken = write_pac(
        &dir,
        "broken.pac",
        "function FindProxyForURL(url, host) {\n  return 'DIRECT'\n",
    );
    let args = |pac: &PathBuf, extra: &[&str]| -> Vec<String> {
        let mut args: Vec<String> = [
            "--relay",
            "http://127.0.0.1:9/tunnel",
            "--listen",
            &listen,
            "--pac-file",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.push(pac.display().to_string());
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };
    let log = client_start_failure(&dir, "client-broken", &args(&broken, &[])).await;
    assert!(
        log.contains("PAC script:") && log.contains("unexpected token"),
        "no clear error for a broken PAC script:\n{log}"
    );

    let endless = write_pac(
        &dir,
        "endless.pac",
        "function FindProxyForURL(url, host) { while (true) {} }",
    );
    let started = Instant::now();
    let log = client_start_failure(
        &dir,
        "client-endless",
        &args(&endless, &["--pac-timeout", "500ms"]),
    )
    .await;
    assert!(
        log.contains("did not finish within 500ms"),
        "no clear error for an endless PAC script:\n{log}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the endless PAC held the client for {:?}",
        started.elapsed()
    );
}
