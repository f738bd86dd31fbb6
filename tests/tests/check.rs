//! `tunnel-client --check` (and `tunnel_client::check`): the report on the path to a relay,
//! through squid for an http:// relay and directly for an https:// one.
//!
//! Needs squid (Debian package `squid`) and the binaries: `cargo build --workspace --bins &&
//! cargo test -p tunnel-tests --test check`. The relays hold pulls 2 s (not 20 s) so the held
//! pull probe is quick.

use std::time::Duration;

use tunnel_tests::inproc::{InProcessOptions, InProcessTunnel, SERVER_NAME};
use tunnel_tests::services::Squid;
use tunnel_tests::{bin_path, free_addr, init_tracing, ChildProcess, TestDir};

const PULL_WAIT: Duration = Duration::from_secs(2);

fn options() -> InProcessOptions {
    let mut options = InProcessOptions::default();
    options.relay.pull_wait = PULL_WAIT;
    // The unknown-server case wants the relay's 404: a fresh relay answers names it has not
    // seen with 503 (retry) during its name grace, in case their broker is re-linking.
    options.relay.name_grace = std::time::Duration::ZERO;
    options
}

/// The binary through squid to an http:// relay: the report names the proxy and how it was
/// chosen, HTTP/1.1, no TLS, and a pull held for the relay's pull wait and answered intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_the_proxy_http_version_and_the_held_pull() {
    init_tracing();
    let dir = TestDir::new("check-squid").unwrap();
    let squid = Squid::start(dir.path(), None).await.unwrap();
    let tunnel = InProcessTunnel::start(options()).await.unwrap();
    let args = [
        "--check".to_string(),
        "--relay".into(),
        tunnel.relay_url(),
        "--server".into(),
        SERVER_NAME.into(),
        "--listen".into(),
        free_addr().to_string(),
        "--proxy".into(),
        squid.url(),
    ];
    let mut client = ChildProcess::spawn(
        "client-check",
        &bin_path("tunnel-client"),
        args,
        &[],
        dir.path(),
    )
    .unwrap();
    let status = client.wait_exit(Duration::from_secs(30)).await.unwrap();
    let log = client.log_contents();
    assert!(status.success(), "--check failed:\n{log}");
    for expected in [
        &format!("route         proxy {} (--proxy)", squid.url()),
        "HTTP version  HTTP/1.1",
        "TLS           none (http:// relay)",
        "answered intact (NoOp)",
        "path OK",
    ] {
        assert!(
            log.contains(expected),
            "no {expected:?} in the report:\n{log}"
        );
    }
    let held = log
        .split("held pull     held ")
        .nth(1)
        .and_then(|rest| rest.split(" s ").next())
        .and_then(|secs| secs.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no held pull time in:\n{log}"));
    assert!(
        held >= PULL_WAIT.as_secs_f64() - 0.2,
        "the pull was held {held} s, less than the relay's pull wait"
    );
}

/// An https:// relay: the report names the issuer of the certificate seen (the test CA) and
/// HTTP/2 (negotiated by ALPN); an unknown server makes the report say the path fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_the_certificate_issuer_and_reports_failures() {
    init_tracing();
    let dir = TestDir::new("check-tls").unwrap();
    let (tunnel, ca_file) =
        InProcessTunnel::start_https(dir.path(), "tunnel-tests check CA", options())
            .await
            .unwrap();
    let mut config = tunnel.client_config(&tunnel.relay_url());
    config.ca_file = Some(ca_file);
    let report = tunnel_client::check(config.clone()).await.unwrap();
    eprintln!("{report}");
    assert!(report.ok, "{report}");
    assert_eq!(report.get("route"), Some("direct"));
    assert_eq!(report.get("HTTP version"), Some("HTTP/2.0"));
    let tls = report.get("TLS").unwrap_or_default();
    assert!(tls.contains("CN=tunnel-tests check CA"), "{report}");

    config.server_name = "no-such-server".into();
    let report = tunnel_client::check(config).await.unwrap();
    eprintln!("{report}");
    assert!(!report.ok, "{report}");
    let failed = report.get("failed").unwrap_or_default();
    assert!(failed.contains("404"), "{report}");
}
