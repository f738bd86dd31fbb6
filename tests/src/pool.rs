//! A pool of relays behind HAProxy, as real processes (docs/protocol.md §5.2):
//!
//! ```text
//!                          ┌─▶ relay 1 (--relay-id 1) ◀──┐
//! clients ──HTTP──▶ haproxy ─▶ relay 2 (--relay-id 2) ◀──┼── broker 1 ──┐
//! (tunnel_client)          └─▶ relay 3 (--relay-id 3) ◀──┴── broker 2 ──┴─▶ data server
//! ```
//!
//! Every broker links to every relay (`tunnel-broker --relay A --relay B ...`). HAProxy runs
//! a configuration shipped in `deploy/haproxy/` ([`HaproxyVariant`]). The clients are the
//! `tunnel_client` library in the test process, pointed at HAProxy
//! ([`Pool::client_config`]). Relays can be killed, stopped and started again on the same
//! ports; HAProxy's view of them comes from its stats socket.

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::Instant;
use tunnel_client::{ClientConfig, TunnelClient};
use tunnel_proto::driver::ConnHandle;

use crate::bins::bin_path;
use crate::chain::{BROKER_BIN, RELAY_BIN, RUST_LOG_ENV};
use crate::haproxy::{Haproxy, HaproxyVariant, RelayServer};
use crate::net::{direct_http_client, free_addr, wait_for_http_ok};
use crate::process::{ChildProcess, LOG_TAIL_LINES};
use crate::servers::sink_source::{
    sink_source_exchange, ExchangeError, ExchangeReport, ExchangeSpec,
};
use crate::tempdir::TestDir;
use crate::transfer::TransferOutcome;

/// The relay that made connection or session id `id` (its top byte, docs/protocol.md §5.2).
pub fn relay_of(id: u32) -> u8 {
    (id >> 24) as u8
}

/// How a pool is started.
#[derive(Debug, Clone)]
pub struct PoolOptions {
    /// Relays, with ids 1 ..= `relays`.
    pub relays: u8,
    /// Broker processes, each linked to every relay.
    pub brokers: usize,
    pub variant: HaproxyVariant,
    /// What the brokers forward each connection to (a `SinkSourceServer`).
    pub target: SocketAddr,
    /// Server name the brokers register. Default `e2e`.
    pub server_name: String,
    pub relay_args: Vec<String>,
    pub broker_args: Vec<String>,
    /// `RUST_LOG` of the relays and brokers: `$TUNNEL_TEST_RUST_LOG`, else `info`.
    pub rust_log: String,
    /// Deadline of the start, and of each relay's restart.
    pub ready_timeout: Duration,
}

impl PoolOptions {
    pub fn new(relays: u8, brokers: usize, variant: HaproxyVariant, target: SocketAddr) -> Self {
        PoolOptions {
            relays,
            brokers,
            variant,
            target,
            server_name: "e2e".into(),
            relay_args: Vec::new(),
            broker_args: Vec::new(),
            rust_log: std::env::var(RUST_LOG_ENV).unwrap_or_else(|_| "info".into()),
            ready_timeout: Duration::from_secs(30),
        }
    }
}

/// One relay of the pool: fixed id and ports, a process while it runs.
#[derive(Debug)]
pub struct PoolRelay {
    pub id: u8,
    pub http: SocketAddr,
    pub link: SocketAddr,
    pub process: Option<ChildProcess>,
    starts: u32,
}

/// A running pool. Dropping it kills every process (printing their log tails if the test is
/// panicking) and removes the temp dir unless the test failed.
pub struct Pool {
    pub options: PoolOptions,
    pub relays: Vec<PoolRelay>,
    pub brokers: Vec<ChildProcess>,
    pub haproxy: Haproxy,
    // Declared last so the processes die before their directory goes.
    dir: TestDir,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("relays", &self.relays)
            .field("haproxy", &self.haproxy.addr())
            .field("dir", &self.dir.path())
            .finish_non_exhaustive()
    }
}

impl Pool {
    /// Starts the relays, HAProxy and the brokers, and waits until HAProxy sees every relay
    /// up, every relay has a link from every broker, and a small exchange through HAProxy
    /// works.
    ///
    /// # Panics
    /// When a program is missing (HAProxy: "install the Debian package haproxy") or the pool
    /// is not ready within `ready_timeout`; the processes' log tails are printed.
    pub async fn start(options: PoolOptions) -> Pool {
        assert!(options.relays >= 1, "a pool needs a relay");
        let dir = TestDir::new("pool").expect("creating the pool's temp dir");
        let secret = format!(
            "pool-secret-{}-{}\n",
            std::process::id(),
            crate::net::free_port()
        );
        std::fs::write(dir.path().join("link-secret"), secret).expect("writing the link secret");
        let mut relays: Vec<PoolRelay> = (1..=options.relays)
            .map(|id| PoolRelay {
                id,
                http: free_addr(),
                link: free_addr(),
                process: None,
                starts: 0,
            })
            .collect();
        for relay in &mut relays {
            if let Err(e) = spawn_relay(relay, &options, dir.path()).await {
                panic!("relay {} did not start: {e}", relay.id);
            }
        }
        let servers: Vec<RelayServer> = relays
            .iter()
            .map(|r| RelayServer {
                id: r.id,
                addr: r.http,
            })
            .collect();
        let haproxy = Haproxy::start(dir.path(), options.variant, &servers)
            .await
            .unwrap_or_else(|e| panic!("HAProxy did not start: {e}"));
        let mut pool = Pool {
            options,
            relays,
            brokers: Vec::new(),
            haproxy,
            dir,
        };
        let deadline = Instant::now() + pool.options.ready_timeout;
        for i in 0..pool.options.brokers {
            let broker = pool
                .spawn_broker(&format!("broker{}", i + 1), &[])
                .unwrap_or_else(|e| panic!("broker {} did not start: {e}", i + 1));
            pool.brokers.push(broker);
        }
        for id in 1..=pool.options.relays {
            let name = format!("relay{id}");
            if let Err(e) = pool
                .haproxy
                .wait_server(&name, true, remaining(deadline))
                .await
            {
                panic!("pool not ready: {e}");
            }
            if let Err(e) = pool.wait_links(id, remaining(deadline)).await {
                panic!("pool not ready: {e}");
            }
        }
        if let Err(e) = pool.probe(remaining(deadline)).await {
            panic!("pool not ready: a first exchange through HAProxy failed: {e}");
        }
        pool
    }

    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// The tunnel URL through HAProxy.
    pub fn url(&self) -> String {
        self.haproxy.tunnel_url("/tunnel")
    }

    /// A client configuration for the pool: HAProxy's URL, the pool's server name, no proxy
    /// from the environment, a 30 s connect timeout.
    pub fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new(self.url(), self.options.server_name.clone());
        config.env_proxy = false;
        config.connect_timeout = Duration::from_secs(30);
        config
    }

    /// A new client (its own session) for the pool.
    pub fn client(&self) -> TunnelClient {
        TunnelClient::new(self.client_config()).expect("client configuration")
    }

    pub fn relay(&self, id: u8) -> &PoolRelay {
        &self.relays[usize::from(id - 1)]
    }

    fn relay_mut(&mut self, id: u8) -> &mut PoolRelay {
        &mut self.relays[usize::from(id - 1)]
    }

    /// Starts one more broker process linked to every relay, with the pool's target and
    /// `broker_args` plus `extra`.
    pub fn spawn_broker(&self, label: &str, extra: &[String]) -> io::Result<ChildProcess> {
        let mut args = Vec::new();
        for relay in &self.relays {
            args.push("--relay".to_string());
            args.push(relay.link.to_string());
        }
        args.extend([
            "--name".to_string(),
            self.options.server_name.clone(),
            "--link-secret-file".into(),
            self.dir.path().join("link-secret").display().to_string(),
            "--forward".into(),
            self.options.target.to_string(),
        ]);
        args.extend(self.options.broker_args.iter().cloned());
        args.extend(extra.iter().cloned());
        let env = vec![("RUST_LOG".to_string(), self.options.rust_log.clone())];
        ChildProcess::spawn(label, &bin_path(BROKER_BIN), args, &env, self.dir.path())
    }

    /// SIGKILLs relay `id` (a crash); its ports stay reserved for [`Pool::start_relay`].
    pub async fn kill_relay(&mut self, id: u8) -> io::Result<()> {
        if let Some(mut process) = self.relay_mut(id).process.take() {
            process.kill9().await?;
        }
        Ok(())
    }

    /// SIGTERMs relay `id` (a graceful stop: it answers its held pulls and closes) and waits
    /// for it to exit, at most 15 s (its drain takes 5 s at most).
    pub async fn stop_relay(&mut self, id: u8) -> io::Result<()> {
        if let Some(mut process) = self.relay_mut(id).process.take() {
            process.terminate(Duration::from_secs(15)).await?;
        }
        Ok(())
    }

    /// Starts relay `id` again on its ports and waits until it answers /healthz, HAProxy
    /// counts it up, and every broker has linked to it again.
    pub async fn start_relay(&mut self, id: u8) -> io::Result<()> {
        let deadline = Instant::now() + self.options.ready_timeout;
        let (options, dir) = (self.options.clone(), self.dir.path().to_owned());
        spawn_relay(self.relay_mut(id), &options, &dir).await?;
        self.haproxy
            .wait_server(&format!("relay{id}"), true, remaining(deadline))
            .await?;
        self.wait_links(id, remaining(deadline)).await
    }

    /// Waits until relay `id` has a link from every broker.
    pub async fn wait_links(&self, id: u8, timeout: Duration) -> io::Result<()> {
        let want = self.options.brokers.to_string();
        let deadline = Instant::now() + timeout;
        loop {
            let links = self.relay_metric(id, "tunnel_links_up").await;
            if links.as_deref() == Some(want.as_str()) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "relay {id}: {want} broker links not up within {timeout:?} \
                         (tunnel_links_up = {links:?})"
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A metric line `name value` of relay `id` (unlabelled), read directly (not through
    /// HAProxy); `None` while the relay is down or has no such line.
    pub async fn relay_metric(&self, id: u8, name: &str) -> Option<String> {
        let text = self.relay_metrics(id).await?;
        text.lines().find_map(|line| {
            let (key, value) = line.split_once(' ')?;
            (key == name).then(|| value.trim().to_string())
        })
    }

    /// Relay `id`'s whole /metrics text, `None` while it is down.
    pub async fn relay_metrics(&self, id: u8) -> Option<String> {
        let url = format!("http://{}/metrics", self.relay(id).http);
        let resp = direct_http_client().get(&url).send().await.ok()?;
        resp.text().await.ok()
    }

    /// The sum over the lines of metric `name` (all label sets) of relay `id`.
    pub async fn relay_metric_sum(&self, id: u8, name: &str) -> Option<f64> {
        let text = self.relay_metrics(id).await?;
        Some(
            text.lines()
                .filter(|l| {
                    l.strip_prefix(name)
                        .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
                })
                .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
                .sum(),
        )
    }

    /// One small exchange through HAProxy on a fresh client, retried until `timeout`: the
    /// brokers' capacity reports may lag their links.
    async fn probe(&self, timeout: Duration) -> io::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let attempt = async {
                let stream = self.client().connect().await.map_err(io::Error::from)?;
                sink_source_exchange(stream, &ExchangeSpec::symmetric(1024, 0xAB), STEP)
                    .await
                    .map(|_| ())
                    .map_err(io::Error::other)
            };
            let last = match tokio::time::timeout(remaining(deadline), attempt).await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(e)) => e.to_string(),
                Err(_) => "timed out".into(),
            };
            if Instant::now() >= deadline {
                return Err(io::Error::new(io::ErrorKind::TimedOut, last));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Fails, naming the process, if a relay, broker or HAProxy that should run has exited.
    pub fn check_alive(&mut self) -> io::Result<()> {
        let relays = self.relays.iter_mut().filter_map(|r| r.process.as_mut());
        let others = self
            .brokers
            .iter_mut()
            .chain(std::iter::once(self.haproxy.process()));
        for process in relays.chain(others) {
            process.check_running()?;
        }
        Ok(())
    }

    /// Prints every running process's log tail to stderr.
    pub fn print_logs(&mut self) {
        for relay in &self.relays {
            if let Some(p) = &relay.process {
                p.print_log_tail(LOG_TAIL_LINES);
            }
        }
        for broker in &self.brokers {
            broker.print_log_tail(LOG_TAIL_LINES);
        }
        self.haproxy.process().print_log_tail(LOG_TAIL_LINES);
    }

    /// The log texts of every relay process ever started (all restarts) and every broker,
    /// concatenated: for counting warnings.
    pub fn all_logs(&mut self) -> String {
        let mut text = String::new();
        for entry in std::fs::read_dir(self.dir.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let path = entry.path();
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            if (name.starts_with("relay") || name.starts_with("broker")) && name.ends_with(".log") {
                text.push_str(&String::from_utf8_lossy(
                    &std::fs::read(&path).unwrap_or_default(),
                ));
            }
        }
        text
    }
}

/// Deadline of one step that should just work (a probe exchange).
const STEP: Duration = Duration::from_secs(30);

async fn spawn_relay(
    relay: &mut PoolRelay,
    options: &PoolOptions,
    dir: &std::path::Path,
) -> io::Result<()> {
    assert!(
        relay.process.is_none(),
        "relay {} already running",
        relay.id
    );
    let mut args = vec![
        "--listen".to_string(),
        relay.http.to_string(),
        "--link-listen".into(),
        relay.link.to_string(),
        "--link-secret-file".into(),
        dir.join("link-secret").display().to_string(),
        "--relay-id".into(),
        relay.id.to_string(),
        // HAProxy's address, so the relay takes the client's from X-Forwarded-For.
        "--trusted-proxy".into(),
        "127.0.0.1/32".into(),
    ];
    args.extend(options.relay_args.iter().cloned());
    relay.starts += 1;
    let label = match relay.starts {
        1 => format!("relay{}", relay.id),
        n => format!("relay{}-{n}", relay.id),
    };
    let env = vec![("RUST_LOG".to_string(), options.rust_log.clone())];
    let mut process = ChildProcess::spawn(&label, &bin_path(RELAY_BIN), args, &env, dir)?;
    let url = format!("http://{}/healthz", relay.http);
    let deadline = Instant::now() + options.ready_timeout;
    loop {
        if wait_for_http_ok(&url, Duration::from_millis(250))
            .await
            .is_ok()
        {
            relay.process = Some(process);
            return Ok(());
        }
        if let Some(status) = process.try_exit_status()? {
            return Err(io::Error::other(format!(
                "{label} exited ({status}) before it was ready; log {}:\n{}",
                process.log_path().display(),
                process.log_tail(LOG_TAIL_LINES)
            )));
        }
        if Instant::now() >= deadline {
            relay.process = Some(process);
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "{label}: /healthz not 200 within {:?}",
                    options.ready_timeout
                ),
            ));
        }
    }
}

fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

// ------------------------------------------------------------------------------------------
// Transfers whose progress can be watched while they run

/// Sink/source exchanges running on connections opened through a pool, each connection with
/// its own client (its own session, as separate machines would have), with a handle on each
/// connection to watch its progress.
pub struct Transfers {
    started: Instant,
    bytes_each_way: u64,
    /// Connection id and a handle per connection, in start order.
    pub connections: Vec<(u32, ConnHandle)>,
    tasks: JoinSet<(usize, Result<ExchangeReport, ExchangeError>)>,
}

impl Transfers {
    /// Opens `count` connections through `pool` (one client each; all opened before any data
    /// moves), then starts an exchange of `bytes_each_way` both ways on each, connection `i`
    /// with seed `seed + i`, each within `timeout`.
    pub async fn start(
        pool: &Pool,
        count: usize,
        bytes_each_way: u64,
        seed: u64,
        timeout: Duration,
    ) -> io::Result<Transfers> {
        let started = Instant::now();
        let mut opening = JoinSet::new();
        for i in 0..count {
            let client = pool.client();
            opening.spawn(async move { (i, client.connect().await) });
        }
        let mut streams = Vec::new();
        while let Some(joined) = opening.join_next().await {
            let (i, result) = joined.map_err(io::Error::other)?;
            let stream = result.map_err(|e| io::Error::other(format!("connect {i}: {e}")))?;
            streams.push((i, stream));
        }
        streams.sort_by_key(|(i, _)| *i);
        let mut connections = Vec::new();
        let mut tasks = JoinSet::new();
        for (i, stream) in streams {
            connections.push((stream.conn_id(), stream.handle()));
            let spec = ExchangeSpec::symmetric(bytes_each_way, seed + i as u64);
            tasks.spawn(async move { (i, sink_source_exchange(stream, &spec, timeout).await) });
        }
        Ok(Transfers {
            started,
            bytes_each_way,
            connections,
            tasks,
        })
    }

    /// How many connections each relay made (by the top byte of their ids).
    pub fn relays_used(&self) -> BTreeMap<u8, usize> {
        let mut used = BTreeMap::new();
        for (id, _) in &self.connections {
            *used.entry(relay_of(*id)).or_default() += 1;
        }
        used
    }

    /// Bytes delivered so far to the client on each connection (down direction).
    pub fn received(&self) -> Vec<u64> {
        self.connections
            .iter()
            .map(|(_, h)| h.stats().bytes_received)
            .collect()
    }

    /// Waits for every exchange and accounts for them.
    pub async fn finish(mut self) -> TransferOutcome {
        let mut verified = 0;
        let mut failures = Vec::new();
        while let Some(joined) = self.tasks.join_next().await {
            match joined {
                Ok((_, Ok(report))) => verified += report.sent + report.received,
                Ok((i, Err(e))) => failures.push(format!(
                    "connection {i} (id {:#x}): {e}",
                    self.connections[i].0
                )),
                Err(e) => failures.push(format!("exchange task failed: {e}")),
            }
        }
        failures.sort();
        let connections = self.connections.len() as u64;
        TransferOutcome {
            connections,
            expected: 2 * connections * self.bytes_each_way,
            verified,
            elapsed: self.started.elapsed(),
            failures,
        }
    }
}

/// How long each connection's down direction stood still, watched from a moment (a kill)
/// on: samples every connection's delivered bytes every [`STALL_SAMPLE`], and keeps per
/// connection the longest time between the start and its first progress, or between two
/// progresses. The time after a connection's last progress does not count (it is done).
pub struct StallWatch {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<Vec<Duration>>,
}

/// Sampling period of [`StallWatch`]: the resolution of the stall times it reports.
pub const STALL_SAMPLE: Duration = Duration::from_millis(10);

impl StallWatch {
    /// Starts watching `handles` now.
    pub fn start(handles: Vec<ConnHandle>) -> StallWatch {
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            let start = Instant::now();
            let mut last: Vec<u64> = handles.iter().map(|h| h.stats().bytes_received).collect();
            let mut last_progress = vec![start; handles.len()];
            let mut longest = vec![Duration::ZERO; handles.len()];
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(STALL_SAMPLE) => {}
                    _ = stopped.wait_for(|s| *s) => break,
                }
                let now = Instant::now();
                for (i, handle) in handles.iter().enumerate() {
                    let received = handle.stats().bytes_received;
                    if received != last[i] {
                        longest[i] = longest[i].max(now - last_progress[i]);
                        last_progress[i] = now;
                        last[i] = received;
                    }
                }
            }
            longest
        });
        StallWatch { stop, task }
    }

    /// Stops watching; the longest stall of each connection, in the order given.
    pub async fn finish(self) -> Vec<Duration> {
        let _ = self.stop.send(true);
        self.task.await.unwrap_or_default()
    }
}
