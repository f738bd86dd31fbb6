//! Authentication and isolation, against real relay/broker processes:
//! - a wrong link secret is refused, counted, and logged without the secret;
//! - a connection's token is the only way to its data: another client (with its own valid
//!   token, a random one, or none) gets 404/400 and the victim's transfer is unaffected;
//! - tokens never appear in any log at RUST_LOG=trace, nor in a URL the client sends;
//! - client authentication at the relay (bearer and basic): right credentials work end to
//!   end through the client binary and the library, missing or wrong ones get 401 with
//!   `WWW-Authenticate` and a clear, unretried client error, and the relay's log names the
//!   failure without the presented secret.
//!
//! Run: `cargo build --workspace --bins && cargo test -p tunnel-tests --test security`.

mod support_raw;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use reqwest::StatusCode;
use support_raw::{
    ack, client_config, data, echo_transfer, token_forms, EchoSetup, Raw, RelayProcess,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tunnel_client::{ConnectError, RelayAuth};
use tunnel_proto::PacketType;
use tunnel_tests::{bin_path, free_addr, wait_for_tcp, ChildProcess, TestDir};

const TEST_LIMIT: Duration = Duration::from_secs(60);

fn assert_absent(what: &str, haystack: &str, needles: &[String], label: &str) {
    for needle in needles {
        assert!(
            !haystack.contains(needle.as_str()),
            "{what} found in the {label} log: {needle}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_link_secret_is_refused_counted_and_not_logged() {
    tokio::time::timeout(TEST_LIMIT, async {
        let dir = TestDir::new("sec-link").unwrap();
        let relay = RelayProcess::start(dir.path(), "relay", &[], "trace").await;
        let wrong_secret = "WRONG-link-secret-9a8b7c6d5e";
        let wrong_file = dir.path().join("wrong-secret");
        std::fs::write(&wrong_file, wrong_secret).unwrap();
        let _broker = support_raw::start_echo_broker(
            dir.path(),
            "broker",
            relay.link,
            &wrong_file,
            &[],
            "info",
        );
        let deadline = Instant::now() + Duration::from_secs(15);
        while relay
            .metric(r#"tunnel_auth_failures_total{side="link"}"#)
            .await
            .unwrap_or(0)
            == 0
        {
            assert!(Instant::now() < deadline, "no link auth failure counted");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(relay.metric("tunnel_links_up").await, Some(0));
        // The log line is written with the counter; give the writer a moment.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let log = relay.process.log_contents();
        assert!(
            log.contains("link authentication failed"),
            "relay log lacks the failure line:\n{log}"
        );
        assert_absent(
            "the presented link secret",
            &log,
            &[wrong_secret.to_string()],
            "relay",
        );
        assert_absent(
            "the configured link secret",
            &log,
            &[support_raw::LINK_SECRET.to_string()],
            "relay",
        );
        // And the broker is told it was refused, in words an operator understands.
        let broker_log = _broker.log_contents();
        assert!(
            !broker_log.contains(wrong_secret),
            "broker logged its secret"
        );
    })
    .await
    .expect("test timed out");
}

/// One request the spy saw.
#[derive(Debug, Clone)]
struct Seen {
    uri: String,
    token_header: Option<String>,
    authorization: Option<String>,
}

/// A reverse proxy in front of the relay that records every request's URI and headers, to
/// check what the client library really sends.
struct Spy {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Spy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Spy {
    async fn start(upstream: SocketAddr) -> Spy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let client = support_raw::client();
        let record = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (client, record) = (client.clone(), record.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (client, record) = (client.clone(), record.clone());
                        async move { Ok::<_, Infallible>(forward(req, upstream, client, record).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        Spy { addr, seen, task }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

async fn forward(
    req: Request<Incoming>,
    upstream: SocketAddr,
    client: reqwest::Client,
    record: Arc<Mutex<Vec<Seen>>>,
) -> Response<Full<Bytes>> {
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let uri = req.uri().to_string();
    record.lock().unwrap().push(Seen {
        uri: uri.clone(),
        token_header: header("tunnel-token"),
        authorization: header("authorization"),
    });
    let method = req.method().clone();
    let headers = req.headers().clone();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let mut out = client.request(method, format!("http://{upstream}{uri}"));
    for name in [
        "tunnel-token",
        "tunnel-session-token",
        "authorization",
        "content-type",
    ] {
        if let Some(v) = headers.get(name) {
            out = out.header(name, v.clone());
        }
    }
    let (status, body) = match out.body(body).send().await {
        Ok(resp) => (resp.status(), resp.bytes().await.unwrap_or_default()),
        Err(_) => (StatusCode::BAD_GATEWAY, Bytes::new()),
    };
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    resp
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_isolate_connections_and_never_reach_logs_or_urls() {
    tokio::time::timeout(TEST_LIMIT, async {
        let setup = EchoSetup::start(&[], &[], "trace").await;
        let spy = Spy::start(setup.relay.http).await;
        let raw = Raw::new(&setup.relay.tunnel_url());

        // The victim: a library client through the spy, moving 4 MiB through the echo. It uses
        // the per-connection requests, whose token travels on every push and pull; the
        // session token's isolation has its own tests (tests/tests/sessions_raw.rs).
        let mut victim_config = client_config(&format!("http://{}/tunnel", spy.addr));
        victim_config.session = false;
        let victim = tunnel_client::connect(victim_config)
            .await
            .expect("victim connects");
        let victim_id = victim.conn_id();
        let transfer = tokio::spawn(echo_transfer(victim, 4 << 20, Duration::from_secs(40)));

        // The attacker: its own connection, so it holds a valid token, just not the victim's.
        let attacker = raw.connect(16).await.expect("attacker connects");
        let own = attacker.token.to_hex();
        let random = tunnel_proto::Token(rand::random()).to_hex();
        for token in [&own, &random] {
            let (status, body) = raw.pull(victim_id, Some(token)).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "pull with another token");
            assert!(
                tunnel_proto::decode_all(body, 1 << 21).is_err(),
                "a refused pull must carry no packets"
            );
            let evil = data(
                support_raw::RawConn {
                    id: victim_id,
                    token: attacker.token,
                },
                0,
                b"injected",
            );
            let (status, _) = raw.push(victim_id, Some(token), evil.to_bytes()).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "push with another token");
        }
        let (status, _) = raw.pull(victim_id, None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "pull without a token");
        let (status, _) = raw.push(victim_id, None, Bytes::new()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "push without a token");

        // The attacker's own connection exercises every path with its token at trace level:
        // handshake, data both ways, ack, abort.
        let got = raw
            .pull_until(attacker, Duration::from_secs(10), |p| {
                p.iter().any(|p| p.kind == PacketType::ConnInitAck)
            })
            .await;
        assert!(got.iter().all(|p| p.kind != PacketType::ConnRejected));
        let mut got = raw
            .push_packets(attacker, &[data(attacker, 0, b"attacker-bytes")])
            .await;
        got.extend(
            raw.pull_until(attacker, Duration::from_secs(10), |p| {
                p.iter().any(|p| p.kind == PacketType::Data)
            })
            .await,
        );
        let echoed = got.iter().find(|p| p.kind == PacketType::Data).unwrap();
        assert_eq!(&echoed.payload[..], b"attacker-bytes");
        raw.push_packets(attacker, &[ack(attacker, echoed.seq)])
            .await;
        let abort = tunnel_proto::Packet::new(PacketType::ConnAbort, attacker.id, Bytes::new());
        raw.push_packets(attacker, &[abort]).await;

        let speed = transfer
            .await
            .expect("victim task")
            .expect("victim transfer unaffected by the attacker");
        println!("victim echo transfer: {speed:.1} MiB/s");

        // Tokens in URLs: the client sent its token only in the header.
        let seen = spy.seen();
        assert!(seen.len() > 3, "spy saw {} requests", seen.len());
        for s in &seen {
            assert!(
                !s.uri.to_lowercase().contains("token"),
                "token in URL {}",
                s.uri
            );
            if let Some(t) = &s.token_header {
                assert!(
                    !s.uri.to_lowercase().contains(&t.to_lowercase()),
                    "token in URL"
                );
            }
            let is_connect = s.uri.contains("Type=connect");
            assert_eq!(
                s.token_header.is_some(),
                !is_connect,
                "Tunnel-Token header on every push/pull and not on connect: {s:?}"
            );
        }
        let victim_token = seen
            .iter()
            .find_map(|s| s.token_header.clone())
            .and_then(|t| tunnel_proto::Token::from_hex(&t))
            .expect("the victim's token, seen by the spy");

        // Tokens in logs: relay and broker ran at trace level.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut forms = token_forms(&attacker.token);
        forms.extend(token_forms(&victim_token));
        for (label, log) in [
            ("relay", setup.relay.process.log_contents()),
            ("broker", setup.broker.log_contents()),
        ] {
            // Proof the log was written at all: both ends log each connection.
            assert!(
                log.contains("connection opened"),
                "{label} log lacks connections"
            );
            assert_absent("a connection token", &log, &forms, label);
        }
    })
    .await
    .expect("test timed out");
}

const BEARER: &str = "bearer-token-for-tests-3f9a1c77e2";
const USER: &str = "tunnel-user";
const PASSWORD: &str = "basic pass:word 81e4";

/// A relay requiring client credentials, an echo broker, and the credentials files.
async fn auth_setup(rust_log: &str) -> EchoSetup {
    let dir = TestDir::new("sec-auth-files").unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(
        &tokens,
        format!("# clients\nsome-other-token-0000000000\n{BEARER}\n"),
    )
    .unwrap();
    let users = dir.path().join("users");
    std::fs::write(&users, format!("{USER}:{PASSWORD}\n")).unwrap();
    let args = vec![
        "--client-tokens-file".to_string(),
        tokens.display().to_string(),
        "--client-basic-auth-file".into(),
        users.display().to_string(),
    ];
    let setup = EchoSetup::start(&args, &[], rust_log).await;
    // The files were read at start; the relay does not need them any more.
    drop(dir);
    setup
}

/// Starts the client binary with `args`/`env` and returns it and its local port.
async fn client_binary(
    setup: &EchoSetup,
    label: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> (ChildProcess, SocketAddr) {
    let listen = free_addr();
    let mut all = vec![
        "--relay".to_string(),
        setup.relay.tunnel_url(),
        "--server".into(),
        support_raw::SERVER.into(),
        "--listen".into(),
        listen.to_string(),
        "--no-env-proxy".into(),
        "--connect-timeout".into(),
        "20".into(),
    ];
    all.extend(args.iter().map(|s| s.to_string()));
    let mut env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    env.push(("RUST_LOG".into(), "debug".into()));
    let process = ChildProcess::spawn(
        label,
        &bin_path("tunnel-client"),
        all,
        &env,
        setup.dir.path(),
    )
    .expect("spawn tunnel-client");
    wait_for_tcp(listen, Duration::from_secs(10))
        .await
        .expect("client port");
    (process, listen)
}

/// An echo round trip through a client binary's port; the bytes that came back.
async fn echo_via(addr: SocketAddr, msg: &[u8]) -> Vec<u8> {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(msg).await.unwrap();
    s.shutdown().await.unwrap();
    let mut back = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut back)).await;
    back
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_auth_right_credentials_work_end_to_end() {
    tokio::time::timeout(TEST_LIMIT, async {
        let setup = auth_setup("debug").await;
        // Binary, bearer from an environment variable.
        let (_bearer_client, bearer_port) = client_binary(
            &setup,
            "client-bearer",
            &["--relay-token-env", "MY_RELAY_TOKEN"],
            &[("MY_RELAY_TOKEN", BEARER)],
        )
        .await;
        assert_eq!(
            echo_via(bearer_port, b"bearer hello").await,
            b"bearer hello"
        );
        // Binary, basic auth.
        let (_basic_client, basic_port) = client_binary(
            &setup,
            "client-basic",
            &["--relay-user", USER, "--relay-password-env", "MY_RELAY_PW"],
            &[("MY_RELAY_PW", PASSWORD)],
        )
        .await;
        assert_eq!(echo_via(basic_port, b"basic hello").await, b"basic hello");

        // Library through the spy: the credentials go on every request, 1 MiB both ways.
        let spy = Spy::start(setup.relay.http).await;
        let mut config = client_config(&format!("http://{}/tunnel", spy.addr));
        config.relay_auth = Some(RelayAuth::Bearer(BEARER.into()));
        let stream = tunnel_client::connect(config)
            .await
            .expect("connect with bearer");
        echo_transfer(stream, 1 << 20, Duration::from_secs(30))
            .await
            .expect("transfer with bearer");
        let seen = spy.seen();
        assert!(seen.len() >= 3);
        for s in &seen {
            assert_eq!(
                s.authorization.as_deref(),
                Some(format!("Bearer {BEARER}").as_str()),
                "Authorization on every request: {}",
                s.uri
            );
        }
        assert_eq!(
            setup
                .relay
                .metric(r#"tunnel_auth_failures_total{side="client"}"#)
                .await,
            Some(0)
        );
        // Neither secret in any log (the clients ran at debug, the relay at debug).
        let needles = vec![BEARER.to_string(), PASSWORD.to_string()];
        for (label, log) in [
            ("relay", setup.relay.process.log_contents()),
            ("client-bearer", _bearer_client.log_contents()),
            ("client-basic", _basic_client.log_contents()),
        ] {
            assert_absent("a client credential", &log, &needles, label);
        }
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_auth_missing_or_wrong_credentials_get_401() {
    tokio::time::timeout(TEST_LIMIT, async {
        let setup = auth_setup("debug").await;
        let url = setup.relay.tunnel_url();
        let wrong_bearer = "WRONG-bearer-token-5c2e9d0b11";
        let wrong_password = "WRONG-password-77aa";

        // Library: missing, wrong bearer, wrong basic password: each a final 401 at once.
        let cases: Vec<(&str, Option<RelayAuth>)> = vec![
            ("none", None),
            ("wrong bearer", Some(RelayAuth::Bearer(wrong_bearer.into()))),
            (
                "wrong password",
                Some(RelayAuth::Basic {
                    user: USER.into(),
                    password: wrong_password.into(),
                }),
            ),
        ];
        for (what, auth) in cases {
            let mut config = client_config(&url);
            config.relay_auth = auth;
            let started = Instant::now();
            let err = tunnel_client::connect(config)
                .await
                .err()
                .unwrap_or_else(|| {
                    panic!("{what}: connect succeeded without the right credentials")
                });
            assert!(
                matches!(err, ConnectError::Refused { status: 401, .. }),
                "{what}: expected Refused 401, got {err}"
            );
            let text = err.to_string();
            assert!(
                text.contains("401") && text.contains("credentials"),
                "{text}"
            );
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "{what}: a 401 must not be retried (took {:?})",
                started.elapsed()
            );
        }

        // Raw: every tunnel request kind is guarded; /healthz and /metrics are not.
        let mut raw = Raw::new(&url);
        assert_eq!(raw.connect(16).await.unwrap_err(), StatusCode::UNAUTHORIZED);
        raw.authorization = Some(format!("Bearer {BEARER}"));
        let conn = raw
            .connect(16)
            .await
            .expect("connect with the bearer token");
        for authorization in [None, Some(format!("Bearer {wrong_bearer}"))] {
            raw.authorization = authorization;
            let hex = conn.token.to_hex();
            let (status, _) = raw.pull(conn.id, Some(&hex)).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "pull without credentials");
            let (status, _) = raw.push(conn.id, Some(&hex), Bytes::new()).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "push without credentials");
        }
        let resp = support_raw::client()
            .post(format!("{url}?Type=connect&ServerName=raw"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
        let challenges: Vec<String> = resp
            .headers()
            .get_all("www-authenticate")
            .iter()
            .map(|v| v.to_str().unwrap().to_string())
            .collect();
        assert!(
            challenges.iter().any(|c| c.starts_with("Bearer "))
                && challenges.iter().any(|c| c.starts_with("Basic ")),
            "WWW-Authenticate challenges: {challenges:?}"
        );
        let base = format!("http://{}", setup.relay.http);
        for path in ["/healthz", "/metrics"] {
            let status = support_raw::client()
                .get(format!("{base}{path}"))
                .send()
                .await
                .unwrap()
                .status();
            assert_eq!(status, StatusCode::OK, "{path} stays open");
        }
        let failures = setup
            .relay
            .metric(r#"tunnel_auth_failures_total{side="client"}"#)
            .await
            .unwrap();
        assert!(failures >= 8, "auth failures counted: {failures}");

        // The client binary without credentials: the local connection is closed, and its
        // log says why in plain words.
        let (mut client, port) = client_binary(&setup, "client-none", &[], &[]).await;
        assert!(echo_via(port, b"x").await.is_empty());
        tokio::time::sleep(Duration::from_millis(300)).await;
        let log = client.log_contents();
        assert!(
            log.contains("401") && log.contains("credentials"),
            "client log should explain the 401:\n{log}"
        );
        assert!(
            client.try_exit_status().unwrap().is_none(),
            "client keeps running"
        );

        // The relay's log names the failures, never the secrets presented or configured.
        let log = setup.relay.process.log_contents();
        assert!(log.contains("client authentication failed"), "{log}");
        let needles = [wrong_bearer, wrong_password, BEARER, PASSWORD]
            .map(str::to_string)
            .to_vec();
        assert_absent("a credential", &log, &needles, "relay");
    })
    .await
    .expect("test timed out");
}
