//! The client address the relay hands the broker (in CONN_INIT), with and without trusted
//! proxies: forwarding headers from an untrusted peer are ignored (the broker sees the real
//! peer), a chain of trusted proxies is walked from the right, and the binary takes its
//! list from `--trusted-proxy` / `TUNNEL_TRUSTED_PROXIES` and refuses a bad one.
//!
//! The addresses in the headers (203.0.113.0/24, 198.51.100.0/24, 2001:db8::/32 are
//! documentation ranges) are header values only: every connection goes to 127.0.0.1.
//!
//! `cargo build --workspace --bins && cargo test -p tunnel-tests --test client_addr`.

mod support_raw;

use std::time::{Duration, Instant};

use support_raw::{start_echo_broker, RelayProcess, SERVER};
use tunnel_servlet::Cidr;
use tunnel_tests::inproc::{raw_connect, InProcessOptions, InProcessTunnel};
use tunnel_tests::{bin_path, init_tracing, ChildProcess, TestDir};

/// What the in-process broker was told about the next connection opened with `headers`.
async fn broker_sees(tunnel: &InProcessTunnel, headers: &[(&str, &str)]) -> String {
    tunnel
        .client_addr_of_raw_connect(&tunnel.relay_url(), headers)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

async fn tunnel_trusting(trusted: &[&str]) -> InProcessTunnel {
    let mut options = InProcessOptions::default();
    options.relay.trusted_proxies = trusted.iter().map(|s| s.parse::<Cidr>().unwrap()).collect();
    InProcessTunnel::start(options).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoofed_headers_from_an_untrusted_peer_are_ignored() {
    init_tracing();
    // Default (nothing trusted), and a list that does not hold the test's 127.0.0.1.
    for trusted in [&[][..], &["10.0.0.0/8", "::1/128"][..]] {
        let tunnel = tunnel_trusting(trusted).await;
        for headers in [
            &[("x-forwarded-for", "203.0.113.7")][..],
            &[("forwarded", "for=198.51.100.1")][..],
            &[
                ("x-forwarded-for", "203.0.113.7, 10.1.1.1"),
                ("forwarded", "for=\"[2001:db8::1]:80\""),
            ][..],
        ] {
            let seen = broker_sees(&tunnel, headers).await;
            assert!(
                seen.starts_with("127.0.0.1:"),
                "trusted {trusted:?}, headers {headers:?}: the broker got {seen:?}, not the \
                 real peer"
            );
            eprintln!("[report] untrusted peer, {headers:?}: broker sees {seen}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_of_trusted_proxies_is_walked_from_the_right() {
    init_tracing();
    let tunnel = tunnel_trusting(&["127.0.0.0/8"]).await;
    let cases: [(&[(&str, &str)], &str); 5] = [
        // Two trusted proxies: 127.0.0.2 passed the client on to 127.0.0.1 (the peer).
        (
            &[("x-forwarded-for", "203.0.113.7, 127.0.0.2")],
            "203.0.113.7",
        ),
        // Whatever the client wrote left of its own address is not believed.
        (
            &[("x-forwarded-for", "198.51.100.9, 203.0.113.7, 127.0.0.2")],
            "203.0.113.7",
        ),
        (
            &[(
                "forwarded",
                "for=\"[2001:db8::17]:4711\";proto=https, for=127.0.0.2",
            )],
            "2001:db8::17",
        ),
        // An opaque hop written by the trusted 127.0.0.2: that proxy is as far as we know.
        (
            &[("x-forwarded-for", "203.0.113.7, unknown, 127.0.0.2")],
            "127.0.0.2",
        ),
        // A trusted peer without headers is the client itself.
        (&[], "127.0.0.1:"),
    ];
    for (headers, want) in cases {
        let seen = broker_sees(&tunnel, headers).await;
        assert!(
            seen == want || (want.ends_with(':') && seen.starts_with(want)),
            "{headers:?}: the broker got {seen:?}, expected {want:?}"
        );
        eprintln!("[report] trusted 127.0.0.0/8, {headers:?}: broker sees {seen}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_takes_trusted_proxies_from_flag_or_environment() {
    init_tracing();
    let dir = TestDir::new("trusted-proxy-bin").unwrap();
    let relay = RelayProcess::start_with_env(
        dir.path(),
        "relay",
        &[],
        &[("TUNNEL_TRUSTED_PROXIES", "10.0.0.0/8, 127.0.0.0/8")],
        "info",
    )
    .await;
    let _broker = start_echo_broker(
        dir.path(),
        "broker",
        relay.link,
        &relay.secret_file,
        &[],
        "info",
    );
    relay.wait_link_up().await;
    raw_connect(
        &relay.tunnel_url(),
        SERVER,
        &[("x-forwarded-for", "203.0.113.7, 127.0.0.2")],
    )
    .await
    .unwrap();
    let log = || relay.process.log_contents();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !log().contains("client=203.0.113.7") {
        assert!(
            Instant::now() < deadline,
            "relay log has no connection from 203.0.113.7:\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A range with host bits set is refused at start, with the likely intent.
    let mut bad = ChildProcess::spawn(
        "relay-bad-cidr",
        &bin_path("tunnel-servlet"),
        [
            "--link-secret-file",
            &relay.secret_file.display().to_string(),
            "--listen",
            "127.0.0.1:0",
            "--link-listen",
            "127.0.0.1:0",
            "--trusted-proxy",
            "127.0.0.1/32",
            "--trusted-proxy",
            "10.1.2.3/8",
        ],
        &[],
        dir.path(),
    )
    .unwrap();
    let status = bad.wait_exit(Duration::from_secs(10)).await.unwrap();
    assert!(!status.success());
    assert!(
        bad.log_contents().contains("did you mean 10.0.0.0/8"),
        "{}",
        bad.log_contents()
    );
}
