//! Test helpers: an in-process relay with short deadlines, a fake broker speaking the link
//! protocol over a raw `TcpStream`, and reqwest wrappers for connect, push and pull. Every
//! wait is bounded by `WAIT`.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tunnel_proto::payload::{
    decode_token, encode_listen_state, AnnouncedConn, Capacity, InstanceId, LinkExtension,
    LinkFeatures, LinkInit, ListenMode, ListenState,
};
use tunnel_proto::{decode_all, encode_all, Decoder, Packet, PacketType, Token};
use tunnel_servlet::{Relay, RelayConfig, RunningRelay, TOKEN_HEADER};

/// Upper bound of every wait in the tests.
pub const WAIT: Duration = Duration::from_secs(10);
pub const SECRET: &[u8] = b"test-link-secret";
pub const SERVER: &str = "broker-a";

/// A config on ephemeral loopback ports with test-friendly deadlines.
pub fn config() -> RelayConfig {
    RelayConfig {
        http_listen: "127.0.0.1:0".parse().unwrap(),
        link_listen: "127.0.0.1:0".parse().unwrap(),
        link_secret: SECRET.to_vec(),
        pull_wait: Duration::from_secs(5),
        sweep_interval: Duration::from_millis(50),
        link_handshake_timeout: Duration::from_secs(2),
        shutdown_drain: Duration::from_millis(500),
        ..RelayConfig::default()
    }
}

pub async fn start(config: RelayConfig) -> RunningRelay {
    Relay::bind(config).await.expect("relay binds").spawn()
}

/// A broker made of a raw TCP stream and a packet decoder.
pub struct FakeBroker {
    pub stream: TcpStream,
    decoder: Decoder,
}

impl FakeBroker {
    /// Dials and sends a version-1 LINK_INIT; does not wait for the answer.
    pub async fn dial(
        addr: SocketAddr,
        name: &str,
        secret: &[u8],
        conns: Vec<AnnouncedConn>,
    ) -> FakeBroker {
        Self::dial_with(addr, name, secret, conns, None).await
    }

    /// Dials and sends LINK_INIT with `extension` (the pool extension, docs/protocol.md §5);
    /// does not wait for the answer.
    pub async fn dial_with(
        addr: SocketAddr,
        name: &str,
        secret: &[u8],
        conns: Vec<AnnouncedConn>,
        extension: Option<LinkExtension>,
    ) -> FakeBroker {
        let stream = tokio::time::timeout(WAIT, TcpStream::connect(addr))
            .await
            .expect("dial in time")
            .expect("dial");
        let mut broker = FakeBroker {
            stream,
            decoder: Decoder::default(),
        };
        let init = LinkInit {
            extension,
            server_name: name.to_string(),
            secret: Bytes::copy_from_slice(secret),
            connections: conns,
        };
        broker
            .send(&Packet::new(PacketType::LinkInit, 0, init.encode()))
            .await;
        broker
    }

    /// Dials, authenticates (expects LINK_INIT_ACK) and announces LISTEN_STATE 1.
    pub async fn link(addr: SocketAddr, name: &str, conns: Vec<AnnouncedConn>) -> FakeBroker {
        let mut broker = Self::dial(addr, name, SECRET, conns).await;
        let ack = broker.recv().await;
        assert_eq!(
            ack.kind,
            PacketType::LinkInitAck,
            "expected LINK_INIT_ACK, got {ack:?}"
        );
        broker
            .send(&Packet::new(
                PacketType::ListenState,
                0,
                encode_listen_state(true),
            ))
            .await;
        broker
    }

    /// Dials as instance `instance` of a broker in a relay pool: the pool extension with
    /// `features`, accepting, unlimited capacity. Expects LINK_INIT_ACK and returns its
    /// payload (the relay's id and features). No LISTEN_STATE is needed: the extension says
    /// accepting.
    pub async fn link_instance(
        addr: SocketAddr,
        name: &str,
        instance: InstanceId,
        features: Option<LinkFeatures>,
        conns: Vec<AnnouncedConn>,
    ) -> (FakeBroker, Bytes) {
        let extension = LinkExtension {
            instance,
            // Longer than any test: the relay must not find the link silent.
            keepalive_ms: 60_000,
            state: ListenState {
                mode: ListenMode::Accepting,
                capacity: Some(Capacity::default()),
            },
            features,
        };
        let mut broker = Self::dial_with(addr, name, SECRET, conns, Some(extension)).await;
        let ack = broker.recv().await;
        assert_eq!(
            ack.kind,
            PacketType::LinkInitAck,
            "expected LINK_INIT_ACK, got {ack:?}"
        );
        (broker, ack.payload)
    }

    /// [`FakeBroker::link_instance`] of a broker that moves connections between relays
    /// (features MOVES, docs/protocol.md §5.2).
    pub async fn link_mover(
        addr: SocketAddr,
        name: &str,
        instance: InstanceId,
        conns: Vec<AnnouncedConn>,
    ) -> (FakeBroker, Bytes) {
        Self::link_instance(addr, name, instance, Some(LinkFeatures::MOVES), conns).await
    }

    pub async fn send(&mut self, packet: &Packet) {
        self.send_all(std::slice::from_ref(packet)).await;
    }

    pub async fn send_all(&mut self, packets: &[Packet]) {
        let bytes = encode_all(packets);
        tokio::time::timeout(WAIT, self.stream.write_all(&bytes))
            .await
            .expect("write in time")
            .expect("write");
    }

    /// The next packet that is not a link keepalive, or `None` at end of stream / timeout.
    pub async fn try_recv(&mut self, within: Duration) -> Option<Packet> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match self
                .decoder
                .next_packet()
                .expect("relay sends valid packets")
            {
                Some(p) if p.kind == PacketType::NoOp && p.conn_id == 0 => continue,
                Some(p) => return Some(p),
                None => {}
            }
            self.decoder.buffer_mut().reserve(64 * 1024);
            match tokio::time::timeout_at(deadline, self.stream.read_buf(self.decoder.buffer_mut()))
                .await
            {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return None,
                Ok(Ok(_)) => {}
            }
        }
    }

    pub async fn recv(&mut self) -> Packet {
        self.try_recv(WAIT)
            .await
            .expect("a packet from the relay in time")
    }

    /// Whether the relay closed the link (EOF) within `within`, ignoring packets before it.
    pub async fn closed_within(&mut self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        let mut buf = [0u8; 4096];
        loop {
            match tokio::time::timeout_at(deadline, self.stream.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
    }
}

pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(WAIT)
        .no_proxy()
        .build()
        .expect("client")
}

pub fn url(relay: &RunningRelay, query: &str) -> String {
    format!("{}?{query}", relay.tunnel_url())
}

/// Connects to `server`; returns the response status and, on 200, (conn_id, token).
pub async fn try_connect(
    client: &reqwest::Client,
    relay: &RunningRelay,
    server: &str,
    window: u16,
) -> (u16, Option<(u32, Token)>) {
    let body = Packet::new(PacketType::ConnInit, 0, Bytes::new())
        .with_window(window)
        .to_bytes();
    let resp = client
        .post(url(relay, &format!("Type=connect&ServerName={server}")))
        .body(body)
        .send()
        .await
        .expect("connect request");
    let status = resp.status().as_u16();
    if status != 200 {
        return (status, None);
    }
    let packets = decode_all(resp.bytes().await.expect("body"), 1 << 20).expect("packets");
    assert_eq!(packets.len(), 1);
    assert_eq!(packets[0].kind, PacketType::ConnInit);
    let token = decode_token(packets[0].payload.clone()).expect("token payload");
    (status, Some((packets[0].conn_id, token)))
}

pub async fn connect(client: &reqwest::Client, relay: &RunningRelay, server: &str) -> (u32, Token) {
    let (status, ok) = try_connect(client, relay, server, 64).await;
    assert_eq!(status, 200, "connect status");
    ok.expect("conn id and token")
}

/// Pushes raw `body`; returns the status and the response body.
pub async fn push_raw(
    client: &reqwest::Client,
    relay: &RunningRelay,
    id: u32,
    token: &Token,
    body: Bytes,
) -> (u16, Bytes) {
    let resp = client
        .post(url(
            relay,
            &format!("Type=push&ServerName={SERVER}&ConnId={id}"),
        ))
        .header(TOKEN_HEADER, token.to_hex())
        .body(body)
        .send()
        .await
        .expect("push request");
    (resp.status().as_u16(), resp.bytes().await.expect("body"))
}

pub async fn push(
    client: &reqwest::Client,
    relay: &RunningRelay,
    id: u32,
    token: &Token,
    packets: &[Packet],
) -> (u16, Bytes) {
    push_raw(client, relay, id, token, encode_all(packets)).await
}

/// Pulls; returns the status and the decoded packets (empty unless 200).
pub async fn pull(
    client: &reqwest::Client,
    relay: &RunningRelay,
    id: u32,
    token: &Token,
) -> (u16, Vec<Packet>) {
    let resp = client
        .get(url(
            relay,
            &format!("Type=pull&ServerName={SERVER}&ConnId={id}"),
        ))
        .header(TOKEN_HEADER, token.to_hex())
        .send()
        .await
        .expect("pull request");
    let status = resp.status().as_u16();
    let body = resp.bytes().await.expect("body");
    if status != 200 {
        return (status, Vec::new());
    }
    (
        status,
        decode_all(body, 1 << 21).expect("pull body is packets"),
    )
}

pub fn data(id: u32, seq: u32, len: usize) -> Packet {
    Packet::new(PacketType::Data, id, Bytes::from(vec![seq as u8; len])).with_seq(seq)
}

/// Waits until `check` holds, polling every 20 ms, at most `WAIT`.
pub async fn eventually(mut check: impl FnMut() -> bool, what: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
