//! Faults of the broker's link to the relay, with the real binaries:
//!
//! ```text
//! test ──▶ client ──HTTP──▶ relay --link-listen ◀── TcpCutter ◀── broker ──▶ SinkSourceServer
//! ```
//!
//! - a cut shorter than the relay's grace period: transfers in progress finish intact;
//! - a cut longer than the grace period: clients' local TCP connections end (the relay sends
//!   CONN_ABORT when the grace period is over), busy and idle alike, instead of hanging;
//! - the broker killed (SIGKILL) and started again: the new broker does not know the old
//!   connections; their clients get an abort (measured);
//!
//! A relay restart (idle and busy) is covered by `e2e_restart.rs`.
//!
//! Needs the binaries: `cargo build --workspace --bins && cargo test -p tunnel-tests --test link_faults -- --nocapture`.

use std::io;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tunnel_tests::chain::BROKER_BIN;
use tunnel_tests::servers::sink_source::MAGIC;
use tunnel_tests::tcp_cutter::TcpCutter;
use tunnel_tests::transfer::{parallel_exchanges, TransferOutcome};
use tunnel_tests::{
    bin_path, init_tracing, Chain, ChainOptions, ChildProcess, ReadyProbe, SinkSourceServer,
    SinkSourceStats,
};

/// The relay's grace period in these tests (`--broker-grace-ms`): short, so the long-cut
/// case is quick.
const GRACE: Duration = Duration::from_secs(5);
/// The short cut, well under [`GRACE`].
const SHORT_CUT: Duration = Duration::from_secs(1);
/// How long after the grace period a client may take to see its connection end: the relay
/// sweeps its deadlines periodically and the client fetches the abort with its next pull.
const ABORT_SLACK: Duration = Duration::from_secs(5);
/// Connections and bytes each way of the busy transfers. 64 MiB each way takes about a
/// second here, so the cut lands in the middle.
const CONNECTIONS: u64 = 2;
const BYTES_EACH_WAY: u64 = 64 << 20;
/// Deadline of each exchange (only hit by a bug; the measured times are printed).
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(120);
/// Deadline for the path to work end to end (broker linked) after a start or a restore.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Deadline for the progress a test waits for before it injects the fault.
const PROGRESS_TIMEOUT: Duration = Duration::from_secs(60);

/// A chain whose broker dials the relay through a [`TcpCutter`].
struct LinkRig {
    server: SinkSourceServer,
    chain: Chain,
    cutter: TcpCutter,
    broker: Option<ChildProcess>,
    broker_starts: u32,
}

impl LinkRig {
    async fn start(relay_args: &[&str]) -> LinkRig {
        init_tracing();
        let server = SinkSourceServer::start().await.unwrap();
        let options = ChainOptions {
            probe: ReadyProbe::PortsOnly,
            relay_args: relay_args.iter().map(|s| s.to_string()).collect(),
            ..ChainOptions::forward_to_sink_source(server.addr())
        };
        let mut chain = Chain::start(options).await;
        // The chain's own broker dials the relay directly; replace it by one that goes
        // through the cutter.
        chain.kill_broker().await.unwrap();
        let cutter = TcpCutter::start(chain.relay_link_addr()).await.unwrap();
        let mut rig = LinkRig {
            server,
            chain,
            cutter,
            broker: None,
            broker_starts: 0,
        };
        rig.start_broker();
        rig.chain.options.probe = ReadyProbe::SinkSource;
        rig.chain
            .wait_path_ready(READY_TIMEOUT)
            .await
            .expect("path through the cutter");
        rig
    }

    fn start_broker(&mut self) {
        assert!(self.broker.is_none(), "broker already running");
        self.broker_starts += 1;
        let args = vec![
            "--relay".to_string(),
            self.cutter.addr().to_string(),
            "--name".into(),
            self.chain.options.server_name.clone(),
            "--link-secret-file".into(),
            // Where the chain writes its link secret.
            self.chain.dir().join("link-secret").display().to_string(),
            "--forward".into(),
            self.server.addr().to_string(),
            // The same instance at every start, so a restarted broker replaces its old link
            // (docs/protocol.md §5.1) instead of joining the pool next to it.
            "--instance-id".into(),
            "0123456789abcdef0123456789abcdef".into(),
        ];
        let env = vec![("RUST_LOG".to_string(), self.chain.options.rust_log.clone())];
        let label = format!("broker-via-cutter-{}", self.broker_starts);
        self.broker = Some(
            ChildProcess::spawn(&label, &bin_path(BROKER_BIN), args, &env, self.chain.dir())
                .expect("starting the broker"),
        );
    }

    async fn kill_broker(&mut self) {
        if let Some(mut broker) = self.broker.take() {
            broker.kill9().await.expect("SIGKILL the broker");
        }
    }

    async fn links_up(&self) -> String {
        self.chain.relay_metric("tunnel_links_up").await
    }

    /// Waits until the relay's `tunnel_links_up` reads `want`.
    async fn wait_links_up(&self, want: &str, timeout: Duration) -> Duration {
        let started = Instant::now();
        loop {
            let now = self.links_up().await;
            if now == want {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < timeout,
                "tunnel_links_up is {now}, expected {want} within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn print_logs(&self) {
        self.chain.print_logs();
        if let Some(broker) = &self.broker {
            broker.print_log_tail(50);
        }
    }
}

/// Starts the busy transfers in a task; it returns the outcome and when it ended.
fn spawn_busy(rig: &LinkRig, seed: u64) -> JoinHandle<(TransferOutcome, Instant)> {
    let addr = rig.chain.client_addr();
    tokio::spawn(async move {
        let outcome =
            parallel_exchanges(addr, CONNECTIONS, BYTES_EACH_WAY, seed, EXCHANGE_TIMEOUT).await;
        (outcome, Instant::now())
    })
}

/// Waits until the server has received and sent a quarter of the busy transfers, then checks
/// they are not finished (the fault must land mid-transfer).
async fn wait_mid_transfer(server: &SinkSourceServer, baseline: &SinkSourceStats) {
    let total = CONNECTIONS * BYTES_EACH_WAY;
    let deadline = Instant::now() + PROGRESS_TIMEOUT;
    loop {
        let stats = server.stats();
        let up = stats.bytes_received - baseline.bytes_received;
        let down = stats.bytes_sent - baseline.bytes_sent;
        if up >= total / 4 && down >= total / 4 {
            assert!(
                up < total && down < total,
                "the transfer finished before the fault; make it bigger ({stats:?})"
            );
            eprintln!(
                "fault injected at {} MiB up, {} MiB down of {} MiB each way",
                up >> 20,
                down >> 20,
                total >> 20
            );
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no progress to a quarter within {PROGRESS_TIMEOUT:?}: {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// An idle connection: a sink/source exchange that sent its header and a few bytes (seen
/// by the server, so the path is known to work) and then waits, sending nothing.
async fn open_idle_connection(rig: &LinkRig) -> TcpStream {
    const PROBE: usize = 1000;
    let before = rig.server.stats().bytes_received;
    let mut stream = rig.chain.connect().await.unwrap();
    let mut header = Vec::from(&MAGIC[..]);
    header.extend_from_slice(&0u64.to_be_bytes()); // nothing down
    header.extend_from_slice(&0u64.to_be_bytes());
    header.extend_from_slice(&[0x5A; PROBE]);
    stream.write_all(&header).await.unwrap();
    let deadline = Instant::now() + READY_TIMEOUT;
    while rig.server.stats().bytes_received < before + PROBE as u64 {
        assert!(
            Instant::now() < deadline,
            "the idle connection's first bytes never reached the server"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stream
}

/// How an idle connection ended: waits for EOF or an error on its read side.
async fn wait_idle_end(stream: &mut TcpStream, timeout: Duration) -> Result<String, String> {
    let mut buf = [0u8; 64];
    match tokio::time::timeout(timeout, stream.read(&mut buf)).await {
        Ok(Ok(0)) => Ok("EOF".into()),
        Ok(Ok(n)) => Err(format!("{n} unexpected bytes")),
        Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionReset => Ok("reset".into()),
        Ok(Err(e)) => Ok(format!("error {e}")),
        Err(_) => Err(format!("still open after {timeout:?}")),
    }
}

fn row(case: &str, outcome: &TransferOutcome, took: Duration) {
    eprintln!(
        "| {case} | {} MiB verified of {} MiB | {} bytes lost | {:.2} s |",
        outcome.verified >> 20,
        outcome.expected >> 20,
        outcome.lost(),
        took.as_secs_f64()
    );
}

/// (a) A cut shorter than the grace period: the broker redials through the restored path,
/// re-announces its connections, and the transfers in progress complete with matching
/// SHA-256 at both ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_link_cut_keeps_connections_intact() {
    let grace = GRACE.as_millis().to_string();
    let rig = LinkRig::start(&["--broker-grace-ms", &grace]).await;
    let baseline = rig.server.stats();
    let started = Instant::now();
    let busy = spawn_busy(&rig, 0x11AC_0000);

    wait_mid_transfer(&rig.server, &baseline).await;
    rig.cutter.cut();
    let cut_at = Instant::now();
    let down_after = rig.wait_links_up("0", Duration::from_secs(5)).await;
    tokio::time::sleep(SHORT_CUT.saturating_sub(cut_at.elapsed())).await;
    rig.cutter.restore();
    let relinked_after = rig.wait_links_up("1", GRACE).await;
    eprintln!(
        "relay saw the link down {down_after:?} after the cut; link back {relinked_after:?} after the restore"
    );

    let (outcome, ended) = busy.await.expect("busy task");
    let took = ended - started;
    row(
        &format!("link cut {SHORT_CUT:?} < grace {GRACE:?}"),
        &outcome,
        took,
    );
    if !outcome.failures.is_empty() {
        rig.print_logs();
    }
    assert!(
        outcome.failures.is_empty(),
        "transfers across a short link cut failed:\n{}",
        outcome.failures.join("\n")
    );
    assert_eq!(outcome.lost(), 0);
    let stats = rig.server.stats();
    assert_eq!(
        stats.bytes_received - baseline.bytes_received,
        CONNECTIONS * BYTES_EACH_WAY,
        "server received each byte once: {stats:?}"
    );
    assert_eq!(
        stats.completed - baseline.completed,
        CONNECTIONS,
        "{stats:?}"
    );
    assert!(rig.cutter.stats().severed >= 1, "{:?}", rig.cutter.stats());
}

/// (b) A cut longer than the grace period: every client connection of that broker, busy or
/// idle, ends within the grace period plus a few seconds; after the path comes back, new
/// connections work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_link_cut_aborts_clients_after_the_grace_period() {
    let grace = GRACE.as_millis().to_string();
    let mut rig = LinkRig::start(&["--broker-grace-ms", &grace]).await;
    let baseline = rig.server.stats();
    let mut idle = open_idle_connection(&rig).await;
    let started = Instant::now();
    let busy = spawn_busy(&rig, 0x10C0_0000);

    wait_mid_transfer(&rig.server, &baseline).await;
    rig.cutter.cut();
    let cut_at = Instant::now();
    let limit = GRACE + ABORT_SLACK;

    let idle_end = wait_idle_end(&mut idle, limit + Duration::from_secs(30)).await;
    let idle_after = cut_at.elapsed();
    let (outcome, ended) = tokio::time::timeout(limit + Duration::from_secs(30), busy)
        .await
        .expect("busy transfers still running long after the grace period")
        .expect("busy task");
    let busy_after = ended.saturating_duration_since(cut_at);
    eprintln!("idle connection ended ({idle_end:?}) {idle_after:?} after the cut");
    eprintln!(
        "busy transfers ended {busy_after:?} after the cut: {:?}",
        outcome.failures
    );
    row(
        &format!("link cut > grace {GRACE:?} (busy; ends by abort)"),
        &outcome,
        ended - started,
    );

    let idle_end = idle_end.expect("the idle connection must end after the grace period");
    assert!(
        idle_after <= limit,
        "idle connection ended ({idle_end}) only {idle_after:?} after the cut (limit {limit:?})"
    );
    assert!(
        busy_after <= limit,
        "busy transfers ended only {busy_after:?} after the cut (limit {limit:?})"
    );
    assert_eq!(
        outcome.failures.len() as u64,
        CONNECTIONS,
        "every busy transfer must fail, none may complete over a dead link: {:?}",
        outcome.failures
    );
    // The abort comes from the grace period, not from something earlier.
    assert!(
        idle_after >= GRACE.saturating_sub(Duration::from_millis(500)),
        "idle connection ended {idle_after:?} after the cut, before the grace period {GRACE:?}"
    );

    // The path heals: the broker relinks and new connections work.
    rig.cutter.restore();
    rig.chain
        .wait_path_ready(READY_TIMEOUT)
        .await
        .expect("new connection after the link came back");
    rig.chain.assert_alive();
    if let Some(broker) = rig.broker.as_mut() {
        assert!(broker.try_exit_status().unwrap().is_none(), "broker exited");
    }
}

/// (c) The broker killed with SIGKILL and started again with the same `--instance-id`: the
/// new broker knows none of the old connections. Client packets for them reach it through the relay and it answers
/// CONN_ABORT, so busy clients see their connection reset soon after the new broker
/// links; idle ones at their next packet (the connection's keepalive, 15 s by default).
/// The relay's grace period is left at its default (30 s) so that it is not what ends them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_aborts_its_old_connections() {
    // Default grace period: what ends the connections must be the new broker.
    const DEFAULT_GRACE: Duration = Duration::from_secs(30);
    /// Longest time from the new broker's start to a busy client's reset.
    const BUSY_LIMIT: Duration = Duration::from_secs(15);
    /// Idle connections send nothing until their keepalive (15 s) after their last packet.
    const IDLE_LIMIT: Duration = Duration::from_secs(25);
    let mut rig = LinkRig::start(&[]).await;
    let baseline = rig.server.stats();
    let mut idle = open_idle_connection(&rig).await;
    let started = Instant::now();
    let busy = spawn_busy(&rig, 0x4E57_0000);

    wait_mid_transfer(&rig.server, &baseline).await;
    rig.kill_broker().await;
    let killed_at = Instant::now();
    rig.wait_links_up("0", Duration::from_secs(5)).await;
    rig.start_broker();
    let relinked = rig.wait_links_up("1", READY_TIMEOUT).await;
    let restarted_at = Instant::now();
    eprintln!("new broker linked {relinked:?} after its start");

    let (outcome, ended) = tokio::time::timeout(BUSY_LIMIT + Duration::from_secs(30), busy)
        .await
        .expect("busy transfers still running long after the broker restart")
        .expect("busy task");
    let busy_after = ended.saturating_duration_since(restarted_at);
    eprintln!(
        "busy transfers ended {busy_after:?} after the new broker linked ({:?} after the kill): {:?}",
        ended.saturating_duration_since(killed_at),
        outcome.failures
    );
    row(
        "broker SIGKILL + restart (busy; ends by abort)",
        &outcome,
        ended - started,
    );
    let idle_end = wait_idle_end(&mut idle, IDLE_LIMIT + Duration::from_secs(30)).await;
    let idle_after = restarted_at.elapsed();
    eprintln!(
        "idle connection ended ({idle_end:?}) {idle_after:?} after the new broker linked ({:?} after the kill)",
        killed_at.elapsed()
    );

    assert_eq!(
        outcome.failures.len() as u64,
        CONNECTIONS,
        "the old connections cannot complete with a broker that lost them: {:?}",
        outcome.failures
    );
    assert!(
        busy_after <= BUSY_LIMIT,
        "busy clients saw the abort only {busy_after:?} after the new broker linked"
    );
    let idle_end = idle_end.expect("the idle connection must end");
    assert!(
        idle_after <= IDLE_LIMIT && killed_at.elapsed() < DEFAULT_GRACE,
        "idle connection ended ({idle_end}) only {idle_after:?} after the new broker linked"
    );
    // The new broker serves new connections.
    rig.chain
        .wait_path_ready(READY_TIMEOUT)
        .await
        .expect("new connection after the broker restart");
    rig.chain.assert_alive();
}
