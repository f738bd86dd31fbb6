//! The broker link (docs/protocol.md §5–§6): authentication, replacement, re-announcement after
//! a relay restart, the grace period, shutdown and liveness.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use tunnel_proto::payload::{decode_reason, AnnouncedConn};
use tunnel_proto::{Packet, PacketType, Token};
use tunnel_servlet::{RelayConfig, RunningRelay};

/// Opens a connection, retrying while the broker's LISTEN_STATE is in flight.
async fn open(
    relay: &RunningRelay,
    broker: &mut FakeBroker,
    client: &reqwest::Client,
) -> (u32, Token) {
    for _ in 0..100 {
        if let (_, Some((id, token))) = try_connect(client, relay, SERVER, 64).await {
            let init = broker.recv().await;
            assert_eq!((init.kind, init.conn_id), (PacketType::ConnInit, id));
            return (id, token);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("broker never became listening");
}

#[tokio::test]
async fn link_with_the_right_secret_is_acknowledged() {
    let relay = start(config()).await;
    let _broker = FakeBroker::link(relay.link_addr(), SERVER, vec![]).await;
    let relay_ref = &relay;
    eventually(|| relay_ref.metrics().links_up == 1, "link up").await;
    assert_eq!(relay.metrics().links_accepted, 1);
    relay.shutdown().await;
}

#[tokio::test]
async fn link_with_a_wrong_secret_is_rejected_and_closed() {
    let relay = start(config()).await;
    for secret in [&b"wrong-secret-same-len"[..], b"x", b""] {
        let mut broker = FakeBroker::dial(relay.link_addr(), SERVER, secret, vec![]).await;
        let answer = broker.recv().await;
        assert_eq!(answer.kind, PacketType::ConnRejected);
        assert!(!decode_reason(&answer.payload).contains("secret"));
        assert!(broker.closed_within(WAIT).await, "closed after rejection");
    }
    let m = relay.metrics();
    assert_eq!((m.link_auth_failures, m.links_up), (3, 0));
    relay.shutdown().await;
}

#[tokio::test]
async fn link_that_never_sends_link_init_is_closed() {
    let mut cfg = config();
    cfg.link_handshake_timeout = Duration::from_millis(200);
    let relay = start(cfg).await;
    let mut stream = tokio::net::TcpStream::connect(relay.link_addr())
        .await
        .unwrap();
    let mut buf = Vec::new();
    use tokio::io::AsyncReadExt;
    let read = tokio::time::timeout(Duration::from_secs(3), stream.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "closed by the relay");
    let packets = tunnel_proto::decode_all(Bytes::from(buf), 1 << 20).unwrap();
    assert_eq!(packets.len(), 1);
    assert_eq!(packets[0].kind, PacketType::ConnRejected);
    relay.shutdown().await;
}

#[tokio::test]
async fn a_newer_link_replaces_the_old_one_and_keeps_the_connections() {
    let relay = start(config()).await;
    let client = http();
    let mut old = FakeBroker::link(relay.link_addr(), SERVER, vec![]).await;
    let (id, token) = open(&relay, &mut old, &client).await;
    let announced = AnnouncedConn {
        conn_id: id,
        token,
        pull_period_ms: 0,
        client_window: 64,
    };
    // Something queued before the replacement must survive it.
    let before = data(id, 0, 10);
    old.send(&before).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut new = FakeBroker::link(relay.link_addr(), SERVER, vec![announced]).await;
    assert!(old.closed_within(WAIT).await, "old link closed");
    let sent = data(id, 0, 20);
    let (status, piggybacked) =
        push(&client, &relay, id, &token, std::slice::from_ref(&sent)).await;
    assert_eq!(status, 200);
    let mut got = tunnel_proto::decode_all(piggybacked, 1 << 20).unwrap();
    assert_eq!(new.recv().await, sent);
    let after = data(id, 1, 30);
    new.send(&after).await;
    while got.len() < 2 {
        let (status, packets) = pull(&client, &relay, id, &token).await;
        assert_eq!(status, 200);
        got.extend(packets.into_iter().filter(|p| p.kind != PacketType::NoOp));
    }
    assert_eq!(got, vec![before, after]);
    assert_eq!(relay.metrics().links_up, 1);
    relay.shutdown().await;
}

fn short_grace() -> RelayConfig {
    RelayConfig {
        broker_grace: Duration::from_millis(400),
        ..config()
    }
}

#[tokio::test]
async fn connections_survive_a_relay_restart_through_re_announcement() {
    let relay = start(config()).await;
    let client = http();
    let mut broker = FakeBroker::link(relay.link_addr(), SERVER, vec![]).await;
    let (id, token) = open(&relay, &mut broker, &client).await;
    relay.abort();
    assert!(
        broker.closed_within(WAIT).await,
        "link dropped with the relay"
    );

    let relay = start(config()).await;
    // Before the broker re-links, the relay cannot know the connection: 503, not 404.
    assert_eq!(
        push(&client, &relay, id, &token, &[data(id, 0, 1)]).await.0,
        503
    );
    assert_eq!(pull(&client, &relay, id, &token).await.0, 503);
    let announced = AnnouncedConn {
        conn_id: id,
        token,
        pull_period_ms: 0,
        client_window: 64,
    };
    let mut broker = FakeBroker::link(relay.link_addr(), SERVER, vec![announced]).await;
    let sent = data(id, 5, 10);
    assert_eq!(
        push(&client, &relay, id, &token, std::slice::from_ref(&sent))
            .await
            .0,
        200
    );
    assert_eq!(broker.recv().await, sent);
    let reply = data(id, 7, 10);
    broker.send(&reply).await;
    let (status, packets) = pull(&client, &relay, id, &token).await;
    assert_eq!(status, 200);
    assert_eq!(packets, vec![reply]);
    // A wrong token is still refused for the re-announced connection.
    assert_eq!(pull(&client, &relay, id, &Token([7; 16])).await.0, 404);
    relay.shutdown().await;
}

#[tokio::test]
async fn push_for_a_server_without_link_is_503_during_grace() {
    let relay = start(config()).await;
    let client = http();
    let mut broker = FakeBroker::link(relay.link_addr(), SERVER, vec![]).await;
    let (id, token) = open(&relay, &mut broker, &client).await;
    drop(broker);
    let relay_ref = &relay;
    eventually(|| relay_ref.metrics().links_up == 0, "link down").await;
    assert_eq!(
        push(&client, &relay, id, &token, &[data(id, 0, 1)]).await.0,
        503
    );
    // The connection is kept for the grace period.
    assert_eq!(relay.metrics().open_connections, 1);
    relay.shutdown().await;
}

#[tokio::test]
async fn grace_expiry_gives_the_client_conn_abort() {
    let relay = start(short_grace()).await;
    let client = http();
    let mut broker = FakeBroker::link(relay.link_addr(), SERVER, vec![]).await;
    let (id, token) = open(&relay, &mut broker, &client).await;
    drop(broker);
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while !got.iter().any(|p: &Packet| p.kind == PacketType::ConnAbort) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no CONN_ABORT in time"
        );
        let (status, packets) = pull(&client, &relay, id, &token).await;
        if status == 200 {
            got.extend(packets);
        } else {
            assert_eq!(status, 503, "only 503 while the grace runs");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let relay_ref = &relay;
    eventually(
        || relay_ref.metrics().open_connections == 0,
        "entry removed after fetch",
    )
    .await;
    relay.shutdown().await;
}

#[tokio::test]
async fn conn_shutdown_forgets_the_connection_after_delivery() {
    let relay = start(config()).await;
    let client = http();
    let mut broker = FakeBroker::link(relay.link_addr(), SERVER, vec![]).await;
    let (id, token) = open(&relay, &mut broker, &client).await;
    let last = Packet::new(PacketType::Ack, id, Bytes::new()).with_seq(3);
    broker
        .send_all(&[
            last.clone(),
            Packet::new(PacketType::ConnShutdown, id, Bytes::new()),
        ])
        .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (status, packets) = pull(&client, &relay, id, &token).await;
    assert_eq!((status, packets), (200, vec![last]));
    assert_eq!(pull(&client, &relay, id, &token).await.0, 404);
    relay.shutdown().await;
}

#[tokio::test]
async fn broker_packets_for_unknown_connections_get_conn_abort() {
    let relay = start(config()).await;
    let mut broker = FakeBroker::link(relay.link_addr(), SERVER, vec![]).await;
    broker.send(&data(4242, 0, 10)).await;
    let abort = broker.recv().await;
    assert_eq!((abort.kind, abort.conn_id), (PacketType::ConnAbort, 4242));
    relay.shutdown().await;
}

#[tokio::test]
async fn silent_link_is_declared_dead_and_idle_link_gets_keepalives() {
    let mut cfg = config();
    cfg.link_keepalive = Duration::from_millis(100);
    let relay = start(cfg).await;
    let mut broker = FakeBroker::link(relay.link_addr(), SERVER, vec![]).await;
    // The relay's keepalives arrive (as raw bytes) while the broker stays silent, and after
    // three silent intervals the relay closes the link.
    let mut buf = [0u8; 64];
    use tokio::io::AsyncReadExt;
    let n = tokio::time::timeout(WAIT, broker.stream.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(n >= 24, "a keepalive NO_OP");
    assert!(broker.closed_within(WAIT).await);
    let relay_ref = &relay;
    eventually(|| relay_ref.metrics().links_up == 0, "link down").await;
    relay.shutdown().await;
}

/// A restarted broker announces none of its old connections: their clients get CONN_ABORT at
/// once instead of finding out at their next keepalive.
#[tokio::test]
async fn a_new_link_that_does_not_announce_a_connection_aborts_it() {
    let relay = start(config()).await;
    let client = http();
    let mut old = FakeBroker::link(relay.link_addr(), SERVER, vec![]).await;
    let (id, token) = open(&relay, &mut old, &client).await;
    let _restarted = FakeBroker::link(relay.link_addr(), SERVER, vec![]).await;
    let (status, packets) = pull(&client, &relay, id, &token).await;
    assert_eq!(status, 200);
    let abort = packets
        .iter()
        .find(|p| p.kind == PacketType::ConnAbort)
        .expect("CONN_ABORT for the forgotten connection");
    assert_eq!(
        decode_reason(&abort.payload),
        "broker no longer knows the connection"
    );
    let relay_ref = &relay;
    eventually(
        || relay_ref.metrics().open_connections == 0,
        "entry removed after fetch",
    )
    .await;
    relay.shutdown().await;
}
