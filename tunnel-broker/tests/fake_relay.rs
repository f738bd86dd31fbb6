//! The broker against a fake relay written here: a TcpListener that speaks the link protocol
//! (docs/protocol.md §3, §5, §6) with tunnel_proto's codec, and plays the client side of
//! connections with its own `tunnel_proto::Connection`. Every wait has a timeout.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tunnel_broker::{BrokerConfig, ClientInfo, TunnelListener, TunnelStream};
use tunnel_proto::payload::{
    decode_reason, encode_reason, BrokerConnInit, Capacity, ConnOption, InstanceId, LinkFeatures,
    LinkInit, ListenMode, ListenState, MoveAnswer, MoveRequest, RelayHello,
};
use tunnel_proto::{Connection, ConnectionConfig, Decoder, Packet, PacketType, Token};

/// Upper bound of any single wait in these tests.
const WAIT: Duration = Duration::from_secs(10);
const SECRET: &[u8] = b"link-secret";
const NAME: &str = "svc";
const TOKEN: Token = Token([7; 16]);

async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

struct FakeRelay {
    listener: TcpListener,
}

impl FakeRelay {
    async fn start() -> (FakeRelay, String) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        (FakeRelay { listener }, addr)
    }

    /// Accepts the broker's next link and reads its LINK_INIT.
    async fn accept_link(&self) -> (FakeLink, LinkInit) {
        let (stream, _) = within("the broker to dial", self.listener.accept())
            .await
            .unwrap();
        let mut link = FakeLink {
            stream,
            decoder: Decoder::default(),
            seen: Vec::new(),
        };
        let first = link.recv().await.expect("LINK_INIT, not end of stream");
        assert_eq!(first.kind, PacketType::LinkInit);
        assert_eq!(first.conn_id, 0);
        let init = LinkInit::decode(first.payload).expect("well-formed LINK_INIT");
        (link, init)
    }
}

struct FakeLink {
    stream: TcpStream,
    decoder: Decoder,
    /// Every packet received, in order (kind, conn_id).
    seen: Vec<(PacketType, u32)>,
}

impl FakeLink {
    async fn send(&mut self, packet: Packet) {
        within("a link write", self.stream.write_all(&packet.to_bytes()))
            .await
            .unwrap();
    }

    async fn ack(&mut self) {
        self.send(Packet::new(PacketType::LinkInitAck, 0, Bytes::new()))
            .await;
    }

    /// The next packet, `Ok(None)` at end of stream, `Err` if none came within `limit`.
    async fn recv_within(&mut self, limit: Duration) -> Result<Option<Packet>, ()> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(packet) = self.decoder.next_packet().expect("broker sent garbage") {
                self.seen.push((packet.kind, packet.conn_id));
                return Ok(Some(packet));
            }
            self.decoder.buffer_mut().reserve(64 * 1024);
            let read = self.stream.read_buf(self.decoder.buffer_mut());
            match tokio::time::timeout_at(deadline, read).await {
                Err(_) => return Err(()),
                Ok(Ok(0)) => return Ok(None),
                Ok(Ok(_)) => {}
                // A reset is how a link can end too.
                Ok(Err(_)) => return Ok(None),
            }
        }
    }

    async fn recv(&mut self) -> Option<Packet> {
        self.recv_within(WAIT)
            .await
            .expect("timed out waiting for a packet from the broker")
    }

    /// The next packet of `kind`, skipping keepalives, listen states and connection traffic.
    async fn expect(&mut self, kind: PacketType) -> Packet {
        loop {
            let packet = self
                .recv()
                .await
                .unwrap_or_else(|| panic!("link closed while waiting for {kind:?}"));
            if packet.kind == kind {
                return packet;
            }
        }
    }

    /// Sends the CONN_INIT the relay forwards for a new client connection.
    async fn conn_init(&mut self, conn_id: u32, client_window: u16, client_addr: &str) {
        let payload = BrokerConnInit {
            token: TOKEN,
            client_addr: client_addr.into(),
        }
        .encode();
        self.send(Packet::new(PacketType::ConnInit, conn_id, payload).with_window(client_window))
            .await;
    }

    /// Runs the client's connection over this link until `done` holds: sends what it has,
    /// hands it what the broker sends for it, fires its timers.
    async fn pump(
        &mut self,
        conn: &mut Connection,
        mut done: impl FnMut(&mut Connection, &[(PacketType, u32)]) -> bool,
    ) {
        let deadline = Instant::now() + WAIT;
        while !done(conn, &self.seen) {
            assert!(
                Instant::now() < deadline,
                "timed out pumping the client connection"
            );
            while let Some(packet) = conn.poll_transmit(Instant::now()) {
                self.send(packet).await;
            }
            match self.recv_within(Duration::from_millis(20)).await {
                Ok(Some(packet)) if packet.conn_id == conn.conn_id() => {
                    conn.handle_packet(packet, Instant::now())
                }
                Ok(Some(_)) | Err(()) => {}
                Ok(None) => panic!("link closed while pumping"),
            }
            if conn.poll_timeout().is_some_and(|t| t <= Instant::now()) {
                conn.handle_timeout(Instant::now());
            }
        }
    }
}

fn test_config(relay: &str) -> BrokerConfig {
    let mut config = BrokerConfig::new(relay, NAME, Bytes::from_static(SECRET));
    config.handshake_timeout = Duration::from_secs(2);
    config.redial_initial = Duration::from_millis(20);
    config.redial_max = Duration::from_millis(200);
    config
}

/// Binds a listener against `relay`, acknowledging its first link.
async fn bind(relay: &FakeRelay, config: BrokerConfig) -> (TunnelListener, FakeLink) {
    let binding = tokio::spawn(TunnelListener::bind(config));
    let (mut link, _) = relay.accept_link().await;
    link.ack().await;
    let listener = within("bind", binding)
        .await
        .unwrap()
        .expect("bind succeeds");
    (listener, link)
}

/// Opens connection `conn_id` from the fake relay and accepts it on the broker side.
async fn open(
    listener: &TunnelListener,
    link: &mut FakeLink,
    conn_id: u32,
) -> (TunnelStream, ClientInfo, Connection) {
    link.conn_init(conn_id, 32, "198.51.100.7:50000").await;
    let (stream, info) = within("accept", listener.accept()).await.unwrap();
    let ack = link.expect(PacketType::ConnInitAck).await;
    assert_eq!(ack.conn_id, conn_id);
    let client = Connection::new(
        conn_id,
        ack.window,
        ConnectionConfig::default(),
        Instant::now(),
    );
    (stream, info, client)
}

#[tokio::test]
async fn link_init_carries_name_and_secret_then_listen_state() {
    let (relay, addr) = FakeRelay::start().await;
    let binding = tokio::spawn(TunnelListener::bind(test_config(&addr)));
    let (mut link, init) = relay.accept_link().await;
    assert_eq!(init.server_name, NAME);
    assert_eq!(&init.secret[..], SECRET);
    assert!(init.connections.is_empty());
    link.ack().await;
    let listener = within("bind", binding).await.unwrap().unwrap();
    assert_eq!(listener.local_name(), NAME);
    assert!(listener.is_link_up());

    let state = link.recv().await.unwrap();
    assert_eq!(state.kind, PacketType::ListenState);
    assert_eq!(
        ListenState::decode(state.payload).unwrap().mode,
        ListenMode::Accepting
    );

    listener.set_accepting(false);
    let state = link.expect(PacketType::ListenState).await;
    assert_eq!(
        ListenState::decode(state.payload).unwrap().mode,
        ListenMode::NotAccepting
    );
}

/// The pool extension (docs/protocol.md §5): LINK_INIT names the instance, its keepalive and
/// capacity; the same id comes back on a redial; the live count follows connections in
/// coalesced LISTEN_STATE updates; a drain says mode 2 and ends with the link closed.
#[tokio::test]
async fn link_init_names_the_instance_and_capacity_updates_follow_the_load() {
    let (relay, addr) = FakeRelay::start().await;
    let mut config = test_config(&addr);
    config.max_connections = 7;
    config.keepalive_interval = Duration::from_millis(2500);
    let binding = tokio::spawn(TunnelListener::bind(config));
    let (mut link, init) = relay.accept_link().await;
    let ext = init.extension.expect("pool extension");
    assert_ne!(ext.instance, InstanceId::LEGACY);
    assert_eq!(ext.keepalive_ms, 2500);
    assert_eq!(ext.state.mode, ListenMode::Accepting);
    assert_eq!(
        ext.state.capacity,
        Some(Capacity {
            max_connections: 7,
            live_connections: 0
        })
    );
    link.ack().await;
    let listener = within("bind", binding).await.unwrap().unwrap();
    assert_eq!(listener.instance_id(), ext.instance);
    let _ = link.expect(PacketType::ListenState).await;

    // Three connections at once: updates are coalesced, and the last one says 3.
    let mut streams = Vec::new();
    for id in [31, 32, 33] {
        streams.push(open(&listener, &mut link, id).await);
    }
    let started = Instant::now();
    let mut updates = 0;
    loop {
        let state = link.expect(PacketType::ListenState).await;
        updates += 1;
        let state = ListenState::decode(state.payload).unwrap();
        if state.capacity.unwrap().live_connections == 3 {
            break;
        }
    }
    assert!(updates <= 2, "{updates} updates for 3 connections");
    assert!(started.elapsed() < Duration::from_secs(2));

    // A redial keeps the id and announces the live count.
    drop(link);
    let (mut link, init) = relay.accept_link().await;
    let again = init.extension.expect("pool extension");
    assert_eq!(again.instance, ext.instance);
    assert_eq!(again.state.capacity.unwrap().live_connections, 3);
    link.ack().await;
    let _ = link.expect(PacketType::ListenState).await;

    // Drain: mode 2 at once; the connections left are aborted when the time is up.
    let listener = Arc::new(listener);
    let draining = {
        let listener = Arc::clone(&listener);
        tokio::spawn(async move { listener.drain(Duration::from_millis(300)).await })
    };
    let state = link.expect(PacketType::ListenState).await;
    assert_eq!(
        ListenState::decode(state.payload).unwrap().mode,
        ListenMode::Draining
    );
    assert!(
        !within("drain", draining).await.unwrap(),
        "connections were left"
    );
    assert!(!listener.is_link_up());
    drop(streams);
}

#[tokio::test]
async fn rejected_link_fails_bind_with_permission_denied_and_the_reason() {
    let (relay, addr) = FakeRelay::start().await;
    let binding = tokio::spawn(TunnelListener::bind(test_config(&addr)));
    let (mut link, _) = relay.accept_link().await;
    link.send(Packet::new(
        PacketType::ConnRejected,
        0,
        encode_reason("bad link secret"),
    ))
    .await;
    let err = within("bind", binding).await.unwrap().unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
    assert!(err.to_string().contains("bad link secret"), "{err}");
}

#[tokio::test]
async fn unreachable_relay_fails_bind_after_the_handshake_timeout() {
    // A port that was just free: nothing listens there.
    let addr = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap().to_string()
    };
    let mut config = test_config(&addr);
    config.handshake_timeout = Duration::from_millis(500);
    let started = Instant::now();
    let err = within("bind", TunnelListener::bind(config))
        .await
        .unwrap_err();
    assert!(
        started.elapsed() >= Duration::from_millis(200),
        "gave up too early"
    );
    assert!(err.to_string().contains(&addr), "{err}");
    // The message tells the time actually spent, not only the limit it stayed under.
    let spent: f64 = err
        .to_string()
        .split("failed in ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|secs| secs.parse().ok())
        .unwrap_or_else(|| panic!("no time spent in {err}"));
    assert!(spent <= started.elapsed().as_secs_f64() + 0.05, "{err}");
}

#[tokio::test]
async fn silent_relay_fails_bind_with_a_timeout() {
    let (relay, addr) = FakeRelay::start().await;
    let mut config = test_config(&addr);
    config.handshake_timeout = Duration::from_millis(300);
    let binding = tokio::spawn(TunnelListener::bind(config));
    // Accept links and never answer; hold them open until bind has given up.
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok(accepted) = relay.listener.accept().await {
            held.push(accepted);
        }
    });
    let err = within("bind", binding).await.unwrap().unwrap_err();
    holder.abort();
    assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
}

#[tokio::test]
async fn conn_init_is_accepted_with_the_client_address_and_acknowledged() {
    let (relay, addr) = FakeRelay::start().await;
    let (listener, mut link) = bind(&relay, test_config(&addr)).await;
    link.conn_init(0x0102_0304, 32, "203.0.113.9:4242").await;
    let (stream, info) = within("accept", listener.accept()).await.unwrap();
    assert_eq!(info.conn_id, 0x0102_0304);
    assert_eq!(info.client_addr, "203.0.113.9:4242");
    assert_eq!(stream.conn_id(), 0x0102_0304);
    let ack = link.expect(PacketType::ConnInitAck).await;
    assert_eq!(ack.conn_id, 0x0102_0304);
    assert_eq!(ack.window, ConnectionConfig::default().recv_window);
    assert_eq!(listener.live_connections(), 1);
}

#[tokio::test]
async fn data_flows_both_ways_with_half_close_and_ends_in_conn_shutdown() {
    let (relay, addr) = FakeRelay::start().await;
    let (listener, mut link) = bind(&relay, test_config(&addr)).await;
    let (mut stream, _, mut client) = open(&listener, &mut link, 11).await;

    // The server reads the whole request, answers, and closes its side.
    let server = tokio::spawn(async move {
        let mut request = Vec::new();
        stream.read_to_end(&mut request).await?;
        stream.write_all(b"answer to ").await?;
        stream.write_all(&request).await?;
        stream.shutdown().await?;
        io::Result::Ok(request)
    });

    let request: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let mut written = 0;
    let mut received = Vec::new();
    let mut closed = false;
    link.pump(&mut client, |c, _| {
        if written < request.len() {
            written += c.write(&request[written..]).unwrap();
        } else if !closed {
            c.close().unwrap();
            closed = true;
        }
        let mut buf = [0u8; 65536];
        while let Some(n) = c.read(&mut buf).unwrap() {
            if n == 0 {
                return true;
            }
            received.extend_from_slice(&buf[..n]);
        }
        false
    })
    .await;
    let got = within("the server task", server).await.unwrap().unwrap();
    assert_eq!(got, request);
    assert_eq!(&received[..10], b"answer to ");
    assert_eq!(&received[10..], &request[..]);

    // Both closes acknowledged: the broker's driver ends and it sends CONN_SHUTDOWN.
    link.pump(&mut client, |_, seen| {
        seen.contains(&(PacketType::ConnShutdown, 11))
    })
    .await;
    within("the table to empty", async {
        while listener.live_connections() != 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn lost_link_is_redialed_and_live_connections_are_reannounced() {
    let (relay, addr) = FakeRelay::start().await;
    let (listener, mut link) = bind(&relay, test_config(&addr)).await;
    let (mut stream, _, mut client) = open(&listener, &mut link, 21).await;
    // The client asks for a pull period; the broker must remember it for re-announcement.
    client.send_option(ConnOption::PullPeriodMs(250)).unwrap();
    let handle = stream.handle();
    link.pump(&mut client, |_, _| {
        handle.peer_options().pull_period_ms == Some(250)
    })
    .await;

    drop(link);
    let (mut link, init) = relay.accept_link().await;
    assert_eq!(init.server_name, NAME);
    assert_eq!(init.connections.len(), 1, "{init:?}");
    let announced = &init.connections[0];
    assert_eq!(announced.conn_id, 21);
    assert!(announced.token.ct_eq(&TOKEN));
    assert_eq!(announced.pull_period_ms, 250);
    assert_eq!(announced.client_window, 32);
    link.ack().await;
    let state = link.expect(PacketType::ListenState).await;
    assert_eq!(
        ListenState::decode(state.payload).unwrap().mode,
        ListenMode::Accepting
    );

    // The connection survived: data still flows over the new link.
    let server = tokio::spawn(async move {
        let mut buf = [0u8; 5];
        stream.read_exact(&mut buf).await?;
        stream.write_all(&buf).await?;
        io::Result::Ok(stream)
    });
    let mut written = false;
    let mut echoed = Vec::new();
    link.pump(&mut client, |c, _| {
        if !written {
            assert_eq!(c.write(b"again").unwrap(), 5);
            written = true;
        }
        let mut buf = [0u8; 16];
        if let Some(n) = c.read(&mut buf).unwrap() {
            echoed.extend_from_slice(&buf[..n]);
        }
        echoed.len() >= 5
    })
    .await;
    assert_eq!(echoed, b"again");
    within("the server task", server).await.unwrap().unwrap();
}

#[tokio::test]
async fn packet_for_an_unknown_connection_is_answered_with_conn_abort() {
    let (relay, addr) = FakeRelay::start().await;
    let (_listener, mut link) = bind(&relay, test_config(&addr)).await;
    link.send(
        Packet::new(PacketType::Data, 99, Bytes::from_static(b"stray"))
            .with_seq(0)
            .with_window(8),
    )
    .await;
    let abort = link.expect(PacketType::ConnAbort).await;
    assert_eq!(abort.conn_id, 99);
    assert_eq!(decode_reason(&abort.payload), "unknown connection");

    // Acks are connection traffic too; an abort is never answered (no ping-pong).
    link.send(Packet::new(PacketType::Ack, 98, Bytes::new()).with_seq(u32::MAX))
        .await;
    link.send(Packet::new(
        PacketType::ConnAbort,
        97,
        encode_reason("gone"),
    ))
    .await;
    let abort = link.expect(PacketType::ConnAbort).await;
    assert_eq!(abort.conn_id, 98);
    assert!(matches!(
        link.recv_within(Duration::from_millis(300)).await,
        Err(())
            | Ok(Some(Packet {
                kind: PacketType::NoOp,
                ..
            }))
    ));
}

#[tokio::test]
async fn abort_from_the_relay_fails_the_accepted_stream() {
    let (relay, addr) = FakeRelay::start().await;
    let (listener, mut link) = bind(&relay, test_config(&addr)).await;
    let (mut stream, _, _client) = open(&listener, &mut link, 31).await;
    link.send(Packet::new(
        PacketType::ConnAbort,
        31,
        encode_reason("client went away"),
    ))
    .await;
    let mut buf = [0u8; 8];
    let err = within("the read to fail", stream.read(&mut buf))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    assert!(err.to_string().contains("client went away"), "{err}");
}

#[tokio::test]
async fn full_backlog_and_paused_listener_reject_new_connections() {
    let (relay, addr) = FakeRelay::start().await;
    let mut config = test_config(&addr);
    config.accept_backlog = 1;
    let (listener, mut link) = bind(&relay, config).await;

    link.conn_init(41, 32, "a").await;
    assert_eq!(link.expect(PacketType::ConnInitAck).await.conn_id, 41);
    link.conn_init(42, 32, "b").await;
    let rejected = link.expect(PacketType::ConnRejected).await;
    assert_eq!(rejected.conn_id, 42);
    assert_eq!(decode_reason(&rejected.payload), "backlog full");

    let (_first, info) = within("accept", listener.accept()).await.unwrap();
    assert_eq!(info.conn_id, 41);

    listener.set_accepting(false);
    link.conn_init(43, 32, "c").await;
    let rejected = link.expect(PacketType::ConnRejected).await;
    assert_eq!(rejected.conn_id, 43);
    assert_eq!(decode_reason(&rejected.payload), "not accepting");
}

#[tokio::test]
async fn shutdown_aborts_live_connections_and_closes_the_link() {
    let (relay, addr) = FakeRelay::start().await;
    let (listener, mut link) = bind(&relay, test_config(&addr)).await;
    let (mut stream, _, _client) = open(&listener, &mut link, 51).await;

    within("shutdown", listener.shutdown()).await;
    let abort = link.expect(PacketType::ConnAbort).await;
    assert_eq!(abort.conn_id, 51);
    assert_eq!(
        decode_reason(&abort.payload),
        tunnel_broker::SHUTDOWN_REASON
    );
    // Then the link closes, and nothing is redialed.
    while let Some(p) = link.recv().await {
        assert!(
            matches!(
                p.kind,
                PacketType::ListenState | PacketType::NoOp | PacketType::ConnShutdown
            ),
            "{p:?}"
        );
    }
    let mut buf = [0u8; 8];
    let err = within("the read to fail", stream.read(&mut buf))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    assert!(within("accept", listener.accept()).await.is_err());
    assert!(
        tokio::time::timeout(Duration::from_millis(500), relay.listener.accept())
            .await
            .is_err(),
        "broker redialed after shutdown"
    );
}

#[tokio::test]
async fn idle_link_sends_keepalives_and_a_silent_link_is_redialed() {
    let (relay, addr) = FakeRelay::start().await;
    let mut config = test_config(&addr);
    config.keepalive_interval = Duration::from_millis(100);
    let (_listener, mut link) = bind(&relay, config).await;
    // Nothing to send: NO_OPs come at about the keepalive interval.
    link.expect(PacketType::NoOp).await;
    link.expect(PacketType::NoOp).await;
    // We never answer, so after three intervals of silence the broker gives up on this link
    // and dials again.
    let started = Instant::now();
    let (_next, init) = relay.accept_link().await;
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(init.server_name, NAME);
}

#[tokio::test]
async fn undecodable_bytes_drop_the_link_and_the_broker_redials() {
    let (relay, addr) = FakeRelay::start().await;
    let (_listener, mut link) = bind(&relay, test_config(&addr)).await;
    within("garbage write", link.stream.write_all(&[0xff; 64]))
        .await
        .unwrap();
    let (_next, _) = relay.accept_link().await;
}

#[tokio::test]
async fn refused_link_on_redial_is_retried() {
    let (relay, addr) = FakeRelay::start().await;
    let (_listener, link) = bind(&relay, test_config(&addr)).await;
    drop(link);
    let (mut refused, _) = relay.accept_link().await;
    refused
        .send(Packet::new(
            PacketType::ConnRejected,
            0,
            encode_reason("try later"),
        ))
        .await;
    drop(refused);
    let (mut link, _) = relay.accept_link().await;
    link.ack().await;
    link.expect(PacketType::ListenState).await;
}

/// Starts the `tunnel-broker` binary against `relay`, forwarding to `forward`.
fn spawn_binary(relay: &str, forward: &str) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_tunnel-broker"))
        .args(["--relay", relay, "--name", NAME, "--forward", forward])
        .env("TUNNEL_LINK_SECRET", "link-secret")
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .expect("binary starts")
}

#[tokio::test]
async fn binary_forwards_to_tcp_and_aborts_when_the_target_refuses() {
    // The forward target: answers "pong:" + what it read, then closes.
    let target = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target_addr = target.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = target.accept().await {
            tokio::spawn(async move {
                let mut request = Vec::new();
                tcp.read_to_end(&mut request).await?;
                tcp.write_all(b"pong:").await?;
                tcp.write_all(&request).await?;
                tcp.shutdown().await
            });
        }
    });

    let (relay, addr) = FakeRelay::start().await;
    let _broker = spawn_binary(&addr, &target_addr);
    let (mut link, init) = relay.accept_link().await;
    assert_eq!(&init.secret[..], SECRET);
    link.ack().await;

    link.conn_init(61, 32, "192.0.2.1:1").await;
    let ack = link.expect(PacketType::ConnInitAck).await;
    let mut client = Connection::new(61, ack.window, ConnectionConfig::default(), Instant::now());
    let mut sent = false;
    let mut received = Vec::new();
    link.pump(&mut client, |c, _| {
        if !sent {
            assert_eq!(c.write(b"ping").unwrap(), 4);
            c.close().unwrap();
            sent = true;
        }
        let mut buf = [0u8; 256];
        while let Some(n) = c.read(&mut buf).unwrap() {
            if n == 0 {
                return true;
            }
            received.extend_from_slice(&buf[..n]);
        }
        false
    })
    .await;
    assert_eq!(received, b"pong:ping");

    // A target that refuses: the tunnel connection is aborted with a reason.
    drop(link);
    drop(_broker);
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap().to_string()
    };
    let _broker = spawn_binary(&addr, &closed);
    let (mut link, _) = relay.accept_link().await;
    link.ack().await;
    link.conn_init(62, 32, "192.0.2.1:2").await;
    link.expect(PacketType::ConnInitAck).await;
    let abort = link.expect(PacketType::ConnAbort).await;
    assert_eq!(abort.conn_id, 62);
    assert!(
        decode_reason(&abort.payload).contains("refused"),
        "{abort:?}"
    );
}

// ---- several relays (docs/protocol.md §5.2) ----

/// Answers a LINK_INIT as a relay of a pool: relay id and the moves feature.
async fn ack_as_pool_relay(link: &mut FakeLink, relay_id: u8) {
    let hello = RelayHello {
        relay_id,
        features: LinkFeatures::MOVES,
    };
    link.send(Packet::new(PacketType::LinkInitAck, 0, hello.encode()))
        .await;
}

async fn wait_links_up(listener: &TunnelListener, count: usize) {
    within("the links to come up", async {
        while listener.links_up() < count {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

fn move_request(conn_id: u32, token: Token) -> Packet {
    Packet::new(
        PacketType::ConnMove,
        conn_id,
        MoveRequest { token }.encode(),
    )
}

/// The next DATA packet of `conn_id`, skipping everything else.
async fn next_data(link: &mut FakeLink, conn_id: u32) -> Packet {
    loop {
        let packet = link.expect(PacketType::Data).await;
        if packet.conn_id == conn_id {
            return packet;
        }
    }
}

#[tokio::test]
async fn links_to_every_relay_and_moves_a_connection_when_asked() {
    let (relay_a, addr_a) = FakeRelay::start().await;
    let (relay_b, addr_b) = FakeRelay::start().await;
    let mut config = test_config(&addr_a);
    config.relays = vec![addr_a.clone(), addr_b.clone()];
    let binding = tokio::spawn(TunnelListener::bind(config));
    let (mut link_a, init_a) = relay_a.accept_link().await;
    let (mut link_b, init_b) = relay_b.accept_link().await;
    for init in [&init_a, &init_b] {
        let extension = init.extension.expect("pool extension");
        assert_eq!(extension.features, Some(LinkFeatures::MOVES));
    }
    assert_eq!(
        init_a.extension.unwrap().instance,
        init_b.extension.unwrap().instance,
        "one instance, linked to every relay"
    );
    ack_as_pool_relay(&mut link_a, 1).await;
    ack_as_pool_relay(&mut link_b, 2).await;
    let listener = within("bind", binding).await.unwrap().unwrap();
    wait_links_up(&listener, 2).await;

    // A connection made by relay 1 (its id in the top byte), on link A.
    let conn_id = 0x0100_0042;
    let (mut stream, _, _) = open(&listener, &mut link_a, conn_id).await;
    stream.write_all(b"before").await.unwrap();
    let first = next_data(&mut link_a, conn_id).await;
    assert_eq!(&first.payload[..], b"before");

    // Another relay asks with the wrong token: unknown, nothing moves.
    link_b.send(move_request(conn_id, Token([9; 16]))).await;
    let answer = link_b.expect(PacketType::ConnMove).await;
    assert_eq!(
        MoveAnswer::decode(answer.payload).unwrap(),
        MoveAnswer::Unknown
    );

    // Relay 2 asks with the right token (its client re-attached there): moved, with the
    // broker's window in the header, then the unacknowledged data again, on link B.
    link_b.send(move_request(conn_id, TOKEN)).await;
    let answer = link_b.expect(PacketType::ConnMove).await;
    assert_eq!(answer.conn_id, conn_id);
    assert_eq!(answer.window, ConnectionConfig::default().recv_window);
    assert_eq!(
        MoveAnswer::decode(answer.payload).unwrap(),
        MoveAnswer::Moved {
            token: TOKEN,
            pull_period_ms: 0,
            client_window: 32
        }
    );
    let resent = next_data(&mut link_b, conn_id).await;
    assert_eq!(
        (resent.seq, &resent.payload[..]),
        (first.seq, &b"before"[..])
    );
    // Relay 1 is told the connection left.
    let left = link_a.expect(PacketType::ConnMove).await;
    assert_eq!(left.conn_id, conn_id);
    assert_eq!(MoveAnswer::decode(left.payload).unwrap(), MoveAnswer::Left);

    // A stale abort from the relay it left does not touch it; new data goes to link B only.
    link_a
        .send(Packet::new(
            PacketType::ConnAbort,
            conn_id,
            encode_reason("session expired"),
        ))
        .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    stream.write_all(b"after").await.unwrap();
    let next = next_data(&mut link_b, conn_id).await;
    assert_eq!(&next.payload[..], b"after");
    // Read whatever link A got meanwhile.
    while let Ok(Some(_)) = link_a.recv_within(Duration::from_millis(200)).await {}
    let data_on_a = link_a
        .seen
        .iter()
        .filter(|&&(kind, id)| kind == PacketType::Data && id == conn_id)
        .count();
    assert_eq!(data_on_a, 1, "data went to the relay the connection left");

    // Relay 1's link drops and comes back: its LINK_INIT no longer lists the connection,
    // which lives on relay 2 now.
    drop(link_a);
    let (mut link_a, init_a) = relay_a.accept_link().await;
    assert!(init_a.connections.is_empty(), "{:?}", init_a.connections);
    ack_as_pool_relay(&mut link_a, 1).await;
    // Relay 2's link drops: its LINK_INIT lists it.
    drop(link_b);
    let (_link_b, init_b) = relay_b.accept_link().await;
    let listed: Vec<u32> = init_b.connections.iter().map(|c| c.conn_id).collect();
    assert_eq!(listed, vec![conn_id]);
}

#[tokio::test]
async fn bind_succeeds_while_one_relay_of_the_pool_is_down_and_links_it_when_it_comes() {
    // A port that was just free: nothing listens there yet.
    let down = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr_down = down.local_addr().unwrap().to_string();
    drop(down);
    let (relay_b, addr_b) = FakeRelay::start().await;
    let mut config = test_config(&addr_b);
    config.relays = vec![addr_down.clone(), addr_b];
    let binding = tokio::spawn(TunnelListener::bind(config));
    let (mut link_b, _) = relay_b.accept_link().await;
    ack_as_pool_relay(&mut link_b, 2).await;
    let listener = within("bind", binding).await.unwrap().unwrap();
    assert_eq!(listener.links_up(), 1);
    assert_eq!(listener.relays().len(), 2);

    // The relay comes up on its address: the broker links to it within its redial back-off.
    let relay_a = FakeRelay {
        listener: TcpListener::bind(&addr_down).await.unwrap(),
    };
    let (mut link_a, _) = relay_a.accept_link().await;
    ack_as_pool_relay(&mut link_a, 1).await;
    wait_links_up(&listener, 2).await;
    // Listen state and capacity go to every relay.
    listener.set_accepting(false);
    for link in [&mut link_a, &mut link_b] {
        // Each link starts with the state at link time; the change follows.
        loop {
            let state = link.expect(PacketType::ListenState).await;
            if ListenState::decode(state.payload).unwrap().mode == ListenMode::NotAccepting {
                break;
            }
        }
    }
}

#[tokio::test]
async fn every_relay_refusing_fails_bind_with_each_reason() {
    let (relay_a, addr_a) = FakeRelay::start().await;
    let (relay_b, addr_b) = FakeRelay::start().await;
    let mut config = test_config(&addr_a);
    config.relays = vec![addr_a.clone(), addr_b.clone()];
    let binding = tokio::spawn(TunnelListener::bind(config));
    for (relay, reason) in [(&relay_a, "bad link secret"), (&relay_b, "name taken")] {
        let (mut link, _) = relay.accept_link().await;
        link.send(Packet::new(
            PacketType::ConnRejected,
            0,
            encode_reason(reason),
        ))
        .await;
    }
    let err = within("bind", binding).await.unwrap().unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::PermissionDenied, "{err}");
    let text = err.to_string();
    assert!(
        text.contains(&addr_a) && text.contains("bad link secret"),
        "{text}"
    );
    assert!(
        text.contains(&addr_b) && text.contains("name taken"),
        "{text}"
    );
}
