//! TLS end to end: the relay serving HTTPS with the client verifying it against a CA file, a
//! client without that CA failing fast with a certificate error, the broker link over TLS
//! with the broker verifying the relay, and mutual TLS on the link (the relay verifying the
//! broker's certificate). Certificates come from a fresh rcgen CA per test.
//!
//! `cargo build --workspace --bins && cargo test -p tunnel-tests --test tls`.

use std::time::{Duration, Instant};

use tunnel_broker::LinkTls;
use tunnel_client::ConnectError;
use tunnel_proto::ConnectionConfig;
use tunnel_servlet::TlsFiles;
use tunnel_tests::certs::{CertFiles, TestCa, Usage, LOOPBACK_NAMES};
use tunnel_tests::inproc::{InProcessOptions, InProcessTunnel};
use tunnel_tests::services::workspace_root;
use tunnel_tests::{bin_path, init_tracing, sink_source_exchange, ExchangeSpec, TestDir};

const BULK_BYTES: u64 = 4 << 20;
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(120);

fn tls_files(files: CertFiles) -> TlsFiles {
    TlsFiles {
        cert: files.cert,
        key: files.key,
    }
}

/// Connects to `tunnel` through `relay_url` with `ca_file` and moves `BULK_BYTES` each way.
async fn bulk_exchange(
    case: &str,
    tunnel: &InProcessTunnel,
    ca_file: Option<std::path::PathBuf>,
    seed: u64,
) {
    let mut config = tunnel.client_config(&tunnel.relay_url());
    config.ca_file = ca_file;
    let started = Instant::now();
    let stream = tokio::time::timeout(Duration::from_secs(60), tunnel_client::connect(config))
        .await
        .unwrap_or_else(|_| panic!("{case}: connect hung"))
        .unwrap_or_else(|e| panic!("{case}: connect failed: {e}"));
    let report = sink_source_exchange(
        stream,
        &ExchangeSpec::symmetric(BULK_BYTES, seed),
        EXCHANGE_TIMEOUT,
    )
    .await
    .unwrap_or_else(|e| panic!("{case}: exchange failed: {e}"));
    eprintln!(
        "[report] {case}: {} B up + {BULK_BYTES} B down, SHA-256 verified both ways, 0 B lost, \
         exchange {:.2?}, with connect {:.2?}",
        report.sent,
        report.elapsed,
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_relay_verified_with_the_ca_file_and_refused_without_it() {
    init_tracing();
    let dir = TestDir::new("tls-https").unwrap();
    let ca = TestCa::new("tunnel-tests HTTPS CA").unwrap();
    let ca_file = ca.write_cert(&dir.path().join("ca.pem")).unwrap();
    let mut options = InProcessOptions::default();
    options.relay.http_tls = Some(tls_files(
        ca.issue(LOOPBACK_NAMES, Usage::Server, dir.path(), "relay")
            .unwrap(),
    ));
    let tunnel = InProcessTunnel::start(options).await.unwrap();
    assert!(tunnel.relay_url().starts_with("https://"));

    bulk_exchange(
        "https:// relay, client trusts the CA file",
        &tunnel,
        Some(ca_file),
        21,
    )
    .await;

    // Without the CA the certificate is unknown: a final error naming the certificate,
    // well before the connect timeout (retrying cannot make an untrusted certificate good).
    let mut config = tunnel.client_config(&tunnel.relay_url());
    config.connect_timeout = Duration::from_secs(30);
    let started = Instant::now();
    let result = tokio::time::timeout(Duration::from_secs(10), tunnel_client::connect(config))
        .await
        .expect("a client without the CA must fail fast, not retry until its timeout");
    let err = match result {
        Ok(_) => panic!("connected to a relay whose certificate it cannot verify"),
        Err(e) => e,
    };
    let text = err.to_string();
    eprintln!(
        "[report] https:// relay, client without the CA: refused after {:.2?}: {text}",
        started.elapsed()
    );
    assert!(
        matches!(err, ConnectError::Tls(_)),
        "expected ConnectError::Tls, got {err:?}"
    );
    assert!(text.contains("certificate"), "{text}");

    // A CA file from another CA does not help either.
    let other = TestCa::new("unrelated CA").unwrap();
    let other_file = other.write_cert(&dir.path().join("other-ca.pem")).unwrap();
    let mut config = tunnel.client_config(&tunnel.relay_url());
    config.ca_file = Some(other_file);
    let result = tokio::time::timeout(Duration::from_secs(10), tunnel_client::connect(config))
        .await
        .expect("fails fast");
    let Err(err) = result else {
        panic!("a foreign CA verified the relay");
    };
    assert!(matches!(err, ConnectError::Tls(_)), "{err:?}");
}

/// A relay whose link listener serves TLS with a certificate from `ca` (and, with
/// `client_ca`, requires broker certificates from that CA).
fn link_tls_options(
    dir: &TestDir,
    ca: &TestCa,
    client_ca: Option<std::path::PathBuf>,
) -> InProcessOptions {
    let mut options = InProcessOptions::default();
    options.relay.link_tls = Some(tls_files(
        ca.issue(LOOPBACK_NAMES, Usage::Server, dir.path(), "relay-link")
            .unwrap(),
    ));
    options.relay.link_tls_client_ca = client_ca;
    options
}

fn link_tls(ca_file: &std::path::Path, identity: Option<&CertFiles>) -> LinkTls {
    LinkTls::from_files(
        "127.0.0.1",
        Some(ca_file),
        identity.map(|i| (i.cert.as_path(), i.key.as_path())),
    )
    .unwrap()
}

/// Starts the relay of `options` and links a broker with `tls` to it; returns the error.
async fn broker_link_error(options: InProcessOptions, tls: LinkTls) -> String {
    let mut relay_config = options.relay;
    relay_config.link_secret = tunnel_tests::inproc::LINK_SECRET.to_vec();
    let relay = tunnel_servlet::Relay::bind(relay_config)
        .await
        .unwrap()
        .spawn();
    let started = Instant::now();
    let result = InProcessTunnel::bind_broker(
        &relay.link_addr().to_string(),
        Some(tls),
        ConnectionConfig::default(),
    )
    .await;
    let links = relay.metrics().links_up;
    relay.abort();
    let err = match result {
        Ok(_) => panic!("the broker linked"),
        Err(e) => e.to_string(),
    };
    assert_eq!(links, 0, "links up at the relay");
    eprintln!(
        "[report] refused link after {:.2?}: {err}",
        started.elapsed()
    );
    err
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_link_over_tls_verifies_the_relay() {
    init_tracing();
    let dir = TestDir::new("tls-link").unwrap();
    let ca = TestCa::new("tunnel-tests link CA").unwrap();
    let ca_file = ca.write_cert(&dir.path().join("ca.pem")).unwrap();

    let mut options = link_tls_options(&dir, &ca, None);
    options.broker_tls = Some(link_tls(&ca_file, None));
    let tunnel = InProcessTunnel::start(options).await.unwrap();
    bulk_exchange(
        "TLS broker link (broker verifies the relay)",
        &tunnel,
        None,
        22,
    )
    .await;
    drop(tunnel);

    // A broker trusting another CA refuses the relay.
    let other = TestCa::new("unrelated CA").unwrap();
    let other_file = other.write_cert(&dir.path().join("other.pem")).unwrap();
    let err = broker_link_error(
        link_tls_options(&dir, &ca, None),
        link_tls(&other_file, None),
    )
    .await;
    assert!(err.to_lowercase().contains("certificate"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_link_accepts_only_brokers_with_a_certificate_from_its_ca() {
    init_tracing();
    let dir = TestDir::new("tls-mtls").unwrap();
    let ca = TestCa::new("tunnel-tests mTLS CA").unwrap();
    let ca_file = ca.write_cert(&dir.path().join("ca.pem")).unwrap();
    let broker_cert = ca
        .issue(
            &["broker.tunnel-tests"],
            Usage::Client,
            dir.path(),
            "broker",
        )
        .unwrap();
    let rogue_ca = TestCa::new("rogue CA").unwrap();
    let rogue_cert = rogue_ca
        .issue(
            &["broker.tunnel-tests"],
            Usage::Client,
            dir.path(),
            "rogue-broker",
        )
        .unwrap();

    let mut options = link_tls_options(&dir, &ca, Some(ca_file.clone()));
    options.broker_tls = Some(link_tls(&ca_file, Some(&broker_cert)));
    let tunnel = InProcessTunnel::start(options).await.unwrap();
    bulk_exchange("mutual-TLS broker link", &tunnel, None, 23).await;
    drop(tunnel);

    // The relay refuses a certificate from another CA, and no certificate at all. With TLS
    // 1.3 the broker learns it from the alert after its handshake, or from the closed link.
    for (case, identity) in [("rogue CA", Some(&rogue_cert)), ("no certificate", None)] {
        let options = link_tls_options(&dir, &ca, Some(ca_file.clone()));
        let err = broker_link_error(options, link_tls(&ca_file, identity)).await;
        eprintln!("[report] mutual TLS, broker with {case}: {err}");
        let lower = err.to_lowercase();
        assert!(
            lower.contains("unknownca") || lower.contains("certificate"),
            "{case}: the broker's error does not name the certificate problem: {err}"
        );
    }
}

#[test]
fn client_has_no_switch_to_skip_certificate_verification() {
    let help = std::process::Command::new(bin_path("tunnel-client"))
        .arg("--help")
        .output()
        .expect("running tunnel-client --help");
    let help = String::from_utf8_lossy(&help.stdout).to_lowercase();
    assert!(help.contains("--ca-file"), "help text:\n{help}");
    for word in [
        "insecure",
        "accept-invalid",
        "no-verify",
        "skip-verify",
        "danger",
        "trust-all",
    ] {
        assert!(
            !help.contains(word),
            "tunnel-client --help mentions {word:?}:\n{help}"
        );
    }
    // Nor a hidden one: the client's sources never turn verification off.
    let mut dirs = vec![workspace_root().join("tunnel-client/src")];
    let mut sources = Vec::new();
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                sources.push(path);
            }
        }
    }
    assert!(sources.len() > 5, "client sources found: {sources:?}");
    for path in sources {
        let text = std::fs::read_to_string(&path).unwrap();
        for call in [
            "danger_accept_invalid_certs",
            "danger_accept_invalid_hostnames",
            "dangerous()",
        ] {
            assert!(!text.contains(call), "{} calls {call}", path.display());
        }
    }
}
