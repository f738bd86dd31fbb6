//! Hostile input and overload against a real relay process (`tunnel-servlet`) with a real
//! echo broker (`tunnel-broker --echo`):
//! - malformed bodies get 400, size fields claiming 4 GiB get 400/413 and the relay's RSS
//!   stays flat;
//! - slow headers and slow bodies (slowloris) are cut off by the header/body timeouts while a
//!   normal tunnel connection keeps working;
//! - a flood of 10,000 connects (200 in flight) is served; the relay's RSS is sampled during
//!   the flood and after the connections time out (numbers printed), and a transfer running
//!   meanwhile completes (its speed before and during is printed);
//! - pulls and pushes for random ids get 404 fast;
//! - pushes past the window are forwarded and dropped by the broker without harm.
//!
//! The heavy tests take a shared lock so their timings do not disturb each other.
//! Run: `cargo build --workspace --bins && cargo test -p tunnel-tests --test overload -- --nocapture`.

mod support_raw;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use reqwest::StatusCode;
use support_raw::{ack, client_config, data, echo_transfer, EchoSetup, Raw};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tunnel_proto::packet::HEADER_LEN;
use tunnel_proto::{Packet, PacketType};

/// Serialises the tests that measure time or memory.
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A packet header whose size field says `size` (the decoder checks sizes before the
/// checksum, so the stale checksum is never what refuses it), with no payload behind it.
fn header_claiming(kind: PacketType, conn_id: u32, size: u32) -> Bytes {
    let mut h = BytesMut::from(
        &Packet::new(kind, conn_id, Bytes::new())
            .with_window(16)
            .to_bytes()[..],
    );
    h[4..8].copy_from_slice(&size.to_be_bytes());
    h.freeze()
}

/// Sends `head` on a fresh TCP connection and reads the status line of the answer, within
/// `limit`; `None` when the relay closed without answering.
async fn raw_http(addr: SocketAddr, head: &str, limit: Duration) -> Option<u16> {
    let mut tcp = TcpStream::connect(addr).await.ok()?;
    tcp.write_all(head.as_bytes()).await.ok()?;
    let mut buf = vec![0u8; 256];
    let n = tokio::time::timeout(limit, tcp.read(&mut buf))
        .await
        .expect("relay answered or closed in time")
        .ok()?;
    let text = String::from_utf8_lossy(&buf[..n]);
    text.split(' ').nth(1)?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_huge_bodies_are_refused_without_allocating() {
    let _heavy = HEAVY.lock().await;
    let setup = EchoSetup::start(&[], &[], "info").await;
    let raw = Raw::new(&setup.relay.tunnel_url());
    let rss_before = setup.relay.rss_kib();

    // Connects: not packets, nothing, two packets, a 4 GiB claim.
    let init = Packet::new(PacketType::ConnInit, 0, Bytes::new()).with_window(16);
    let two = tunnel_proto::encode_all(&[init.clone(), init.clone()]);
    let cases: Vec<(&str, Bytes)> = vec![
        (
            "garbage",
            Bytes::from_static(b"this is not a tunnel packet at all"),
        ),
        ("empty", Bytes::new()),
        ("two CONN_INITs", two),
        (
            "4 GiB claim",
            header_claiming(PacketType::ConnInit, 0, u32::MAX),
        ),
        ("truncated", init.to_bytes().slice(..20)),
    ];
    for (what, body) in cases {
        let (status, _) = raw.connect_body(body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "connect with {what}");
    }

    // Pushes on a real connection: a 4 GiB claim, a bad checksum, a foreign type.
    let conn = raw.connect(16).await.expect("connect");
    let hex = conn.token.to_hex();
    let mut bad_sum = BytesMut::from(&data(conn, 0, b"payload").to_bytes()[..]);
    let last = bad_sum.len() - 1;
    bad_sum[last] ^= 0xff;
    let link_init = Packet::new(PacketType::LinkInit, conn.id, Bytes::new()).to_bytes();
    for (what, body) in [
        (
            "4 GiB claim",
            header_claiming(PacketType::Data, conn.id, u32::MAX),
        ),
        ("bad checksum", bad_sum.freeze()),
        ("LINK_INIT from a client", link_init),
    ] {
        let (status, _) = raw.push(conn.id, Some(&hex), body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "push with {what}");
    }

    // Content-Length of 4 GiB, body never sent: refused on the header alone, at once, 50
    // times in parallel; and a 5 MiB body (over the 4 MiB limit) sent chunked.
    let head = format!(
        "POST /tunnel?Type=push&ServerName=raw&ConnId={}\r\nHost: relay\r\nTunnel-Token: {hex}\r\nContent-Length: 4294967296\r\n\r\n",
        conn.id
    )
    .replacen("\r\n", " HTTP/1.1\r\n", 1);
    let mut tasks = JoinSet::new();
    for _ in 0..50 {
        let head = head.clone();
        let addr = setup.relay.http;
        tasks.spawn(async move { raw_http(addr, &head, Duration::from_secs(5)).await });
    }
    while let Some(status) = tasks.join_next().await {
        assert_eq!(status.unwrap(), Some(413), "4 GiB Content-Length");
    }
    // Valid packets, so that the limit refuses it and not the decoding (a push body is
    // decoded as it arrives).
    static PAYLOAD: [u8; 16 * 1024 - HEADER_LEN] = [0u8; 16 * 1024 - HEADER_LEN];
    let packet = data(conn, 0, &PAYLOAD).to_bytes();
    let chunk = [&packet[..], &packet[..], &packet[..], &packet[..]].concat();
    assert_eq!(
        chunked_push(setup.relay.http, conn.id, &hex, chunk, 5 << 20).await,
        Some(413),
        "5 MiB chunked body over the 4 MiB limit"
    );

    // The connection is still fine after all that.
    let got = raw
        .pull_until(conn, Duration::from_secs(10), |p| {
            p.iter().any(|p| p.kind == PacketType::ConnInitAck)
        })
        .await;
    assert!(got.iter().all(|p| p.kind != PacketType::ConnAbort));
    let rss_after = setup.relay.rss_kib();
    println!("relay RSS before hostile bodies {rss_before} KiB, after {rss_after} KiB");
    assert!(
        rss_after < rss_before + 32 * 1024,
        "RSS grew from {rss_before} to {rss_after} KiB: a size claim was allocated"
    );
}

/// Pushes `chunk` over and over, `len` bytes in all, with chunked encoding (no
/// Content-Length, so only the running count can stop it); the status line's code, `None`
/// if the relay closed without one.
async fn chunked_push(
    addr: SocketAddr,
    conn_id: u32,
    hex: &str,
    chunk: Vec<u8>,
    len: usize,
) -> Option<u16> {
    let mut tcp = TcpStream::connect(addr).await.ok()?;
    let head = format!(
        "POST /tunnel?Type=push&ServerName=raw&ConnId={conn_id} HTTP/1.1\r\nHost: relay\r\nTunnel-Token: {hex}\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    tcp.write_all(head.as_bytes()).await.ok()?;
    let (mut rd, mut wr) = tcp.into_split();
    let writer = tokio::spawn(async move {
        let mut sent = 0;
        while sent < len {
            let frame = format!("{:x}\r\n", chunk.len());
            if wr.write_all(frame.as_bytes()).await.is_err()
                || wr.write_all(&chunk).await.is_err()
                || wr.write_all(b"\r\n").await.is_err()
            {
                return;
            }
            sent += chunk.len();
        }
        let _ = wr.write_all(b"0\r\n\r\n").await;
    });
    let mut buf = vec![0u8; 256];
    let n = tokio::time::timeout(Duration::from_secs(10), rd.read(&mut buf))
        .await
        .expect("answer to an oversized chunked body in time")
        .ok()?;
    writer.abort();
    let text = String::from_utf8_lossy(&buf[..n]);
    text.split(' ').nth(1)?.parse().ok()
}

/// Opens `n` TCP connections that trickle `prefix` one byte per `every`; returns how many
/// the relay cut off (EOF or reset) within `limit`, and the longest time one survived.
async fn trickle(
    addr: SocketAddr,
    n: usize,
    prefix: &'static [u8],
    every: Duration,
    limit: Duration,
) -> (usize, Duration) {
    let mut tasks = JoinSet::new();
    for _ in 0..n {
        tasks.spawn(async move {
            let started = Instant::now();
            let Ok(tcp) = TcpStream::connect(addr).await else {
                return None;
            };
            let (mut rd, mut wr) = tcp.into_split();
            let writer = tokio::spawn(async move {
                for byte in prefix {
                    if wr.write_all(std::slice::from_ref(byte)).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(every).await;
                }
                // Keep the socket open, silent, until the relay closes it.
                tokio::time::sleep(Duration::from_secs(3600)).await;
            });
            let mut sink = [0u8; 512];
            let cut = tokio::time::timeout(limit, async {
                loop {
                    match rd.read(&mut sink).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {} // a 408 answer; the close follows
                    }
                }
            })
            .await
            .is_ok();
            writer.abort();
            cut.then(|| started.elapsed())
        });
    }
    let (mut cut, mut longest) = (0, Duration::ZERO);
    while let Some(result) = tasks.join_next().await {
        if let Some(elapsed) = result.unwrap() {
            cut += 1;
            longest = longest.max(elapsed);
        }
    }
    (cut, longest)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_and_bodies_are_cut_off_while_tunnels_keep_working() {
    let _heavy = HEAVY.lock().await;
    let timeouts = [
        "--header-timeout-ms".to_string(),
        "2000".into(),
        "--body-timeout-ms".into(),
        "2000".into(),
    ];
    let setup = EchoSetup::start(&timeouts, &[], "info").await;
    let addr = setup.relay.http;
    let url = setup.relay.tunnel_url();
    let stop = Arc::new(AtomicBool::new(false));
    let transfers = Arc::new(AtomicU64::new(0));
    // Normal traffic all along: fresh connections, 256 KiB echo each.
    let normal = {
        let (stop, transfers, url) = (stop.clone(), transfers.clone(), url.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let stream = tunnel_client::connect(client_config(&url)).await?;
                echo_transfer(stream, 256 * 1024, Duration::from_secs(20)).await?;
                transfers.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
        })
    };
    let limit = Duration::from_secs(8);
    let slow_header: &'static [u8] =
        b"POST /tunnel?Type=connect&ServerName=raw HTTP/1.1\r\nHost: x\r\n";
    let slow_body: &'static [u8] =
        b"POST /tunnel?Type=connect&ServerName=raw HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789";
    let body_head_len = slow_body.len() - 10;
    let (headers, bodies, silent) = tokio::join!(
        trickle(addr, 150, slow_header, Duration::from_secs(1), limit),
        // The headers arrive at once (one write per byte, no pause), then the body trickles.
        trickle_body(
            addr,
            50,
            &slow_body[..body_head_len],
            &slow_body[body_head_len..],
            limit
        ),
        trickle(addr, 50, b"", Duration::from_secs(1), limit),
    );
    stop.store(true, Ordering::Relaxed);
    let normal = tokio::time::timeout(Duration::from_secs(30), normal)
        .await
        .expect("normal traffic finished")
        .expect("normal traffic task");
    let done = transfers.load(Ordering::Relaxed);
    println!(
        "slow headers cut: {}/150 (longest {:?}); slow bodies cut: {}/50 (longest {:?}); silent connections cut: {}/50 (longest {:?}); normal echo transfers meanwhile: {done}",
        headers.0, headers.1, bodies.0, bodies.1, silent.0, silent.1
    );
    normal.expect("normal tunnel traffic kept working during the slowloris");
    assert!(
        done >= 3,
        "only {done} normal transfers during the slowloris"
    );
    assert_eq!(
        headers.0, 150,
        "slow headers not all cut off within {limit:?}"
    );
    assert_eq!(bodies.0, 50, "slow bodies not all cut off within {limit:?}");
    assert_eq!(
        silent.0, 50,
        "silent connections not all cut off within {limit:?}"
    );
}

/// Like [`trickle`], but `head` is sent at once and `body` one byte per second.
async fn trickle_body(
    addr: SocketAddr,
    n: usize,
    head: &'static [u8],
    body: &'static [u8],
    limit: Duration,
) -> (usize, Duration) {
    let mut tasks = JoinSet::new();
    for _ in 0..n {
        tasks.spawn(async move {
            let started = Instant::now();
            let mut tcp = TcpStream::connect(addr).await.ok()?;
            tcp.write_all(head).await.ok()?;
            let (mut rd, mut wr) = tcp.into_split();
            let writer = tokio::spawn(async move {
                for byte in body {
                    if wr.write_all(std::slice::from_ref(byte)).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                tokio::time::sleep(Duration::from_secs(3600)).await;
            });
            let mut sink = [0u8; 512];
            let cut = tokio::time::timeout(limit, async {
                loop {
                    match rd.read(&mut sink).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                }
            })
            .await
            .is_ok();
            writer.abort();
            cut.then(|| started.elapsed())
        });
    }
    let (mut cut, mut longest) = (0, Duration::ZERO);
    while let Some(result) = tasks.join_next().await {
        if let Some(elapsed) = result.unwrap() {
            cut += 1;
            longest = longest.max(elapsed);
        }
    }
    (cut, longest)
}

/// Samples the relay's VmRSS every 100 ms until stopped; the peak in KiB.
fn rss_sampler(pid: u32, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut peak = 0;
        while !stop.load(Ordering::Relaxed) {
            peak = peak.max(support_raw::vm_rss_kib(pid).unwrap_or(0));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        peak
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_flood_memory_is_bounded_and_returned_and_transfers_continue() {
    const FLOOD: usize = 10_000;
    const IN_FLIGHT: usize = 200;
    const TRANSFER: usize = 8 << 20;
    let _heavy = HEAVY.lock().await;
    // 10,000 pull-less connections plus the HTTP sockets need descriptors.
    let _ = tunnel_tests::fdlimit::raise_nofile_limit(20_000);
    let setup = EchoSetup::start(
        &["--inactivity-ms".to_string(), "5000".into()],
        &["--max-connections", "20000", "--accept-backlog", "20000"],
        "warn",
    )
    .await;
    let url = setup.relay.tunnel_url();
    let pid = setup.relay.pid();

    // Baseline.
    let stream = tunnel_client::connect(client_config(&url))
        .await
        .expect("connect");
    let before = echo_transfer(stream, TRANSFER, Duration::from_secs(60))
        .await
        .expect("baseline transfer");
    let rss_idle = setup.relay.rss_kib();

    // The flood, with a transfer started alongside it.
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = rss_sampler(pid, stop.clone());
    let flood_started = Instant::now();
    let flood = {
        let raw = Raw::new(&url);
        tokio::spawn(async move {
            let slots = Arc::new(Semaphore::new(IN_FLIGHT));
            let mut tasks = JoinSet::new();
            let mut ok = 0usize;
            let mut other = Vec::new();
            for _ in 0..FLOOD {
                let permit = slots.clone().acquire_owned().await.unwrap();
                let raw = raw.clone();
                tasks.spawn(async move {
                    let _permit = permit;
                    raw.connect(16).await.map(|_| ())
                });
                while let Some(done) = tasks.try_join_next() {
                    match done.unwrap() {
                        Ok(()) => ok += 1,
                        Err(status) => other.push(status),
                    }
                }
            }
            while let Some(done) = tasks.join_next().await {
                match done.unwrap() {
                    Ok(()) => ok += 1,
                    Err(status) => other.push(status),
                }
            }
            (ok, other)
        })
    };
    let during_started = Instant::now();
    let stream = tunnel_client::connect(client_config(&url))
        .await
        .expect("connect during the flood");
    let during = echo_transfer(stream, TRANSFER, Duration::from_secs(90))
        .await
        .expect("transfer during the flood");
    let during_took = during_started.elapsed();
    let (ok, refused) = flood.await.unwrap();
    let flood_took = flood_started.elapsed();
    let open_after_flood = setup.relay.metric("tunnel_open_connections").await;

    // The raw connections never pull or push again: the relay drops them after 5 s.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let open = setup.relay.metric("tunnel_open_connections").await;
        if open == Some(0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "tunnel_open_connections still {open:?} 60 s after the flood"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let emptied_after = flood_started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let peak = sampler.await.unwrap();
    // Give the allocator a moment to hand pages back after the last entries went.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after = setup.relay.rss_kib();
    let (rss_idle_mib, peak_mib, after_mib) = (
        rss_idle as f64 / 1024.0,
        peak as f64 / 1024.0,
        rss_after as f64 / 1024.0,
    );
    println!(
        "flood: {ok}/{FLOOD} connects answered 200 in {flood_took:.1?} ({IN_FLIGHT} in flight), refused: {}; open right after: {open_after_flood:?}; all gone {emptied_after:.1?} after the flood began",
        refused.len()
    );
    println!(
        "relay RSS: idle {rss_idle_mib:.1} MiB, peak during flood {peak_mib:.1} MiB, after timeout {after_mib:.1} MiB"
    );
    println!(
        "echo transfer of {} MiB: {before:.1} MiB/s before, {during:.1} MiB/s during the flood (ratio {:.2}, took {during_took:.1?})",
        TRANSFER >> 20,
        during / before
    );
    assert!(
        ok >= FLOOD * 99 / 100,
        "only {ok} of {FLOOD} connects succeeded; refusals: {:?}",
        &refused[..refused.len().min(10)]
    );
    // Bounded: 10,000 idle connections must not cost more than ~20 KiB each.
    assert!(
        peak < rss_idle + 200 * 1024,
        "peak RSS {peak_mib:.1} MiB for {FLOOD} connections (idle {rss_idle_mib:.1} MiB)"
    );
    // Nothing keeps growing once the connections are gone. The peak is sampled, so the true
    // one can be a little higher than what we saw: allow 8 MiB over it.
    assert!(
        rss_after <= peak + 8 * 1024,
        "RSS after the timeout ({after_mib:.1} MiB) well above the sampled peak ({peak_mib:.1} MiB)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_and_pushes_for_random_ids_are_refused_fast() {
    let _heavy = HEAVY.lock().await;
    let setup = EchoSetup::start(&[], &[], "info").await;
    let raw = Raw::new(&setup.relay.tunnel_url());
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for i in 0..1000u32 {
        let raw = raw.clone();
        tasks.spawn(async move {
            let id = rand::random::<u32>() | 1;
            let token = tunnel_proto::Token(rand::random()).to_hex();
            let t = Instant::now();
            let (status, _) = if i % 2 == 0 {
                raw.pull(id, Some(&token)).await
            } else {
                raw.push(id, Some(&token), Bytes::new()).await
            };
            (status, t.elapsed())
        });
        if tasks.len() >= 100 {
            let (status, took) = tasks.join_next().await.unwrap().unwrap();
            assert_eq!(status, StatusCode::NOT_FOUND);
            assert!(took < Duration::from_secs(2), "a refusal took {took:?}");
        }
    }
    while let Some(done) = tasks.join_next().await {
        let (status, took) = done.unwrap();
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(took < Duration::from_secs(2), "a refusal took {took:?}");
    }
    let all = started.elapsed();
    println!("1000 pulls/pushes for random ids: all 404 in {all:?}");
    assert!(all < Duration::from_secs(20));
    // A server nobody registered: 503 for pulls (it may not be re-announced yet), and 503
    // for connects too while the relay is younger than its name grace (its brokers may be
    // re-linking after a restart, docs/protocol.md §2).
    let mut stranger = Raw::new(&setup.relay.tunnel_url());
    stranger.server = "nobody".into();
    let token = tunnel_proto::Token(rand::random()).to_hex();
    let t = Instant::now();
    let (status, _) = stranger.pull(7, Some(&token)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        stranger.connect(16).await.unwrap_err(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert!(t.elapsed() < Duration::from_secs(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_past_the_window_are_dropped_by_the_broker_harmlessly() {
    let _heavy = HEAVY.lock().await;
    let setup = EchoSetup::start(&[], &[], "info").await;
    let raw = Raw::new(&setup.relay.tunnel_url());
    let conn = raw.connect(16).await.expect("connect");
    let got = raw
        .pull_until(conn, Duration::from_secs(10), |p| {
            p.iter().any(|p| p.kind == PacketType::ConnInitAck)
        })
        .await;
    let window = got
        .iter()
        .find(|p| p.kind == PacketType::ConnInitAck)
        .unwrap()
        .window;
    // Far past the broker's window, in a batch with in-window data: the relay forwards
    // everything (200), the broker must keep only seq 0.
    let far = u32::from(window) + 1000;
    let mut batch = vec![data(conn, 0, b"first-")];
    for i in 0..20 {
        batch.push(data(conn, far + i, b"PAST-THE-WINDOW"));
    }
    let mut seen = raw.push_packets(conn, &batch).await;
    // Then more in-window data; the echo must return exactly "first-second".
    seen.extend(raw.push_packets(conn, &[data(conn, 1, b"second")]).await);
    let mut echoed: std::collections::BTreeMap<u32, Bytes> = Default::default();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        for p in seen.drain(..) {
            assert_ne!(p.kind, PacketType::ConnAbort, "connection aborted: {p:?}");
            if p.kind == PacketType::Data {
                echoed.insert(p.seq, p.payload);
            }
        }
        let text: Vec<u8> = echoed.values().flat_map(|b| b.to_vec()).collect();
        if text.len() >= b"first-second".len() {
            assert_eq!(text, b"first-second", "the echo holds only in-window data");
            let last = *echoed.keys().last().unwrap();
            raw.push_packets(conn, &[ack(conn, last)]).await;
            break;
        }
        assert!(Instant::now() < deadline, "echo incomplete: {text:?}");
        let (status, body) = raw.pull(conn.id, Some(&conn.token.to_hex())).await;
        assert_eq!(status, StatusCode::OK);
        seen.extend(tunnel_proto::decode_all(body, 1 << 21).unwrap());
    }
    // Still healthy: one more round trip on the same connection.
    let mut back = raw.push_packets(conn, &[data(conn, 2, b"-third")]).await;
    back.extend(
        raw.pull_until(conn, Duration::from_secs(10), |p| {
            p.iter().any(|p| p.kind == PacketType::Data)
        })
        .await,
    );
    assert!(back.iter().all(|p| p.kind != PacketType::ConnAbort));
    let third: Vec<u8> = back
        .iter()
        .filter(|p| p.kind == PacketType::Data)
        .flat_map(|p| p.payload.to_vec())
        .collect();
    assert_eq!(third, b"-third");
}
