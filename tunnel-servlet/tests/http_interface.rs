//! The relay's HTTP interface against a fake broker: connect, push, pull, and their error
//! answers (docs/protocol.md §2–§3).

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use tunnel_proto::payload::{encode_reason, BrokerConnInit, ConnOption};
use tunnel_proto::{Packet, PacketType, Token};
use tunnel_servlet::RelayConfig;

#[tokio::test]
async fn connect_to_unknown_server_is_404() {
    // Without a name grace, an unknown name is 404 at once.
    let relay = start(RelayConfig {
        name_grace: Duration::ZERO,
        ..config()
    })
    .await;
    let client = http();
    let (status, _) = try_connect(&client, &relay, "nobody", 8).await;
    assert_eq!(status, 404);
    assert_eq!(relay.metrics().connects_rejected_no_server, 1);
    relay.shutdown().await;
}

#[tokio::test]
async fn connect_to_a_name_not_linked_yet_after_start_is_503_with_retry_after() {
    // A relay that just started cannot know whether the name's brokers are re-linking.
    let relay = start(config()).await;
    let client = http();
    let url = format!("{}?Type=connect&ServerName=nobody", relay.tunnel_url());
    let init = Packet::new(PacketType::ConnInit, 0, Bytes::new()).to_bytes();
    let resp = client.post(url).body(init).send().await.unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["retry-after"], "1");
    assert_eq!(relay.metrics().connects_rejected_no_instance, 1);
    relay.shutdown().await;
}

#[tokio::test]
async fn connect_forwards_conn_init_with_token_and_address() {
    let relay = start(config()).await;
    let mut broker = FakeBroker::link(relay.link_addr(), SERVER, vec![]).await;
    let client = http();
    // The LISTEN_STATE may still be in flight: retry a 404 briefly.
    let mut got = None;
    for _ in 0..50 {
        let (status, ok) = try_connect(&client, &relay, SERVER, 77).await;
        if status == 200 {
            got = ok;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (id, token) = got.expect("connect succeeds once the broker listens");
    assert_ne!(id, 0);
    let init = broker.recv().await;
    assert_eq!(init.kind, PacketType::ConnInit);
    assert_eq!(init.conn_id, id);
    assert_eq!(init.window, 77);
    let payload = BrokerConnInit::decode(init.payload).expect("broker CONN_INIT payload");
    assert!(payload.token.ct_eq(&token));
    assert!(
        payload.client_addr.starts_with("127.0.0.1:"),
        "{}",
        payload.client_addr
    );
    assert_eq!(relay.metrics().open_connections, 1);
    relay.shutdown().await;
}

/// Links a broker, waits until it listens, and opens one connection.
async fn linked() -> (
    tunnel_servlet::RunningRelay,
    FakeBroker,
    reqwest::Client,
    u32,
    Token,
) {
    linked_with(config()).await
}

async fn linked_with(
    config: tunnel_servlet::RelayConfig,
) -> (
    tunnel_servlet::RunningRelay,
    FakeBroker,
    reqwest::Client,
    u32,
    Token,
) {
    let relay = start(config).await;
    let mut broker = FakeBroker::link(relay.link_addr(), SERVER, vec![]).await;
    let client = http();
    for _ in 0..100 {
        let (status, ok) = try_connect(&client, &relay, SERVER, 64).await;
        if let Some((id, token)) = ok {
            let init = broker.recv().await;
            assert_eq!((init.kind, init.conn_id), (PacketType::ConnInit, id));
            return (relay, broker, client, id, token);
        }
        assert_eq!(status, 404);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("broker never became listening");
}

#[tokio::test]
async fn push_is_forwarded_and_pull_delivers_broker_packets() {
    let (relay, mut broker, client, id, token) = linked().await;
    let sent = [data(id, 0, 100), data(id, 1, 5000)];
    let (status, body) = push(&client, &relay, id, &token, &sent).await;
    assert_eq!(status, 200);
    assert!(body.is_empty(), "nothing queued yet");
    assert_eq!(broker.recv().await, sent[0]);
    assert_eq!(broker.recv().await, sent[1]);

    let ack = Packet::new(PacketType::ConnInitAck, id, Bytes::new()).with_window(32);
    let reply = data(id, 0, 300);
    broker.send_all(&[ack.clone(), reply.clone()]).await;
    let mut received = Vec::new();
    while received.len() < 2 {
        let (status, packets) = pull(&client, &relay, id, &token).await;
        assert_eq!(status, 200);
        received.extend(packets.into_iter().filter(|p| p.kind != PacketType::NoOp));
    }
    assert_eq!(received, vec![ack, reply]);
    let m = relay.metrics();
    assert!(
        m.bytes_up >= 5100 && m.bytes_down >= 300 && m.pushes_total == 1,
        "{m:?}"
    );
    relay.shutdown().await;
}

#[tokio::test]
async fn push_response_piggybacks_queued_packets() {
    let (relay, mut broker, client, id, token) = linked().await;
    let reply = data(id, 0, 10);
    broker.send(&reply).await;
    let relay_ref = &relay;
    eventually(|| relay_ref.metrics().open_connections == 1, "connection").await;
    // Give the link reader a moment to queue the packet.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (status, body) = push(&client, &relay, id, &token, &[data(id, 0, 1)]).await;
    assert_eq!(status, 200);
    let packets = tunnel_proto::decode_all(body, 1 << 20).unwrap();
    assert_eq!(packets, vec![reply]);
    relay.shutdown().await;
}

#[tokio::test]
async fn wrong_token_and_unknown_id_are_both_404() {
    let (relay, _broker, client, id, token) = linked().await;
    let wrong = Token([0xAB; 16]);
    assert_eq!(
        push(&client, &relay, id, &wrong, &[data(id, 0, 1)]).await.0,
        404
    );
    assert_eq!(pull(&client, &relay, id, &wrong).await.0, 404);
    let other = id.wrapping_add(1).max(1);
    assert_eq!(
        push(&client, &relay, other, &token, &[data(other, 0, 1)])
            .await
            .0,
        404
    );
    assert_eq!(pull(&client, &relay, other, &token).await.0, 404);
    relay.shutdown().await;
}

#[tokio::test]
async fn malformed_push_is_400_and_nothing_is_forwarded() {
    let (relay, mut broker, client, id, token) = linked().await;
    // A good packet followed by garbage: the good one must not reach the broker.
    let mut body = data(id, 0, 10).to_bytes().to_vec();
    body.extend_from_slice(b"garbage that is not a packet");
    assert_eq!(
        push_raw(&client, &relay, id, &token, Bytes::from(body))
            .await
            .0,
        400
    );
    // A packet of another connection.
    assert_eq!(
        push(
            &client,
            &relay,
            id,
            &token,
            &[data(id, 0, 10), data(id ^ 1, 1, 10)]
        )
        .await
        .0,
        400
    );
    // A type clients may not send.
    let bad = Packet::new(PacketType::LinkInit, id, Bytes::new());
    assert_eq!(push(&client, &relay, id, &token, &[bad]).await.0, 400);
    // Missing token header.
    let resp = client
        .post(url(
            &relay,
            &format!("Type=push&ServerName={SERVER}&ConnId={id}"),
        ))
        .body(data(id, 0, 1).to_bytes())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    assert!(
        broker.try_recv(Duration::from_millis(300)).await.is_none(),
        "nothing forwarded"
    );
    relay.shutdown().await;
}

#[tokio::test]
async fn oversize_push_is_413() {
    let mut cfg = config();
    cfg.max_body_size = 64 * 1024;
    let (relay, mut broker, client, id, token) = linked_with(cfg).await;
    let packets: Vec<Packet> = (0..3).map(|i| data(id, i, 30 * 1024)).collect();
    assert_eq!(push(&client, &relay, id, &token, &packets).await.0, 413);
    assert!(broker.try_recv(Duration::from_millis(200)).await.is_none());
    relay.shutdown().await;
}

#[tokio::test]
async fn a_second_pull_answers_the_first_with_no_op() {
    let (relay, _broker, client, id, token) = linked().await;
    let first = {
        let (client, relay_url, token) = (client.clone(), relay.tunnel_url(), token);
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let resp = client
                .get(format!(
                    "{relay_url}?Type=pull&ServerName={SERVER}&ConnId={id}"
                ))
                .header(tunnel_servlet::TOKEN_HEADER, token.to_hex())
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            let body = resp.bytes().await.unwrap();
            (
                status,
                tunnel_proto::decode_all(body, 1 << 20).unwrap(),
                started.elapsed(),
            )
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = tokio::spawn({
        let client = client.clone();
        let url = url(
            &relay,
            &format!("Type=pull&ServerName={SERVER}&ConnId={id}"),
        );
        async move {
            client
                .get(url)
                .header(tunnel_servlet::TOKEN_HEADER, token.to_hex())
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    });
    let (status, packets, elapsed) = tokio::time::timeout(WAIT, first).await.unwrap().unwrap();
    assert_eq!(status, 200);
    assert_eq!(packets.len(), 1);
    assert_eq!(packets[0].kind, PacketType::NoOp);
    assert!(
        elapsed < Duration::from_secs(3),
        "answered when superseded, not at pull wait: {elapsed:?}"
    );
    second.abort();
    relay.shutdown().await;
}

#[tokio::test]
async fn held_pull_gets_no_op_after_pull_wait() {
    let mut cfg = config();
    cfg.pull_wait = Duration::from_millis(300);
    let (relay, _broker, client, id, token) = linked_with(cfg).await;
    let started = std::time::Instant::now();
    let (status, packets) = pull(&client, &relay, id, &token).await;
    let elapsed = started.elapsed();
    assert_eq!(status, 200);
    assert_eq!(packets.len(), 1);
    assert_eq!(packets[0].kind, PacketType::NoOp);
    assert!(elapsed >= Duration::from_millis(250), "held: {elapsed:?}");
    relay.shutdown().await;
}

#[tokio::test]
async fn held_pull_is_answered_when_the_broker_sends() {
    let (relay, mut broker, client, id, token) = linked().await;
    let pulling = tokio::spawn({
        let client = client.clone();
        let url = url(
            &relay,
            &format!("Type=pull&ServerName={SERVER}&ConnId={id}"),
        );
        async move {
            let resp = client
                .get(url)
                .header(tunnel_servlet::TOKEN_HEADER, token.to_hex())
                .send()
                .await
                .unwrap();
            tunnel_proto::decode_all(resp.bytes().await.unwrap(), 1 << 20).unwrap()
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let reply = data(id, 0, 42);
    broker.send(&reply).await;
    let got = tokio::time::timeout(Duration::from_secs(3), pulling)
        .await
        .expect("answered early")
        .unwrap();
    assert_eq!(got, vec![reply]);
    relay.shutdown().await;
}

#[tokio::test]
async fn queue_overflow_drops_and_counts() {
    let mut cfg = config();
    cfg.queue_limit = 10 * 1024;
    let (relay, mut broker, client, id, token) = linked_with(cfg).await;
    let burst: Vec<Packet> = (0..20).map(|i| data(id, i, 1000)).collect();
    broker.send_all(&burst).await;
    let relay_ref = &relay;
    eventually(
        || relay_ref.metrics().packets_dropped >= 10,
        "drops counted",
    )
    .await;
    // The link is still read: a control packet after the burst still arrives.
    let abort = Packet::new(PacketType::ConnAbort, id, encode_reason("bye"));
    broker.send(&abort).await;
    let mut got = Vec::new();
    while !got.iter().any(|p: &Packet| p.kind == PacketType::ConnAbort) {
        let (status, packets) = pull(&client, &relay, id, &token).await;
        assert_eq!(status, 200);
        got.extend(packets);
    }
    let data_count = got.iter().filter(|p| p.kind == PacketType::Data).count();
    assert!(
        (9..=10).contains(&data_count),
        "queued within bound: {data_count}"
    );
    assert_eq!(relay.metrics().packets_dropped, 20 - data_count as u64);
    // CONN_ABORT fetched: it is repeated (in case that answer was lost) until the relay
    // forgets the connection a few seconds later.
    let (status, again) = pull(&client, &relay, id, &token).await;
    assert_eq!(status, 200);
    assert_eq!(again, vec![abort]);
    relay.shutdown().await;
}

#[tokio::test]
async fn connection_limit_gives_503() {
    let mut cfg = config();
    cfg.max_connections = 1;
    let (relay, _broker, client, _id, _token) = linked_with(cfg).await;
    let (status, _) = try_connect(&client, &relay, SERVER, 8).await;
    assert_eq!(status, 503);
    assert_eq!(relay.metrics().connects_rejected_limit, 1);
    relay.shutdown().await;
}

#[tokio::test]
async fn health_metrics_and_http2_prior_knowledge() {
    let (relay, _broker, _client, id, token) = linked().await;
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .no_proxy()
        .timeout(WAIT)
        .build()
        .unwrap();
    let health = h2
        .get(format!("http://{}/healthz", relay.http_addr()))
        .send()
        .await
        .unwrap();
    assert_eq!(health.version(), reqwest::Version::HTTP_2);
    assert_eq!(health.status().as_u16(), 200);
    let (status, _) = push(&h2, &relay, id, &token, &[data(id, 0, 1)]).await;
    assert_eq!(status, 200);
    let text = http()
        .get(format!("http://{}/metrics", relay.http_addr()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.contains("tunnel_open_connections 1"), "{text}");
    assert!(text.contains("tunnel_links_up 1"), "{text}");
    assert!(
        text.contains("tunnel_connects_rejected_total{reason=\"limit\"} 0"),
        "{text}"
    );
    assert!(!text.contains(&token.to_hex()));
    relay.shutdown().await;
}

#[tokio::test]
async fn tunnel_responses_carry_the_required_headers() {
    let (relay, _broker, client, id, token) = linked().await;
    let resp = client
        .post(url(
            &relay,
            &format!("Type=push&ServerName={SERVER}&ConnId={id}"),
        ))
        .header(tunnel_servlet::TOKEN_HEADER, token.to_hex())
        .body(data(id, 0, 1).to_bytes())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["content-type"], "application/octet-stream");
    assert_eq!(resp.headers()["cache-control"], "no-store");
    relay.shutdown().await;
}

#[tokio::test]
async fn inactivity_timeout_sends_conn_abort_to_the_broker() {
    let mut cfg = config();
    cfg.client_inactivity_timeout = Duration::from_millis(300);
    let (relay, mut broker, _client, id, _token) = linked_with(cfg).await;
    let abort = broker.recv().await;
    assert_eq!((abort.kind, abort.conn_id), (PacketType::ConnAbort, id));
    assert_eq!(relay.metrics().open_connections, 0);
    relay.shutdown().await;
}

#[tokio::test]
async fn conn_option_from_the_client_sets_the_inactivity_timeout() {
    let (relay, mut broker, client, id, token) = linked().await;
    let option = Packet::new(
        PacketType::ConnOption,
        id,
        ConnOption::InactivityTimeoutMs(300).encode(),
    );
    assert_eq!(
        push(&client, &relay, id, &token, std::slice::from_ref(&option))
            .await
            .0,
        200
    );
    assert_eq!(broker.recv().await, option);
    let abort = broker.recv().await;
    assert_eq!((abort.kind, abort.conn_id), (PacketType::ConnAbort, id));
    relay.shutdown().await;
}

/// CONN_INIT_ACK has no sequence number, so the relay hands it out again until the client's
/// first push shows it arrived (the response that carried it may have been lost on the way).
#[tokio::test]
async fn init_ack_is_resent_until_the_client_pushes() {
    let (relay, mut broker, client, id, token) = linked().await;
    let ack = Packet::new(PacketType::ConnInitAck, id, Bytes::new()).with_window(32);
    broker.send(&ack).await;
    let first = loop {
        let (status, packets) = pull(&client, &relay, id, &token).await;
        assert_eq!(status, 200);
        let got: Vec<_> = packets
            .into_iter()
            .filter(|p| p.kind != PacketType::NoOp)
            .collect();
        if !got.is_empty() {
            break got;
        }
    };
    assert_eq!(first, vec![ack.clone()]);
    // Suppose that response was lost: the next pull gets a copy, after a short wait rather
    // than the whole pull wait.
    let started = std::time::Instant::now();
    let (status, again) = pull(&client, &relay, id, &token).await;
    assert_eq!(status, 200);
    assert_eq!(again, vec![ack]);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    // The client's first push confirms it: no more copies.
    let ack_from_client = Packet::new(PacketType::Ack, id, Bytes::new()).with_seq(u32::MAX);
    let (status, _) = push(&client, &relay, id, &token, &[ack_from_client]).await;
    assert_eq!(status, 200);
    let reply = data(id, 0, 10);
    broker.send(&reply).await;
    let (_, after) = pull(&client, &relay, id, &token).await;
    assert_eq!(
        after,
        vec![reply],
        "no CONN_INIT_ACK after the client pushed"
    );
    relay.shutdown().await;
}
