//! Stream semantics through the three binaries: many full-duplex transfers at once,
//! half-close, a server that closes first, resets in both directions, and hundreds of
//! concurrent connections.
//!
//! Needs the binaries: `cargo build --workspace --bins && cargo test -p tunnel-tests --test e2e_streams`.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tunnel_tests::data::{hex, seeded_sha256};
use tunnel_tests::fdlimit::raise_nofile_limit;
use tunnel_tests::transfer::parallel_exchanges;
use tunnel_tests::{init_tracing, sha256, Chain, ChainOptions, SeededBytes, SinkSourceServer};

/// Deadline of the big transfers; generous because two cores run three processes and the
/// test, and the dev profile is not fully optimised.
const BULK_TIMEOUT: Duration = Duration::from_secs(300);
/// Deadline of small exchanges.
const SMALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How soon a reset must reach the other end ("promptly").
const RESET_DEADLINE: Duration = Duration::from_secs(5);

/// (a) 64 connections through one relay and one broker link, each moving 4 MiB up and 4 MiB
/// down at the same time, SHA-256 checked at both ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_connections_move_4_mib_each_way_at_once() {
    init_tracing();
    const CONNECTIONS: u64 = 64;
    const BYTES_EACH_WAY: u64 = 4 << 20;
    let server = SinkSourceServer::start().await.unwrap();
    let mut chain = Chain::start(ChainOptions::forward_to_sink_source(server.addr())).await;
    let baseline = server.settled_stats().await;

    let outcome = parallel_exchanges(
        chain.client_addr(),
        CONNECTIONS,
        BYTES_EACH_WAY,
        64_000,
        BULK_TIMEOUT,
    )
    .await;
    outcome.assert_complete(&server, &baseline);
    eprintln!(
        "64 x 4 MiB each way: {} MiB in {:?} ({:.1} MiB/s both directions together); relay dropped {} packets",
        outcome.verified >> 20,
        outcome.elapsed,
        outcome.mib_per_sec(),
        chain.relay_metric("tunnel_packets_dropped_total").await
    );
    chain.assert_alive();
}

/// A server that reads until EOF, then answers the length (u64 BE) and SHA-256 of what it
/// got, then closes.
async fn start_hash_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut got = Vec::new();
                let read = tokio::time::timeout(BULK_TIMEOUT, s.read_to_end(&mut got)).await;
                if !matches!(read, Ok(Ok(_))) {
                    return;
                }
                let mut answer = (got.len() as u64).to_be_bytes().to_vec();
                answer.extend_from_slice(&sha256(&got));
                let _ = s.write_all(&answer).await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

/// (b) Half-close: the client shuts its write side down and still reads the whole reply,
/// which the server can only send after seeing that EOF.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_then_read_the_full_reply() {
    init_tracing();
    let server = start_hash_server().await;
    let mut options = ChainOptions::forward_to_echo(server);
    options.probe = tunnel_tests::ReadyProbe::PortsOnly;
    let mut chain = Chain::start(options).await;

    for (len, seed) in [(0usize, 1u64), (1, 2), (3 * 65536 + 17, 3), (2 << 20, 4)] {
        let data = SeededBytes::new(seed).take_vec(len);
        let mut s = chain.connect().await.unwrap();
        let exchange = async {
            s.write_all(&data).await?;
            s.shutdown().await?;
            let mut reply = Vec::new();
            s.read_to_end(&mut reply).await?;
            Ok::<_, io::Error>(reply)
        };
        let reply = tokio::time::timeout(SMALL_TIMEOUT, exchange)
            .await
            .unwrap_or_else(|_| panic!("half-close exchange of {len} bytes timed out"))
            .unwrap_or_else(|e| panic!("half-close exchange of {len} bytes: {e}"));
        assert_eq!(reply.len(), 40, "reply to {len} bytes: {reply:?}");
        assert_eq!(
            u64::from_be_bytes(reply[..8].try_into().unwrap()),
            len as u64,
            "server's byte count"
        );
        assert_eq!(
            hex(&reply[8..]),
            hex(&sha256(&data)),
            "server's SHA-256 of {len} bytes"
        );
    }
    chain.assert_alive();
}

/// A server that sends `len` seeded bytes at once, shuts its write side, waits for the
/// peer's EOF (or an error), and closes. Reports each connection's end on `ends`.
async fn start_reply_and_close_server(
    len: usize,
    seed: u64,
) -> (SocketAddr, mpsc::UnboundedReceiver<io::Result<u64>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let data = SeededBytes::new(seed).take_vec(len);
                let result = async {
                    s.write_all(&data).await?;
                    s.shutdown().await?;
                    // Whatever the client sends after our close is read and counted, so
                    // closing never turns into a reset because of unread bytes.
                    let mut sink = Vec::new();
                    let n = tokio::time::timeout(BULK_TIMEOUT, s.read_to_end(&mut sink))
                        .await
                        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "peer idle"))??;
                    Ok::<_, io::Error>(n as u64)
                }
                .await;
                let _ = tx.send(result);
            });
        }
    });
    (addr, rx)
}

/// (c) The server writes its reply and closes first: the client reads all of it, then EOF;
/// writing afterwards neither hangs nor disturbs the relay (the bytes may be delivered to the
/// server's half-open socket, discarded, or the write may fail).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_closes_first_client_reads_all_then_eof() {
    init_tracing();
    const LEN: usize = 1_500_000;
    const SEED: u64 = 77;
    let (server, mut ends) = start_reply_and_close_server(LEN, SEED).await;
    let mut options = ChainOptions::forward_to_echo(server);
    options.probe = tunnel_tests::ReadyProbe::PortsOnly;
    let mut chain = Chain::start(options).await;

    let mut s = chain.connect().await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(SMALL_TIMEOUT, s.read_to_end(&mut got))
        .await
        .expect("reading the server's reply timed out")
        .expect("reading the server's reply");
    assert_eq!(got.len(), LEN, "reply length");
    assert_eq!(hex(&sha256(&got)), hex(&seeded_sha256(SEED, LEN as u64)));

    // Late writes: each must complete (Ok or an error) without hanging.
    let late = SeededBytes::new(78).take_vec(10_000);
    let mut outcomes = Vec::new();
    for _ in 0..5 {
        let outcome = tokio::time::timeout(SMALL_TIMEOUT, s.write_all(&late))
            .await
            .expect("a write after the server's close hung");
        let failed = outcome.is_err();
        outcomes.push(outcome.map_err(|e| e.kind()));
        if failed {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = tokio::time::timeout(SMALL_TIMEOUT, s.shutdown()).await;
    drop(s);
    eprintln!("writes after the server's close: {outcomes:?}");

    // The server side of that connection ends (EOF or error), not left hanging.
    let end = tokio::time::timeout(SMALL_TIMEOUT, ends.recv())
        .await
        .expect("the server's connection never ended")
        .expect("server task gone");
    eprintln!("server connection ended: {end:?}");

    // The tunnel still works for the next connection.
    let mut s = chain.connect().await.unwrap();
    let mut again = Vec::new();
    tokio::time::timeout(SMALL_TIMEOUT, s.read_to_end(&mut again))
        .await
        .expect("second reply timed out")
        .expect("second reply");
    assert_eq!(hex(&sha256(&again)), hex(&seeded_sha256(SEED, LEN as u64)));
    chain.assert_alive();
}

/// What the resetting server saw of each connection.
#[derive(Debug)]
struct ServerSide {
    /// Bytes read before the connection ended or was reset by us.
    read: u64,
    /// How its reads ended, when the client reset first.
    end: Option<io::Result<usize>>,
    /// When that end was seen.
    at: Instant,
}

/// A server that, per connection, reads the first message byte `b'R'` (reset: it then
/// closes with SO_LINGER 0, which sends a TCP RST) or `b'W'` (wait: it reads until EOF or
/// an error and reports it).
async fn start_reset_server() -> (SocketAddr, mpsc::UnboundedReceiver<ServerSide>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut first = [0u8; 1];
                if !matches!(
                    tokio::time::timeout(SMALL_TIMEOUT, s.read_exact(&mut first)).await,
                    Ok(Ok(_))
                ) {
                    return; // a port probe, or nothing sent
                }
                match first[0] {
                    b'R' => {
                        s.set_zero_linger().unwrap();
                        drop(s);
                        let _ = tx.send(ServerSide {
                            read: 1,
                            end: None,
                            at: Instant::now(),
                        });
                    }
                    _ => {
                        let counted = AtomicU64::new(1);
                        let mut buf = vec![0u8; 65536];
                        let end = loop {
                            match tokio::time::timeout(BULK_TIMEOUT, s.read(&mut buf)).await {
                                Err(_) => {
                                    break Err(io::Error::new(io::ErrorKind::TimedOut, "idle"))
                                }
                                Ok(Ok(0)) => break Ok(0),
                                Ok(Ok(n)) => {
                                    counted.fetch_add(n as u64, Ordering::Relaxed);
                                }
                                Ok(Err(e)) => break Err(e),
                            }
                        };
                        let _ = tx.send(ServerSide {
                            read: counted.load(Ordering::Relaxed),
                            end: Some(end),
                            at: Instant::now(),
                        });
                    }
                }
            });
        }
    });
    (addr, rx)
}

/// (d) Aborts: the forward target resets its connection → the client's local socket sees a
/// reset or EOF promptly; the client's local socket is reset → the target sees a reset or
/// EOF promptly. Neither end hangs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resets_reach_the_other_end_promptly() {
    init_tracing();
    let (server, mut sides) = start_reset_server().await;
    let mut options = ChainOptions::forward_to_echo(server);
    options.probe = tunnel_tests::ReadyProbe::PortsOnly;
    let mut chain = Chain::start(options).await;

    // Target resets: keep the client's socket reading, with data flowing up, until it ends.
    let mut s = chain.connect().await.unwrap();
    s.write_all(b"R").await.unwrap();
    let side = tokio::time::timeout(SMALL_TIMEOUT, sides.recv())
        .await
        .expect("the target never got the reset request")
        .unwrap();
    let reset_at = side.at;
    let mut buf = [0u8; 1024];
    let seen = tokio::time::timeout(RESET_DEADLINE + Duration::from_secs(1), async {
        match s.read(&mut buf).await {
            Ok(0) => "EOF".to_string(),
            Ok(n) => panic!("the resetting target sent nothing, yet {n} bytes arrived"),
            Err(e) => format!("error {:?}: {e}", e.kind()),
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!("the client's local socket did not see the target's reset within {RESET_DEADLINE:?}")
    });
    let after = reset_at.elapsed();
    eprintln!("target reset seen by the local socket after {after:?}: {seen}");
    assert!(after <= RESET_DEADLINE, "took {after:?}");

    // Local socket reset: the target must see its connection end.
    let mut s = chain.connect().await.unwrap();
    s.write_all(b"W").await.unwrap();
    s.write_all(&SeededBytes::new(5).take_vec(100_000))
        .await
        .unwrap();
    // Let the bytes arrive first, so the end is not mistaken for a lost start.
    tokio::time::sleep(Duration::from_millis(500)).await;
    s.set_zero_linger().unwrap();
    let reset_at = Instant::now();
    drop(s);
    let side = tokio::time::timeout(RESET_DEADLINE + Duration::from_secs(1), sides.recv())
        .await
        .unwrap_or_else(|_| {
            panic!("the target did not see the local socket's reset within {RESET_DEADLINE:?}")
        })
        .unwrap();
    let after = side.at.duration_since(reset_at);
    eprintln!(
        "local reset seen by the target after {after:?}: read {} bytes, end {:?}",
        side.read, side.end
    );
    assert!(after <= RESET_DEADLINE, "took {after:?}");
    assert!(side.read <= 100_001, "{side:?}");
    chain.assert_alive();
}

/// (e) 500 connections open at once, each completing an echo round trip.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_concurrent_echo_round_trips() {
    init_tracing();
    const CONNECTIONS: u64 = 500;
    // Each connection costs sockets in every process: local + HTTP in the client, HTTP in the
    // relay, the test's own end here. The children inherit the limit set now.
    let limit = raise_nofile_limit(8192).expect("raising RLIMIT_NOFILE");
    assert!(
        limit >= 4 * CONNECTIONS + 256,
        "open-files limit {limit} too low for {CONNECTIONS} connections (hard limit too low)"
    );
    let mut chain = Chain::start(ChainOptions::echo()).await;

    let started = Instant::now();
    let addr = chain.client_addr();
    let opened = Arc::new(tokio::sync::Barrier::new(CONNECTIONS as usize));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..CONNECTIONS {
        let opened = Arc::clone(&opened);
        tasks.spawn(async move {
            let round_trip = async {
                let connected = TcpStream::connect(addr).await;
                // All 500 are open before any sends, so they really are concurrent (a failed
                // connect still counts, so the others are not left waiting).
                opened.wait().await;
                let mut s = connected?;
                let data = SeededBytes::new(500_000 + i).take_vec(1000 + i as usize);
                s.write_all(&data).await?;
                s.shutdown().await?;
                let mut back = Vec::with_capacity(data.len());
                s.read_to_end(&mut back).await?;
                if back != data {
                    return Err(io::Error::other(format!(
                        "echo differs: sent {} bytes, got {}",
                        data.len(),
                        back.len()
                    )));
                }
                Ok(())
            };
            (
                i,
                tokio::time::timeout(BULK_TIMEOUT, round_trip)
                    .await
                    .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "timed out"))),
            )
        });
    }
    let mut failures = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        let (i, result) = joined.expect("round-trip task panicked");
        if let Err(e) = result {
            failures.push(format!("connection {i}: {e}"));
        }
    }
    let elapsed = started.elapsed();
    if !failures.is_empty() {
        failures.sort();
        failures.truncate(20);
        panic!(
            "some of {CONNECTIONS} echo round trips failed (first 20 shown):\n{}",
            failures.join("\n")
        );
    }
    eprintln!("{CONNECTIONS} concurrent echo round trips in {elapsed:?} (nofile limit {limit})");
    chain.assert_alive();
}
