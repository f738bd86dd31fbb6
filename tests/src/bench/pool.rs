//! The bench's `pool` section: aggregate throughput of many connections through 1, 2 and 3
//! relays behind HAProxy (deploy/haproxy/haproxy.cfg, rendered by
//! `tunnel_tests::haproxy`), against the 3-hop TCP chain and a tunnel with one relay and no
//! HAProxy, all measured in the same run, with the CPU each kind of process spends per GiB.
//!
//! Every tunnel setup has the same clients and brokers: `clients` client processes (each its
//! own session, so HAProxy spreads them over the relays) sharing the connections round-robin,
//! and `brokers` broker processes each linked to every relay.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use tokio::time::Instant;
use tunnel_tests::haproxy::{Haproxy, HaproxyVariant, RelayServer};
use tunnel_tests::net::direct_http_client;
use tunnel_tests::{free_addr, procfs, wait_for_http_ok, ChildProcess, TestDir};

use super::measure;
use super::report::{num, Json};
use super::stats::{median, ratio};
use super::tunnel::{self, bin, rust_log, READY_TIMEOUT};

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;
const SERVER_NAME: &str = "bench";

/// Parameters of the section (from the bench's options).
#[derive(Debug, Clone)]
pub struct PoolOptions {
    /// Relay counts to measure behind HAProxy, e.g. [1, 2, 3].
    pub relay_counts: Vec<u8>,
    pub clients: usize,
    pub brokers: usize,
    pub conns: usize,
    pub bytes: u64,
    pub runs: usize,
    pub timeout: Duration,
}

/// One measured setup.
#[derive(Debug, Default)]
pub struct PoolRow {
    pub label: String,
    /// MiB/s both directions, one per run.
    pub rates: Vec<f64>,
    /// CPU seconds by kind of process (relays, haproxy, brokers, clients, hops) over all
    /// runs, and the bytes those runs moved.
    pub cpu: BTreeMap<String, f64>,
    pub bytes_moved: f64,
    /// Connections each relay took over all runs (its `tunnel_connects_total`), by relay id.
    pub connects_per_relay: BTreeMap<u8, f64>,
}

/// The section's results.
#[derive(Debug)]
pub struct PoolResults {
    pub options: PoolOptions,
    pub rows: Vec<PoolRow>,
}

/// A running setup: its processes by kind, the client entries, and the relays' addresses.
struct Setup {
    label: String,
    entries: Vec<SocketAddr>,
    /// (kind, process); kind is `relay`, `haproxy`, `broker`, `client` or `hop`.
    processes: Vec<(String, ChildProcess)>,
    /// (relay id, HTTP address), to read their metrics.
    relays: Vec<(u8, SocketAddr)>,
    _haproxy: Option<Haproxy>,
    _dir: Option<TestDir>,
}

impl Setup {
    fn check_alive(&mut self) -> io::Result<()> {
        for (kind, process) in &mut self.processes {
            if let Some(status) = process.try_exit_status()? {
                return Err(io::Error::other(format!(
                    "{}: {kind} {} exited ({status}); log tail:\n{}",
                    self.label,
                    process.label(),
                    process.log_tail(20)
                )));
            }
        }
        if let Some(haproxy) = &mut self._haproxy {
            if let Some(status) = haproxy.process().try_exit_status()? {
                return Err(io::Error::other(format!(
                    "{}: haproxy exited ({status}); log tail:\n{}",
                    self.label,
                    haproxy.process().log_tail(20)
                )));
            }
        }
        Ok(())
    }

    /// CPU seconds by kind of process, now.
    fn cpu(&mut self) -> BTreeMap<String, f64> {
        let mut by_kind = BTreeMap::new();
        let haproxy = self
            ._haproxy
            .as_mut()
            .and_then(|h| h.process().id())
            .map(|pid| ("haproxy".to_string(), pid));
        let pids = self
            .processes
            .iter()
            .filter_map(|(kind, p)| Some((kind.clone(), p.id()?)))
            .chain(haproxy);
        for (kind, pid) in pids {
            if let Ok(secs) = procfs::cpu_seconds(pid) {
                *by_kind.entry(kind).or_insert(0.0) += secs;
            }
        }
        by_kind
    }

    /// `tunnel_connects_total` of each relay.
    async fn connects(&self) -> BTreeMap<u8, f64> {
        let mut out = BTreeMap::new();
        for (id, http) in &self.relays {
            let url = format!("http://{http}/metrics");
            let Ok(resp) = direct_http_client().get(&url).send().await else {
                continue;
            };
            let text = resp.text().await.unwrap_or_default();
            let value = text.lines().find_map(|l| {
                let (k, v) = l.split_once(' ')?;
                (k == "tunnel_connects_total").then(|| v.trim().parse::<f64>().ok())?
            });
            out.insert(*id, value.unwrap_or(f64::NAN));
        }
        out
    }
}

/// What a tunnel setup is: relays behind HAProxy, or one relay reached directly.
#[derive(Debug, Clone, Copy)]
enum Front {
    Haproxy(u8),
    Direct,
}

async fn start_tunnel_setup(
    bin_dir: &Path,
    target: SocketAddr,
    options: &PoolOptions,
    front: Front,
) -> io::Result<Setup> {
    let (relay_count, label) = match front {
        Front::Haproxy(n) => (
            n,
            format!(
                "pool: {n} relay{} behind HAProxy",
                if n == 1 { "" } else { "s" }
            ),
        ),
        Front::Direct => (1, "tunnel: 1 relay, no HAProxy".to_string()),
    };
    let dir = TestDir::new("bench-pool")?;
    let secret_file = dir.path().join("link-secret");
    std::fs::write(
        &secret_file,
        format!("bench-pool-{}-{}", std::process::id(), free_addr().port()),
    )?;
    let max_conns = (options.conns + 1024).to_string();
    let mut setup = Setup {
        label,
        entries: Vec::new(),
        processes: Vec::new(),
        relays: Vec::new(),
        _haproxy: None,
        _dir: None,
    };
    let mut links = Vec::new();
    for id in 1..=relay_count {
        let (http, link) = (free_addr(), free_addr());
        let args: Vec<String> = vec![
            "--listen".into(),
            http.to_string(),
            "--link-listen".into(),
            link.to_string(),
            "--link-secret-file".into(),
            secret_file.display().to_string(),
            "--relay-id".into(),
            id.to_string(),
            "--trusted-proxy".into(),
            "127.0.0.1/32".into(),
            "--max-session-connections".into(),
            max_conns.clone(),
        ];
        let mut process = ChildProcess::spawn(
            &format!("relay{id}"),
            &bin(bin_dir, "tunnel-servlet")?,
            args,
            &rust_log(),
            dir.path(),
        )?;
        process.wait_listening(http, READY_TIMEOUT).await?;
        wait_for_http_ok(&format!("http://{http}/healthz"), READY_TIMEOUT).await?;
        setup.processes.push(("relay".into(), process));
        setup.relays.push((id, http));
        links.push(link);
    }
    let relay_url = match front {
        Front::Haproxy(_) => {
            let servers: Vec<RelayServer> = setup
                .relays
                .iter()
                .map(|(id, addr)| RelayServer {
                    id: *id,
                    addr: *addr,
                })
                .collect();
            let haproxy = Haproxy::start(dir.path(), HaproxyVariant::ById, &servers).await?;
            for server in &servers {
                haproxy
                    .wait_server(&server.name(), true, READY_TIMEOUT)
                    .await?;
            }
            let url = haproxy.tunnel_url("/tunnel");
            setup._haproxy = Some(haproxy);
            url
        }
        Front::Direct => format!("http://{}/tunnel", setup.relays[0].1),
    };
    for i in 1..=options.brokers {
        let mut args: Vec<String> = Vec::new();
        for link in &links {
            args.extend(["--relay".to_string(), link.to_string()]);
        }
        args.extend([
            "--name".to_string(),
            SERVER_NAME.into(),
            "--link-secret-file".into(),
            secret_file.display().to_string(),
            "--forward".into(),
            target.to_string(),
            "--max-connections".into(),
            max_conns.clone(),
            "--accept-backlog".into(),
            max_conns.clone(),
        ]);
        let process = ChildProcess::spawn(
            &format!("broker{i}"),
            &bin(bin_dir, "tunnel-broker")?,
            args,
            &rust_log(),
            dir.path(),
        )?;
        setup.processes.push(("broker".into(), process));
    }
    for (id, http) in setup.relays.clone() {
        wait_links(&mut setup, id, http, options.brokers).await?;
    }
    for i in 1..=options.clients {
        let listen = free_addr();
        let args: Vec<String> = vec![
            "--relay".into(),
            relay_url.clone(),
            "--server".into(),
            SERVER_NAME.into(),
            "--no-env-proxy".into(),
            "--http1".into(),
            "--listen".into(),
            listen.to_string(),
        ];
        let mut process = ChildProcess::spawn(
            &format!("client{i}"),
            &bin(bin_dir, "tunnel-client")?,
            args,
            &rust_log(),
            dir.path(),
        )?;
        process.wait_listening(listen, READY_TIMEOUT).await?;
        setup.processes.push(("client".into(), process));
        setup.entries.push(listen);
        // One at a time, so that each client's session is open (and counted by HAProxy's
        // leastconn) before the next one opens its own.
        probe(&mut setup, listen).await?;
    }
    setup._dir = Some(dir);
    Ok(setup)
}

/// Waits until relay `id` has a link from each of the `brokers`.
async fn wait_links(setup: &mut Setup, id: u8, http: SocketAddr, brokers: usize) -> io::Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    let url = format!("http://{http}/metrics");
    loop {
        let text = match direct_http_client().get(&url).send().await {
            Ok(resp) => resp.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        if text
            .lines()
            .any(|l| l == format!("tunnel_links_up {brokers}"))
        {
            return Ok(());
        }
        setup.check_alive()?;
        if Instant::now() >= deadline {
            return Err(io::Error::other(format!(
                "{}: relay {id} has not {brokers} broker links within {READY_TIMEOUT:?}",
                setup.label
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Retries an echo of a few bytes through `entry` (the data server echoes).
async fn probe(setup: &mut Setup, entry: SocketAddr) -> io::Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let attempt = tunnel::echo_probe(entry).await;
        match attempt {
            Ok(()) => return Ok(()),
            Err(e) => {
                setup.check_alive()?;
                if Instant::now() >= deadline {
                    return Err(io::Error::other(format!(
                        "{}: no round trip through {entry} within {READY_TIMEOUT:?}: {e}",
                        setup.label
                    )));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// Starts every setup, then measures each `runs` times, interleaved (run 1 of every setup,
/// then run 2, ...), so that drift of the machine spreads over all of them.
pub async fn section(
    bin_dir: &Path,
    target: SocketAddr,
    options: &PoolOptions,
    say: impl Fn(&str),
) -> io::Result<PoolResults> {
    say("pool: starting the 3-hop TCP chain");
    let chain = tunnel::start_tcp_chain(target).await?;
    let mut setups = vec![Setup {
        label: chain.label.clone(),
        entries: vec![chain.entry],
        processes: Vec::new(),
        relays: Vec::new(),
        _haproxy: None,
        _dir: None,
    }];
    // The chain's hops are measured through its RunningPath's processes.
    let mut chain = chain;
    let hops: Vec<(String, ChildProcess)> = std::mem::take(&mut chain.processes)
        .into_iter()
        .map(|(_, p)| ("hop".to_string(), p))
        .collect();
    setups[0].processes = hops;
    let mut fronts = vec![Front::Direct];
    fronts.extend(options.relay_counts.iter().map(|n| Front::Haproxy(*n)));
    for front in fronts {
        say(&format!("pool: starting {front:?}"));
        setups.push(start_tunnel_setup(bin_dir, target, options, front).await?);
    }
    let mut rows: Vec<PoolRow> = setups
        .iter()
        .map(|s| PoolRow {
            label: s.label.clone(),
            ..Default::default()
        })
        .collect();
    for run in 1..=options.runs {
        for (setup, row) in setups.iter_mut().zip(rows.iter_mut()) {
            let cpu_before = setup.cpu();
            let connects_before = setup.connects().await;
            let t = measure::aggregate_over(
                &setup.entries,
                options.conns,
                options.bytes,
                options.bytes,
                options.timeout,
            )
            .await
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", setup.label)))?;
            for (kind, after) in setup.cpu() {
                let before = cpu_before.get(&kind).copied().unwrap_or(after);
                *row.cpu.entry(kind).or_insert(0.0) += after - before;
            }
            for (id, after) in setup.connects().await {
                let before = connects_before.get(&id).copied().unwrap_or(0.0);
                *row.connects_per_relay.entry(id).or_insert(0.0) += after - before;
            }
            row.bytes_moved += (t.up + t.down) as f64;
            row.rates.push(t.mib_per_s());
            say(&format!(
                "pool run {run}/{}: {:<34} {} conns both ways {:9.1} MiB/s",
                options.runs,
                setup.label,
                options.conns,
                t.mib_per_s()
            ));
            setup.check_alive()?;
        }
    }
    // The hops log into the chain's directory: they go first.
    drop(setups);
    drop(chain);
    Ok(PoolResults {
        options: options.clone(),
        rows,
    })
}

/// Kinds of process in the table's CPU columns, in order, with their column headers.
const KINDS: [(&str, &str); 5] = [
    ("hop", "hops"),
    ("relay", "relays"),
    ("haproxy", "haproxy"),
    ("broker", "brokers"),
    ("client", "clients"),
];

pub fn render_table(results: &PoolResults, t: &mut String) {
    let o = &results.options;
    let _ = writeln!(
        t,
        "\nRelay pool: {} connections busy at once, {} KiB each way each, over {} client \
         processes (one session each); {} brokers, each linked to every relay",
        o.conns,
        o.bytes >> 10,
        o.clients,
        o.brokers
    );
    let _ = writeln!(
        t,
        "(MiB/s both directions, median of {}; CPU seconds per GiB moved, by kind of process, \
         all processes of a kind summed)",
        o.runs
    );
    let mut header = format!("{:<34} {:>8} {:>5} ", "path", "MiB/s", "/3h");
    for (_, title) in KINDS {
        let _ = write!(header, " {title:>7}");
    }
    let _ = writeln!(header, " {:>7}  connections per relay", "total");
    t.push_str(&header);
    let base = results.rows.first().map(|r| median(&r.rates));
    for row in &results.rows {
        let gib = row.bytes_moved / GIB;
        let per = |kind: &str| row.cpu.get(kind).map_or(f64::NAN, |s| s / gib);
        let total: f64 = row.cpu.values().sum::<f64>() / gib;
        let spread: Vec<String> = row
            .connects_per_relay
            .iter()
            .map(|(id, n)| format!("{id}: {n:.0}"))
            .collect();
        let rate = median(&row.rates);
        let mut line = format!(
            "{:<34} {:>8} {:>5} ",
            row.label,
            num(rate, 1),
            num(base.map_or(f64::NAN, |b| ratio(rate, b)), 2)
        );
        for (kind, _) in KINDS {
            let _ = write!(line, " {:>7}", num(per(kind), 2));
        }
        let _ = writeln!(line, " {:>7}  {}", num(total, 2), spread.join(", "));
        t.push_str(&line);
    }
    let _ = writeln!(
        t,
        "Every process of every setup shares the machine's cores: with few cores, more relays \
         add processes, not capacity, so these figures show the pool's overhead (HAProxy's \
         hop, more links), not how it scales."
    );
}

pub fn render_json(results: &PoolResults) -> Json {
    let o = &results.options;
    let base = results.rows.first().map(|r| median(&r.rates));
    let rows = results
        .rows
        .iter()
        .map(|row| {
            let gib = row.bytes_moved / GIB;
            let cpu = row
                .cpu
                .iter()
                .map(|(kind, s)| (kind.clone(), Json::Num(s / gib)))
                .collect();
            let spread = row
                .connects_per_relay
                .iter()
                .map(|(id, n)| (id.to_string(), Json::Num(*n)))
                .collect();
            let rate = median(&row.rates);
            Json::obj(vec![
                ("path", Json::Str(row.label.clone())),
                ("runs_mib_s", Json::nums(&row.rates)),
                ("median_mib_s", Json::Num(rate)),
                (
                    "ratio_to_3hop",
                    Json::Num(base.map_or(f64::NAN, |b| ratio(rate, b))),
                ),
                ("cpu_seconds_per_gib", Json::Obj(cpu)),
                ("connections_per_relay", Json::Obj(spread)),
            ])
        })
        .collect();
    Json::obj(vec![
        ("conns", Json::Num(o.conns as f64)),
        ("bytes_each_way", Json::Num(o.bytes as f64)),
        ("clients", Json::Num(o.clients as f64)),
        ("brokers", Json::Num(o.brokers as f64)),
        ("runs", Json::Num(o.runs as f64)),
        ("setups", Json::Arr(rows)),
    ])
}
