//! The stream driver against an in-memory transport: two connections wired back to back
//! through `PacketSink`s that hand packets to the other side's `ConnHandle`, optionally losing
//! some of them.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::timeout;
use tunnel_proto::connection::StreamError;
use tunnel_proto::driver::{self as stream, ConnHandle, PacketSink, TunnelStream};
use tunnel_proto::{Connection, ConnectionConfig, Packet};

const TEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Delivers every packet to the peer, except a seeded random share that is lost.
struct LossySink {
    peer: OnceLock<ConnHandle>,
    loss: f64,
    rng: Mutex<StdRng>,
}

impl PacketSink for LossySink {
    fn send(&self, packets: Vec<Packet>) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            let Some(peer) = self.peer.get() else { return };
            let kept: Vec<Packet> = {
                let mut rng = self.rng.lock().unwrap();
                packets
                    .into_iter()
                    .filter(|_| !rng.random_bool(self.loss))
                    .collect()
            };
            peer.deliver_all(kept);
        })
    }
}

fn config() -> ConnectionConfig {
    ConnectionConfig {
        // Losses are recovered by timeouts too; keep them short so the test is quick.
        rto_initial: Duration::from_millis(50),
        rto_min: Duration::from_millis(20),
        ..ConnectionConfig::default()
    }
}

struct Pair {
    a: TunnelStream,
    b: TunnelStream,
    a_handle: ConnHandle,
    b_handle: ConnHandle,
}

fn pair(loss: f64, seed: u64) -> Pair {
    let now = tokio::time::Instant::now().into_std();
    // Without loss, the default timeouts: a 20 ms floor would fire spuriously whenever a
    // loaded test machine stalls a task that long, and this test asserts no retransmits.
    let cfg = if loss > 0.0 {
        config()
    } else {
        ConnectionConfig::default()
    };
    let a_conn = Connection::new(7, cfg.recv_window, cfg.clone(), now);
    let b_conn = Connection::new(7, cfg.recv_window, cfg, now);
    let a_sink = Arc::new(LossySink {
        peer: OnceLock::new(),
        loss,
        rng: Mutex::new(StdRng::seed_from_u64(seed)),
    });
    let b_sink = Arc::new(LossySink {
        peer: OnceLock::new(),
        loss,
        rng: Mutex::new(StdRng::seed_from_u64(seed + 1)),
    });
    let (a, a_handle) = stream::spawn(a_conn, a_sink.clone());
    let (b, b_handle) = stream::spawn(b_conn, b_sink.clone());
    a_sink.peer.set(b_handle.clone()).unwrap();
    b_sink.peer.set(a_handle.clone()).unwrap();
    Pair {
        a,
        b,
        a_handle,
        b_handle,
    }
}

fn pattern(len: usize, salt: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(salt) ^ (i >> 11) as u8)
        .collect()
}

/// Writes `data` in uneven pieces, then shuts down (half-close); reads the other direction
/// to its end concurrently.
async fn exchange(stream: TunnelStream, data: Vec<u8>) -> io::Result<Vec<u8>> {
    let (mut r, mut w) = tokio::io::split(stream);
    let writer = async move {
        let mut rest = &data[..];
        let mut piece = 1000;
        while !rest.is_empty() {
            let n = piece.min(rest.len());
            w.write_all(&rest[..n]).await?;
            rest = &rest[n..];
            piece = piece * 3 % 100_000 + 1;
        }
        w.shutdown().await?;
        Ok::<_, io::Error>(w)
    };
    let reader = async move {
        let mut got = Vec::new();
        r.read_to_end(&mut got).await?;
        Ok::<_, io::Error>((r, got))
    };
    let (w, (r, got)) = tokio::try_join!(writer, reader)?;
    // Both halves dropped here, after shutdown: the driver lingers until the close completes.
    drop(r.unsplit(w));
    Ok(got)
}

async fn moves_data_both_ways(loss: f64, seed: u64) {
    let p = pair(loss, seed);
    let to_b = pattern(3 * 1024 * 1024 + 17, 1);
    let to_a = pattern(2 * 1024 * 1024 + 5, 2);
    let (a_got, b_got) = timeout(TEST_TIMEOUT, async {
        tokio::try_join!(exchange(p.a, to_b.clone()), exchange(p.b, to_a.clone()))
    })
    .await
    .expect("exchange timed out")
    .expect("exchange failed");
    assert_eq!(a_got.len(), to_a.len());
    assert!(a_got == to_a, "a received corrupted data");
    assert_eq!(b_got.len(), to_b.len());
    assert!(b_got == to_b, "b received corrupted data");
    // Both closes are acknowledged: both drivers end by themselves.
    timeout(TEST_TIMEOUT, async {
        p.a_handle.closed().await;
        p.b_handle.closed().await;
    })
    .await
    .expect("drivers did not end after both sides closed");
    assert_eq!(p.a_handle.error(), None);
    assert_eq!(p.b_handle.error(), None);
    assert_eq!(p.a_handle.stats().bytes_received, to_a.len() as u64);
    assert_eq!(p.b_handle.stats().bytes_received, to_b.len() as u64);
    let retransmits = p.a_handle.stats().retransmits + p.b_handle.stats().retransmits;
    if loss > 0.0 {
        assert!(
            retransmits > 0,
            "losses must have been repaired by retransmits"
        );
    } else {
        assert_eq!(retransmits, 0, "nothing was lost, nothing to retransmit");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lossless_pair_moves_megabytes_both_ways_with_half_close() {
    moves_data_both_ways(0.0, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lossy_pair_moves_megabytes_both_ways_with_half_close() {
    moves_data_both_ways(0.05, 2).await;
}

#[tokio::test]
async fn half_close_keeps_the_other_direction_open() {
    let p = pair(0.0, 3);
    let (mut a, mut b) = (p.a, p.b);
    timeout(TEST_TIMEOUT, async {
        a.write_all(b"request").await.unwrap();
        a.shutdown().await.unwrap();
        let mut req = Vec::new();
        b.read_to_end(&mut req).await.unwrap();
        assert_eq!(req, b"request");
        // a's write side is closed, b's is not: the answer still flows.
        b.write_all(b"answer").await.unwrap();
        b.shutdown().await.unwrap();
        let mut ans = Vec::new();
        a.read_to_end(&mut ans).await.unwrap();
        assert_eq!(ans, b"answer");
        let err = a.write_all(b"late").await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
    })
    .await
    .expect("timed out");
}

#[tokio::test]
async fn dropping_without_shutdown_resets_the_peer() {
    let p = pair(0.0, 4);
    let mut b = p.b;
    timeout(TEST_TIMEOUT, async {
        drop(p.a);
        let mut buf = [0u8; 16];
        let err = b.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
        p.a_handle.closed().await;
        p.b_handle.closed().await;
    })
    .await
    .expect("timed out");
}

#[tokio::test]
async fn transport_failure_fails_reads_and_writes() {
    let p = pair(0.0, 5);
    let mut a = p.a;
    timeout(TEST_TIMEOUT, async {
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 16];
            let err = a.read(&mut buf).await.unwrap_err();
            (a, err)
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        p.a_handle
            .fail(StreamError::AbortedByPeer("relay forgot us".into()));
        let (mut a, err) = reader.await.unwrap();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
        assert!(err.to_string().contains("relay forgot us"), "{err}");
        let err = a.write_all(b"x").await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
        p.a_handle.closed().await;
        assert!(p.a_handle.is_closed());
    })
    .await
    .expect("timed out");
}

#[tokio::test]
async fn idle_peer_times_out_with_a_paused_clock() {
    tokio::time::pause();
    let now = tokio::time::Instant::now().into_std();
    let cfg = ConnectionConfig {
        idle_timeout: Duration::from_secs(60),
        ..config()
    };
    // The sink loses everything: the peer is silent.
    let sink = Arc::new(LossySink {
        peer: OnceLock::new(),
        loss: 1.0,
        rng: Mutex::new(StdRng::seed_from_u64(6)),
    });
    let (mut s, handle) = stream::spawn(Connection::new(9, 64, cfg, now), sink);
    let mut buf = [0u8; 4];
    let err = timeout(Duration::from_secs(120), s.read(&mut buf))
        .await
        .expect("no idle timeout")
        .unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
    timeout(Duration::from_secs(1), handle.closed())
        .await
        .expect("driver did not end");
}
