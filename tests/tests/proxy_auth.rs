//! Proxy authentication beyond Basic, against real proxies: squid with `ntlm_fake_auth`
//! (the NTLM handshake) and squid with `negotiate_kerberos_auth` against a throw-away MIT
//! Kerberos realm (KDC, keytab for `HTTP/localhost`, a `kinit` credential cache). Each case
//! moves data both ways over several tunnel connections, verified with SHA-256, through an
//! `http://` relay (authenticated keep-alive connections) and an `https://` relay (CONNECT
//! with the handshake, then TLS inside), and shows in squid's access log that the user was
//! authenticated. Wrong credentials and a missing ticket fail at once with a clear 407.
//!
//! Needs squid (with its helpers), krb5-kdc, krb5-admin-server and krb5-user (Debian
//! packages of those names; `.ci/run` installs them): `cargo test -p tunnel-tests --test
//! proxy_auth`.

use std::time::{Duration, Instant};

use tokio::task::JoinSet;
use tunnel_client::{ClientConfig, ConnectError, PacSource, ProxyConfig, TunnelClient};
use tunnel_tests::inproc::{expect_connect_error, InProcessOptions, InProcessTunnel};
use tunnel_tests::kerberos::KerberosRealm;
use tunnel_tests::services::{squid_helper, Squid};
use tunnel_tests::{init_tracing, sink_source_exchange, ExchangeSpec, TestDir};

/// Tunnel connections per case, opened at once (so the forwarder authenticates several
/// proxy connections side by side).
const CONNECTIONS: u64 = 3;
/// Bytes each connection moves each way.
const BYTES_EACH_WAY: u64 = 1 << 20;
/// Deadline of one connection's exchange.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(120);
/// A refusal must come this quickly (the connect timeout is longer: a retry loop would
/// show up as a hang).
const QUICK: Duration = Duration::from_secs(10);
/// How squid's access log names the NTLM user `CORP\alice` (it escapes the backslash).
const SQUID_LOGGED_ALICE: &str = " CORP\\\\alice ";
/// Realm of the Kerberos case.
const REALM: &str = "TUNNEL.TEST";

fn proxy(url: String, user: Option<(&str, &str)>) -> Option<ProxyConfig> {
    Some(ProxyConfig {
        url,
        username: user.map(|(u, _)| u.to_string()),
        password: user.map(|(_, p)| p.to_string()),
    })
}

/// Opens `CONNECTIONS` connections with one client and moves `BYTES_EACH_WAY` each way on
/// each, verified on both ends; prints the case's report line.
async fn exchange_many(case: &str, config: ClientConfig, seed: u64) {
    let started = Instant::now();
    let client = TunnelClient::new(config).unwrap_or_else(|e| panic!("{case}: client: {e}"));
    let mut exchanges = JoinSet::new();
    for i in 0..CONNECTIONS {
        let client = client.clone();
        let case = case.to_string();
        exchanges.spawn(async move {
            let stream = tokio::time::timeout(Duration::from_secs(60), client.connect())
                .await
                .unwrap_or_else(|_| panic!("{case}: connect {i} did not return within 60 s"))
                .unwrap_or_else(|e| panic!("{case}: connect {i} failed: {e}"));
            let spec = ExchangeSpec::symmetric(BYTES_EACH_WAY, seed * 100 + i);
            let report = sink_source_exchange(stream, &spec, EXCHANGE_TIMEOUT)
                .await
                .unwrap_or_else(|e| panic!("{case}: exchange {i} failed: {e}"));
            assert_eq!(report.sent, BYTES_EACH_WAY, "{case}: bytes sent on {i}");
        });
    }
    while let Some(done) = exchanges.join_next().await {
        done.unwrap();
    }
    eprintln!(
        "[report] {case}: {CONNECTIONS} connections x {BYTES_EACH_WAY} B each way, SHA-256 \
         verified, in {:.2?}",
        started.elapsed()
    );
}

/// Starts an HTTPS relay and runs [`exchange_many`] to it through `proxy`; returns the
/// relay and the CA file that trusts it.
async fn https_exchange(
    dir: &TestDir,
    case: &str,
    proxy: Option<ProxyConfig>,
    seed: u64,
) -> (InProcessTunnel, std::path::PathBuf) {
    let (tls, ca_file) = InProcessTunnel::start_https(
        dir.path(),
        "tunnel-tests proxy_auth CA",
        InProcessOptions::default(),
    )
    .await
    .unwrap();
    let mut config = tls.client_config(&tls.relay_url());
    config.proxy = proxy;
    config.ca_file = Some(ca_file.clone());
    exchange_many(case, config, seed).await;
    (tls, ca_file)
}

/// `tunnel-client --check` with `config` passes and reports `expected` as the proxy
/// authentication.
async fn check_names(case: &str, config: ClientConfig, expected: &str) {
    let report = tunnel_client::check(config).await.unwrap();
    eprintln!("[report] --check through {case}:\n{report}");
    assert!(report.ok, "{report}");
    assert_eq!(report.get("proxy auth"), Some(expected), "{report}");
}

/// Connects with `config`, expecting a 407 refusal within `QUICK`; returns it.
async fn expect_refusal(case: &str, config: ClientConfig) -> ConnectError {
    let err = expect_connect_error(case, config, QUICK).await;
    assert!(
        matches!(err, ConnectError::Refused { status: 407, .. }),
        "{case}: expected Refused {{ status: 407 }}, got {err:?}"
    );
    err
}

/// Waits for squid's access-log line of a request containing `needle` (a request line part)
/// made as `user` (squid logs the authenticated user's name), and returns it.
async fn authenticated_line(squid: &Squid, needle: &str, user: &str) -> String {
    let find = || {
        squid
            .access_log()
            .lines()
            .find(|l| l.contains(needle) && l.contains(user))
            .map(str::to_string)
    };
    let deadline = Instant::now() + tunnel_tests::services::LOG_WAIT;
    loop {
        if let Some(line) = find() {
            return line;
        }
        assert!(
            Instant::now() < deadline,
            "squid access.log has no line with {needle:?} by {user:?}:\n{}",
            squid.access_log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// squid.conf lines for NTLM through `ntlm_fake_auth`, which accepts any well-formed
/// handshake and reports the user as `DOMAIN\user`; only `allowed` may pass. A refused
/// user hits `deny !allowed_user`, whose last ACL is the authentication one: squid answers
/// 407, as a real NTLM proxy does to wrong credentials.
fn ntlm_squid_config(allowed: &str) -> String {
    let helper = squid_helper("ntlm_fake_auth").unwrap_or_else(|e| panic!("{e}"));
    format!(
        "auth_param ntlm program {}\n\
         auth_param ntlm children 2 startup=1 idle=1\n\
         auth_param ntlm keep_alive on\n\
         acl allowed_user proxy_auth {allowed}\n\
         http_access deny !allowed_user\n",
        helper.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ntlm_through_squid_for_http_and_https_relays_and_wrong_user_is_refused() {
    init_tracing();
    let dir = TestDir::new("ntlm").unwrap();
    let squid = Squid::start_with(dir.path(), &ntlm_squid_config("CORP\\alice"), &[])
        .await
        .unwrap();
    let alice = Some(("CORP\\alice", "alice's password"));

    let plain = InProcessTunnel::start(InProcessOptions::default())
        .await
        .unwrap();
    let mut config = plain.client_config(&plain.relay_url());
    config.proxy = proxy(squid.url(), alice);
    exchange_many("NTLM via squid, http:// relay", config.clone(), 1).await;
    let connect = format!("POST {}?Type=connect", plain.relay_url());
    let line = authenticated_line(&squid, &connect, SQUID_LOGGED_ALICE).await;
    assert!(line.contains("TCP_MISS/200"), "{line}");

    check_names("NTLM squid", config, "NTLM as CORP\\alice").await;

    let (tls, ca_file) = https_exchange(
        &dir,
        "NTLM via squid, https:// relay (CONNECT, then TLS)",
        proxy(squid.url(), alice),
        2,
    )
    .await;
    // squid logs a CONNECT tunnel when it closes: the client (and its pool) is gone.
    let connect = format!("CONNECT {}", tls.relay_http_addr());
    let line = authenticated_line(&squid, &connect, SQUID_LOGGED_ALICE).await;
    assert!(line.contains("/200"), "{line}");

    let mallory = Some(("CORP\\mallory", "any password"));
    for (case, url, ca) in [
        ("NTLM, refused user, http://", plain.relay_url(), None),
        (
            "NTLM, refused user, https://",
            tls.relay_url(),
            Some(ca_file),
        ),
    ] {
        let mut config = plain.client_config(&url);
        config.proxy = proxy(squid.url(), mallory);
        config.ca_file = ca;
        let text = expect_refusal(case, config).await.to_string();
        assert!(
            text.contains("NTLM as CORP\\mallory"),
            "{case}: the error does not name the scheme and user: {text}"
        );
    }
}

/// Requests of squid's per-connection log (`ports.log`, see below) from line `from` on:
/// (the client port of squid's connection, the status).
fn requests_by_port(log: &str, from: usize) -> Vec<(String, String)> {
    log.lines()
        .skip(from)
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let port = fields.next()?.rsplit(':').next()?.to_string();
            Some((port, fields.next()?.to_string()))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ntlm_connections_the_proxy_closes_are_authenticated_afresh() {
    init_tracing();
    let dir = TestDir::new("ntlm-reauth").unwrap();
    // squid closes client connections idle for 1 s (the client's pool would keep them 60 s),
    // and logs each request with the port of the connection it came on.
    let ports_log = dir.path().join("squid").join("ports.log");
    let config_lines = format!(
        "client_idle_pconn_timeout 1 second\n\
         logformat withport %>a:%>p %Ss/%03>Hs %rm %ru %[un\n\
         access_log stdio:{} withport\n{}",
        ports_log.display(),
        ntlm_squid_config("CORP\\alice")
    );
    let squid = Squid::start_with(dir.path(), &config_lines, &[])
        .await
        .unwrap();
    let tunnel = InProcessTunnel::start(InProcessOptions::default())
        .await
        .unwrap();
    let mut config = tunnel.client_config(&tunnel.relay_url());
    config.proxy = proxy(squid.url(), Some(("CORP\\alice", "pw")));
    config.http_pool_idle_timeout = Duration::from_secs(60);
    // Per-connection requests: between the two connections every proxy connection goes idle
    // and squid closes it. A session would keep its held pull (and so one proxy connection)
    // open across the pause, which is right for a session but not what this test looks at.
    config.session = false;
    let client = TunnelClient::new(config).unwrap();
    let log = || std::fs::read_to_string(&ports_log).unwrap_or_default();

    let spec = ExchangeSpec::symmetric(64 * 1024, 11);
    let stream = client.connect().await.unwrap();
    sink_source_exchange(stream, &spec, EXCHANGE_TIMEOUT)
        .await
        .unwrap();
    // squid logs a request when it ends: after 3 s every request of the first connection
    // is logged, and squid has closed the idle proxy connections.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let first_log = log();
    let first = requests_by_port(&first_log, 0);
    let first_ports: std::collections::HashSet<_> = first.iter().map(|(p, _)| p.clone()).collect();
    assert!(
        first.iter().any(|(_, status)| status == "TCP_DENIED/407"),
        "no NTLM handshake in:\n{first_log}"
    );

    // The client's pooled connections are gone: the next requests go over new proxy
    // connections, each starting with a handshake (its first request answered 407).
    let stream = client.connect().await.unwrap();
    sink_source_exchange(stream, &spec, EXCHANGE_TIMEOUT)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let second = requests_by_port(&log(), first_log.lines().count());
    let mut seen = std::collections::HashSet::new();
    for (port, status) in &second {
        assert!(
            !first_ports.contains(port),
            "a request went over a proxy connection squid had closed (port {port}):\n{}",
            log()
        );
        if seen.insert(port.clone()) {
            assert_eq!(
                status,
                "TCP_DENIED/407",
                "new proxy connection (port {port}) without a handshake:\n{}",
                log()
            );
        }
    }
    assert!(!seen.is_empty(), "no request after the pause:\n{}", log());
    eprintln!(
        "[report] NTLM, squid closed the idle proxy connections: {} connection(s) before, {} \
         new one(s) after, each authenticated afresh; both exchanges verified",
        first_ports.len(),
        seen.len()
    );
}

/// A process-wide environment variable for GSSAPI, which reads `KRB5_CONFIG` and
/// `KRB5CCNAME` from the environment: only the Kerberos test (one test function, its
/// cases one after the other) sets them.
fn set_env(name: &str, value: &str) {
    std::env::set_var(name, value);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negotiate_kerberos_through_squid_with_a_kinit_ticket_and_without_one() {
    init_tracing();
    let dir = TestDir::new("kerberos").unwrap();
    let realm = KerberosRealm::start(dir.path(), REALM).await.unwrap();
    let service_keytab = realm
        .keytab_for("HTTP/localhost", "http.keytab")
        .await
        .unwrap();
    let user_keytab = realm.keytab_for("alice", "alice.keytab").await.unwrap();
    let ccache = dir.path().join("krb5").join("alice.ccache");
    realm.kinit("alice", &user_keytab, &ccache).await.unwrap();

    let helper = squid_helper("negotiate_kerberos_auth").unwrap_or_else(|e| panic!("{e}"));
    let auth = format!(
        "auth_param negotiate program {} -s HTTP/localhost@{REALM}\n\
         auth_param negotiate children 2 startup=1 idle=1\n\
         auth_param negotiate keep_alive on\n\
         acl authenticated proxy_auth REQUIRED\n\
         http_access deny !authenticated\n",
        helper.display()
    );
    let mut squid_env = realm.env();
    squid_env.push((
        "KRB5_KTNAME".into(),
        format!("FILE:{}", service_keytab.display()),
    ));
    // squid's helper runs as squid's user, which cannot write a replay cache here.
    squid_env.push(("KRB5RCACHETYPE".into(), "none".into()));
    let squid = Squid::start_with(dir.path(), &auth, &squid_env)
        .await
        .unwrap();
    // The service name is HTTP@<the proxy URL's host>: "localhost", as in the keytab.
    let proxy_url = format!("http://localhost:{}", squid.addr().port());

    for (name, value) in realm.env() {
        set_env(&name, &value);
    }
    set_env("KRB5CCNAME", &format!("FILE:{}", ccache.display()));

    let plain = InProcessTunnel::start(InProcessOptions::default())
        .await
        .unwrap();
    let mut config = plain.client_config(&plain.relay_url());
    config.proxy = proxy(proxy_url.clone(), None);
    exchange_many("Negotiate via squid, http:// relay", config.clone(), 3).await;
    let user = format!(" alice@{REALM} ");
    let connect = format!("POST {}?Type=connect", plain.relay_url());
    let line = authenticated_line(&squid, &connect, &user).await;
    assert!(line.contains("TCP_MISS/200"), "{line}");

    let expected = format!("Negotiate (Kerberos) as alice@{REALM} for HTTP@localhost");
    check_names("Kerberos squid", config, &expected).await;

    let (tls, _) = https_exchange(
        &dir,
        "Negotiate via squid, https:// relay (CONNECT, then TLS)",
        proxy(proxy_url.clone(), None),
        4,
    )
    .await;
    let connect = format!("CONNECT {}", tls.relay_http_addr());
    let line = authenticated_line(&squid, &connect, &user).await;
    assert!(line.contains("/200"), "{line}");

    // A PAC script choosing the squid: Negotiate too (a PAC proxy gets no user, but a ticket).
    let pac = dir.path().join("proxy.pac");
    let port = squid.addr().port();
    std::fs::write(
        &pac,
        format!("function FindProxyForURL(url, host) {{ return \"PROXY localhost:{port}\"; }}"),
    )
    .unwrap();
    let mut config = plain.client_config(&plain.relay_url());
    config.pac = Some(PacSource::File(pac));
    check_names("Kerberos squid chosen by a PAC script", config, &expected).await;
    assert!(
        realm.kdc_log().contains("HTTP/localhost@"),
        "the KDC issued no ticket for HTTP/localhost:\n{}",
        realm.kdc_log()
    );

    // No ticket: a credential cache that does not exist.
    let empty = dir.path().join("krb5").join("nobody.ccache");
    set_env("KRB5CCNAME", &format!("FILE:{}", empty.display()));
    let mut config = plain.client_config(&plain.relay_url());
    config.proxy = proxy(proxy_url.clone(), None);
    let text = expect_refusal("Negotiate, no ticket", config)
        .await
        .to_string();
    assert!(
        text.contains("kinit"),
        "the error does not say how to get a ticket: {text}"
    );
    // No ticket, but a user: the forwarder runs, and says what the proxy asked for.
    let mut config = plain.client_config(&plain.relay_url());
    config.proxy = proxy(proxy_url, Some(("CORP\\alice", "pw")));
    let text = expect_refusal("Negotiate, no ticket, NTLM user given", config)
        .await
        .to_string();
    assert!(
        text.contains("the proxy asks for Negotiate") && text.contains("kinit"),
        "the error does not name the scheme and what is missing: {text}"
    );
}
