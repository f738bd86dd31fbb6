//! The tunnel through real HTTP intermediaries: squid and tinyproxy as the client's forward
//! proxy (plain HTTP relay, HTTPS relay through CONNECT, proxy authentication, HTTP_PROXY
//! from the environment), and nginx as a reverse proxy in front of the relay, running the
//! shipped example `deploy/nginx/tunnel.conf` (buffering off, on, and on whatever the relay
//! asks; a 65 s long poll). The session's downstream streams where the path passes a stream
//! on (squid, nginx unless it buffers regardless) and falls back to polling where it does
//! not, within the probe deadline; every case checks which mode the client ended in. Over
//! HTTP/2 (h2c and HTTPS straight to the relay) the session streams upstream too; behind
//! nginx speaking HTTP/2, which holds request bodies until they end, it keeps pushing.
//!
//! Needs squid, tinyproxy, nginx and openssl (Debian packages of the same names; `.ci/run`
//! installs them) and the binaries: `cargo build --workspace --bins && cargo test -p
//! tunnel-tests --test proxies`. Each case prints bytes moved and lost and the time taken.

use std::time::{Duration, Instant};

use tunnel_client::{
    ClientConfig, ConnectError, Downstream, HttpVersion, ProxyConfig, SessionStats, TransportMode,
    TunnelClient, Upstream,
};
use tunnel_proto::ConnectionConfig;
use tunnel_tests::inproc::{expect_connect_error, InProcessOptions, InProcessTunnel, SERVER_NAME};
use tunnel_tests::services::{wait_for_log, Nginx, NginxOptions, ProxyUser, Squid, Tinyproxy};
use tunnel_tests::{
    bin_path, free_addr, init_tracing, sink_source_exchange, wait_for_tcp, ChildProcess,
    ExchangeSpec, FaultConfig, FaultProxy, TestDir,
};

/// Bytes moved each way in a bulk case.
const BULK_BYTES: u64 = 4 << 20;
/// Deadline of one bulk exchange (two shared cores, a proxy in the path).
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(120);

/// Connects with `config` and moves `BULK_BYTES` each way, verified with SHA-256 on both
/// ends; prints the case's line of the report. Returns how the session's downstream went.
async fn bulk_exchange(case: &str, config: ClientConfig, seed: u64) -> SessionStats {
    let client = TunnelClient::new(config).unwrap_or_else(|e| panic!("{case}: client: {e}"));
    bulk_exchange_with(case, &client, seed, Duration::ZERO).await
}

/// [`bulk_exchange`] with a client made by the caller, idle for `idle_first` between the
/// connect and the transfer.
async fn bulk_exchange_with(
    case: &str,
    client: &TunnelClient,
    seed: u64,
    idle_first: Duration,
) -> SessionStats {
    let started = Instant::now();
    let stream = tokio::time::timeout(Duration::from_secs(60), client.connect())
        .await
        .unwrap_or_else(|_| panic!("{case}: connect did not return within 60 s"))
        .unwrap_or_else(|e| panic!("{case}: connect failed: {e}"));
    tokio::time::sleep(idle_first).await;
    let spec = ExchangeSpec::symmetric(BULK_BYTES, seed);
    let report = sink_source_exchange(stream, &spec, EXCHANGE_TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("{case}: exchange failed: {e}"));
    assert_eq!(report.sent, BULK_BYTES, "{case}: bytes sent");
    let stats = client
        .session_stats()
        .unwrap_or_else(|| panic!("{case}: the client has no session"));
    eprintln!(
        "[report] {case}: {} B up + {} B down, SHA-256 verified both ways, 0 B lost, \
         exchange {:.2?}, with connect {:.2?}; downstream {} ({} streams, {} polls, {} \
         fall-backs), upstream {} ({} upstreams, {} fall-backs)",
        report.sent,
        BULK_BYTES,
        report.elapsed,
        started.elapsed(),
        stats.downstream,
        stats.streams,
        stats.polls,
        stats.fallbacks,
        stats.upstream,
        stats.upstreams,
        stats.upstream_fallbacks
    );
    stats
}

fn proxy(url: String, user: Option<&ProxyUser>) -> Option<ProxyConfig> {
    Some(ProxyConfig {
        url,
        username: user.map(|u| u.name.clone()),
        password: user.map(|u| u.password.clone()),
    })
}

/// A relay serving HTTPS with a certificate for 127.0.0.1/localhost from a fresh CA; returns
/// the tunnel and the CA file clients must trust.
async fn https_tunnel(dir: &TestDir) -> (InProcessTunnel, std::path::PathBuf) {
    InProcessTunnel::start_https(
        dir.path(),
        "tunnel-tests proxies CA",
        InProcessOptions::default(),
    )
    .await
    .unwrap()
}

fn test_user() -> ProxyUser {
    ProxyUser {
        name: "tunnel".into(),
        password: "s3cret pass:word".into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn squid_forwards_plain_http_and_https_through_connect() {
    init_tracing();
    let dir = TestDir::new("squid").unwrap();
    let squid = Squid::start(dir.path(), None).await.unwrap();

    let plain = InProcessTunnel::start(InProcessOptions::default())
        .await
        .unwrap();
    // squid passes a streamed response on as it comes; the client streams in auto mode.
    // Forced either way, the transfer is intact too.
    let modes = [
        (TransportMode::Auto, Downstream::Streaming),
        (TransportMode::Stream, Downstream::Streaming),
        (TransportMode::Poll, Downstream::Polling),
    ];
    for (i, (mode, expected)) in modes.into_iter().enumerate() {
        let mut config = plain.client_config(&plain.relay_url());
        config.proxy = proxy(squid.url(), None);
        config.mode = mode;
        let case = format!("squid, http:// relay, mode {mode:?}");
        let stats = bulk_exchange(&case, config, 1 + 10 * i as u64).await;
        assert_eq!(stats.downstream, expected, "{case}: {stats:?}");
    }
    // squid logs a request when it ends; the connect request ended long ago.
    let connect_line = format!("POST {}?Type=connect", plain.relay_url());
    wait_for_log("squid access.log", || squid.access_log(), &connect_line).await;
    // squid adds X-Forwarded-For, but squid is not a trusted proxy of this relay (a
    // client's forward proxy never is): the broker gets squid's own address and port.
    let through_squid = plain
        .accepted_clients()
        .last()
        .map(|c| c.client_addr.clone())
        .unwrap_or_default();
    assert!(
        through_squid.starts_with("127.0.0.1:"),
        "client address the broker got through squid: {through_squid:?}"
    );

    let (tls, ca_file) = https_tunnel(&dir).await;
    let mut config = tls.client_config(&tls.relay_url());
    config.proxy = proxy(squid.url(), None);
    config.ca_file = Some(ca_file);
    bulk_exchange("squid, https:// relay via CONNECT", config, 2).await;
    // The CONNECT tunnel is logged when it closes: the stream is gone, and with it the
    // client's connection pool.
    let connect_line = format!("CONNECT {}", tls.relay_http_addr());
    wait_for_log("squid access.log", || squid.access_log(), &connect_line).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tinyproxy_forwards_plain_http_and_https_through_connect() {
    init_tracing();
    let dir = TestDir::new("tinyproxy").unwrap();
    let plain = InProcessTunnel::start(InProcessOptions::default())
        .await
        .unwrap();
    let (tls, ca_file) = https_tunnel(&dir).await;
    // CONNECT allowed to the HTTPS relay's port only.
    let tinyproxy = Tinyproxy::start(dir.path(), &[tls.relay_http_addr().port()])
        .await
        .unwrap();

    let mut config = plain.client_config(&plain.relay_url());
    config.proxy = proxy(tinyproxy.url(), None);
    bulk_exchange("tinyproxy, http:// relay", config, 3).await;
    let request_line = format!("POST {}?Type=connect", plain.relay_url());
    wait_for_log("tinyproxy log", || tinyproxy.log(), &request_line).await;

    let mut config = tls.client_config(&tls.relay_url());
    config.proxy = proxy(tinyproxy.url(), None);
    config.ca_file = Some(ca_file);
    bulk_exchange("tinyproxy, https:// relay via CONNECT", config, 4).await;
    let connect_line = format!("CONNECT {}", tls.relay_http_addr());
    wait_for_log("tinyproxy log", || tinyproxy.log(), &connect_line).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn squid_basic_auth_right_credentials_pass_wrong_ones_get_a_clear_407() {
    init_tracing();
    let dir = TestDir::new("squid-auth").unwrap();
    let user = test_user();
    let squid = Squid::start(dir.path(), Some(&user)).await.unwrap();
    let plain = InProcessTunnel::start(InProcessOptions::default())
        .await
        .unwrap();
    let (tls, ca_file) = https_tunnel(&dir).await;

    let mut config = plain.client_config(&plain.relay_url());
    config.proxy = proxy(squid.url(), Some(&user));
    bulk_exchange("squid with basic auth, http:// relay", config, 5).await;
    // The access log names the authenticated user.
    wait_for_log("squid access.log", || squid.access_log(), " tunnel HIER_").await;

    let mut config = tls.client_config(&tls.relay_url());
    config.proxy = proxy(squid.url(), Some(&user));
    config.ca_file = Some(ca_file.clone());
    bulk_exchange(
        "squid with basic auth, https:// relay via CONNECT",
        config,
        6,
    )
    .await;

    let wrong = ProxyUser {
        name: user.name.clone(),
        password: "not the password".into(),
    };
    // A 407 is final: the client must say so at once, not retry until its connect timeout.
    let quick = Duration::from_secs(10);
    for (case, url, creds, ca) in [
        (
            "squid, wrong password, http://",
            plain.relay_url(),
            Some(&wrong),
            None,
        ),
        (
            "squid, no credentials, http://",
            plain.relay_url(),
            None,
            None,
        ),
        (
            "squid, wrong password, https:// (CONNECT)",
            tls.relay_url(),
            Some(&wrong),
            Some(ca_file.clone()),
        ),
        (
            "squid, no credentials, https:// (CONNECT)",
            tls.relay_url(),
            None,
            Some(ca_file.clone()),
        ),
    ] {
        let mut config = plain.client_config(&url);
        config.proxy = proxy(squid.url(), creds);
        config.ca_file = ca;
        config.connect_timeout = Duration::from_secs(30);
        let err = expect_connect_error(case, config, quick).await;
        let text = err.to_string();
        assert!(
            text.contains("407") && text.to_lowercase().contains("proxy"),
            "{case}: error does not say 407 from the proxy: {text}"
        );
        assert!(
            matches!(err, ConnectError::Refused { status: 407, .. }),
            "{case}: expected Refused {{ status: 407 }}, got {err:?}"
        );
    }
}

/// Starts the client binary with `env` on a free port, forwarding to the in-process
/// broker, and runs one exchange through it.
async fn exchange_through_client_binary(
    case: &str,
    tunnel: &InProcessTunnel,
    dir: &TestDir,
    env: &[(String, String)],
    seed: u64,
) {
    let listen = free_addr();
    let args = vec![
        "--relay".to_string(),
        tunnel.relay_url(),
        "--server".into(),
        SERVER_NAME.into(),
        "--listen".into(),
        listen.to_string(),
    ];
    let mut client = ChildProcess::spawn(
        &format!("client-{seed}"),
        &bin_path("tunnel-client"),
        args,
        env,
        dir.path(),
    )
    .unwrap();
    wait_for_tcp(listen, Duration::from_secs(20))
        .await
        .unwrap_or_else(|e| panic!("{case}: client port: {e}"));
    let stream = tokio::net::TcpStream::connect(listen).await.unwrap();
    let spec = ExchangeSpec::symmetric(BULK_BYTES, seed);
    let report = sink_source_exchange(stream, &spec, EXCHANGE_TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("{case}: exchange failed: {e}"));
    eprintln!(
        "[report] {case}: {} B up + {BULK_BYTES} B down, SHA-256 verified, 0 B lost, {:.2?}",
        report.sent, report.elapsed
    );
    client.kill9().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_binary_uses_http_proxy_from_its_environment() {
    init_tracing();
    let dir = TestDir::new("env-proxy").unwrap();
    let squid = Squid::start(dir.path(), None).await.unwrap();
    let tunnel = InProcessTunnel::start(InProcessOptions::default())
        .await
        .unwrap();
    let connect_line = format!("POST {}?Type=connect", tunnel.relay_url());
    let rust_log = ("RUST_LOG".to_string(), "info".to_string());

    // HTTP_PROXY for the child only; the relay is on 127.0.0.1 and no NO_PROXY is set, so
    // the proxy must be used (reqwest has no implicit loopback exception).
    let env = [rust_log.clone(), ("HTTP_PROXY".to_string(), squid.url())];
    exchange_through_client_binary("client binary, HTTP_PROXY=squid", &tunnel, &dir, &env, 7).await;
    wait_for_log("squid access.log", || squid.access_log(), &connect_line).await;
    let through_proxy = squid.access_log().matches(&connect_line).count();

    // NO_PROXY naming the relay's host: the client goes direct, and squid sees nothing new.
    let env = [
        rust_log,
        ("HTTP_PROXY".to_string(), squid.url()),
        ("NO_PROXY".to_string(), "127.0.0.1".to_string()),
    ];
    exchange_through_client_binary(
        "client binary, HTTP_PROXY + NO_PROXY",
        &tunnel,
        &dir,
        &env,
        8,
    )
    .await;
    // Give squid the time it would need to log a request, then check it logged none.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        squid.access_log().matches(&connect_line).count(),
        through_proxy,
        "NO_PROXY=127.0.0.1 should bypass squid:\n{}",
        squid.access_log()
    );
}

/// The relay with its pull wait and inactivity timeout set; broker keepalives far apart so
/// an idle connection really leaves its pull held for the whole wait.
async fn tunnel_for_nginx(pull_wait: Duration, keepalive: Duration) -> InProcessTunnel {
    let mut options = InProcessOptions::default();
    options.relay.pull_wait = pull_wait;
    options.relay.client_inactivity_timeout = pull_wait * 3;
    options.broker_connection = ConnectionConfig {
        keepalive_interval: keepalive,
        idle_timeout: keepalive * 3,
        ..ConnectionConfig::default()
    };
    InProcessTunnel::start(options).await.unwrap()
}

/// The stream probe deadline of the reverse-proxy cases.
const PROBE: Duration = Duration::from_secs(1);

/// When `client`'s session first falls back to polling, counted from now (`None`: not
/// within the exchange deadline).
fn watch_fallback(client: &TunnelClient) -> tokio::task::JoinHandle<Option<Duration>> {
    let client = client.clone();
    let started = Instant::now();
    tokio::spawn(async move {
        while started.elapsed() < EXCHANGE_TIMEOUT {
            if client.session_stats().is_some_and(|s| s.fallbacks > 0) {
                return Some(started.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        None
    })
}

/// A reverse proxy that buffers every response whole (the test's fault proxy without
/// faults), in front of the relay: the session's first stream delivers nothing until it
/// ends, so the client falls back to polling within the probe deadline, and the transfer
/// is intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_buffering_reverse_proxy_makes_the_session_poll_within_the_probe_deadline() {
    init_tracing();
    let tunnel = InProcessTunnel::start(InProcessOptions::default())
        .await
        .unwrap();
    let proxy = FaultProxy::start(tunnel.relay_http_addr(), FaultConfig::none(5))
        .await
        .unwrap();
    let mut config = tunnel.client_config(&proxy.url(tunnel.base_path()));
    config.stream_probe_timeout = PROBE;
    let case = "buffering reverse proxy";
    let client = TunnelClient::new(config).unwrap();
    let fell_back = watch_fallback(&client);
    let stats = bulk_exchange_with(case, &client, 21, Duration::ZERO).await;
    assert_eq!(stats.downstream, Downstream::Polling, "{case}: {stats:?}");
    assert!(stats.polls >= 1, "{case}: no poll: {stats:?}");
    let after = fell_back
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("{case}: no fall-back seen: {stats:?}"));
    // The probe's stream is the session's first pull, sent right after the session opens
    // (a few ms here).
    assert!(
        after <= PROBE + Duration::from_millis(500),
        "{case}: fell back {after:?} after the start, probe deadline {PROBE:?}"
    );
    eprintln!(
        "[report] {case}: fell back to polling {after:?} after the start (probe deadline \
         {PROBE:?})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_example_in_front_of_the_relay_with_buffering_on_and_off() {
    init_tracing();
    let dir = TestDir::new("nginx").unwrap();
    // As deploy/nginx/tunnel.conf says: the relay trusts the nginx on its host.
    let mut options = InProcessOptions::default();
    options.relay.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
    let tunnel = InProcessTunnel::start(options).await.unwrap();
    // (proxy_buffering, proxy_ignore_headers X-Accel-Buffering, seed). nginx passes a
    // streamed response on as it comes in all three: with buffering on it still forwards
    // each chunk it reads (measured: the first bytes of an idle stream arrive at once, and
    // so does a 5-byte chunk of a test upstream with curl). The relay's X-Accel-Buffering:
    // no turns buffering off for the stream besides.
    let cases = [(false, false, 10), (true, false, 9), (true, true, 12)];
    for (buffering, ignore_accel_buffering, seed) in cases {
        let nginx = Nginx::start(
            dir.path(),
            &NginxOptions {
                relay: tunnel.relay_http_addr(),
                buffering,
                ignore_accel_buffering,
                http2: false,
            },
        )
        .await
        .unwrap();
        let before = tunnel.accepted_clients().len();
        let mut config = tunnel.client_config(&nginx.tunnel_url(tunnel.base_path()));
        config.stream_probe_timeout = PROBE;
        let case = format!(
            "nginx reverse proxy, proxy_buffering {}{}",
            if buffering { "on" } else { "off" },
            if ignore_accel_buffering {
                ", X-Accel-Buffering ignored"
            } else {
                ""
            }
        );
        let client = TunnelClient::new(config).unwrap();
        // Idle past the probe deadline first: the stream's first packet must cross nginx on
        // its own, not behind a transfer that fills nginx's buffers.
        let stats = bulk_exchange_with(&case, &client, seed, PROBE * 2).await;
        assert_eq!(stats.downstream, Downstream::Streaming, "{case}: {stats:?}");
        assert!(stats.streams >= 1, "{case}: no stream opened: {stats:?}");
        assert_eq!(stats.fallbacks, 0, "{case}: fell back: {stats:?}");
        assert_eq!(stats.polls, 0, "{case}: polled: {stats:?}");
        // The example buffers request bodies (proxy_request_buffering on): the streamed
        // upstream's probe goes unanswered and the session pushes.
        assert_eq!(stats.upstream, Upstream::Pushing, "{case}: {stats:?}");
        assert!(stats.upstream_fallbacks >= 1, "{case}: {stats:?}");
        assert_eq!(stats.upstreams, 0, "{case}: {stats:?}");
        // nginx replaced X-Forwarded-For with the peer it saw; the relay, trusting nginx,
        // passed that on.
        let clients = tunnel.accepted_clients();
        assert_eq!(clients.len(), before + 1, "connections the broker accepted");
        assert_eq!(
            clients.last().unwrap().client_addr,
            "127.0.0.1",
            "client address the broker got behind nginx"
        );
        // A client claiming another address gets nowhere: nginx overwrites X-Forwarded-For
        // and drops Forwarded.
        let spoofed = tunnel
            .client_addr_of_raw_connect(
                &nginx.tunnel_url(tunnel.base_path()),
                &[
                    ("x-forwarded-for", "203.0.113.7"),
                    ("forwarded", "for=198.51.100.1"),
                ],
            )
            .await
            .unwrap();
        assert_eq!(
            spoofed, "127.0.0.1",
            "{case}: spoofed headers through nginx"
        );
        let log = nginx.access_log();
        // A streamed pull is logged when it ends, which may be after this.
        assert!(
            log.contains("Type=connect") && log.contains("Type=push"),
            "{case}: nginx access log lacks the tunnel requests:\n{log}"
        );
        assert!(
            !log.contains("\" 413 ") && !log.contains("\" 504 ") && !log.contains("\" 502 "),
            "{case}: nginx answered errors:\n{log}"
        );
    }
    // For contrast: directly, the relay reports the peer with its port.
    let config = tunnel.client_config(&tunnel.relay_url());
    let stream = tunnel_client::connect(config).await.unwrap();
    drop(stream);
    let direct = tunnel
        .accepted_clients()
        .last()
        .unwrap()
        .client_addr
        .clone();
    assert!(
        direct.starts_with("127.0.0.1:"),
        "direct client address {direct}"
    );
}

/// Longer than nginx's default proxy_read_timeout (60 s), shorter than the example's.
const LONG_PULL_WAIT: Duration = Duration::from_secs(65);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_example_holds_a_65_second_long_poll() {
    init_tracing();
    let dir = TestDir::new("nginx-long-poll").unwrap();
    // Keepalives every 200 s: nothing crosses the idle connection during the wait.
    let tunnel = tunnel_for_nginx(LONG_PULL_WAIT, Duration::from_secs(200)).await;
    let nginx = Nginx::start(dir.path(), &NginxOptions::example(tunnel.relay_http_addr()))
        .await
        .unwrap();
    let mut config = tunnel.client_config(&nginx.tunnel_url(tunnel.base_path()));
    config.pull_timeout = LONG_PULL_WAIT + Duration::from_secs(30);
    config.connection.keepalive_interval = Duration::from_secs(200);
    config.connection.idle_timeout = Duration::from_secs(600);
    let started = Instant::now();
    let stream = tunnel_client::connect(config).await.unwrap();

    // Stay idle past the pull wait: the pull in flight is held by the relay, through nginx.
    tokio::time::sleep(LONG_PULL_WAIT + Duration::from_secs(3)).await;
    let log = nginx.access_log();
    let held: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("Type=pull"))
        .filter(|l| {
            l.split_whitespace()
                .find_map(|f| f.strip_prefix("rt="))
                .and_then(|t| t.parse::<f64>().ok())
                .is_some_and(|secs| secs >= LONG_PULL_WAIT.as_secs_f64() - 1.0)
        })
        .collect();
    assert!(
        held.iter().any(|l| l.contains("\" 200 ")),
        "no pull held ~{LONG_PULL_WAIT:?} and answered 200 by nginx:\n{log}\nerror log:\n{}",
        nginx.error_log()
    );
    assert!(!log.contains("\" 504 "), "nginx timed a pull out:\n{log}");

    // And the connection still works afterwards.
    let spec = ExchangeSpec::symmetric(1 << 20, 11);
    let report = sink_source_exchange(stream, &spec, EXCHANGE_TIMEOUT)
        .await
        .expect("exchange after the long poll");
    eprintln!(
        "[report] nginx, pull held {:?}: answered 200 ({} line(s) like {:?}); then {} B each \
         way, SHA-256 verified, 0 B lost, {:.2?}; whole case {:.2?}",
        LONG_PULL_WAIT,
        held.len(),
        held.first(),
        report.sent,
        report.elapsed,
        started.elapsed()
    );
}

/// Straight to the relay, over HTTP/2 (h2c by prior knowledge, and HTTPS with h2 chosen by
/// ALPN) and over HTTP/1.1 (a chunked body, used once the relay answered its probe), the
/// session's packets go up in a streamed upstream: the client ends streaming both ways, the
/// relay served upstreams and (nearly) no pushes, and the transfer is intact. `--mode poll`
/// uses pushes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn straight_to_the_relay_the_session_streams_upstream() {
    init_tracing();
    let dir = TestDir::new("upstream").unwrap();
    let h2c = InProcessTunnel::start(InProcessOptions::default())
        .await
        .unwrap();
    let (https, ca) = https_tunnel(&dir).await;
    for (case, tunnel, mode, seed) in [
        ("h2c, auto", &h2c, TransportMode::Auto, 31),
        ("HTTPS (h2 by ALPN), auto", &https, TransportMode::Auto, 32),
        ("h2c, poll", &h2c, TransportMode::Poll, 33),
        ("HTTP/1.1, auto", &h2c, TransportMode::Auto, 35),
    ] {
        let before = tunnel.relay().metrics();
        let mut config = tunnel.client_config(&tunnel.relay_url());
        if tunnel.relay_url().starts_with("https") {
            config.ca_file = Some(ca.clone());
        } else if case.starts_with("HTTP/1.1") {
            config.http_version = HttpVersion::Http1Only;
        } else {
            config.http_version = HttpVersion::Http2PriorKnowledge;
        }
        config.mode = mode;
        let stats = bulk_exchange(case, config, seed).await;
        let after = tunnel.relay().metrics();
        let upstreams = after.upstreams_total - before.upstreams_total;
        let pushes = after.pushes_total - before.pushes_total;
        eprintln!("[report] {case}: relay served {upstreams} upstream(s) and {pushes} push(es)");
        if mode == TransportMode::Poll {
            assert_eq!(stats.upstreams, 0, "{case}: {stats:?}");
            assert_eq!(upstreams, 0, "{case}");
            assert!(pushes > 0, "{case}");
            continue;
        }
        assert_eq!(stats.downstream, Downstream::Streaming, "{case}: {stats:?}");
        assert_eq!(stats.upstream, Upstream::Streaming, "{case}: {stats:?}");
        assert!(stats.upstreams >= 1, "{case}: {stats:?}");
        assert_eq!(stats.upstream_fallbacks, 0, "{case}: {stats:?}");
        assert_eq!(
            upstreams, stats.upstreams,
            "{case}: relay and client disagree"
        );
        // The pushes before the first upstream's headers came, at most.
        assert!(pushes < 20, "{case}: {pushes} pushes beside the upstream");
    }
}

/// nginx speaking HTTP/2 to the client (h2c) in front of the relay, with the shipped
/// example's defaults: it holds a request body until the body ends, so the streamed
/// upstream's headers never come; the client keeps pushing, falls back within the probe
/// deadline, and the transfer is intact. The downstream still streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_over_http2_holds_request_bodies_so_the_session_pushes() {
    init_tracing();
    let dir = TestDir::new("nginx-h2").unwrap();
    let tunnel = tunnel_for_nginx(Duration::from_secs(20), Duration::from_secs(30)).await;
    let nginx = Nginx::start(
        dir.path(),
        &NginxOptions {
            http2: true,
            ..NginxOptions::example(tunnel.relay_http_addr())
        },
    )
    .await
    .unwrap();
    let mut config = tunnel.client_config(&nginx.tunnel_url(tunnel.base_path()));
    config.http_version = HttpVersion::Http2PriorKnowledge;
    config.stream_probe_timeout = PROBE;
    let case = "nginx over h2c";
    let client = TunnelClient::new(config).unwrap();
    // Idle past the probe deadline first: the connection's first packets up ask for an
    // upstream, which nginx never answers.
    let stats = bulk_exchange_with(case, &client, 34, PROBE * 2).await;
    assert_eq!(stats.upstream, Upstream::Pushing, "{case}: {stats:?}");
    assert!(stats.upstream_fallbacks >= 1, "{case}: {stats:?}");
    assert_eq!(stats.upstreams, 0, "{case}: {stats:?}");
    assert_eq!(stats.downstream, Downstream::Streaming, "{case}: {stats:?}");
    let log = nginx.access_log();
    assert!(
        log.contains("HTTP/2.0"),
        "{case}: nginx did not serve HTTP/2:\n{log}"
    );
    assert_eq!(tunnel.relay().metrics().upstreams_total, 0, "{case}");
}

/// A proxy that passes every request head on at once but holds a chunked request body
/// until the client closes the connection (bodies with a `Content-Length`, and responses,
/// pass as they come): the kind of path on which a streamed upstream's headers are answered
/// and its packets still never arrive. Raw TCP, one upstream connection per client
/// connection.
async fn start_head_first_proxy(relay: std::net::SocketAddr) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(upstream) = tokio::net::TcpStream::connect(relay).await else {
                    return;
                };
                let (mut client_rd, mut client_wr) = client.into_split();
                let (mut up_rd, mut up_wr) = upstream.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut up_rd, &mut client_wr).await;
                });
                let mut buf = Vec::new();
                let mut chunk = [0u8; 16 * 1024];
                loop {
                    // One request head, then its body by Content-Length.
                    let head_end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        match client_rd.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
                    if up_wr.write_all(&buf[..head_end]).await.is_err() {
                        return;
                    }
                    buf.drain(..head_end);
                    if head.contains("transfer-encoding: chunked") {
                        // Held: read and kept back until the client goes away.
                        while let Ok(n) = client_rd.read(&mut chunk).await {
                            if n == 0 {
                                return;
                            }
                        }
                        return;
                    }
                    let mut length: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    while length > 0 {
                        if buf.is_empty() {
                            match client_rd.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        let take = length.min(buf.len());
                        if up_wr.write_all(&buf[..take]).await.is_err() {
                            return;
                        }
                        buf.drain(..take);
                        length -= take;
                    }
                }
            });
        }
    });
    addr
}

/// Over HTTP/1.1 through a proxy that passes a streamed upstream's head on at once but holds
/// its body: the relay answers the headers, the probe's answer never comes, so the session
/// falls back to pushes within the probe deadline and the transfer is intact. (Headers
/// alone, the HTTP/2 probe, would have taken this path for one that streams.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_holding_chunked_request_bodies_makes_the_session_push() {
    init_tracing();
    let tunnel = InProcessTunnel::start(InProcessOptions::default())
        .await
        .unwrap();
    let proxy = start_head_first_proxy(tunnel.relay_http_addr()).await;
    let url = format!("http://{proxy}{}", tunnel.base_path());
    let mut config = tunnel.client_config(&url);
    config.http_version = HttpVersion::Http1Only;
    config.stream_probe_timeout = PROBE;
    let case = "proxy holding chunked request bodies";
    let client = TunnelClient::new(config).unwrap();
    let stats = bulk_exchange_with(case, &client, 36, PROBE * 2).await;
    assert_eq!(stats.downstream, Downstream::Streaming, "{case}: {stats:?}");
    assert_eq!(stats.upstream, Upstream::Pushing, "{case}: {stats:?}");
    assert!(stats.upstream_fallbacks >= 1, "{case}: {stats:?}");
    assert_eq!(stats.upstreams, 0, "{case}: {stats:?}");
    // The relay did see the upstream (its head went through) and answered it.
    assert!(
        tunnel.relay().metrics().upstreams_total >= 1,
        "{case}: the upstream's head never reached the relay"
    );
}
