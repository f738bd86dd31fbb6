//! Focused tests of single mechanisms of the connection. The seeded lossy-network simulator
//! lives in `tests/simulator.rs`.

use super::*;

fn cfg() -> ConnectionConfig {
    ConnectionConfig {
        recv_window: 8,
        max_data_payload: 1000,
        send_buffer: 64 * 1024,
        ..ConnectionConfig::default()
    }
}

fn pair(now: Instant) -> (Connection, Connection) {
    let c = cfg();
    (
        Connection::new(7, c.recv_window, c.clone(), now),
        Connection::new(7, c.recv_window, c, now),
    )
}

fn drain(c: &mut Connection, now: Instant) -> Vec<Packet> {
    std::iter::from_fn(|| c.poll_transmit(now)).collect()
}

/// A timeout's setting: `a` writes `data` and sends it at `now` (the packets are returned,
/// not delivered), then its first retransmission timeout fires. Returns the packets sent, the
/// timeout's instant and what the timeout resent.
fn send_then_time_out(
    a: &mut Connection,
    data: &[u8],
    now: Instant,
) -> (Vec<Packet>, Instant, Vec<Packet>) {
    a.write(data).unwrap();
    let sent = drain(a, now);
    let deadline = a.poll_timeout().unwrap();
    a.handle_timeout(deadline);
    let resent = drain(a, deadline);
    (sent, deadline, resent)
}

/// A pair whose `a` has measured one round trip of `rtt`: it sent 2,000 bytes of 1s (two
/// packets, acknowledged at once) and has their ACK. Returns the pair and the ACK's instant.
fn pair_after_a_round_trip(rtt: Duration) -> (Connection, Connection, Instant) {
    let t0 = Instant::now();
    let (mut a, mut b) = pair(t0);
    a.write(&[1u8; 2000]).unwrap();
    for p in drain(&mut a, t0) {
        b.handle_packet(p, t0 + rtt / 2);
    }
    let t1 = t0 + rtt;
    for p in drain(&mut b, t0 + rtt / 2) {
        a.handle_packet(p, t1);
    }
    assert_eq!(a.srtt, Some(rtt));
    (a, b, t1)
}

fn seqs(packets: &[Packet]) -> Vec<u32> {
    packets.iter().map(|p| p.seq).collect()
}

fn read_all(c: &mut Connection) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(Some(n)) = c.read(&mut buf) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    out
}

/// Moves packets both ways until nothing more is sent, optionally reading on the receiver.
fn exchange(a: &mut Connection, b: &mut Connection, now: Instant) {
    for _ in 0..1000 {
        let from_a = drain(a, now);
        let from_b = drain(b, now);
        if from_a.is_empty() && from_b.is_empty() {
            return;
        }
        for p in from_a {
            b.handle_packet(p, now);
        }
        for p in from_b {
            a.handle_packet(p, now);
        }
    }
    panic!("exchange did not settle");
}

#[test]
fn small_writes_are_coalesced_into_one_packet() {
    let now = Instant::now();
    let (mut a, _) = pair(now);
    for _ in 0..100 {
        assert_eq!(a.write(b"x").unwrap(), 1);
    }
    let sent = drain(&mut a, now);
    let data: Vec<_> = sent.iter().filter(|p| p.kind == PacketType::Data).collect();
    assert_eq!(data.len(), 1);
    assert_eq!(data[0].payload.len(), 100);
}

#[test]
fn a_bulk_write_bytes_is_sent_without_a_copy_and_a_short_one_is_coalesced() {
    let now = Instant::now();
    let (mut a, mut b) = pair(now);
    let bulk = Bytes::from((0..10_000u32).map(|i| i as u8).collect::<Vec<_>>());
    let mut rest = bulk.clone();
    assert_eq!(a.write_bytes(&mut rest).unwrap(), 10_000);
    assert!(rest.is_empty());
    // A short write_bytes is appended to a copied chunk, like `write`.
    let mut short = Bytes::from_static(b"abc");
    assert_eq!(a.write_bytes(&mut short).unwrap(), 3);
    assert_eq!(a.write(b"def").unwrap(), 3);
    let sent = drain(&mut a, now);
    let data: Vec<_> = sent.iter().filter(|p| p.kind == PacketType::Data).collect();
    let sizes: Vec<_> = data.iter().map(|p| p.payload.len()).collect();
    assert_eq!(sizes, [1000; 8], "cut at max_data_payload, window of 8");
    // The payloads are slices of the written buffer, not copies of it.
    let start = bulk.as_ptr() as usize;
    assert_eq!(data[1].payload.as_ptr() as usize, start + 1000);
    for p in sent {
        b.handle_packet(p, now);
    }
    exchange(&mut a, &mut b, now);
    let mut expected = bulk.to_vec();
    expected.extend_from_slice(b"abcdef");
    let mut got = read_all(&mut b);
    exchange(&mut a, &mut b, now);
    got.extend(read_all(&mut b));
    assert_eq!(got, expected);
}

#[test]
fn write_bytes_takes_what_the_send_buffer_has_room_for() {
    let now = Instant::now();
    let (mut a, _) = pair(now);
    let mut data = Bytes::from(vec![1u8; 100 * 1024]);
    assert_eq!(a.write_bytes(&mut data).unwrap(), 64 * 1024);
    assert_eq!(data.len(), 36 * 1024, "the rest stays with the caller");
    assert_eq!(a.write_bytes(&mut data).unwrap(), 0, "full");
    a.close().unwrap();
    assert!(matches!(
        a.write_bytes(&mut data),
        Err(StreamError::WriteAfterClose)
    ));
}

#[test]
fn sender_stops_at_the_window_and_resumes_on_update() {
    let now = Instant::now();
    let (mut a, mut b) = pair(now);
    let data = vec![5u8; 20_000];
    assert_eq!(a.write(&data).unwrap(), 20_000);
    let first = drain(&mut a, now);
    assert_eq!(first.len(), 8, "window of 8 packets");
    for p in first {
        b.handle_packet(p, now);
    }
    // b's application has read nothing: its ACK closes the window.
    let acks = drain(&mut b, now);
    assert_eq!(acks.len(), 1);
    assert_eq!(acks[0].window, 0);
    for p in acks {
        a.handle_packet(p, now);
    }
    assert!(drain(&mut a, now).is_empty(), "window is closed");
    // Reading a quarter of the window sends an update without being asked.
    let mut buf = [0u8; 2000];
    assert_eq!(b.read(&mut buf).unwrap(), Some(2000));
    let update = drain(&mut b, now);
    assert_eq!(update.len(), 1);
    assert_eq!(update[0].window, 2);
    for p in update {
        a.handle_packet(p, now);
    }
    assert_eq!(drain(&mut a, now).len(), 2);
}

#[test]
fn a_smaller_window_keeps_the_edge_announced_and_a_larger_one_is_announced_at_once() {
    let now = Instant::now();
    let (mut a, mut b) = pair(now);
    assert_eq!(a.write(&vec![5u8; 40_000]).unwrap(), 40_000);
    // b moves to a relay that holds 4 packets: what a may already send (8) still comes.
    b.set_recv_window(4);
    assert!(drain(&mut b, now).is_empty(), "shrinking sends nothing");
    let first = drain(&mut a, now);
    assert_eq!(first.len(), 8, "the window announced before");
    for p in first {
        b.handle_packet(p, now);
    }
    let acks = drain(&mut b, now);
    assert_eq!(acks.len(), 1);
    assert_eq!(acks[0].window, 0, "all 8 taken, none dropped");
    assert_eq!(b.stats().bytes_received, 8_000);
    for p in acks {
        a.handle_packet(p, now);
    }
    // Once read, the window is the new size: a sends 4 more, not 8.
    assert_eq!(read_all(&mut b).len(), 8_000);
    for p in drain(&mut b, now) {
        a.handle_packet(p, now);
    }
    let second = drain(&mut a, now);
    assert_eq!(second.len(), 4);
    for p in second {
        b.handle_packet(p, now);
    }
    assert_eq!(read_all(&mut b).len(), 4_000);
    // Back to a relay that holds 16: an ACK announces it without waiting for data.
    b.set_recv_window(16);
    let update = drain(&mut b, now);
    assert_eq!(update.len(), 1);
    assert_eq!((update[0].kind, update[0].window), (PacketType::Ack, 16));
    for p in update {
        a.handle_packet(p, now);
    }
    assert_eq!(drain(&mut a, now).len(), 16);
}

#[test]
fn stale_ack_never_shrinks_the_window() {
    let now = Instant::now();
    let (mut a, _) = pair(now);
    let newer = Packet::new(PacketType::Ack, 7, Bytes::new())
        .with_seq(u32::MAX)
        .with_window(8);
    a.handle_packet(newer, now);
    let edge = a.peer_right_edge();
    let stale = Packet::new(PacketType::Ack, 7, Bytes::new())
        .with_seq(u32::MAX)
        .with_window(0);
    a.handle_packet(stale, now);
    assert_eq!(a.peer_right_edge(), edge);
}

#[test]
fn whole_lost_batch_is_resent_after_the_timeout() {
    let now = Instant::now();
    let (mut a, mut b) = pair(now);
    let (lost, deadline, resent) = send_then_time_out(&mut a, &[1u8; 5000], now);
    assert_eq!(lost.len(), 5);
    assert_eq!(deadline, now + Duration::from_secs(1), "initial RTO");
    assert_eq!(resent.len(), 1, "the timeout resends the first packet only");
    assert_eq!(resent[0].seq, 0);
    for p in resent {
        b.handle_packet(p, deadline);
    }
    // The copy's ack comes back alone: the rest of the batch was lost with it.
    let back = deadline + Duration::from_millis(20);
    for p in drain(&mut b, back) {
        a.handle_packet(p, back);
    }
    let rest = drain(&mut a, back);
    assert_eq!(
        seqs(&rest),
        vec![1, 2, 3, 4],
        "the rest of the batch is resent on that ack, without another timeout"
    );
    assert_eq!(a.stats().retransmits, 5);
    for p in rest {
        b.handle_packet(p, back);
    }
    exchange(&mut a, &mut b, back);
    assert_eq!(read_all(&mut b), vec![1u8; 5000]);
    // Back-off doubled the timeout; the next one uses it.
    a.write(&[2u8; 10]).unwrap();
    drain(&mut a, deadline);
    assert_eq!(a.rto_deadline, Some(deadline + Duration::from_secs(2)));
}

#[test]
fn a_timeout_that_was_only_a_delay_costs_one_packet() {
    let now = Instant::now();
    let (mut a, mut b) = pair(now);
    // A queue holds the batch past the timeout (as a session's shared upstream can).
    let (delayed, deadline, copies) = send_then_time_out(&mut a, &[4u8; 8000], now);
    assert_eq!(delayed.len(), 8);
    assert_eq!(copies.len(), 1, "one packet per timeout, not the window");
    // The queue drains: the originals arrive one by one, 5 ms apart, and each ack the
    // receiver sends reaches the sender; the acks pass the resent packet, so nothing else is
    // resent, however long the sender waits between them.
    let mut t = deadline + Duration::from_millis(300);
    for p in delayed {
        b.handle_packet(p, t);
        for ack in drain(&mut b, t) {
            a.handle_packet(ack, t);
        }
        assert!(drain(&mut a, t).is_empty());
        t += Duration::from_millis(5);
        if let Some(check) = a.poll_timeout().filter(|&d| d <= t) {
            a.handle_timeout(check);
            assert!(
                drain(&mut a, check).is_empty(),
                "nothing resent at {check:?}"
            );
        }
    }
    b.handle_timeout(t); // its delayed ack of the last one
    for ack in drain(&mut b, t) {
        a.handle_packet(ack, t);
    }
    assert_eq!(a.stats().retransmits, 1);
    assert_eq!(a.rto_deadline, None, "everything is acknowledged");
    // The copy arrives after all, as a duplicate; the stream is intact.
    for p in copies {
        b.handle_packet(p, t);
    }
    exchange(&mut a, &mut b, t);
    assert_eq!(read_all(&mut b), vec![4u8; 8000]);
    assert_eq!(a.stats().retransmits, 1);
}

#[test]
fn after_a_timeout_the_packets_an_ack_leaves_behind_are_resent_without_another_timeout() {
    let now = Instant::now();
    let (mut a, mut b) = pair(now);
    let (mut sent, deadline, copy) = send_then_time_out(&mut a, &[6u8; 5000], now);
    assert_eq!(sent.len(), 5);
    assert_eq!(copy.len(), 1);
    // Packet 0's original and packets 3 and 4 are lost; 1 and 2 were only late.
    sent.truncate(3);
    sent.remove(0);
    let t = deadline + Duration::from_millis(40);
    for p in copy.into_iter().chain(sent) {
        b.handle_packet(p, t);
    }
    b.handle_timeout(t + Duration::from_millis(5));
    for ack in drain(&mut b, t + Duration::from_millis(5)) {
        a.handle_packet(ack, t + Duration::from_millis(5));
    }
    assert!(
        drain(&mut a, t).is_empty(),
        "3 and 4 were sent with 1 and 2: not given up yet"
    );
    // They are deemed lost once out as long as 2 took, plus the margin, well before the
    // backed-off timer (2 s).
    let check = a.poll_timeout().unwrap();
    assert!(
        check < deadline + Duration::from_millis(300),
        "{:?}",
        check - deadline
    );
    a.handle_timeout(check);
    let rest = drain(&mut a, check);
    assert_eq!(seqs(&rest), vec![3, 4]);
    for p in rest {
        b.handle_packet(p, check);
    }
    exchange(&mut a, &mut b, check);
    assert_eq!(read_all(&mut b), vec![6u8; 5000]);
    assert_eq!(a.stats().retransmits, 3);
}

#[test]
fn a_second_timeout_in_a_row_resends_everything() {
    let now = Instant::now();
    let (mut a, mut b) = pair(now);
    let (lost, first, copy) = send_then_time_out(&mut a, &[5u8; 3000], now);
    assert_eq!(lost.len(), 3);
    assert_eq!(seqs(&copy), vec![0]); // lost too
    let second = a.poll_timeout().unwrap();
    assert_eq!(second, first + Duration::from_secs(2), "backed off");
    a.handle_timeout(second);
    let all = drain(&mut a, second);
    assert_eq!(seqs(&all), vec![0, 1, 2]);
    for p in all {
        b.handle_packet(p, second);
    }
    exchange(&mut a, &mut b, second);
    assert_eq!(read_all(&mut b), vec![5u8; 3000]);
    // A timeout after the recovery ended resends one packet only again.
    let (lost, _, copy) = send_then_time_out(&mut a, &[7u8; 2000], second);
    assert_eq!(lost.len(), 2);
    assert_eq!(copy.len(), 1);
}

#[test]
fn selective_acks_trigger_fast_retransmit_of_the_hole() {
    let now = Instant::now();
    let (mut a, mut b) = pair(now);
    a.write(&[3u8; 6000]).unwrap();
    let mut sent = drain(&mut a, now);
    assert_eq!(sent.len(), 6);
    sent.remove(1); // lose packet 1
    for p in sent {
        b.handle_packet(p, now);
    }
    for p in drain(&mut b, now) {
        a.handle_packet(p, now);
    }
    assert!(
        drain(&mut a, now).is_empty(),
        "a fresh hole may be reordering: not resent yet"
    );
    let check = a.poll_timeout().unwrap();
    // RTT measured as 0 here (no time passes in this test): the floor applies.
    assert_eq!(check, now + MIN_REORDER_WINDOW, "reorder window");
    a.handle_timeout(check);
    let resent = drain(&mut a, check);
    assert_eq!(resent.len(), 1, "only the hole is resent, before the RTO");
    assert_eq!(resent[0].seq, 1);
    b.handle_packet(resent[0].clone(), check);
    exchange(&mut a, &mut b, check);
    assert_eq!(read_all(&mut b), vec![3u8; 6000]);
}

#[test]
fn a_hole_in_the_tail_of_a_burst_is_resent_a_round_trip_later_not_at_the_timeout() {
    let rtt = Duration::from_millis(10);
    let (mut a, mut b, t1) = pair_after_a_round_trip(rtt);
    // A burst of three whose second packet is lost: one packet above the hole, and no more
    // to come.
    a.write(&[2u8; 3000]).unwrap();
    let mut sent = drain(&mut a, t1);
    assert_eq!(sent.len(), 3);
    let lost = sent.remove(1);
    let t2 = t1 + rtt;
    for p in sent {
        b.handle_packet(p, t2 - rtt / 2);
    }
    for p in drain(&mut b, t2 - rtt / 2) {
        a.handle_packet(p, t2);
    }
    assert!(
        drain(&mut a, t2).is_empty(),
        "one packet above a hole is not yet a loss"
    );
    // The hole is lost a smoothed RTT plus the reorder window (half of it) after it was sent.
    let check = a.poll_timeout().unwrap();
    assert_eq!(check, t1 + rtt + rtt / 2);
    assert!(check < t1 + a.config.rto_min, "before any timeout");
    a.handle_timeout(check);
    let resent = drain(&mut a, check);
    assert_eq!(seqs(&resent), vec![lost.seq]);
    b.handle_packet(resent[0].clone(), check);
    exchange(&mut a, &mut b, check);
    let mut expected = vec![1u8; 2000];
    expected.extend_from_slice(&[2u8; 3000]);
    assert_eq!(read_all(&mut b), expected);
    assert_eq!(a.stats().retransmits, 1);
}

#[test]
fn a_lost_tail_is_probed_two_round_trips_later_and_repaired_without_the_timeout() {
    let rtt = Duration::from_millis(10);
    let (mut a, mut b, t1) = pair_after_a_round_trip(rtt);
    assert_eq!(a.tail_probe_at, None, "everything is acknowledged");
    // A burst of three whose last two packets are lost: nothing above the hole will be
    // acknowledged, so no selective ack can reveal it.
    a.write(&[2u8; 3000]).unwrap();
    let sent = drain(&mut a, t1);
    assert_eq!(sent.len(), 3);
    b.handle_packet(sent[0].clone(), t1 + rtt / 2);
    let delayed_ack = t1 + rtt / 2 + a.config.ack_delay;
    b.handle_timeout(delayed_ack);
    let t2 = delayed_ack + rtt / 2;
    for p in drain(&mut b, delayed_ack) {
        a.handle_packet(p, t2);
    }
    assert!(drain(&mut a, t2).is_empty(), "nothing is known lost yet");
    // Two smoothed RTTs plus the peer's ACK delay later, the last packet goes again, long
    // before the retransmission timeout.
    let probe_at = a.poll_timeout().unwrap();
    let srtt = a.srtt.unwrap();
    assert_eq!(probe_at, t2 + srtt * 2 + a.config.ack_delay);
    assert!(probe_at < a.rto_deadline.unwrap());
    a.handle_timeout(probe_at);
    let probe = drain(&mut a, probe_at);
    assert_eq!(seqs(&probe), vec![sent[2].seq]);
    assert_eq!(a.stats().tail_probes, 1);
    assert_eq!(a.stats().retransmits, 0);
    // One probe per episode: without an answer, the timer is next.
    assert_eq!(a.poll_timeout(), a.rto_deadline);
    // The probe's copy arrives; its selective ack shows the hole below it, which is resent
    // at once (it has been out far longer than a round trip).
    let t3 = probe_at + rtt / 2;
    b.handle_packet(probe[0].clone(), t3);
    let t4 = t3 + rtt / 2;
    for p in drain(&mut b, t3) {
        a.handle_packet(p, t4);
    }
    let resent = drain(&mut a, t4);
    assert_eq!(seqs(&resent), vec![sent[1].seq]);
    for p in resent {
        b.handle_packet(p, t4);
    }
    exchange(&mut a, &mut b, t4);
    let mut expected = vec![1u8; 2000];
    expected.extend_from_slice(&[2u8; 3000]);
    assert_eq!(read_all(&mut b), expected);
    assert_eq!(a.stats().retransmits, 1);
    assert_eq!(a.stats().tail_probes, 1);
    assert_eq!(a.tail_probe_at, None, "everything is acknowledged");
}

#[test]
fn a_lost_retransmission_is_resent_once_a_packet_sent_after_it_gets_through() {
    let rtt = Duration::from_millis(10);
    let (mut a, mut b, t1) = pair_after_a_round_trip(rtt);
    // Four packets; the first is lost, the three above it reveal the hole at once.
    a.write(&[2u8; 4000]).unwrap();
    let sent = drain(&mut a, t1);
    assert_eq!(sent.len(), 4);
    for p in &sent[1..] {
        b.handle_packet(p.clone(), t1 + rtt / 2);
    }
    let t2 = t1 + rtt;
    for p in drain(&mut b, t1 + rtt / 2) {
        a.handle_packet(p, t2);
    }
    let resent = drain(&mut a, t2);
    assert_eq!(resent.len(), 1);
    assert_eq!(resent[0].seq, sent[0].seq);
    // The resent copy is lost too. A packet written a millisecond later gets through.
    let t3 = t2 + Duration::from_millis(1);
    a.write(&[3u8; 1000]).unwrap();
    let later = drain(&mut a, t3);
    assert_eq!(later.len(), 1);
    b.handle_packet(later[0].clone(), t3 + rtt / 2);
    let t4 = t3 + rtt;
    for p in drain(&mut b, t3 + rtt / 2) {
        a.handle_packet(p, t4);
    }
    // The copy is lost again a round trip and the reorder window after it was sent: before
    // the tail-loss probe or the timeout would have resent it.
    let due = a.poll_timeout().unwrap();
    assert!(due > t4);
    assert!(due < a.tail_probe_at.unwrap() && due < a.rto_deadline.unwrap());
    a.handle_timeout(due);
    let again = drain(&mut a, due);
    assert_eq!(seqs(&again), vec![sent[0].seq]);
    assert_eq!(a.stats().retransmits, 2);
    assert_eq!(a.stats().tail_probes, 0);
    for p in again {
        b.handle_packet(p, due);
    }
    exchange(&mut a, &mut b, due);
    let mut expected = vec![1u8; 2000];
    expected.extend_from_slice(&[2u8; 4000]);
    expected.extend_from_slice(&[3u8; 1000]);
    assert_eq!(read_all(&mut b), expected);
}

#[test]
fn no_tail_probe_before_a_round_trip_is_measured() {
    let now = Instant::now();
    let (mut a, _b) = pair(now);
    a.write(&[1u8; 3000]).unwrap();
    assert_eq!(drain(&mut a, now).len(), 3);
    assert_eq!(a.poll_timeout(), Some(now + a.config.rto_initial));
}

#[test]
fn half_close_then_finish_both_ways() {
    let now = Instant::now();
    let (mut a, mut b) = pair(now);
    a.write(b"request").unwrap();
    a.close().unwrap();
    assert_eq!(a.write(b"more"), Err(StreamError::WriteAfterClose));
    exchange(&mut a, &mut b, now);
    assert_eq!(read_all(&mut b), b"request");
    let mut buf = [0u8; 8];
    assert_eq!(b.read(&mut buf).unwrap(), Some(0), "end of stream");
    // b can still answer after a's half-close.
    b.write(b"reply").unwrap();
    b.close().unwrap();
    exchange(&mut a, &mut b, now);
    assert_eq!(read_all(&mut a), b"reply");
    assert!(a.is_finished() && b.is_finished());
    let events: Vec<_> = std::iter::from_fn(|| a.poll_event()).collect();
    assert_eq!(events, vec![Event::PeerClosed, Event::Finished]);
    assert_eq!(a.poll_timeout(), None);
}

#[test]
fn abort_reaches_the_peer_with_its_reason() {
    let now = Instant::now();
    let (mut a, mut b) = pair(now);
    a.write(b"partial").unwrap();
    a.abort("application gave up");
    let sent = drain(&mut a, now);
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].kind, PacketType::ConnAbort);
    assert!(a.is_finished());
    b.handle_packet(sent[0].clone(), now);
    let mut buf = [0u8; 8];
    assert_eq!(
        b.read(&mut buf),
        Err(StreamError::AbortedByPeer("application gave up".into()))
    );
    assert_eq!(
        b.poll_event(),
        Some(Event::Failed(StreamError::AbortedByPeer(
            "application gave up".into()
        )))
    );
}

#[test]
fn idle_peer_times_out_and_keepalives_are_sent() {
    let now = Instant::now();
    let (mut a, _) = pair(now);
    let keepalive = now + a.config.keepalive_interval;
    assert_eq!(a.poll_timeout(), Some(keepalive));
    a.handle_timeout(keepalive);
    let sent = drain(&mut a, keepalive);
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].kind, PacketType::Ack);
    let idle = now + a.config.idle_timeout;
    a.handle_timeout(idle);
    assert!(matches!(a.error(), Some(StreamError::TimedOut(_))));
    assert_eq!(drain(&mut a, idle)[0].kind, PacketType::ConnAbort);
}

#[test]
fn zero_window_probe_recovers_a_lost_window_update() {
    let now = Instant::now();
    let (mut a, mut b) = pair(now);
    a.write(&[9u8; 9000]).unwrap();
    for p in drain(&mut a, now) {
        b.handle_packet(p, now);
    }
    for p in drain(&mut b, now) {
        a.handle_packet(p, now);
    }
    // b reads everything, but its window update is lost.
    assert_eq!(read_all(&mut b).len(), 8000);
    let lost_update = drain(&mut b, now);
    assert_eq!(lost_update.len(), 1);
    // a probes after a retransmission timeout with the next packet.
    let probe_at = a.poll_timeout().unwrap();
    a.handle_timeout(probe_at);
    let probe = drain(&mut a, probe_at);
    assert_eq!(probe.len(), 1);
    assert_eq!(probe[0].seq, 8);
    for p in probe {
        b.handle_packet(p, probe_at);
    }
    exchange(&mut a, &mut b, probe_at);
    assert_eq!(read_all(&mut b).len(), 1000);
}

#[test]
fn sequence_numbers_wrap() {
    let now = Instant::now();
    let (mut a, mut b) = pair(now);
    a.next_seq = u32::MAX - 2;
    a.peer_ack = u32::MAX - 3;
    a.peer_right_edge = a.peer_ack.wrapping_add(8);
    b.recv_next = u32::MAX - 2;
    b.advertised_right_edge = b.recv_next.wrapping_add(7);
    let data: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
    a.write(&data).unwrap();
    let mut got = Vec::new();
    for _ in 0..10 {
        exchange(&mut a, &mut b, now);
        got.extend(read_all(&mut b));
    }
    assert_eq!(got, data);
    assert!(seq::lt(u32::MAX - 2, a.next_seq));
}

#[test]
fn restored_path_resends_at_once_without_back_off() {
    let now = Instant::now();
    let (mut a, mut b) = pair(now);
    a.write(&[4u8; 3000]).unwrap();
    drain(&mut a, now); // lost in an outage
    let t1 = a.poll_timeout().unwrap();
    a.handle_timeout(t1);
    drain(&mut a, t1); // lost again; the timeout is now 2 s
    let t2 = t1 + Duration::from_millis(500);
    a.on_path_restored(t2);
    let resent = drain(&mut a, t2);
    assert_eq!(
        resent.iter().filter(|p| p.kind == PacketType::Data).count(),
        3
    );
    assert_eq!(a.rto_deadline, Some(t2 + Duration::from_secs(1)));
    for p in resent {
        b.handle_packet(p, t2);
    }
    exchange(&mut a, &mut b, t2);
    assert_eq!(read_all(&mut b), vec![4u8; 3000]);
}

#[test]
fn a_late_original_widens_the_reorder_window() {
    let t0 = Instant::now();
    let (mut a, mut b) = pair(t0);
    a.write(&[6u8; 6000]).unwrap();
    let mut sent = drain(&mut a, t0);
    let late = sent.remove(0); // overtaken, not lost
    let t1 = t0 + Duration::from_millis(10);
    for p in sent {
        b.handle_packet(p, t1);
    }
    for p in drain(&mut b, t1) {
        a.handle_packet(p, t1);
    }
    // The hole is older than the reorder window (half of the 10 ms RTT): resent.
    let resent = drain(&mut a, t1);
    assert_eq!(seqs(&resent), vec![0]);
    assert_eq!(a.reorder_quarters, INITIAL_REORDER_QUARTERS);
    // The original arrives just after: its ACK comes too soon to be for the copy.
    let t2 = t1 + Duration::from_millis(1);
    b.handle_packet(late, t2);
    for p in drain(&mut b, t2) {
        a.handle_packet(p, t2);
    }
    assert_eq!(a.reorder_quarters, INITIAL_REORDER_QUARTERS + 1);
    assert_eq!(read_all(&mut b), vec![6u8; 6000]);
}

#[test]
fn peer_announced_silence_raises_the_idle_timeout_within_its_ceiling() {
    let now = Instant::now();
    let (mut client, mut broker) = pair(now);
    let default_idle = broker.config.idle_timeout;
    // A client that may be cut off for 5 minutes says so; the broker must not give up after
    // its own 60 s.
    client
        .send_option(ConnOption::InactivityTimeoutMs(300_000))
        .unwrap();
    exchange(&mut client, &mut broker, now);
    assert_eq!(
        broker.poll_event(),
        Some(Event::Option(ConnOption::InactivityTimeoutMs(300_000)))
    );
    assert_eq!(broker.config.idle_timeout, Duration::from_secs(300));
    broker.handle_timeout(now + default_idle + Duration::from_secs(1));
    assert_eq!(broker.error(), None, "timed out at the old idle timeout");
    broker.handle_timeout(now + Duration::from_secs(301));
    assert!(matches!(broker.error(), Some(StreamError::TimedOut(_))));

    // Beyond the ceiling, the ceiling applies; a shorter value never lowers the timeout.
    let (mut client, mut broker) = pair(now);
    client
        .send_option(ConnOption::InactivityTimeoutMs(u32::MAX))
        .unwrap();
    client
        .send_option(ConnOption::InactivityTimeoutMs(1_000))
        .unwrap();
    exchange(&mut client, &mut broker, now);
    assert_eq!(
        broker.config.idle_timeout,
        broker.config.max_peer_idle_timeout
    );
}

// ---- delayed ACKs (ConnectionConfig::ack_delay) ----

fn kinds(packets: &[Packet]) -> Vec<PacketType> {
    packets.iter().map(|p| p.kind).collect()
}

#[test]
fn the_ack_of_one_packet_waits_for_the_delay_or_rides_with_the_reply() {
    let now = Instant::now();
    let (mut a, mut b) = pair(now);
    let delay = b.config.ack_delay;
    assert!(!delay.is_zero());
    a.write(b"ping").unwrap();
    for p in drain(&mut a, now) {
        b.handle_packet(p, now);
    }
    // Nothing goes out at once; the timer is the delay.
    assert!(drain(&mut b, now).is_empty());
    assert_eq!(b.poll_timeout(), Some(now + delay));
    // A reply within the delay carries the ACK in the same batch.
    assert_eq!(read_all(&mut b), b"ping");
    b.write(b"pong").unwrap();
    let sent = drain(&mut b, now);
    assert_eq!(kinds(&sent), [PacketType::Data, PacketType::Ack]);
    assert_eq!(sent[1].seq, 0, "acks the ping");
    assert!(drain(&mut b, now + delay).is_empty(), "acked once");

    // No reply: the ACK goes out alone when the delay is over.
    for p in sent {
        a.handle_packet(p, now);
    }
    assert!(drain(&mut a, now).is_empty());
    let later = now + delay;
    a.handle_timeout(later);
    assert_eq!(kinds(&drain(&mut a, later)), [PacketType::Ack]);
}

#[test]
fn every_second_packet_and_anything_out_of_order_is_acked_at_once() {
    let now = Instant::now();
    let (mut a, mut b) = pair(now);
    a.write(&[1u8; 2500]).unwrap(); // three packets of 1000, 1000, 500 bytes
    let sent = drain(&mut a, now);
    assert_eq!(sent.len(), 3);
    b.handle_packet(sent[0].clone(), now);
    assert!(drain(&mut b, now).is_empty(), "first packet: held");
    b.handle_packet(sent[1].clone(), now);
    let acks = drain(&mut b, now);
    assert_eq!((kinds(&acks), acks[0].seq), (vec![PacketType::Ack], 1));

    // A gap: the packet after it is acked at once, with its SACK block.
    let (mut a, mut b) = pair(now);
    a.write(&[2u8; 2500]).unwrap();
    let sent = drain(&mut a, now);
    b.handle_packet(sent[2].clone(), now);
    let acks = drain(&mut b, now);
    assert_eq!(kinds(&acks), [PacketType::Ack]);
    assert!(!acks[0].payload.is_empty(), "carries a SACK block");

    // A duplicate is acked at once too (its first ACK may have been lost).
    let (mut a, mut b) = pair(now);
    a.write(b"x").unwrap();
    let sent = drain(&mut a, now);
    let later = now + b.config.ack_delay;
    b.handle_packet(sent[0].clone(), now);
    b.handle_timeout(later);
    assert_eq!(drain(&mut b, later).len(), 1);
    b.handle_packet(sent[0].clone(), later);
    assert_eq!(kinds(&drain(&mut b, later)), [PacketType::Ack]);
}

#[test]
fn a_zero_ack_delay_acks_everything_at_once() {
    let now = Instant::now();
    let config = ConnectionConfig {
        ack_delay: Duration::ZERO,
        ..cfg()
    };
    let mut a = Connection::new(7, 8, config.clone(), now);
    let mut b = Connection::new(7, 8, config, now);
    a.write(b"x").unwrap();
    for p in drain(&mut a, now) {
        b.handle_packet(p, now);
    }
    assert_eq!(kinds(&drain(&mut b, now)), [PacketType::Ack]);
}

#[test]
fn writes_stop_at_the_unsent_limit_and_resume_as_packets_leave() {
    let now = Instant::now();
    let config = ConnectionConfig {
        unsent_limit: 3000,
        ..cfg()
    };
    let mut a = Connection::new(7, config.recv_window, config.clone(), now);
    let mut b = Connection::new(7, config.recv_window, config, now);
    let data = vec![9u8; 20_000];
    assert_eq!(
        a.write(&data).unwrap(),
        3000,
        "the send buffer has room for all of it"
    );
    assert_eq!(a.send_capacity(), 0);
    assert!(!a.is_writable());
    // Three packets leave: the unsent room is back, the send buffer counts them in flight.
    let sent = drain(&mut a, now);
    assert_eq!(sent.len(), 3);
    assert!(a.is_writable());
    assert_eq!(a.write(&data).unwrap(), 3000);
    // Once the peer's window (8 packets) is full, what waits for it is held to the limit.
    let sent_too = drain(&mut a, now);
    assert_eq!(sent_too.len(), 3);
    assert_eq!(a.write(&data).unwrap(), 3000);
    assert_eq!(drain(&mut a, now).len(), 2, "the window's last two packets");
    assert_eq!(a.send_capacity(), 2000, "1000 bytes wait for the window");
    assert_eq!(a.write(&data).unwrap(), 2000);
    assert_eq!(a.send_capacity(), 0);
    // Every byte written arrives once, in order.
    let mut got = Vec::new();
    for p in sent.into_iter().chain(sent_too) {
        b.handle_packet(p, now);
    }
    got.extend(read_all(&mut b));
    assert_eq!(got.len(), 6000);
}
