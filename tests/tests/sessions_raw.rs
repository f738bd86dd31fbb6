//! Sessions (docs/protocol.md §2.1) at the wire, with raw HTTP requests against a real relay
//! and a real echo broker, so each test holds the session's and the connections' tokens
//! itself:
//! - connections in two sessions echo through their session's pushes and pulls;
//! - isolation: a wrong session token and an unknown session get the same 404; a packet of
//!   another session's connection is answered CONN_ABORT "unknown connection" (once per
//!   connection) and that connection keeps working; the per-connection push and pull of a
//!   connection in a session get 404;
//! - a malformed SESSION_INIT or push body gets 400 and nothing of it is forwarded;
//! - the session limit and the per-session connection limit get 503 and are counted;
//! - the answer to a session opening names the relay's per-connection queue limit, the
//!   default and one set with `--queue-limit`, and the client announces the window it holds,
//!   also after its connection moves to a relay that holds less;
//! - the session token never appears in the relay's or the broker's log at trace level;
//! - a streamed pull opens with a packet at once, carries echoes as they come, and ends
//!   after the pull wait or when a newer pull supersedes it;
//! - a streamed upstream (HTTP/2 or HTTP/1.1) is answered at once, carries packets as they are written,
//!   sends its answers down the pull, ends with its body and is reset by a malformed packet;
//! - after the relay is killed and started again on the same ports, a connection is attached
//!   to a new session with its token once the broker has re-linked, and data flows.
//!
//! Run: `cargo build --workspace --bins && cargo test -p tunnel-tests --test sessions_raw`.

mod support_raw;

use std::time::{Duration, Instant};

use bytes::Bytes;
use reqwest::StatusCode;
use support_raw::{
    ack, data, start_echo_broker, token_forms, EchoSetup, Raw, RawConn, RelayProcess,
};
use tunnel_proto::payload::{decode_reason, decode_token, Attach, ConnOption, SessionRequest};
use tunnel_proto::{decode_all, encode_all, Packet, PacketType, Token};
use tunnel_tests::TestDir;

const TEST_LIMIT: Duration = Duration::from_secs(90);

/// Relay flags for these tests: short held pulls, so loops turn quickly, and no name grace,
/// so an unknown name is a 404 at once.
fn relay_args(extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = ["--pull-wait-ms", "1000", "--name-grace-ms", "0"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// One raw session: its id and token, and the relay's URL.
#[derive(Clone)]
struct RawSession {
    raw: Raw,
    id: u32,
    token: Token,
}

/// POSTs `body` as a session opening; the relay's answer.
async fn open_response(raw: &Raw, body: Bytes) -> reqwest::Response {
    raw.http
        .post(format!("{}?Type=session", raw.url))
        .body(body)
        .send()
        .await
        .expect("session request")
}

/// POSTs `body` as a session opening; status and body.
async fn open_body(raw: &Raw, body: Bytes) -> (StatusCode, Bytes) {
    let resp = open_response(raw, body).await;
    let status = resp.status();
    (status, resp.bytes().await.unwrap_or_default())
}

/// Opens a session asking for the relay's default idle timeout.
async fn open_session(raw: &Raw) -> Result<RawSession, StatusCode> {
    let request = SessionRequest { idle_timeout_ms: 0 }.encode();
    let init = Packet::new(PacketType::SessionInit, 0, request);
    let (status, body) = open_body(raw, init.to_bytes()).await;
    if status != StatusCode::OK {
        return Err(status);
    }
    let list = decode_all(body, 1 << 21).expect("session answer is packets");
    assert_eq!(list.len(), 1, "one SESSION_INIT: {list:?}");
    assert_eq!(list[0].kind, PacketType::SessionInit);
    assert_ne!(list[0].conn_id, 0, "session id is non-zero");
    let token = decode_token(list[0].payload.clone()).expect("16-byte session token");
    Ok(RawSession {
        raw: raw.clone(),
        id: list[0].conn_id,
        token,
    })
}

impl RawSession {
    /// A request of `kind` in session `id` with `token`, as given (so tests can lie).
    fn request(
        &self,
        method: reqwest::Method,
        query: &str,
        id: u32,
        token: Token,
    ) -> reqwest::RequestBuilder {
        self.raw
            .http
            .request(method, format!("{}?{query}&Session={id}", self.raw.url))
            .header("tunnel-session-token", token.to_hex())
    }

    async fn send(req: reqwest::RequestBuilder) -> (StatusCode, Bytes) {
        let resp = req.send().await.expect("session request");
        let status = resp.status();
        (status, resp.bytes().await.unwrap_or_default())
    }

    /// A connect in this session; the connection, or the status.
    async fn connect(&self) -> Result<RawConn, StatusCode> {
        self.connect_as(self.id, self.token).await
    }

    async fn connect_as(&self, id: u32, token: Token) -> Result<RawConn, StatusCode> {
        let init = Packet::new(PacketType::ConnInit, 0, Bytes::new()).with_window(16);
        let query = format!("Type=connect&ServerName={}", self.raw.server);
        let req = self.request(reqwest::Method::POST, &query, id, token);
        let (status, body) = Self::send(req.body(init.to_bytes())).await;
        if status != StatusCode::OK {
            return Err(status);
        }
        let list = decode_all(body, 1 << 21).expect("connect answer is packets");
        let token = decode_token(list[0].payload.clone()).expect("connection token");
        Ok(RawConn {
            id: list[0].conn_id,
            token,
        })
    }

    async fn push_as(&self, id: u32, token: Token, body: Bytes) -> (StatusCode, Bytes) {
        Self::send(
            self.request(reqwest::Method::POST, "Type=push", id, token)
                .body(body),
        )
        .await
    }

    async fn push(&self, body: Bytes) -> (StatusCode, Bytes) {
        self.push_as(self.id, self.token, body).await
    }

    async fn pull_as(&self, id: u32, token: Token) -> (StatusCode, Bytes) {
        Self::send(self.request(reqwest::Method::GET, "Type=pull", id, token)).await
    }

    /// Pushes `packets` (200 expected); the packets of the answer.
    async fn push_packets(&self, packets: &[Packet]) -> Vec<Packet> {
        let (status, body) = self.push(encode_all(packets)).await;
        assert_eq!(status, StatusCode::OK, "session push: {body:?}");
        decode_all(body, 1 << 21).expect("push answer is packets")
    }

    /// Pulls until `done` says the packets collected so far (starting with `got`) suffice,
    /// within `limit`.
    async fn pull_until(
        &self,
        mut got: Vec<Packet>,
        limit: Duration,
        mut done: impl FnMut(&[Packet]) -> bool,
    ) -> Vec<Packet> {
        let deadline = Instant::now() + limit;
        while !done(&got) {
            assert!(
                Instant::now() < deadline,
                "session pull_until timed out; got {:?}",
                got.iter()
                    .map(|p| (p.kind, p.conn_id, p.seq))
                    .collect::<Vec<_>>()
            );
            let (status, body) = self.pull_as(self.id, self.token).await;
            assert_eq!(status, StatusCode::OK, "session pull");
            got.extend(decode_all(body, 1 << 21).expect("pull answer is packets"));
        }
        got
    }

    /// Pulls until every connection of `conns` has its CONN_INIT_ACK, then confirms each
    /// with an ACK (which stops the relay's resends).
    async fn wait_accepted(&self, conns: &[RawConn]) {
        let got = self
            .pull_until(Vec::new(), Duration::from_secs(10), |got| {
                conns.iter().all(|c| {
                    got.iter()
                        .any(|p| p.kind == PacketType::ConnInitAck && p.conn_id == c.id)
                })
            })
            .await;
        assert!(got.iter().all(|p| p.kind != PacketType::ConnRejected));
        let acks: Vec<Packet> = conns.iter().map(|c| ack(*c, u32::MAX)).collect();
        self.push_packets(&acks).await;
    }

    /// Pushes DATA `payload` with `seq` on `conn` and pulls until its echo comes back.
    async fn echo(&self, conn: RawConn, seq: u32, payload: &'static [u8]) {
        let got = self.push_packets(&[data(conn, seq, payload)]).await;
        let got = self
            .pull_until(got, Duration::from_secs(10), |got| {
                has_data(got, conn, payload)
            })
            .await;
        assert!(has_data(&got, conn, payload));
    }
}

/// An ATTACH of `conn` with `token`, to `server`.
fn attach_packet(conn: RawConn, token: Token, server: &str) -> Packet {
    let attach = Attach {
        token,
        server: server.to_string(),
    };
    Packet::new(PacketType::Attach, conn.id, attach.encode())
}

fn has_data(got: &[Packet], conn: RawConn, payload: &[u8]) -> bool {
    got.iter()
        .any(|p| p.kind == PacketType::Data && p.conn_id == conn.id && &p.payload[..] == payload)
}

/// The CONN_ABORTs "unknown connection" of `conn` in `got`.
fn unknown_aborts(got: &[Packet], conn: RawConn) -> usize {
    got.iter()
        .filter(|p| {
            p.kind == PacketType::ConnAbort
                && p.conn_id == conn.id
                && decode_reason(&p.payload) == "unknown connection"
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_carry_connections_and_isolate_them() {
    tokio::time::timeout(TEST_LIMIT, async {
        let setup = EchoSetup::start(&relay_args(&[]), &[], "trace").await;
        let raw = Raw::new(&setup.relay.tunnel_url());
        let a = open_session(&raw).await.expect("session A");
        let b = open_session(&raw).await.expect("session B");
        assert_ne!((a.id, a.token), (b.id, b.token));
        let (c1, c2) = (a.connect().await.unwrap(), a.connect().await.unwrap());
        let c3 = b.connect().await.unwrap();
        a.wait_accepted(&[c1, c2]).await;
        b.wait_accepted(&[c3]).await;
        assert_eq!(setup.relay.metric("tunnel_sessions").await, Some(2));

        // Echo through the session: both connections in one push, their echoes in its pulls.
        let got = a
            .push_packets(&[data(c1, 0, b"one"), data(c2, 0, b"two")])
            .await;
        let got = a
            .pull_until(got, Duration::from_secs(10), |got| {
                has_data(got, c1, b"one") && has_data(got, c2, b"two")
            })
            .await;
        assert!(got.iter().all(|p| p.conn_id != c3.id), "B's packets in A");
        b.echo(c3, 0, b"three").await;

        // A wrong session token and an unknown session: the same 404, for every request.
        let wrong = Token(rand::random());
        let unknown_id = a.id.wrapping_add(1).max(1);
        let mut refusals = Vec::new();
        for (id, token) in [(a.id, wrong), (a.id, b.token), (unknown_id, a.token)] {
            if id == b.id {
                continue;
            }
            refusals.push(a.pull_as(id, token).await);
            refusals.push(a.push_as(id, token, data(c1, 1, b"evil").to_bytes()).await);
            let connect = a.connect_as(id, token).await;
            assert_eq!(connect.err(), Some(StatusCode::NOT_FOUND));
        }
        for (status, body) in &refusals {
            assert_eq!(*status, StatusCode::NOT_FOUND);
            assert_eq!(body, &refusals[0].1, "404 bodies differ");
        }
        // A missing or malformed token header, or a bad session id, is a 400.
        let no_header = raw
            .http
            .get(format!("{}?Type=pull&Session={}", raw.url, a.id))
            .send()
            .await
            .unwrap();
        assert_eq!(no_header.status(), StatusCode::BAD_REQUEST);
        let (status, _) = a.pull_as(0, a.token).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);

        // B's connection pushed in A: CONN_ABORT "unknown connection", once for two packets,
        // and nothing forwarded; B's connection keeps working.
        let got = a
            .push_packets(&[
                data(c3, 1, b"foreign"),
                data(c3, 2, b"foreign2"),
                data(c1, 1, b"mine"),
            ])
            .await;
        assert_eq!(unknown_aborts(&got, c3), 1, "{got:?}");
        let got = a
            .pull_until(got, Duration::from_secs(10), |got| {
                has_data(got, c1, b"mine")
            })
            .await;
        assert!(!got
            .iter()
            .any(|p| p.conn_id == c3.id && p.kind == PacketType::Data));
        b.echo(c3, 1, b"still-b").await;

        // The per-connection requests of a connection in a session: 404.
        let v1 = Raw::new(&setup.relay.tunnel_url());
        let (status, _) = v1.pull(c1.id, Some(&c1.token.to_hex())).await;
        assert_eq!(
            status,
            StatusCode::NOT_FOUND,
            "v1 pull of a session connection"
        );
        let (status, _) = v1
            .push(c1.id, Some(&c1.token.to_hex()), ack(c1, 0).to_bytes())
            .await;
        assert_eq!(
            status,
            StatusCode::NOT_FOUND,
            "v1 push of a session connection"
        );

        // Malformed bodies: 400, and nothing of them forwarded.
        let bad_bodies: Vec<Bytes> = vec![
            Bytes::from_static(b"not packets at all, not even close"),
            encode_all(&[
                data(c1, 2, b"bad-zero"),
                data(
                    RawConn {
                        id: 0,
                        token: c1.token,
                    },
                    0,
                    b"x",
                ),
            ]),
            encode_all(&[
                data(c2, 1, b"bad-type"),
                Packet::new(PacketType::ConnInit, c2.id, Bytes::new()),
            ]),
            encode_all(&[
                data(c2, 1, b"bad-attach"),
                Packet::new(PacketType::Attach, c2.id, Bytes::from_static(b"short")),
            ]),
            {
                let mut body = data(c2, 1, b"bad-tail").to_bytes().to_vec();
                body.extend_from_slice(&[0, 1, 2]);
                Bytes::from(body)
            },
        ];
        for body in bad_bodies {
            let (status, _) = a.push(body).await;
            assert_eq!(status, StatusCode::BAD_REQUEST);
        }
        for body in [
            Bytes::new(),
            Packet::new(PacketType::SessionInit, 0, Bytes::from_static(&[0, 0, 1])).to_bytes(),
            Packet::new(
                PacketType::SessionInit,
                7,
                SessionRequest { idle_timeout_ms: 0 }.encode(),
            )
            .to_bytes(),
            Packet::new(
                PacketType::ConnInit,
                0,
                SessionRequest { idle_timeout_ms: 0 }.encode(),
            )
            .to_bytes(),
        ] {
            let (status, _) = open_body(&raw, body).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "malformed SESSION_INIT");
        }
        let get = raw
            .http
            .get(format!("{}?Type=session", raw.url))
            .send()
            .await
            .unwrap();
        assert_eq!(get.status(), StatusCode::METHOD_NOT_ALLOWED);
        // Nothing of the refused bodies came back from the echo.
        let settle = Instant::now() + Duration::from_millis(1500);
        let mut late = Vec::new();
        while Instant::now() < settle {
            let (status, body) = a.pull_as(a.id, a.token).await;
            assert_eq!(status, StatusCode::OK);
            late.extend(decode_all(body, 1 << 21).unwrap());
        }
        assert!(
            !late.iter().any(|p| p.payload.starts_with(b"bad-")),
            "a refused push was forwarded: {late:?}"
        );
        assert_eq!(
            setup
                .relay
                .metric(r#"tunnel_session_rejected_total{reason="bad_request"}"#)
                .await,
            Some(4)
        );

        // The session tokens never reach a log (both ran at trace level).
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut forms = token_forms(&a.token);
        forms.extend(token_forms(&b.token));
        for (label, log) in [
            ("relay", setup.relay.process.log_contents()),
            ("broker", setup.broker.log_contents()),
        ] {
            assert!(log.contains("connection opened"), "{label} log is empty");
            for form in &forms {
                assert!(
                    !log.contains(form.as_str()),
                    "a session token in the {label} log"
                );
            }
        }
        assert!(setup
            .relay
            .process
            .log_contents()
            .contains("session opened"));
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_session_limits_answer_503_and_are_counted() {
    tokio::time::timeout(TEST_LIMIT, async {
        let args = relay_args(&["--max-sessions", "2", "--max-session-connections", "1"]);
        let setup = EchoSetup::start(&args, &[], "info").await;
        let raw = Raw::new(&setup.relay.tunnel_url());
        let a = open_session(&raw).await.expect("first session");
        let b = open_session(&raw).await.expect("second session");
        assert_eq!(
            open_session(&raw).await.err(),
            Some(StatusCode::SERVICE_UNAVAILABLE)
        );
        let c1 = a.connect().await.expect("first connection");
        assert_eq!(
            a.connect().await.err(),
            Some(StatusCode::SERVICE_UNAVAILABLE)
        );
        a.wait_accepted(&[c1]).await;
        a.echo(c1, 0, b"under the limits").await;
        let metric = |reason: &str| {
            let name = format!("tunnel_session_rejected_total{{reason=\"{reason}\"}}");
            let relay = &setup.relay;
            async move { relay.metric(&name).await }
        };
        assert_eq!(metric("limit").await, Some(1));
        assert_eq!(metric("connection_limit").await, Some(1));
        assert_eq!(
            setup.relay.metric("tunnel_sessions_opened_total").await,
            Some(2)
        );
        assert_eq!(setup.relay.metric("tunnel_sessions").await, Some(2));

        // Closing a session frees its place at once; a wrong token closes nothing, and a
        // closed session is unknown (404) from then on.
        let close =
            |id, token| RawSession::send(a.request(reqwest::Method::POST, "Type=close", id, token));
        assert_eq!(close(a.id, b.token).await.0, StatusCode::NOT_FOUND);
        assert_eq!(close(a.id, a.token).await.0, StatusCode::OK);
        assert_eq!(close(a.id, a.token).await.0, StatusCode::NOT_FOUND);
        assert_eq!(a.pull_as(a.id, a.token).await.0, StatusCode::NOT_FOUND);
        assert_eq!(setup.relay.metric("tunnel_sessions").await, Some(1));
        open_session(&raw)
            .await
            .expect("a place again after the close");
    })
    .await
    .expect("test timed out");
}

/// The `tunnel-queue-limit` header of a session opening's answer (docs/protocol.md §2.1).
async fn announced_queue_limit(raw: &Raw) -> Option<u64> {
    let init = Packet::new(
        PacketType::SessionInit,
        0,
        SessionRequest { idle_timeout_ms: 0 }.encode(),
    );
    let resp = open_response(raw, init.to_bytes()).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let value = resp.headers().get("tunnel-queue-limit")?;
    Some(value.to_str().ok()?.parse().expect("a number of bytes"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_opening_names_the_relay_queue_limit_and_the_client_keeps_within_it() {
    tokio::time::timeout(TEST_LIMIT, async {
        let setup = EchoSetup::start(&relay_args(&[]), &[], "info").await;
        let raw = Raw::new(&setup.relay.tunnel_url());
        assert_eq!(
            announced_queue_limit(&raw).await,
            Some(tunnel_servlet::config::DEFAULT_QUEUE_LIMIT as u64)
        );

        // 20 packets of 64 KiB and their headers, and room for the ACK.
        let limit = 20 * (64 * 1024 + 24) + 4096;
        let setup = EchoSetup::start(
            &relay_args(&["--queue-limit", &limit.to_string()]),
            &[],
            "info",
        )
        .await;
        let raw = Raw::new(&setup.relay.tunnel_url());
        assert_eq!(announced_queue_limit(&raw).await, Some(limit as u64));
        let mut config =
            tunnel_client::ClientConfig::new(setup.relay.tunnel_url(), support_raw::SERVER);
        config.env_proxy = false;
        let stream = tunnel_client::connect(config).await.expect("connect");
        assert_eq!(
            stream.handle().recv_window(),
            20,
            "the window the relay's queue holds"
        );
    })
    .await
    .expect("test timed out");
}

/// Writes `message` to `stream` and reads it back from the echo, within 20 s.
async fn echo_through(stream: &mut tunnel_client::TunnelStream, message: &[u8]) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let round_trip = async {
        stream.write_all(message).await.expect("write");
        let mut back = vec![0u8; message.len()];
        stream.read_exact(&mut back).await.expect("read the echo");
        assert_eq!(back, message);
    };
    tokio::time::timeout(Duration::from_secs(20), round_trip)
        .await
        .expect("no echo within 20 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_moved_to_a_relay_that_holds_less_announces_what_it_holds() {
    tokio::time::timeout(TEST_LIMIT, async {
        let mut setup = EchoSetup::start(&relay_args(&[]), &[], "info").await;
        let addrs = (setup.relay.http, setup.relay.link);
        let mut config =
            tunnel_client::ClientConfig::new(setup.relay.tunnel_url(), support_raw::SERVER);
        config.env_proxy = false;
        let mut stream = tunnel_client::connect(config).await.expect("connect");
        echo_through(&mut stream, b"before").await;
        assert_eq!(
            stream.handle().recv_window(),
            64,
            "the default relay's queue"
        );

        // The same relay comes back holding 20 packets a connection.
        setup.relay.process.kill9().await.expect("kill the relay");
        let limit = (20 * (64 * 1024 + 24) + 4096).to_string();
        setup.relay = RelayProcess::start_on(
            setup.dir.path(),
            "relay2",
            addrs,
            &relay_args(&["--queue-limit", &limit]),
            &[],
            "info",
        )
        .await;
        echo_through(&mut stream, b"after the restart").await;
        // Room already announced is not taken back: the window shrinks as the data it
        // allowed arrives, one packet per echo here, until it is what the queue holds.
        for i in 0..70 {
            echo_through(&mut stream, format!("echo {i}").as_bytes()).await;
        }
        assert_eq!(stream.handle().recv_window(), 20, "the new relay's queue");
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_is_attached_to_a_new_session_after_a_relay_restart() {
    tokio::time::timeout(TEST_LIMIT, async {
        let dir = TestDir::new("sessions-attach").unwrap();
        let args = relay_args(&[]);
        let mut relay = RelayProcess::start(dir.path(), "relay", &args, "debug").await;
        let addrs = (relay.http, relay.link);
        let _broker = start_echo_broker(
            dir.path(),
            "broker",
            relay.link,
            &relay.secret_file,
            &[],
            "debug",
        );
        relay.wait_link_up().await;
        let raw = Raw::new(&relay.tunnel_url());
        let old = open_session(&raw).await.unwrap();
        let conn = old.connect().await.unwrap();
        old.wait_accepted(&[conn]).await;
        old.echo(conn, 0, b"before").await;

        relay.process.kill9().await.expect("kill the relay");
        let relay = RelayProcess::start_on(dir.path(), "relay2", addrs, &args, &[], "debug").await;
        let raw = Raw::new(&relay.tunnel_url());
        // The old session is gone: 404, which tells the client to open a new one.
        let (status, _) = old.pull_as(old.id, old.token).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let new = open_session(&raw).await.expect("new session");
        let attach = attach_packet(conn, conn.token, &raw.server);
        // Unanswered until the broker has re-linked and re-announced the connection.
        let deadline = Instant::now() + Duration::from_secs(20);
        let answer = loop {
            let got = new.push_packets(std::slice::from_ref(&attach)).await;
            if let Some(p) = got.iter().find(|p| p.conn_id == conn.id) {
                break p.clone();
            }
            assert!(Instant::now() < deadline, "ATTACH never answered");
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert_eq!(answer.kind, PacketType::Attach, "{answer:?}");
        assert!(answer.payload.is_empty());
        assert_eq!(relay.metric("tunnel_session_attaches_total").await, Some(1));
        new.echo(conn, 1, b"after the restart").await;

        // A wrong token for a name the relay has a link of: CONN_ABORT.
        let forged = attach_packet(conn, Token(rand::random()), &raw.server);
        let got = new.push_packets(&[forged]).await;
        assert!(got
            .iter()
            .any(|p| p.kind == PacketType::ConnAbort && p.conn_id == conn.id));
        // The connection itself is untouched.
        new.echo(conn, 2, b"still attached").await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_ack_is_resent_in_the_session_and_an_idle_session_expires() {
    tokio::time::timeout(TEST_LIMIT, async {
        // A short idle timeout for sessions (and connections), so the session expires soon.
        let setup = EchoSetup::start(&relay_args(&["--inactivity-ms", "3000"]), &[], "info").await;
        let raw = Raw::new(&setup.relay.tunnel_url());
        let s = open_session(&raw).await.unwrap();
        let conn = s.connect().await.unwrap();
        let count_acks = |got: &[Packet]| {
            got.iter()
                .filter(|p| p.kind == PacketType::ConnInitAck && p.conn_id == conn.id)
                .count()
        };
        // Not confirmed by a push: handed out again (every 500 ms).
        let got = s
            .pull_until(Vec::new(), Duration::from_secs(10), |got| {
                count_acks(got) >= 2
            })
            .await;
        assert!(count_acks(&got) >= 2);
        // Confirmed: no more copies. CONN_OPTION 2 keeps the connection longer than its
        // session, as tunnel-client does with its outage grace.
        let keep = Packet::new(
            PacketType::ConnOption,
            conn.id,
            ConnOption::InactivityTimeoutMs(60_000).encode(),
        )
        .with_seq(0)
        .with_window(16);
        s.push_packets(&[ack(conn, u32::MAX), keep]).await;
        let settle = Instant::now() + Duration::from_millis(1500);
        let mut later = Vec::new();
        while Instant::now() < settle {
            let (status, body) = s.pull_as(s.id, s.token).await;
            assert_eq!(status, StatusCode::OK);
            later.extend(decode_all(body, 1 << 21).unwrap());
        }
        assert_eq!(count_acks(&later), 0, "{later:?}");

        // No request for the idle timeout: the session is forgotten (404), its connection is
        // not, and it is attached to a new session.
        tokio::time::sleep(Duration::from_millis(3600)).await;
        let (status, _) = s.pull_as(s.id, s.token).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(
            setup.relay.metric("tunnel_sessions_expired_total").await,
            Some(1)
        );
        assert_eq!(setup.relay.metric("tunnel_sessions").await, Some(0));
        let new = open_session(&raw).await.unwrap();
        let attach = attach_packet(conn, conn.token, &raw.server);
        let got = new.push_packets(&[attach]).await;
        assert!(
            got.iter()
                .any(|p| p.kind == PacketType::Attach && p.conn_id == conn.id),
            "{got:?}"
        );
        new.echo(conn, 1, b"in the new session").await;
    })
    .await
    .expect("test timed out");
}

/// Reads packets from a streamed pull until `done` says the ones collected suffice, the
/// response ends (`true`), or `limit` passes (a failure).
async fn read_stream(
    resp: &mut reqwest::Response,
    decoder: &mut tunnel_proto::Decoder,
    got: &mut Vec<Packet>,
    limit: Duration,
    mut done: impl FnMut(&[Packet]) -> bool,
) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while !done(got) {
        let chunk = tokio::time::timeout_at(deadline, resp.chunk())
            .await
            .unwrap_or_else(|_| panic!("stream: nothing more within {limit:?}; got {got:?}"))
            .expect("stream body");
        let Some(chunk) = chunk else {
            decoder.finish().expect("stream ends between packets");
            return true;
        };
        decoder.feed(&chunk);
        while let Some(packet) = decoder.next_packet().expect("stream holds packets") {
            got.push(packet);
        }
    }
    false
}

/// The streamed pull (docs/protocol.md §2.2) at the wire: it opens with a packet at once,
/// carries the echoes of two pushes in the same response, ends after the pull wait, ends when
/// a newer pull supersedes it, and is a 404 for an unknown session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_pull_carries_packets_as_they_come_and_ends_in_time() {
    tokio::time::timeout(TEST_LIMIT, async {
        let setup = EchoSetup::start(&relay_args(&[]), &[], "info").await;
        let raw = Raw::new(&setup.relay.tunnel_url());
        let s = open_session(&raw).await.unwrap();
        let conn = s.connect().await.unwrap();
        s.wait_accepted(&[conn]).await;
        let stream_request = |id: u32, token: Token| {
            s.request(reqwest::Method::GET, "Type=pull&Stream=1", id, token)
        };

        let opened = Instant::now();
        let mut resp = stream_request(s.id, s.token).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(resp.content_length().is_none(), "a stream has no length");
        assert_eq!(resp.headers()["x-accel-buffering"], "no");
        let mut decoder = tunnel_proto::Decoder::new(1 << 21);
        let mut got = Vec::new();
        // The first packet at once (nothing is queued: a NO_OP).
        read_stream(
            &mut resp,
            &mut decoder,
            &mut got,
            Duration::from_millis(500),
            |g| !g.is_empty(),
        )
        .await;
        assert_eq!(got[0].kind, PacketType::NoOp, "{got:?}");
        // Two echoes, one after the other, in the same response.
        for (seq, payload) in [(0u32, &b"first"[..]), (1, &b"second"[..])] {
            let answer = s.push_packets(&[data(conn, seq, payload)]).await;
            got.extend(answer);
            let ended = read_stream(
                &mut resp,
                &mut decoder,
                &mut got,
                Duration::from_secs(5),
                |g| has_data(g, conn, payload),
            )
            .await;
            assert!(!ended, "the stream ended before the echo of {payload:?}");
        }
        // Ends after the pull wait (1 s here).
        let ended = read_stream(
            &mut resp,
            &mut decoder,
            &mut got,
            Duration::from_secs(5),
            |_| false,
        )
        .await;
        assert!(ended);
        let lasted = opened.elapsed();
        assert!(
            lasted >= Duration::from_millis(900) && lasted < Duration::from_secs(4),
            "the stream lasted {lasted:?}, the pull wait is 1 s"
        );

        // A newer pull ends the stream at once.
        let mut resp = stream_request(s.id, s.token).send().await.unwrap();
        let mut decoder = tunnel_proto::Decoder::new(1 << 21);
        let mut got = Vec::new();
        read_stream(
            &mut resp,
            &mut decoder,
            &mut got,
            Duration::from_millis(500),
            |g| !g.is_empty(),
        )
        .await;
        let superseded = Instant::now();
        let pull = tokio::spawn({
            let s = s.clone();
            async move { s.pull_as(s.id, s.token).await }
        });
        let ended = read_stream(
            &mut resp,
            &mut decoder,
            &mut got,
            Duration::from_millis(800),
            |_| false,
        )
        .await;
        assert!(ended, "superseded stream still open");
        assert!(superseded.elapsed() < Duration::from_millis(800));
        assert_eq!(pull.await.unwrap().0, StatusCode::OK);

        // An unknown session: 404 before any stream.
        let resp = stream_request(s.id ^ 1, s.token).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
        assert_eq!(
            setup
                .relay
                .metric("tunnel_requests_total{type=\"stream\"}")
                .await,
            Some(2)
        );
    })
    .await
    .expect("test timed out");
}

/// The body of a raw streamed upstream: what the test writes into the channel, each write
/// one DATA frame (or a few, as HTTP/2 splits them), as it comes.
struct ChannelBody(tokio::sync::mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|b| b.map(|b| Ok(hyper::body::Frame::data(b))))
    }
}

/// Opens a streamed upstream of session `s` with `token`: the writer of its body, and the
/// response (or the error that ended the request).
async fn open_upstream(
    s: &RawSession,
    id: u32,
    token: Token,
) -> (
    tokio::sync::mpsc::Sender<Bytes>,
    Result<reqwest::Response, reqwest::Error>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let resp = s
        .request(reqwest::Method::POST, "Type=push&Stream=1", id, token)
        .body(reqwest::Body::wrap(ChannelBody(rx)))
        .send()
        .await;
    (tx, resp)
}

/// The streamed upstream (docs/protocol.md §2.3) at the wire, over h2c: the relay answers
/// its headers before any of the body; packets reach the broker as they are written, a packet
/// split over two writes once its second half is in; the answers a push would carry (here a
/// CONN_ABORT for a connection not in the session) come down the pull; the response ends
/// when the body does; a malformed packet resets it; an unknown session gets 404. Over
/// HTTP/1.1 (chunked) the same: a probe (NOOP, conn_id 0) is answered down the response at
/// once, and packets written after it reach the broker. Counted as type=upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_upstream_carries_packets_as_they_are_written() {
    tokio::time::timeout(TEST_LIMIT, async {
        let setup = EchoSetup::start(&relay_args(&[]), &[], "info").await;
        let mut raw = Raw::new(&setup.relay.tunnel_url());
        raw.http = reqwest::Client::builder()
            .no_proxy()
            .http2_prior_knowledge()
            .build()
            .unwrap();
        let s = open_session(&raw).await.unwrap();
        let conn = s.connect().await.unwrap();
        s.wait_accepted(&[conn]).await;

        // Headers first, with nothing of the body sent.
        let started = Instant::now();
        let (tx, resp) = open_upstream(&s, s.id, s.token).await;
        let resp = resp.expect("upstream answered");
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.version(), reqwest::Version::HTTP_2);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "headers came after {:?}",
            started.elapsed()
        );

        // A whole packet in one write: its echo comes down the pull.
        tx.send(data(conn, 0, b"streamed up").to_bytes())
            .await
            .unwrap();
        s.pull_until(Vec::new(), Duration::from_secs(5), |g| {
            has_data(g, conn, b"streamed up")
        })
        .await;
        // A packet split over two writes, the second 300 ms later: nothing is forwarded
        // until it is whole.
        let split = data(conn, 1, b"split in two").to_bytes();
        tx.send(split.slice(..10)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        tx.send(split.slice(10..)).await.unwrap();
        s.pull_until(Vec::new(), Duration::from_secs(5), |g| {
            has_data(g, conn, b"split in two")
        })
        .await;
        // A connection not in the session: the CONN_ABORT comes down the pull.
        let stranger = RawConn {
            id: conn.id ^ 0x4000_0000,
            token: conn.token,
        };
        tx.send(data(stranger, 0, b"who?").to_bytes())
            .await
            .unwrap();
        s.pull_until(Vec::new(), Duration::from_secs(5), |g| {
            unknown_aborts(g, stranger) == 1
        })
        .await;
        // The body ends: so does the response, empty.
        drop(tx);
        let rest = tokio::time::timeout(Duration::from_secs(5), resp.bytes())
            .await
            .expect("the upstream's response ended with its body")
            .expect("ended cleanly");
        assert!(
            rest.is_empty(),
            "an upstream's response carries nothing: {rest:?}"
        );

        // A malformed packet resets the upstream; the session goes on.
        let (tx, resp) = open_upstream(&s, s.id, s.token).await;
        let mut resp = resp.expect("upstream answered");
        tx.send(Bytes::from_static(&[0xff; 24])).await.unwrap();
        let ended = tokio::time::timeout(Duration::from_secs(5), resp.chunk())
            .await
            .expect("the upstream was reset");
        assert!(
            ended.is_err(),
            "a malformed upstream ends in a reset: {ended:?}"
        );
        s.echo(conn, 2, b"still here").await;

        // An unknown session: 404.
        let (_tx, resp) = open_upstream(&s, s.id ^ 1, s.token).await;
        assert_eq!(resp.unwrap().status(), StatusCode::NOT_FOUND);

        // HTTP/1.1: the probe is answered with a NOOP as soon as it is written, then packets
        // go through, and the response ends with the body.
        let h1 = RawSession {
            raw: Raw::new(&setup.relay.tunnel_url()),
            ..s.clone()
        };
        let (tx, resp) = open_upstream(&h1, s.id, s.token).await;
        let mut resp = resp.expect("HTTP/1.1 upstream answered");
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.version(), reqwest::Version::HTTP_11);
        let probe = Packet::new(PacketType::NoOp, 0, Bytes::new()).to_bytes();
        tx.send(probe.clone()).await.unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(2), resp.chunk())
            .await
            .expect("the probe was answered at once")
            .expect("the response goes on")
            .expect("a chunk, not the end");
        assert_eq!(answer, probe, "a probe's answer is one NOOP");
        tx.send(data(conn, 3, b"chunked up").to_bytes())
            .await
            .unwrap();
        s.pull_until(Vec::new(), Duration::from_secs(5), |g| {
            has_data(g, conn, b"chunked up")
        })
        .await;
        drop(tx);
        let rest = tokio::time::timeout(Duration::from_secs(5), resp.bytes())
            .await
            .expect("the HTTP/1.1 upstream's response ended with its body")
            .expect("ended cleanly");
        assert!(
            rest.is_empty(),
            "nothing after the probe's answer: {rest:?}"
        );
        assert_eq!(
            setup
                .relay
                .metric("tunnel_requests_total{type=\"upstream\"}")
                .await,
            Some(3)
        );
    })
    .await
    .expect("test timed out");
}
