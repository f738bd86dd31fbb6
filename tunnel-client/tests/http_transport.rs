//! The HTTP transport against a small hyper-based mock relay that plays the relay's HTTP
//! interface (docs/protocol.md §2) and hosts the broker end of the connection itself.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::time::timeout;
use tunnel_client::{ClientConfig, ConnectError, TunnelClient, TunnelStream};
use tunnel_proto::driver::{self as stream, ConnHandle, PacketSink};
use tunnel_proto::payload::{encode_reason, encode_token};
use tunnel_proto::{Connection, ConnectionConfig, Packet, PacketType, Token};

const TEST_TIMEOUT: Duration = Duration::from_secs(30);
const CONN_ID: u32 = 7;
const TOKEN: Token = Token([0x5a; 16]);

#[derive(Clone)]
enum BrokerAnswer {
    Accept,
    Reject(&'static str),
}

struct MockRelay {
    /// Statuses answered to connect requests, in order, before the first success.
    connect_failures: Mutex<VecDeque<u16>>,
    /// Answer every connect with this status instead (e.g. 404).
    connect_always: Option<u16>,
    broker_answer: BrokerAnswer,
    connects: AtomicUsize,
    /// Answer pulls and pushes with 404 from now on.
    forget: AtomicBool,
    /// Packets waiting for the client's next pull.
    to_client: Mutex<VecDeque<Packet>>,
    queued: Notify,
    broker: Mutex<Option<ConnHandle>>,
}

impl MockRelay {
    fn new(
        connect_failures: &[u16],
        connect_always: Option<u16>,
        answer: BrokerAnswer,
    ) -> Arc<Self> {
        Arc::new(MockRelay {
            connect_failures: Mutex::new(connect_failures.iter().copied().collect()),
            connect_always,
            broker_answer: answer,
            connects: AtomicUsize::new(0),
            forget: AtomicBool::new(false),
            to_client: Mutex::new(VecDeque::new()),
            queued: Notify::new(),
            broker: Mutex::new(None),
        })
    }

    fn queue(&self, packets: impl IntoIterator<Item = Packet>) {
        self.to_client.lock().unwrap().extend(packets);
        self.queued.notify_one();
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let query = req.uri().query().unwrap_or("").to_string();
        let param = |name: &str| {
            query
                .split('&')
                .filter_map(|kv| kv.split_once('='))
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        };
        if param("ServerName").as_deref() != Some("echo") {
            return status(StatusCode::BAD_REQUEST);
        }
        let token_ok = req
            .headers()
            .get("Tunnel-Token")
            .and_then(|v| v.to_str().ok())
            .and_then(Token::from_hex)
            .is_some_and(|t| t.ct_eq(&TOKEN));
        let kind = param("Type");
        let body = match req.into_body().collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => return status(StatusCode::BAD_REQUEST),
        };
        match kind.as_deref() {
            Some("connect") => self.connect(body),
            Some("pull") | Some("push") if !token_ok || self.forget.load(Ordering::SeqCst) => {
                status(StatusCode::NOT_FOUND)
            }
            Some("pull") => self.pull().await,
            Some("push") => self.push(body),
            _ => status(StatusCode::BAD_REQUEST),
        }
    }

    fn connect(self: &Arc<Self>, body: Bytes) -> Response<Full<Bytes>> {
        self.connects.fetch_add(1, Ordering::SeqCst);
        if let Some(code) = self.connect_always {
            return status(StatusCode::from_u16(code).unwrap());
        }
        if let Some(code) = self.connect_failures.lock().unwrap().pop_front() {
            return status(StatusCode::from_u16(code).unwrap());
        }
        let Ok(packets) = tunnel_proto::decode_all(body, 1 << 20) else {
            return status(StatusCode::BAD_REQUEST);
        };
        let [init] = &packets[..] else {
            return status(StatusCode::BAD_REQUEST);
        };
        if init.kind != PacketType::ConnInit || init.conn_id != 0 {
            return status(StatusCode::BAD_REQUEST);
        }
        let cfg = ConnectionConfig::default();
        match self.broker_answer {
            BrokerAnswer::Accept => {
                self.queue([Packet::new(PacketType::ConnInitAck, CONN_ID, Bytes::new())
                    .with_window(cfg.recv_window)]);
                let now = tokio::time::Instant::now().into_std();
                let conn = Connection::new(CONN_ID, init.window, cfg, now);
                let (broker_stream, handle) = stream::spawn(conn, self.clone());
                *self.broker.lock().unwrap() = Some(handle);
                tokio::spawn(echo(broker_stream));
            }
            BrokerAnswer::Reject(reason) => self.queue([Packet::new(
                PacketType::ConnRejected,
                CONN_ID,
                encode_reason(reason),
            )]),
        }
        let answer = Packet::new(PacketType::ConnInit, CONN_ID, encode_token(&TOKEN));
        ok(answer.to_bytes())
    }

    async fn pull(&self) -> Response<Full<Bytes>> {
        // Hold the pull until something is queued (a short wait keeps the test quick).
        let _ = timeout(Duration::from_millis(300), async {
            loop {
                let notified = self.queued.notified();
                if !self.to_client.lock().unwrap().is_empty() {
                    return;
                }
                notified.await;
            }
        })
        .await;
        let mut queue = self.to_client.lock().unwrap();
        let mut packets = Vec::new();
        let mut size = 0;
        while let Some(p) = queue.front() {
            if !packets.is_empty() && size + p.wire_len() > 1 << 20 {
                break;
            }
            size += p.wire_len();
            packets.push(queue.pop_front().unwrap());
        }
        if packets.is_empty() {
            packets.push(Packet::new(PacketType::NoOp, CONN_ID, Bytes::new()));
        }
        ok(tunnel_proto::encode_all(&packets))
    }

    fn push(&self, body: Bytes) -> Response<Full<Bytes>> {
        let Ok(packets) = tunnel_proto::decode_all(body, 1 << 20) else {
            return status(StatusCode::BAD_REQUEST);
        };
        if let Some(h) = self.broker.lock().unwrap().as_ref() {
            h.deliver_all(packets);
        }
        ok(Bytes::new())
    }
}

/// The mock's broker end sends by queueing for the client's pulls.
impl PacketSink for MockRelay {
    fn send(&self, packets: Vec<Packet>) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        self.queue(packets);
        Box::pin(async {})
    }
}

async fn echo(stream: TunnelStream) {
    let (mut r, mut w) = tokio::io::split(stream);
    if tokio::io::copy(&mut r, &mut w).await.is_ok() {
        let _ = w.shutdown().await;
    }
}

fn status(code: StatusCode) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = code;
    r
}

fn ok(body: Bytes) -> Response<Full<Bytes>> {
    Response::builder()
        .header("Content-Type", "application/octet-stream")
        .header("Cache-Control", "no-store")
        .body(Full::new(body))
        .unwrap()
}

async fn start(mock: Arc<MockRelay>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let mock = mock.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let mock = mock.clone();
                    async move { Ok::<_, Infallible>(mock.handle(req).await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(socket), service)
                    .await;
            });
        }
    });
    addr
}

fn client_config(addr: SocketAddr) -> ClientConfig {
    ClientConfig {
        connect_timeout: Duration::from_secs(10),
        retry_initial: Duration::from_millis(20),
        retry_max: Duration::from_millis(100),
        // Loopback tests must not go through a proxy from the environment.
        env_proxy: false,
        ..ClientConfig::new(format!("http://{addr}/tunnel"), "echo")
    }
}

#[tokio::test]
async fn unknown_server_is_no_such_server() {
    let mock = MockRelay::new(&[], Some(404), BrokerAnswer::Accept);
    let addr = start(mock.clone()).await;
    let err = timeout(TEST_TIMEOUT, tunnel_client::connect(client_config(addr)))
        .await
        .expect("timed out")
        .unwrap_err();
    assert!(
        matches!(&err, ConnectError::NoSuchServer { server } if server == "echo"),
        "{err:?}"
    );
    assert_eq!(
        mock.connects.load(Ordering::SeqCst),
        1,
        "404 is not retried"
    );
}

#[tokio::test]
async fn bad_request_is_refused_without_retry() {
    let mock = MockRelay::new(&[], Some(400), BrokerAnswer::Accept);
    let addr = start(mock.clone()).await;
    let err = timeout(TEST_TIMEOUT, tunnel_client::connect(client_config(addr)))
        .await
        .expect("timed out")
        .unwrap_err();
    assert!(
        matches!(err, ConnectError::Refused { status: 400, .. }),
        "{err:?}"
    );
    assert_eq!(mock.connects.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn busy_relay_is_retried_until_the_connect_timeout() {
    let mock = MockRelay::new(&[], Some(503), BrokerAnswer::Accept);
    let addr = start(mock.clone()).await;
    let config = ClientConfig {
        connect_timeout: Duration::from_millis(600),
        ..client_config(addr)
    };
    let err = timeout(TEST_TIMEOUT, tunnel_client::connect(config))
        .await
        .expect("timed out")
        .unwrap_err();
    match &err {
        ConnectError::TimedOut { last_error, .. } => assert!(last_error.contains("503"), "{err}"),
        other => panic!("expected TimedOut, got {other:?}"),
    }
    assert!(mock.connects.load(Ordering::SeqCst) >= 3, "503 is retried");
}

#[tokio::test]
async fn unreachable_relay_times_out() {
    // A port that was just free: nothing listens there.
    let addr = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let config = ClientConfig {
        connect_timeout: Duration::from_millis(500),
        ..client_config(addr)
    };
    let err = timeout(TEST_TIMEOUT, tunnel_client::connect(config))
        .await
        .expect("timed out")
        .unwrap_err();
    assert!(matches!(err, ConnectError::TimedOut { .. }), "{err:?}");
}

#[tokio::test]
async fn invalid_url_is_a_config_error() {
    let config = ClientConfig::new("ftp://127.0.0.1/tunnel", "echo");
    let err = tunnel_client::connect(config).await.unwrap_err();
    assert!(matches!(err, ConnectError::InvalidConfig(_)), "{err:?}");
}

#[test]
fn a_data_payload_the_largest_packet_cannot_carry_is_a_config_error() {
    let mut config = ClientConfig::new("http://127.0.0.1:1/tunnel", "echo");
    config.connection.max_data_payload = config.max_packet_size - 24;
    assert!(
        TunnelClient::new(config.clone()).is_ok(),
        "a payload that fits"
    );
    for payload in [0, config.max_packet_size - 23] {
        config.connection.max_data_payload = payload;
        let err = TunnelClient::new(config.clone()).unwrap_err();
        assert!(
            matches!(&err, ConnectError::InvalidConfig(m) if m.contains("max data payload")),
            "{payload}: {err:?}"
        );
    }
}

#[tokio::test]
async fn broker_rejection_is_reported() {
    let mock = MockRelay::new(&[], None, BrokerAnswer::Reject("too many connections"));
    let addr = start(mock).await;
    let err = timeout(TEST_TIMEOUT, tunnel_client::connect(client_config(addr)))
        .await
        .expect("timed out")
        .unwrap_err();
    assert!(
        matches!(&err, ConnectError::Rejected(r) if r == "too many connections"),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_relay_then_success_carries_an_echo_with_half_close() {
    let mock = MockRelay::new(&[503, 503], None, BrokerAnswer::Accept);
    let addr = start(mock.clone()).await;
    let mut tunnel = timeout(TEST_TIMEOUT, tunnel_client::connect(client_config(addr)))
        .await
        .expect("timed out")
        .expect("connect failed");
    assert_eq!(tunnel.conn_id(), CONN_ID);
    assert_eq!(
        mock.connects.load(Ordering::SeqCst),
        3,
        "two 503s, then success"
    );

    let data: Vec<u8> = (0..1_500_000u32).map(|i| (i % 251) as u8).collect();
    let handle = tunnel.handle();
    let echoed = timeout(TEST_TIMEOUT, async {
        let (mut r, mut w) = tokio::io::split(&mut tunnel);
        let write = async {
            w.write_all(&data).await?;
            w.shutdown().await
        };
        let mut got = Vec::new();
        let read = r.read_to_end(&mut got);
        tokio::try_join!(write, read)?;
        Ok::<_, std::io::Error>(got)
    })
    .await
    .expect("echo timed out")
    .expect("echo failed");
    assert!(echoed == data, "echo differs ({} bytes back)", echoed.len());
    drop(tunnel);
    timeout(TEST_TIMEOUT, handle.closed())
        .await
        .expect("connection did not finish after both closes");
    assert_eq!(handle.error(), None);
}

#[tokio::test]
async fn relay_forgetting_the_connection_resets_the_stream() {
    let mock = MockRelay::new(&[], None, BrokerAnswer::Accept);
    let addr = start(mock.clone()).await;
    let mut tunnel = timeout(TEST_TIMEOUT, tunnel_client::connect(client_config(addr)))
        .await
        .expect("timed out")
        .expect("connect failed");
    mock.forget.store(true, Ordering::SeqCst);
    let mut buf = [0u8; 8];
    let err = timeout(TEST_TIMEOUT, tunnel.read(&mut buf))
        .await
        .expect("read did not fail")
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
    assert!(err.to_string().contains("relay no longer knows"), "{err}");
}
