//! Relay pools (docs/protocol.md §5.2) in process: two relays with ids 1 and 2 and fake
//! brokers that link to both as one instance, as a real broker links to every relay of a
//! pool.
//! - LINK_INIT_ACK is [relay id, MOVES]; connection and session ids carry the relay's id in
//!   their top byte;
//! - a connection opened on relay 1 moves to relay 2 once relay 1 is gone: the ATTACH makes
//!   relay 2 ask (CONN_MOVE with the token), the broker's *moved* installs it, the session's
//!   pull hands out CONN_INIT_ACK (the broker's window) then ATTACH, and data flows both ways
//!   through relay 2;
//! - *left* makes a relay forget a connection without telling the client or the broker;
//! - *unknown* from every instance asked makes the next ATTACH a CONN_ABORT;
//! - only instances with the MOVES feature are asked; without any, the ATTACH of a connection
//!   the relay does not hold is answered CONN_ABORT at once;
//! - an unanswered move is asked again only after the retry delay (2 s), also when the
//!   relay is at its limit of moves under way (which holds the others back);
//! - a *moved* that comes after its session closed installs the connection for the next
//!   session's ATTACH;
//! - a connection moves off a relay that is still up: that relay gets *left* and forgets it.
//!
//! Run: `cargo test -p tunnel-servlet --test relay_moves`.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use tunnel_proto::payload::{
    decode_reason, decode_token, Attach, BrokerConnInit, InstanceId, LinkFeatures, MoveAnswer,
    MoveRequest, SessionRequest,
};
use tunnel_proto::{decode_all, encode_all, Packet, PacketType, Token};
use tunnel_servlet::{RelayConfig, RunningRelay, SESSION_TOKEN_HEADER};

/// How long a link is watched for a packet that must not come. The relay sends what a push
/// causes before it answers the push, so a packet that was due is on the wire by then.
const QUIET: Duration = Duration::from_millis(300);

/// The window the fake broker announces for a connection, distinct from the client's 64.
const BROKER_WINDOW: u16 = 32;

/// The relay's retry delay for an unanswered move (moves.rs `MOVE_RETRY`).
const MOVE_RETRY: Duration = Duration::from_secs(2);

/// Relay `relay_id` of a pool, with short held pulls so that pull loops turn quickly.
fn pool_config(relay_id: u8) -> RelayConfig {
    RelayConfig {
        relay_id,
        pull_wait: Duration::from_millis(300),
        ..config()
    }
}

fn instance(n: u8) -> InstanceId {
    InstanceId([n; 16])
}

/// A session the test holds the id and token of.
#[derive(Debug, Clone, Copy)]
struct Session {
    id: u32,
    token: Token,
}

async fn open_session(client: &reqwest::Client, relay: &RunningRelay) -> Session {
    let init = Packet::new(
        PacketType::SessionInit,
        0,
        SessionRequest { idle_timeout_ms: 0 }.encode(),
    );
    let resp = client
        .post(url(relay, "Type=session"))
        .body(init.to_bytes())
        .send()
        .await
        .expect("session request");
    assert_eq!(resp.status().as_u16(), 200, "session opening");
    let list = decode_all(resp.bytes().await.expect("body"), 1 << 20).expect("packets");
    assert_eq!(list.len(), 1, "one SESSION_INIT: {list:?}");
    assert_eq!(list[0].kind, PacketType::SessionInit);
    Session {
        id: list[0].conn_id,
        token: decode_token(list[0].payload.clone()).expect("session token"),
    }
}

fn in_session(
    client: &reqwest::Client,
    relay: &RunningRelay,
    method: reqwest::Method,
    query: &str,
    session: Session,
) -> reqwest::RequestBuilder {
    client
        .request(
            method,
            url(relay, &format!("{query}&Session={}", session.id)),
        )
        .header(SESSION_TOKEN_HEADER, session.token.to_hex())
}

/// A connect to [`SERVER`] in `session`: the connection's id and token.
async fn session_connect(
    client: &reqwest::Client,
    relay: &RunningRelay,
    session: Session,
) -> (u32, Token) {
    let init = Packet::new(PacketType::ConnInit, 0, Bytes::new()).with_window(64);
    let query = format!("Type=connect&ServerName={SERVER}");
    let resp = in_session(client, relay, reqwest::Method::POST, &query, session)
        .body(init.to_bytes())
        .send()
        .await
        .expect("connect request");
    assert_eq!(resp.status().as_u16(), 200, "connect in a session");
    let list = decode_all(resp.bytes().await.expect("body"), 1 << 20).expect("packets");
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].kind, PacketType::ConnInit);
    let token = decode_token(list[0].payload.clone()).expect("connection token");
    (list[0].conn_id, token)
}

/// A session push of `packets`, 200 expected; the packets of the answer.
async fn session_push(
    client: &reqwest::Client,
    relay: &RunningRelay,
    session: Session,
    packets: &[Packet],
) -> Vec<Packet> {
    let resp = in_session(client, relay, reqwest::Method::POST, "Type=push", session)
        .body(encode_all(packets))
        .send()
        .await
        .expect("push request");
    assert_eq!(resp.status().as_u16(), 200, "session push");
    decode_all(resp.bytes().await.expect("body"), 1 << 21).expect("push answer is packets")
}

/// One session pull (held up to the pull wait), 200 expected; its packets but NO_OP.
async fn session_pull(
    client: &reqwest::Client,
    relay: &RunningRelay,
    session: Session,
) -> Vec<Packet> {
    let resp = in_session(client, relay, reqwest::Method::GET, "Type=pull", session)
        .send()
        .await
        .expect("pull request");
    assert_eq!(resp.status().as_u16(), 200, "session pull");
    let list = decode_all(resp.bytes().await.expect("body"), 1 << 21).expect("packets");
    list.into_iter()
        .filter(|p| p.kind != PacketType::NoOp)
        .collect()
}

/// Pulls until `done` holds for what was collected (starting with `got`), within `WAIT`.
async fn pull_until(
    client: &reqwest::Client,
    relay: &RunningRelay,
    session: Session,
    mut got: Vec<Packet>,
    mut done: impl FnMut(&[Packet]) -> bool,
) -> Vec<Packet> {
    let deadline = Instant::now() + WAIT;
    while !done(&got) {
        assert!(
            Instant::now() < deadline,
            "pull_until timed out; got {:?}",
            got.iter()
                .map(|p| (p.kind, p.conn_id, p.seq))
                .collect::<Vec<_>>()
        );
        got.extend(session_pull(client, relay, session).await);
    }
    got
}

fn attach_packet(id: u32, token: Token) -> Packet {
    let attach = Attach {
        token,
        server: SERVER.to_string(),
    };
    Packet::new(PacketType::Attach, id, attach.encode())
}

fn moved(id: u32, token: Token) -> Packet {
    let answer = MoveAnswer::Moved {
        token,
        pull_period_ms: 0,
        client_window: 64,
    };
    Packet::new(PacketType::ConnMove, id, answer.encode()).with_window(BROKER_WINDOW)
}

fn move_answer(id: u32, answer: MoveAnswer) -> Packet {
    Packet::new(PacketType::ConnMove, id, answer.encode())
}

/// The packets of connection `id` in `got`.
fn of(got: &[Packet], id: u32) -> Vec<&Packet> {
    got.iter().filter(|p| p.conn_id == id).collect()
}

fn is_unknown_abort(p: &Packet) -> bool {
    p.kind == PacketType::ConnAbort && decode_reason(&p.payload) == "unknown connection"
}

/// Reads the broker's next packet: a CONN_MOVE asking for `id` with `token`.
async fn expect_move_request(broker: &mut FakeBroker, id: u32, token: Token) {
    let ask = broker.recv().await;
    assert_eq!(
        (ask.kind, ask.conn_id),
        (PacketType::ConnMove, id),
        "expected CONN_MOVE, got {ask:?}"
    );
    let request = MoveRequest::decode(ask.payload).expect("CONN_MOVE request payload");
    assert_eq!(request.token, token, "CONN_MOVE carries the ATTACH's token");
}

/// Asserts the broker gets nothing (but keepalives) within [`QUIET`].
async fn expect_quiet(broker: &mut FakeBroker, what: &str) {
    if let Some(p) = broker.try_recv(QUIET).await {
        panic!("{what}: unexpected {p:?}");
    }
}

/// Opens a connection in `session` on `relay` whose CONN_INIT reaches `broker`; the broker
/// accepts it with [`BROKER_WINDOW`] and the client gets the CONN_INIT_ACK.
async fn open_accepted(
    client: &reqwest::Client,
    relay: &RunningRelay,
    broker: &mut FakeBroker,
    session: Session,
) -> (u32, Token) {
    let (id, token) = session_connect(client, relay, session).await;
    let init = broker.recv().await;
    assert_eq!((init.kind, init.conn_id), (PacketType::ConnInit, id));
    let init = BrokerConnInit::decode(init.payload).expect("CONN_INIT payload");
    assert_eq!(init.token, token, "the broker gets the client's token");
    broker
        .send(&Packet::new(PacketType::ConnInitAck, id, Bytes::new()).with_window(BROKER_WINDOW))
        .await;
    pull_until(client, relay, session, Vec::new(), |got| {
        got.iter()
            .any(|p| p.kind == PacketType::ConnInitAck && p.conn_id == id)
    })
    .await;
    (id, token)
}

/// The client pushes DATA `seq` on `id` through `relay` and `broker` receives it as sent;
/// then `broker` sends DATA `seq` back and the client's pull gets it.
async fn data_both_ways(
    client: &reqwest::Client,
    relay: &RunningRelay,
    broker: &mut FakeBroker,
    session: Session,
    id: u32,
    seq: u32,
) {
    let up = data(id, seq, 100 + seq as usize);
    let answer = session_push(client, relay, session, std::slice::from_ref(&up)).await;
    assert!(
        !answer
            .iter()
            .any(|p| p.conn_id == id && is_unknown_abort(p)),
        "push refused: {answer:?}"
    );
    assert_eq!(broker.recv().await, up, "the pushed DATA reaches the link");
    let down = data(id, seq, 200 + seq as usize);
    broker.send(&down).await;
    let got = pull_until(client, relay, session, answer, |got| got.contains(&down)).await;
    assert!(
        !got.iter()
            .any(|p| p.conn_id == id && p.kind == PacketType::ConnAbort),
        "{got:?}"
    );
}

#[tokio::test]
async fn link_init_ack_and_ids_carry_the_relay_id() {
    let client = http();
    for relay_id in [1u8, 2] {
        let relay = start(pool_config(relay_id)).await;
        let (mut broker, hello) =
            FakeBroker::link_mover(relay.link_addr(), SERVER, instance(1), vec![]).await;
        assert_eq!(&hello[..], &[relay_id, LinkFeatures::MOVES.0][..]);
        // A broker that does not move connections is told the same.
        let (_other, hello) =
            FakeBroker::link_instance(relay.link_addr(), SERVER, instance(2), None, vec![]).await;
        assert_eq!(&hello[..], &[relay_id, 1][..]);
        let range = (u32::from(relay_id) << 24)..(u32::from(relay_id) + 1) << 24;
        for _ in 0..20 {
            let session = open_session(&client, &relay).await;
            assert!(
                range.contains(&session.id),
                "session id {:#x} of relay {relay_id}",
                session.id
            );
            let (id, _) = session_connect(&client, &relay, session).await;
            assert!(
                range.contains(&id),
                "connection id {id:#x} of relay {relay_id}"
            );
            let (id, _) = connect(&client, &relay, SERVER).await;
            assert!(
                range.contains(&id),
                "per-connection id {id:#x} of relay {relay_id}"
            );
        }
        // Every connect reached a link (either instance may be chosen); drain ours so its
        // socket buffer never fills.
        while broker.try_recv(Duration::from_millis(50)).await.is_some() {}
        relay.shutdown().await;
    }
}

#[tokio::test]
async fn a_connection_moves_to_the_other_relay_when_its_relay_is_gone() {
    let client = http();
    let relay1 = start(pool_config(1)).await;
    let relay2 = start(pool_config(2)).await;
    // One broker instance linked to both relays.
    let (mut link1, _) =
        FakeBroker::link_mover(relay1.link_addr(), SERVER, instance(7), vec![]).await;
    let (mut link2, _) =
        FakeBroker::link_mover(relay2.link_addr(), SERVER, instance(7), vec![]).await;

    let old = open_session(&client, &relay1).await;
    let (id, token) = open_accepted(&client, &relay1, &mut link1, old).await;
    assert_eq!(id >> 24, 1, "made by relay 1");
    data_both_ways(&client, &relay1, &mut link1, old, id, 0).await;

    relay1.shutdown().await;
    assert!(link1.closed_within(WAIT).await, "relay 1's link closed");

    let new = open_session(&client, &relay2).await;
    let attach = attach_packet(id, token);
    let answer = session_push(&client, &relay2, new, std::slice::from_ref(&attach)).await;
    assert!(
        of(&answer, id).is_empty(),
        "the ATTACH waits for the move: {answer:?}"
    );
    expect_move_request(&mut link2, id, token).await;
    // Nothing of the connection goes to the broker before it has moved.
    expect_quiet(&mut link2, "before the move answer").await;
    assert_eq!(relay2.metrics().connections_moved, 0);

    link2.send(&moved(id, token)).await;
    let got = pull_until(&client, &relay2, new, Vec::new(), |got| {
        got.iter()
            .any(|p| p.kind == PacketType::Attach && p.conn_id == id)
    })
    .await;
    let mine = of(&got, id);
    let kinds: Vec<PacketType> = mine.iter().map(|p| p.kind).collect();
    assert_eq!(
        kinds,
        vec![PacketType::ConnInitAck, PacketType::Attach],
        "CONN_INIT_ACK then the ATTACH's answer: {mine:?}"
    );
    assert_eq!(mine[0].window, BROKER_WINDOW, "the broker's window");
    assert!(mine[1].payload.is_empty(), "an ATTACH answer is empty");
    let m = relay2.metrics();
    assert_eq!((m.connections_moved, m.session_attaches), (1, 1));
    assert_eq!(m.open_connections, 1);

    // Until the client pushes, the CONN_INIT_ACK is handed out again.
    let again = pull_until(&client, &relay2, new, Vec::new(), |got| {
        got.iter()
            .any(|p| p.kind == PacketType::ConnInitAck && p.conn_id == id)
    })
    .await;
    assert!(again
        .iter()
        .all(|p| p.kind != PacketType::ConnInitAck || p.window == BROKER_WINDOW));

    // A later ATTACH is answered ATTACH at once and asks nothing.
    let answer = session_push(&client, &relay2, new, std::slice::from_ref(&attach)).await;
    let mine = of(&answer, id);
    assert!(
        mine.iter().any(|p| p.kind == PacketType::Attach),
        "{answer:?}"
    );
    assert!(mine.iter().all(|p| p.kind != PacketType::ConnAbort));
    expect_quiet(&mut link2, "after a repeated ATTACH").await;

    data_both_ways(&client, &relay2, &mut link2, new, id, 1).await;
    data_both_ways(&client, &relay2, &mut link2, new, id, 2).await;
    // The client has pushed: no more CONN_INIT_ACK copies (they come every 500 ms).
    let deadline = Instant::now() + Duration::from_millis(800);
    while Instant::now() < deadline {
        let got = session_pull(&client, &relay2, new).await;
        assert!(
            got.iter().all(|p| p.kind != PacketType::ConnInitAck),
            "CONN_INIT_ACK resent after the client pushed: {got:?}"
        );
    }
    assert_eq!(relay2.metrics().connections_moved, 1);
    let text = client
        .get(format!("http://{}/metrics", relay2.http_addr()))
        .send()
        .await
        .expect("metrics request")
        .text()
        .await
        .expect("metrics text");
    assert!(text.contains("tunnel_connections_moved_total 1"), "{text}");
    relay2.shutdown().await;
}

#[tokio::test]
async fn left_makes_the_relay_forget_the_connection_silently() {
    let client = http();
    let relay = start(pool_config(2)).await;
    let (mut holder, _) =
        FakeBroker::link_mover(relay.link_addr(), SERVER, instance(7), vec![]).await;
    let session = open_session(&client, &relay).await;
    let (id, _) = open_accepted(&client, &relay, &mut holder, session).await;
    data_both_ways(&client, &relay, &mut holder, session, id, 0).await;
    // Another instance of the name, linked once the connection is on the first one's link.
    let (mut other, _) =
        FakeBroker::link_mover(relay.link_addr(), SERVER, instance(8), vec![]).await;

    // *left* from an instance that does not hold it changes nothing.
    other.send(&move_answer(id, MoveAnswer::Left)).await;
    expect_quiet(&mut other, "after a stranger's left").await;
    data_both_ways(&client, &relay, &mut holder, session, id, 1).await;
    assert_eq!(relay.metrics().open_connections, 1);

    holder.send(&move_answer(id, MoveAnswer::Left)).await;
    let relay_ref = &relay;
    eventually(
        || relay_ref.metrics().open_connections == 0,
        "connection forgotten",
    )
    .await;
    // Nothing to the broker, nothing to the client.
    expect_quiet(&mut holder, "after left").await;
    let got = session_pull(&client, &relay, session).await;
    assert!(
        of(&got, id).is_empty(),
        "the client is told nothing: {got:?}"
    );
    // A later push of it is a packet of a connection not in the session.
    let answer = session_push(&client, &relay, session, &[data(id, 2, 10)]).await;
    let mine = of(&answer, id);
    assert_eq!(mine.len(), 1, "{answer:?}");
    assert!(is_unknown_abort(mine[0]), "{answer:?}");
    expect_quiet(&mut holder, "a push after left").await;
    assert_eq!(relay.metrics().connections_moved, 0);
    relay.shutdown().await;
}

#[tokio::test]
async fn unknown_from_every_instance_makes_the_next_attach_an_abort() {
    let client = http();
    let relay = start(pool_config(2)).await;
    let (mut a, _) = FakeBroker::link_mover(relay.link_addr(), SERVER, instance(1), vec![]).await;
    let (mut b, _) = FakeBroker::link_mover(relay.link_addr(), SERVER, instance(2), vec![]).await;
    let session = open_session(&client, &relay).await;
    // A connection of relay 1, which this relay never held.
    let (id, token) = ((1 << 24) | 0x00_1234, Token([9; 16]));
    let attach = attach_packet(id, token);

    let answer = session_push(&client, &relay, session, std::slice::from_ref(&attach)).await;
    assert!(of(&answer, id).is_empty(), "{answer:?}");
    expect_move_request(&mut a, id, token).await;
    expect_move_request(&mut b, id, token).await;

    a.send(&move_answer(id, MoveAnswer::Unknown)).await;
    // Give the relay time to read it: then the ATTACH still waits, for b.
    tokio::time::sleep(QUIET).await;
    let answer = session_push(&client, &relay, session, std::slice::from_ref(&attach)).await;
    assert!(
        of(&answer, id).is_empty(),
        "one instance has not answered yet: {answer:?}"
    );
    expect_quiet(&mut a, "asked again within the retry delay").await;
    expect_quiet(&mut b, "asked again within the retry delay").await;

    b.send(&move_answer(id, MoveAnswer::Unknown)).await;
    let deadline = Instant::now() + WAIT;
    let answer = loop {
        let answer = session_push(&client, &relay, session, std::slice::from_ref(&attach)).await;
        if !of(&answer, id).is_empty() {
            break answer;
        }
        assert!(Instant::now() < deadline, "ATTACH never answered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mine = of(&answer, id);
    assert_eq!(mine.len(), 1, "{answer:?}");
    assert!(is_unknown_abort(mine[0]), "{answer:?}");
    // The brokers are not told anything about it.
    expect_quiet(&mut a, "after unknown").await;
    expect_quiet(&mut b, "after unknown").await;
    let m = relay.metrics();
    assert_eq!((m.connections_moved, m.open_connections), (0, 0));
    relay.shutdown().await;
}

#[tokio::test]
async fn without_a_broker_that_moves_an_unknown_attach_is_aborted_at_once() {
    let client = http();
    let (id, token) = ((1 << 24) | 0x00_4321, Token([5; 16]));
    let attach = attach_packet(id, token);
    // A version-1 link (no pool extension), and a pool link without the features byte.
    for pool in [false, true] {
        let relay = start(pool_config(2)).await;
        let mut broker = if pool {
            FakeBroker::link_instance(relay.link_addr(), SERVER, instance(3), None, vec![])
                .await
                .0
        } else {
            FakeBroker::link(relay.link_addr(), SERVER, vec![]).await
        };
        let relay_ref = &relay;
        eventually(|| relay_ref.metrics().links_up == 1, "link up").await;
        let session = open_session(&client, &relay).await;
        let answer = session_push(&client, &relay, session, std::slice::from_ref(&attach)).await;
        let mine = of(&answer, id);
        assert_eq!(mine.len(), 1, "pool extension {pool}: {answer:?}");
        assert!(
            is_unknown_abort(mine[0]),
            "pool extension {pool}: {answer:?}"
        );
        expect_quiet(&mut broker, "no CONN_MOVE to a broker without the feature").await;
        relay.shutdown().await;
    }
}

#[tokio::test]
async fn only_instances_that_move_are_asked() {
    let client = http();
    let relay = start(pool_config(2)).await;
    let (mut mover, _) =
        FakeBroker::link_mover(relay.link_addr(), SERVER, instance(1), vec![]).await;
    let (mut older, _) =
        FakeBroker::link_instance(relay.link_addr(), SERVER, instance(2), None, vec![]).await;
    let session = open_session(&client, &relay).await;
    let (id, token) = ((1 << 24) | 0x00_0777, Token([3; 16]));
    let attach = attach_packet(id, token);
    let answer = session_push(&client, &relay, session, std::slice::from_ref(&attach)).await;
    assert!(of(&answer, id).is_empty(), "{answer:?}");
    expect_move_request(&mut mover, id, token).await;
    expect_quiet(&mut older, "a broker without the feature is not asked").await;

    mover.send(&move_answer(id, MoveAnswer::Unknown)).await;
    let deadline = Instant::now() + WAIT;
    loop {
        let answer = session_push(&client, &relay, session, std::slice::from_ref(&attach)).await;
        if let Some(p) = of(&answer, id).first() {
            assert!(is_unknown_abort(p), "{answer:?}");
            break;
        }
        assert!(Instant::now() < deadline, "ATTACH never answered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    expect_quiet(&mut older, "nothing for the older broker").await;
    relay.shutdown().await;
}

#[tokio::test]
async fn an_unanswered_move_is_asked_again_after_the_retry_delay() {
    let client = http();
    let relay = start(pool_config(2)).await;
    let (mut broker, _) =
        FakeBroker::link_mover(relay.link_addr(), SERVER, instance(1), vec![]).await;
    let session = open_session(&client, &relay).await;
    let (id, token) = ((1 << 24) | 0x00_0abc, Token([4; 16]));
    let attach = attach_packet(id, token);

    let first_ask = Instant::now();
    session_push(&client, &relay, session, std::slice::from_ref(&attach)).await;
    expect_move_request(&mut broker, id, token).await;
    // The question is lost (no answer). The client's ATTACHes within the retry delay wait.
    let answer = session_push(&client, &relay, session, std::slice::from_ref(&attach)).await;
    assert!(of(&answer, id).is_empty(), "{answer:?}");
    expect_quiet(&mut broker, "asked again within the retry delay").await;
    assert!(
        first_ask.elapsed() < MOVE_RETRY,
        "the test was too slow to check the retry delay"
    );

    tokio::time::sleep(MOVE_RETRY.saturating_sub(first_ask.elapsed()) + QUIET).await;
    let answer = session_push(&client, &relay, session, std::slice::from_ref(&attach)).await;
    assert!(of(&answer, id).is_empty(), "{answer:?}");
    expect_move_request(&mut broker, id, token).await;

    // This time the broker answers: the connection is attached.
    broker.send(&moved(id, token)).await;
    let got = pull_until(&client, &relay, session, Vec::new(), |got| {
        got.iter()
            .any(|p| p.kind == PacketType::Attach && p.conn_id == id)
    })
    .await;
    assert!(of(&got, id).iter().all(|p| p.kind != PacketType::ConnAbort));
    data_both_ways(&client, &relay, &mut broker, session, id, 0).await;
    assert_eq!(relay.metrics().connections_moved, 1);
    relay.shutdown().await;
}

#[tokio::test]
async fn at_the_limit_of_moves_under_way_a_move_still_waits_and_ends() {
    let client = http();
    // The relay bounds the moves under way by its connection limit: here 1.
    let relay = start(RelayConfig {
        max_connections: 1,
        ..pool_config(2)
    })
    .await;
    let (mut broker, _) =
        FakeBroker::link_mover(relay.link_addr(), SERVER, instance(1), vec![]).await;
    let session = open_session(&client, &relay).await;
    let (id, token) = ((1 << 24) | 0x00_0def, Token([6; 16]));
    let attach = attach_packet(id, token);
    let answer = session_push(&client, &relay, session, std::slice::from_ref(&attach)).await;
    assert!(of(&answer, id).is_empty(), "{answer:?}");
    expect_move_request(&mut broker, id, token).await;

    // The move under way is the one at the limit: its ATTACH waits, without asking again.
    let answer = session_push(&client, &relay, session, std::slice::from_ref(&attach)).await;
    assert!(of(&answer, id).is_empty(), "{answer:?}");
    expect_quiet(&mut broker, "asked again within the retry delay").await;
    // Another connection's ATTACH waits for room, without asking.
    let (other, other_token) = ((1 << 24) | 0x00_0fed, Token([8; 16]));
    let other_attach = attach_packet(other, other_token);
    let answer = session_push(
        &client,
        &relay,
        session,
        std::slice::from_ref(&other_attach),
    )
    .await;
    assert!(of(&answer, other).is_empty(), "{answer:?}");
    expect_quiet(&mut broker, "a move over the limit").await;

    // The broker does not know it: the next ATTACH is answered CONN_ABORT.
    broker.send(&move_answer(id, MoveAnswer::Unknown)).await;
    let deadline = Instant::now() + WAIT;
    loop {
        let answer = session_push(&client, &relay, session, std::slice::from_ref(&attach)).await;
        if let Some(p) = of(&answer, id).first() {
            assert!(is_unknown_abort(p), "{answer:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "ATTACH never answered (asked again instead?)"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    expect_quiet(&mut broker, "after unknown").await;
    // Room again: the other connection's move is asked.
    session_push(
        &client,
        &relay,
        session,
        std::slice::from_ref(&other_attach),
    )
    .await;
    expect_move_request(&mut broker, other, other_token).await;
    relay.shutdown().await;
}

#[tokio::test]
async fn a_move_answered_after_its_session_closed_is_attached_by_the_next_session() {
    let client = http();
    let relay = start(pool_config(2)).await;
    let (mut broker, _) =
        FakeBroker::link_mover(relay.link_addr(), SERVER, instance(1), vec![]).await;
    let first = open_session(&client, &relay).await;
    let (id, token) = ((1 << 24) | 0x00_0bad, Token([2; 16]));
    let attach = attach_packet(id, token);
    session_push(&client, &relay, first, std::slice::from_ref(&attach)).await;
    expect_move_request(&mut broker, id, token).await;
    // The client gives up on that session before the broker answers.
    let resp = in_session(&client, &relay, reqwest::Method::POST, "Type=close", first)
        .send()
        .await
        .expect("close request");
    assert_eq!(resp.status().as_u16(), 200, "session close");

    broker.send(&moved(id, token)).await;
    let relay_ref = &relay;
    eventually(
        || relay_ref.metrics().open_connections == 1,
        "the moved connection installed",
    )
    .await;
    assert_eq!(relay.metrics().connections_moved, 1);

    // The next session's ATTACH is answered at once, with the broker's acceptance.
    let second = open_session(&client, &relay).await;
    let answer = session_push(&client, &relay, second, std::slice::from_ref(&attach)).await;
    assert!(
        of(&answer, id).iter().any(|p| p.kind == PacketType::Attach),
        "{answer:?}"
    );
    expect_quiet(&mut broker, "an installed connection is not asked for").await;
    let got = pull_until(&client, &relay, second, answer, |got| {
        got.iter()
            .any(|p| p.kind == PacketType::ConnInitAck && p.conn_id == id)
    })
    .await;
    assert!(got
        .iter()
        .filter(|p| p.kind == PacketType::ConnInitAck)
        .all(|p| p.window == BROKER_WINDOW));
    assert!(of(&got, id).iter().all(|p| p.kind != PacketType::ConnAbort));
    data_both_ways(&client, &relay, &mut broker, second, id, 0).await;
    relay.shutdown().await;
}

#[tokio::test]
async fn a_connection_moves_off_a_live_relay_which_then_forgets_it() {
    let client = http();
    let relay1 = start(pool_config(1)).await;
    let relay2 = start(pool_config(2)).await;
    let (mut link1, _) =
        FakeBroker::link_mover(relay1.link_addr(), SERVER, instance(7), vec![]).await;
    let (mut link2, _) =
        FakeBroker::link_mover(relay2.link_addr(), SERVER, instance(7), vec![]).await;
    let old = open_session(&client, &relay1).await;
    let (id, token) = open_accepted(&client, &relay1, &mut link1, old).await;
    data_both_ways(&client, &relay1, &mut link1, old, id, 0).await;

    // The load balancer sends the client to relay 2 while relay 1 is still up (a failed
    // health check, say): the client opens a session there and re-attaches.
    let new = open_session(&client, &relay2).await;
    let attach = attach_packet(id, token);
    session_push(&client, &relay2, new, std::slice::from_ref(&attach)).await;
    expect_move_request(&mut link2, id, token).await;
    // The broker moves it: moved on the link that asked, left on the one it was on.
    link2.send(&moved(id, token)).await;
    link1.send(&move_answer(id, MoveAnswer::Left)).await;
    let relay1_ref = &relay1;
    eventually(
        || relay1_ref.metrics().open_connections == 0,
        "relay 1 forgets the connection",
    )
    .await;
    pull_until(&client, &relay2, new, Vec::new(), |got| {
        got.iter()
            .any(|p| p.kind == PacketType::Attach && p.conn_id == id)
    })
    .await;
    data_both_ways(&client, &relay2, &mut link2, new, id, 1).await;
    // Relay 1 told neither its client nor the broker.
    expect_quiet(&mut link1, "relay 1 after left").await;
    let got = session_pull(&client, &relay1, old).await;
    assert!(of(&got, id).is_empty(), "{got:?}");
    let (m1, m2) = (relay1.metrics(), relay2.metrics());
    assert_eq!((m1.connections_moved, m2.connections_moved), (0, 1));
    relay1.shutdown().await;
    relay2.shutdown().await;
}
