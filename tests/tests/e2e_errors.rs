//! Failures through the real relay binary: an unknown server name, a broker that refuses
//! (backlog full, not accepting, a forward target that refuses), and a wrong connection
//! token sent straight to the relay.
//!
//! Needs the binaries: `cargo build --workspace --bins && cargo test -p tunnel-tests --test e2e_errors`.

use std::io;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tunnel_broker::{BrokerConfig, TunnelListener};
use tunnel_client::{ClientConfig, ConnectError, TunnelStream};
use tunnel_proto::{Packet, PacketType};
use tunnel_tests::net::direct_http_client;
use tunnel_tests::{
    bin_path, free_addr, init_tracing, wait_for_tcp, Chain, ChainOptions, ChildProcess, ReadyProbe,
    SeededBytes, Target,
};

/// Deadline of a connect or exchange that should work.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// How soon a refused connection must be ended for the local socket.
const END_DEADLINE: Duration = Duration::from_secs(10);

fn library_config(chain: &Chain, server: &str) -> ClientConfig {
    let mut config = ClientConfig::new(chain.relay_url(), server);
    config.env_proxy = false;
    config.connect_timeout = Duration::from_secs(10);
    config
}

async fn connect_lib(chain: &Chain, server: &str) -> Result<TunnelStream, ConnectError> {
    tokio::time::timeout(
        STEP_TIMEOUT,
        tunnel_client::connect(library_config(chain, server)),
    )
    .await
    .expect("TunnelStream::connect did not return within its deadline")
}

/// Reads from `s` until it ends; returns how it ended, or panics after `END_DEADLINE`.
async fn read_until_end<S: tokio::io::AsyncRead + Unpin>(s: &mut S, what: &str) -> String {
    let mut buf = vec![0u8; 4096];
    let mut total = 0usize;
    let end = tokio::time::timeout(END_DEADLINE, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) => return "EOF".to_string(),
                Ok(n) => total += n,
                Err(e) => return format!("{:?}: {e}", e.kind()),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what}: the connection did not end within {END_DEADLINE:?}"));
    assert_eq!(total, 0, "{what}: bytes arrived on a refused connection");
    end
}

async fn echo_round_trip(stream: &mut TunnelStream, seed: u64) {
    let data = SeededBytes::new(seed).take_vec(200_000);
    let round_trip = async {
        stream.write_all(&data).await?;
        stream.shutdown().await?;
        let mut back = Vec::new();
        stream.read_to_end(&mut back).await?;
        Ok::<_, io::Error>(back)
    };
    let back = tokio::time::timeout(STEP_TIMEOUT, round_trip)
        .await
        .expect("echo round trip timed out")
        .expect("echo round trip");
    assert!(back == data, "echo differs ({} bytes back)", back.len());
}

/// The client binary pointed at a name no broker registered: the local connection ends, and
/// the client's log says why. The library returns `ConnectError::NoSuchServer`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_server_name() {
    init_tracing();
    // Without a name grace the relay answers 404 for an unknown name at once (with one, it
    // answers 503 for the grace after it starts, docs/protocol.md §2).
    let mut options = ChainOptions::echo();
    options.relay_args = vec!["--name-grace-ms".into(), "0".into()];
    let mut chain = Chain::start(options).await;

    match connect_lib(&chain, "no-such-server").await {
        Err(ConnectError::NoSuchServer { server }) => assert_eq!(server, "no-such-server"),
        Err(other) => panic!("expected NoSuchServer, got {other}"),
        Ok(_) => panic!("connect to an unregistered name succeeded"),
    }

    let listen = free_addr();
    let mut client = ChildProcess::spawn(
        "client-unknown",
        &bin_path("tunnel-client"),
        [
            "--relay".to_string(),
            chain.relay_url(),
            "--server".into(),
            "no-such-server".into(),
            "--listen".into(),
            listen.to_string(),
            "--connect-timeout".into(),
            "10".into(),
        ],
        &[("RUST_LOG".to_string(), "info".to_string())],
        chain.dir(),
    )
    .unwrap();
    wait_for_tcp(listen, STEP_TIMEOUT).await.unwrap();
    let mut s = tokio::net::TcpStream::connect(listen).await.unwrap();
    // Writing may already fail if the client closed first; only the end matters.
    let _ = s.write_all(b"hello?").await;
    let started = Instant::now();
    let end = read_until_end(&mut s, "unknown server via the client binary").await;
    eprintln!(
        "unknown server: local connection ended after {:?}: {end}",
        started.elapsed()
    );
    let deadline = Instant::now() + END_DEADLINE;
    loop {
        let log = client.log_contents();
        if log.contains("knows no server named") && log.contains("no-such-server") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the client logged no clear error about the unknown server; log:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        client.try_exit_status().unwrap().is_none(),
        "the client exited"
    );
    chain.assert_alive();
}

/// Reads the chain's link secret as the binaries do (trailing newline ignored).
fn chain_secret(chain: &Chain) -> Bytes {
    chain.link_secret()
}

/// An in-process broker on the real relay that never accepts: its backlog (1) fills, and
/// the next client gets `Rejected("backlog full")`; then it stops accepting, and clients get
/// `NoSuchServer` (the relay answers 404 for a broker that does not listen).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_that_refuses() {
    init_tracing();
    let mut chain = Chain::start(ChainOptions::echo()).await;
    let mut config = BrokerConfig::new(
        chain.relay_link_addr().to_string(),
        "refuser",
        chain_secret(&chain),
    );
    config.accept_backlog = 1;
    let listener = tokio::time::timeout(STEP_TIMEOUT, TunnelListener::bind(config))
        .await
        .expect("broker bind timed out")
        .expect("broker bind");

    // The first connection waits in the backlog; retry while the relay has not seen the
    // link's LISTEN_STATE yet.
    let deadline = Instant::now() + STEP_TIMEOUT;
    let _queued = loop {
        match connect_lib(&chain, "refuser").await {
            Ok(stream) => break stream,
            Err(ConnectError::NoSuchServer { .. }) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("first connection to the refusing broker: {e}"),
        }
    };
    match connect_lib(&chain, "refuser").await {
        Err(ConnectError::Rejected(reason)) => {
            assert!(reason.contains("backlog full"), "reason: {reason}")
        }
        Err(other) => panic!("expected Rejected(backlog full), got {other}"),
        Ok(_) => panic!("a connection beyond the backlog was accepted"),
    }

    listener.set_accepting(false);
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        match connect_lib(&chain, "refuser").await {
            Err(ConnectError::NoSuchServer { .. }) => break,
            // Until LISTEN_STATE 0 reaches the relay the broker itself rejects.
            Err(ConnectError::Rejected(reason)) if Instant::now() < deadline => {
                assert!(
                    reason.contains("not accepting") || reason.contains("backlog full"),
                    "reason: {reason}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(other) => panic!("expected NoSuchServer after set_accepting(false), got {other}"),
            Ok(_) => panic!("a broker that stopped accepting accepted"),
        }
    }
    listener.shutdown().await;
    chain.assert_alive();
}

/// A broker whose `--forward` target refuses: through the client binary the local
/// connection ends promptly; through the library, reads fail with a reset whose message
/// carries the broker's reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_target_refuses() {
    init_tracing();
    // A port nothing listens on (bound, then released).
    let refused = free_addr();
    let mut options = ChainOptions::echo();
    options.target = Target::Forward(refused);
    options.probe = ReadyProbe::PortsOnly;
    let mut chain = Chain::start(options).await;

    // Through the library: wait for the link, then the abort arrives with a reason.
    let deadline = Instant::now() + STEP_TIMEOUT;
    let mut stream = loop {
        match connect_lib(&chain, "e2e").await {
            Ok(stream) => break stream,
            Err(ConnectError::NoSuchServer { .. }) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("connect to the broker: {e}"),
        }
    };
    let mut buf = [0u8; 16];
    let err = tokio::time::timeout(END_DEADLINE, stream.read(&mut buf))
        .await
        .expect("the refused connection was not ended in time")
        .expect_err("reading a connection whose target refused returned data or EOF");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
    assert!(
        err.to_string().contains("forward target refused"),
        "the reset does not carry the broker's reason: {err}"
    );

    // Through the client binary: the local socket ends (reset or EOF), nothing arrives. The
    // reset can be so quick that it is already there when our connect completes.
    match chain.connect().await {
        Ok(mut s) => {
            let _ = s.write_all(b"anyone?").await;
            let end = read_until_end(&mut s, "refused target via the client binary").await;
            eprintln!("refused target: local connection ended: {end}");
        }
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
            eprintln!("refused target: local connection reset at once");
        }
        Err(e) => panic!("connect to the client binary: {e}"),
    }
    // The broker logs the reason once the client binary's connection reached it.
    let deadline = Instant::now() + STEP_TIMEOUT;
    let logged_twice = |chain: &Chain| {
        let log = chain.broker.as_ref().unwrap().log_contents();
        log.matches("forward target refused").count() >= 2
    };
    while !logged_twice(&chain) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let broker_log = chain.broker.as_ref().unwrap().log_contents();
    assert!(
        broker_log.contains("forward target refused"),
        "broker log lacks the reason:\n{broker_log}"
    );
    chain.assert_alive();
}

fn hex16(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A wrong `Tunnel-Token` gets 404 for push and pull, exactly like an unknown connection,
/// and what it pushed never reaches the real connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_token_gets_404_and_the_real_connection_is_unaffected() {
    init_tracing();
    let mut chain = Chain::start(ChainOptions::echo()).await;
    let http = direct_http_client();
    let base = chain.relay_url();
    let url = |kind: &str, conn: u32| format!("{base}?Type={kind}&ServerName=e2e&ConnId={conn}");
    let wrong_token = hex16(&[0x5A; 16]);

    // A connection opened by hand: the right token pulls 200, a wrong one 404.
    let init = Packet::new(PacketType::ConnInit, 0, Bytes::new()).with_window(16);
    let resp = http
        .post(format!("{base}?Type=connect&ServerName=e2e"))
        .body(init.to_bytes())
        .send()
        .await
        .expect("connect request");
    assert_eq!(resp.status(), 200, "connect");
    let body = resp.bytes().await.unwrap();
    let answer = tunnel_proto::decode_all(body, 1 << 21).expect("connect answer decodes");
    let first = answer.first().expect("connect answer is empty");
    assert_eq!(first.kind, PacketType::ConnInit);
    let (conn_id, token) = (first.conn_id, hex16(&first.payload));
    assert_ne!(conn_id, 0);
    assert_eq!(first.payload.len(), 16, "token length");

    for (kind, method_post) in [("pull", false), ("push", true)] {
        let request = if method_post {
            http.post(url(kind, conn_id)).body(
                Packet::new(PacketType::Data, conn_id, Bytes::from_static(b"EVIL"))
                    .with_seq(0)
                    .to_bytes(),
            )
        } else {
            http.get(url(kind, conn_id))
        };
        let resp = request
            .header("Tunnel-Token", &wrong_token)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 404, "{kind} with a wrong token");
    }
    let resp = http
        .get(url("pull", conn_id))
        .header("Tunnel-Token", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "pull with the right token");
    let packets = tunnel_proto::decode_all(resp.bytes().await.unwrap(), 1 << 21).unwrap();
    assert!(
        packets.iter().any(|p| p.kind == PacketType::ConnInitAck),
        "the right token's pull did not get the broker's CONN_INIT_ACK: {:?}",
        packets.iter().map(|p| p.kind).collect::<Vec<_>>()
    );

    // A real connection: a forged DATA at seq 0 with a wrong token must not reach the echo.
    let mut stream = connect_lib(&chain, "e2e").await.expect("library connect");
    let id = stream.conn_id();
    let forged = Packet::new(PacketType::Data, id, Bytes::from_static(b"EVIL"))
        .with_seq(0)
        .to_bytes();
    let resp = http
        .post(url("push", id))
        .header("Tunnel-Token", &wrong_token)
        .body(forged)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404, "forged push");
    let resp = http
        .get(url("pull", id))
        .header("Tunnel-Token", &wrong_token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404, "forged pull");
    echo_round_trip(&mut stream, 31).await;
    chain.assert_alive();
}
