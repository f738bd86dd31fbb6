//! Benchmark of the HTTP tunnel against plain TCP, measured in one run on loopback.
//!
//! Starts the real relay, broker and client binaries (release build; `--bin-dir`), a data
//! server behind the broker, and the baselines (direct TCP; three `copy_bidirectional`
//! forwarders in a row, each its own process), then measures one-connection throughput,
//! ping-pong latency, many-connection throughput, relay CPU per GiB, and 10,000 idle
//! connections held by one relay (with sessions or per-connection requests); on request,
//! 100,000 connections opened with the library in the bench process through one relay
//! (`--sections inproc-many`), connection churn with the processes' memory, descriptors
//! and warnings sampled (`--sections soak`), and many connections through a pool of 1, 2
//! and 3 relays behind HAProxy (`--sections pool`), and request/response exchanges on 16
//! connections (`--sections rr`), and GNU httptunnel beside the tunnel on one connection
//! (`--sections peers`, needs the Debian package httptunnel). With `--old-bin-dir`, previous binaries are
//! measured beside the new ones in the same run. Each run measures the paths one after the
//! other, backwards in every other run (a path measured later in a run tends to come out
//! faster). Prints a table (or JSON with `--json`) with medians over `--runs` and ratios to
//! the baselines. Progress goes to stderr.
//!
//! ```text
//! cargo build --release --workspace --bins
//! cargo run --release -p tunnel-tests --bin bench -- --runs 5
//! ```

#[path = "../bench/dataserver.rs"]
mod dataserver;
#[path = "../bench/forwarder.rs"]
mod forwarder;
#[path = "../bench/many.rs"]
mod many;
#[path = "../bench/measure.rs"]
mod measure;
#[path = "../bench/peers.rs"]
mod peers;
#[path = "../bench/pool.rs"]
mod pool;
#[path = "../bench/report.rs"]
mod report;
#[path = "../bench/rr.rs"]
mod rr;
#[path = "../bench/soak.rs"]
mod soak;
#[path = "../bench/stats.rs"]
mod stats;
#[path = "../bench/tunnel.rs"]
mod tunnel;

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use tokio::time::Instant;
use tunnel_tests::{fdlimit, procfs};

use report::{num, parse_size, Json};
use stats::{median, percentile, ratio};
use tunnel::{Flavour, RunningPath, Transport, TunnelOptions};

/// Target: one connection, each direction, at least this share of the 3-hop chain.
const TARGET_THROUGHPUT_RATIO: f64 = 0.60;
/// Target: 1-byte round trip p50 at most this multiple of the 3-hop chain's.
const TARGET_LATENCY_RATIO: f64 = 3.0;
/// Target: relay memory per idle connection below this.
const TARGET_IDLE_BYTES: f64 = 32.0 * 1024.0;
/// Session targets (issue 9), for 10,000 idle connections over HTTP/1.1 and for the
/// in-process section: a round trip on all within this many seconds, …
const TARGET_SESSION_ROUND_TRIP_SECS: f64 = 5.0;
/// … the relay at most this per connection, …
const TARGET_SESSION_RELAY_BYTES: f64 = 8.0 * 1024.0;
/// … the client at most this per connection, …
const TARGET_SESSION_CLIENT_BYTES: f64 = 16.0 * 1024.0;
/// … and the relay at most this many descriptors.
const TARGET_SESSION_RELAY_FDS: usize = 64;
/// Old binaries against new (`--old-bin-dir`): one connection's throughput at least this
/// share of the old, its 1-byte p50 at most this multiple of the old (the machine's noise
/// between two paths measured in one run is about 10 %).
const TARGET_NO_WORSE_THROUGHPUT: f64 = 0.90;
const TARGET_NO_WORSE_LATENCY: f64 = 1.10;
/// Width of the path column of the table.
const LABEL_WIDTH: usize = 34;
/// Connections the idle section opens at once.
const IDLE_OPEN_PARALLEL: usize = 256;
const MIB: f64 = 1024.0 * 1024.0;
const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

#[derive(Parser, Debug, Clone)]
#[command(about = "Benchmark the HTTP tunnel against direct TCP and a 3-hop TCP chain")]
struct Opts {
    /// Directory holding tunnel-servlet, tunnel-broker and tunnel-client (default: the
    /// directory of this executable, i.e. target/release when run with `cargo run --release`).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Directory of previous release binaries: the throughput, latency and aggregate
    /// sections then measure every flavour through them too, in the same run ("old" rows),
    /// and the targets compare new with old.
    #[arg(long)]
    old_bin_dir: Option<PathBuf>,
    /// Repetitions of every throughput, latency and aggregate measurement (medians reported).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Bytes per direction of one single-connection throughput measurement (K/M/G suffixes).
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    bytes: u64,
    /// Sections to run, comma-separated: throughput, latency, aggregate, idle, inproc-many,
    /// soak, pool, rr and peers (these five are not run unless named: 100,000 connections,
    /// churn for `--soak-secs`, relays behind HAProxy, which needs the haproxy program,
    /// request/response exchanges, and GNU httptunnel, which needs the httptunnel package).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "throughput,latency,aggregate,idle"
    )]
    sections: Vec<String>,
    /// Tunnel flavours to measure, comma-separated: http1, http2, https.
    #[arg(long, value_delimiter = ',', default_value = "http1,http2,https")]
    flavours: Vec<String>,
    /// How the tunnels of the throughput, latency, aggregate, rr and peers sections carry
    /// their packets, comma-separated, one row each: `stream` (a session whose pull is
    /// streamed, `tunnel-client --mode stream`), `poll` (`--mode poll`) and `per-conn`
    /// (`--no-session`). Old binaries (`--old-bin-dir`) run in their first mode only.
    #[arg(long, value_delimiter = ',', default_value = "stream,poll")]
    modes: Vec<String>,
    /// Ping-pongs per latency measurement (1-byte; the 16 KiB series runs a quarter).
    #[arg(long, default_value_t = 1000)]
    pings: usize,
    /// Connections held open in the idle section.
    #[arg(long, default_value_t = 10_000)]
    idle_conns: usize,
    /// Flavour of the tunnel the idle section runs through: http1 or http2.
    #[arg(long, default_value = "http1")]
    idle_flavour: String,
    /// How the idle section's clients reach the relay, comma-separated, one run each:
    /// `stream`, `poll` and `per-conn` as in `--modes` (a client without sessions is
    /// per-connection either way, and the label says so).
    #[arg(long, value_delimiter = ',', default_value = "session")]
    idle_transports: Vec<String>,
    /// Connections the inproc-many section opens with the library.
    #[arg(long, default_value_t = 100_000)]
    many_conns: usize,
    /// Connects in flight at once in the inproc-many section.
    #[arg(long, default_value_t = 1024)]
    many_open_parallel: usize,
    /// Flavour between the library client and the relay in the inproc-many section: http1
    /// or http2.
    #[arg(long, default_value = "http1")]
    many_flavour: String,
    /// Connections busy at once in the aggregate section.
    #[arg(long, default_value_t = 100)]
    agg_conns: usize,
    /// Bytes per direction per connection in the aggregate section.
    #[arg(long, default_value = "2M", value_parser = parse_size)]
    agg_bytes: u64,
    /// Deadline of any one measurement, in seconds.
    #[arg(long, default_value_t = 300)]
    timeout_secs: u64,
    /// Tokio worker threads of every process the bench starts (tunnel processes, chain
    /// forwarders, the data server) and of the bench itself, set through
    /// `TOKIO_WORKER_THREADS` and the tunnel binaries' `--worker-threads`; 0 leaves tokio's
    /// default (one per core), and 1 is tokio's current-thread scheduler in every process
    /// (`tunnel_proto::runtime`). Default 1: on a 2-core machine running three processes per
    /// path, one worker each gave every path its shortest round trip (BENCHMARKS.md).
    #[arg(long, default_value_t = 1)]
    worker_threads: usize,
    /// Small sizes for a smoke run: 3 runs, 16 MiB, 200 pings, 1,000 idle connections,
    /// 512 KiB per aggregate connection, 3 s of request/response, 16 MiB per direction in the
    /// peers section (explicit options given after it still apply).
    #[arg(long)]
    quick: bool,
    /// Print the results as JSON on stdout (the table then goes to stderr).
    #[arg(long)]
    json: bool,
    /// Client processes the idle section spreads its connections over (0: as many as the
    /// open-file limit requires, two descriptors per connection per client).
    #[arg(long, default_value_t = 0)]
    idle_clients: usize,
    /// How long the soak section churns connections, in seconds.
    #[arg(long, default_value_t = 60)]
    soak_secs: u64,
    /// Connections the soak section keeps in progress at once (one per worker).
    #[arg(long, default_value_t = 32)]
    soak_workers: usize,
    /// Flavour of the tunnel the soak section churns through: http1, http2 or https.
    #[arg(long, default_value = "http1")]
    soak_flavour: String,
    /// Longest wait after the churn for descriptors to come back to idle, in seconds.
    #[arg(long, default_value_t = 30)]
    soak_settle_secs: u64,
    /// Keep the soak's processes this many seconds after its figures are taken (their pids
    /// are printed), to inspect them: gdb, malloc_stats, a heap profiler.
    #[arg(long, default_value_t = 0)]
    soak_hold_secs: u64,
    /// Relay counts the pool section measures behind HAProxy, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
    pool_relays: Vec<u8>,
    /// Client processes of the pool section (each its own session, spread over the relays);
    /// a multiple of every relay count spreads them evenly.
    #[arg(long, default_value_t = 6)]
    pool_clients: usize,
    /// Broker processes of the pool section, each linked to every relay.
    #[arg(long, default_value_t = 2)]
    pool_brokers: usize,
    /// Connections of the rr section, each doing request/response exchanges in turn.
    #[arg(long, default_value_t = 16)]
    rr_conns: usize,
    /// How long the rr section's exchanges go on per path and run, in seconds.
    #[arg(long, default_value_t = 10)]
    rr_secs: u64,
    /// Bytes of one request of the rr section (K/M suffixes; at most 16M).
    #[arg(long, default_value = "200", value_parser = parse_exchange_size)]
    rr_request: u32,
    /// Bytes of one answer of the rr section (K/M suffixes; at most 16M).
    #[arg(long, default_value = "2048", value_parser = parse_exchange_size)]
    rr_answer: u32,
    /// Bytes per direction of one throughput measurement of the peers section (K/M/G).
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    peers_bytes: u64,
    /// Internal: run as the data server, listening here.
    #[arg(long, hide = true)]
    serve_data: Option<SocketAddr>,
    /// Internal: run as one hop of the TCP baseline chain, listening here.
    #[arg(long, hide = true, requires = "forwarder_to")]
    forwarder_listen: Option<SocketAddr>,
    /// Internal: where the hop forwards to.
    #[arg(long, hide = true)]
    forwarder_to: Option<SocketAddr>,
}

impl Opts {
    fn apply_quick(&mut self) {
        if !self.quick {
            return;
        }
        let args: Vec<String> = std::env::args().collect();
        let given = |flag: &str| {
            args.iter()
                .any(|a| a == flag || a.starts_with(&format!("{flag}=")))
        };
        if !given("--runs") {
            self.runs = 3;
        }
        if !given("--bytes") {
            self.bytes = 16 << 20;
        }
        if !given("--pings") {
            self.pings = 200;
        }
        if !given("--idle-conns") {
            self.idle_conns = 1000;
        }
        if !given("--many-conns") {
            self.many_conns = 2000;
        }
        if !given("--rr-secs") {
            self.rr_secs = 3;
        }
        if !given("--peers-bytes") {
            self.peers_bytes = 16 << 20;
        }
        if !given("--agg-bytes") {
            self.agg_bytes = 512 << 10;
        }
    }

    fn section(&self, name: &str) -> bool {
        self.sections.iter().any(|s| s == name)
    }

    fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_secs)
    }
}

/// A request or answer size of the rr section: 1 byte up to the data server's bound.
fn parse_exchange_size(text: &str) -> Result<u32, String> {
    let n = parse_size(text)?;
    if n == 0 || n > u64::from(dataserver::MAX_EXCHANGE) {
        return Err(format!(
            "size {text:?} not in 1..={} bytes",
            dataserver::MAX_EXCHANGE
        ));
    }
    Ok(n as u32)
}

fn parse_transport(name: &str) -> Result<Transport, String> {
    match name {
        "stream" | "session" => Ok(Transport::Stream),
        "poll" => Ok(Transport::Poll),
        "per-conn" | "per-connection" | "no-session" => Ok(Transport::PerConnection),
        other => Err(format!(
            "unknown transport {other:?} (stream, poll, per-conn)"
        )),
    }
}

fn parse_flavour(name: &str) -> Result<Flavour, String> {
    match name {
        "http1" | "h1" => Ok(Flavour::Http1),
        "http2" | "h2" => Ok(Flavour::Http2),
        "https" => Ok(Flavour::Https),
        other => Err(format!("unknown flavour {other:?} (http1, http2, https)")),
    }
}

/// Progress on stderr, stamped with the time since the start.
struct Progress(Instant);

impl Progress {
    fn say(&self, what: impl AsRef<str>) {
        eprintln!(
            "[{:7.1}s] {}",
            self.0.elapsed().as_secs_f64(),
            what.as_ref()
        );
    }
}

/// Per-path results of the repeated measurements (one value per run).
#[derive(Default, Debug)]
struct PathResults {
    label: String,
    up: Vec<f64>,
    down: Vec<f64>,
    both: Vec<f64>,
    aggregate: Vec<f64>,
    p50_1b: Vec<f64>,
    p99_1b: Vec<f64>,
    p50_16k: Vec<f64>,
    p99_16k: Vec<f64>,
    /// CPU seconds per role over the throughput and aggregate sections, and the bytes moved.
    cpu: BTreeMap<String, f64>,
    bytes_moved: f64,
}

#[derive(Debug)]
struct IdleResults {
    flavour: String,
    conns: usize,
    open_secs: f64,
    round_trip_secs: f64,
    rss_before: BTreeMap<String, u64>,
    rss_held: BTreeMap<String, u64>,
    /// Descriptors the relay holds while the connections are held (HTTP connections + links).
    relay_fds_held: usize,
    /// Connections whose round trip failed, and the first error.
    rt_failed: usize,
    rt_error: Option<String>,
    /// CPU seconds by role (clients summed) spent opening them and doing the round trips.
    cpu_secs: BTreeMap<String, f64>,
}

impl IdleResults {
    fn per_conn(&self, role: &str) -> f64 {
        let (Some(b), Some(h)) = (self.rss_before.get(role), self.rss_held.get(role)) else {
            return f64::NAN;
        };
        (*h as f64 - *b as f64) / self.conns as f64
    }
}

fn main() -> std::process::ExitCode {
    let mut opts = Opts::parse();
    if let (Some(listen), Some(to)) = (opts.forwarder_listen, opts.forwarder_to) {
        let runtime = tunnel::runtime();
        return match runtime.block_on(forwarder::run(listen, to)) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("forwarder {listen} -> {to}: {e}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    if let Some(addr) = opts.serve_data {
        let runtime = tunnel::runtime();
        return match runtime.block_on(async {
            let _ = fdlimit::raise_nofile_limit(65_536);
            let _server = dataserver::DataServer::start(addr).await?;
            std::future::pending::<io::Result<()>>().await
        }) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("data server {addr}: {e}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    opts.apply_quick();
    // Before any runtime exists: the bench's own and every child's (inherited).
    tunnel::set_worker_threads(opts.worker_threads);
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                // The inproc-many section runs the client and broker libraries here and drops
                // its 100,000 connections at its end, a warning each; its failures are
                // counted by the bench itself.
                .unwrap_or_else(|_| {
                    tracing_subscriber::EnvFilter::new(
                        "warn,tunnel_client=error,tunnel_broker=error,tunnel_proto=error",
                    )
                }),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let runtime = tunnel::runtime();
    match runtime.block_on(run(opts)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench failed: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(opts: Opts) -> io::Result<()> {
    let progress = Progress(Instant::now());
    let flavours = opts
        .flavours
        .iter()
        .map(|f| parse_flavour(f))
        .collect::<Result<Vec<_>, _>>()
        .map_err(io::Error::other)?;
    let idle_flavour = parse_flavour(&opts.idle_flavour).map_err(io::Error::other)?;
    let soak_flavour = parse_flavour(&opts.soak_flavour).map_err(io::Error::other)?;
    let many_flavour = parse_flavour(&opts.many_flavour).map_err(io::Error::other)?;
    if many_flavour == Flavour::Https {
        return Err(io::Error::other("--many-flavour is http1 or http2"));
    }
    let idle_transports = opts
        .idle_transports
        .iter()
        .map(|t| parse_transport(t))
        .collect::<Result<Vec<_>, _>>()
        .map_err(io::Error::other)?;
    let modes = opts
        .modes
        .iter()
        .map(|t| parse_transport(t))
        .collect::<Result<Vec<_>, _>>()
        .map_err(io::Error::other)?;
    if modes.is_empty() {
        return Err(io::Error::other("--modes names no mode"));
    }
    let bin_dir = match &opts.bin_dir {
        Some(dir) => dir.clone(),
        None => std::env::current_exe()?
            .parent()
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("target/release")),
    };
    let machine = procfs::Machine::detect();
    // Each idle connection costs the bench two descriptors (its end and the data server's)
    // and each tunnel process one or two; leave room for the rest.
    // The inproc-many section over per-connection requests holds a socket per connection
    // here and in the relay (which inherits this limit).
    let many_fds = if opts.section("inproc-many") {
        opts.many_conns as u64 * 2 + 4096
    } else {
        0
    };
    let nofile = fdlimit::raise_nofile_limit(
        (opts.idle_conns as u64 * 3 + 4096)
            .max(many_fds)
            .max(65_536),
    )?;
    progress.say(format!(
        "machine: {} cores, {}, Linux {}; binaries from {}; open-file limit {nofile}",
        machine.cores,
        machine.cpu_model,
        machine.kernel,
        bin_dir.display()
    ));
    if opts.section("idle") && (nofile as usize) < opts.idle_conns + 1024 {
        return Err(io::Error::other(format!(
            "open-file limit {nofile} too low for {} idle connections",
            opts.idle_conns
        )));
    }

    let (server_addr, _server_process, _server_dir) = tunnel::start_data_server().await?;
    let broker_max = opts.idle_conns.max(opts.agg_conns) + 1024;
    let mut results: Vec<PathResults> = Vec::new();
    let needs_paths = ["throughput", "latency", "aggregate"]
        .iter()
        .any(|s| opts.section(s));
    if needs_paths {
        let mut paths: Vec<RunningPath> = vec![tunnel::direct(server_addr)?];
        progress.say("starting the 3-hop TCP chain");
        let chain = tunnel::start_tcp_chain(server_addr).await?;
        let chain_entry = chain.entry;
        paths.push(chain);
        let mut dirs = vec![("", &bin_dir)];
        if let Some(old) = &opts.old_bin_dir {
            dirs.push(("old ", old));
        }
        for (prefix, dir) in dirs {
            let dir_modes = if prefix.is_empty() {
                &modes[..]
            } else {
                &modes[..1]
            };
            for flavour in &flavours {
                for mode in dir_modes {
                    let options = TunnelOptions::new(broker_max).with_transport(*mode);
                    let label = tunnel::tunnel_label(dir, *flavour, *mode)?;
                    progress.say(format!("starting {prefix}{label}"));
                    let mut path =
                        tunnel::start_tunnel(dir, *flavour, server_addr, &options).await?;
                    path.label = format!("{prefix}{}", path.label);
                    paths.push(path);
                }
            }
        }
        results = paths
            .iter()
            .map(|p| PathResults {
                label: p.label.clone(),
                ..Default::default()
            })
            .collect();
        // The first transfer after the machine has idled comes out slower (on a VM, about a
        // fifth for 128 MiB through the chain), which would fall on whichever path a run
        // starts with: one transfer through the chain first, not counted.
        measure::throughput(chain_entry, opts.bytes, opts.bytes, opts.timeout())
            .await
            .map_err(|e| io::Error::new(e.kind(), format!("warm-up through the chain: {e}")))?;
        for run in 1..=opts.runs {
            for i in stats::run_order(paths.len(), run) {
                measure_path(&opts, &progress, run, &mut paths[i], &mut results[i]).await?;
            }
        }
        drop(paths);
    }
    let mut idle = Vec::new();
    if opts.section("idle") {
        let clients = match opts.idle_clients {
            0 => (opts.idle_conns * 2).div_ceil((nofile as usize).saturating_sub(1024).max(1)),
            n => n,
        };
        for transport in &idle_transports {
            let options = TunnelOptions {
                max_conns: broker_max,
                clients,
                transport: *transport,
            };
            idle.push(
                idle_section(
                    &opts,
                    &progress,
                    &bin_dir,
                    idle_flavour,
                    server_addr,
                    &options,
                )
                .await?,
            );
        }
    }
    let inproc_many = if opts.section("inproc-many") {
        let options = many::ManyOptions {
            conns: opts.many_conns,
            open_parallel: opts.many_open_parallel,
            flavour: many_flavour,
            timeout: opts.timeout(),
        };
        Some(many::section(&bin_dir, &options, |line| progress.say(line)).await?)
    } else {
        None
    };

    let soak = if opts.section("soak") {
        let options = soak::SoakOptions {
            flavour: soak_flavour,
            workers: opts.soak_workers,
            duration: Duration::from_secs(opts.soak_secs),
            settle: Duration::from_secs(opts.soak_settle_secs),
            hold: Duration::from_secs(opts.soak_hold_secs),
            broker_max_conns: broker_max,
        };
        Some(soak::section(&bin_dir, server_addr, &options, |line| progress.say(line)).await?)
    } else {
        None
    };

    let pool = if opts.section("pool") {
        let options = pool::PoolOptions {
            relay_counts: opts.pool_relays.clone(),
            clients: opts.pool_clients.max(1),
            brokers: opts.pool_brokers.max(1),
            conns: opts.agg_conns,
            bytes: opts.agg_bytes,
            runs: opts.runs,
            timeout: opts.timeout(),
        };
        Some(pool::section(&bin_dir, server_addr, &options, |line| progress.say(line)).await?)
    } else {
        None
    };

    let rr = if opts.section("rr") {
        let options = rr::RrOptions {
            conns: opts.rr_conns.max(1),
            duration: Duration::from_secs(opts.rr_secs.max(1)),
            request: opts.rr_request,
            answer: opts.rr_answer,
            runs: opts.runs,
            flavours: flavours.clone(),
            modes: modes.clone(),
            broker_max_conns: broker_max,
            timeout: opts.timeout(),
        };
        Some(rr::section(&bin_dir, server_addr, &options, |line| progress.say(line)).await?)
    } else {
        None
    };

    let peers = if opts.section("peers") {
        let options = peers::PeersOptions {
            pings: opts.pings,
            bytes: opts.peers_bytes,
            runs: opts.runs,
            flavours: flavours.clone(),
            modes: modes.clone(),
            broker_max_conns: broker_max,
            timeout: opts.timeout(),
        };
        Some(peers::section(&bin_dir, server_addr, &options, |line| progress.say(line)).await?)
    } else {
        None
    };

    let mut table = render_table(
        &opts,
        &machine,
        &results,
        &idle,
        inproc_many.as_ref(),
        soak.as_ref(),
    );
    if let Some(pool) = &pool {
        pool::render_table(pool, &mut table);
    }
    if let Some(rr) = &rr {
        rr::render_table(rr, &mut table);
    }
    if let Some(peers) = &peers {
        peers::render_table(peers, &mut table);
    }
    if opts.json {
        eprintln!("{table}");
        let mut json = render_json(&opts, &machine, &results, &idle);
        if let (Json::Obj(fields), Some(many)) = (&mut json, &inproc_many) {
            fields.push(("inproc_many".into(), many::render_json(many)));
        }
        if let (Json::Obj(fields), Some(soak)) = (&mut json, &soak) {
            fields.push(("soak".into(), soak::render_json(soak)));
        }
        if let (Json::Obj(fields), Some(pool)) = (&mut json, &pool) {
            fields.push(("pool".into(), pool::render_json(pool)));
        }
        if let (Json::Obj(fields), Some(rr)) = (&mut json, &rr) {
            fields.push(("request_response".into(), rr::render_json(rr)));
        }
        if let (Json::Obj(fields), Some(peers)) = (&mut json, &peers) {
            fields.push(("peers".into(), peers::render_json(peers)));
        }
        println!("{}", json.render());
    } else {
        println!("{table}");
    }
    Ok(())
}

/// CPU seconds of every process of the path, by role.
fn cpu_by_role(path: &RunningPath) -> BTreeMap<String, f64> {
    path.processes
        .iter()
        .filter_map(|(role, p)| Some((role.clone(), procfs::cpu_seconds(p.id()?).ok()?)))
        .collect()
}

async fn measure_path(
    opts: &Opts,
    progress: &Progress,
    run: usize,
    path: &mut RunningPath,
    res: &mut PathResults,
) -> io::Result<()> {
    let timeout = opts.timeout();
    let fail = |what: &str, e: io::Error| {
        io::Error::new(e.kind(), format!("{} {what}: {e}", res_label(path)))
    };
    if opts.section("throughput") {
        let n = opts.bytes;
        for (dir, up, down) in [("up", n, 0), ("down", 0, n), ("both", n, n)] {
            let cpu_before = cpu_by_role(path);
            let t = measure::throughput(path.entry, up, down, timeout)
                .await
                .map_err(|e| fail(&format!("throughput {dir}"), e))?;
            account_cpu(path, res, &cpu_before, (up + down) as f64);
            let rate = t.mib_per_s();
            progress.say(format!(
                "run {run}/{}: {:<LABEL_WIDTH$} {dir:<4} {:9.1} MiB/s",
                opts.runs, path.label, rate
            ));
            match dir {
                "up" => res.up.push(rate),
                "down" => res.down.push(rate),
                _ => res.both.push(rate),
            }
        }
    }
    if opts.section("latency") {
        for (size, count) in [(1usize, opts.pings), (16 * 1024, (opts.pings / 4).max(20))] {
            let samples = measure::ping_pong(path.entry, size, count, count / 10 + 5, timeout)
                .await
                .map_err(|e| fail(&format!("ping-pong {size} B"), e))?;
            let (p50, p99) = (percentile(&samples, 50.0), percentile(&samples, 99.0));
            let us = |d: Duration| d.as_secs_f64() * 1e6;
            progress.say(format!(
                "run {run}/{}: {:<LABEL_WIDTH$} rtt {size:>5} B  p50 {:8.1} µs  p99 {:8.1} µs",
                opts.runs,
                path.label,
                us(p50),
                us(p99)
            ));
            if size == 1 {
                res.p50_1b.push(us(p50));
                res.p99_1b.push(us(p99));
            } else {
                res.p50_16k.push(us(p50));
                res.p99_16k.push(us(p99));
            }
        }
    }
    if opts.section("aggregate") {
        let b = opts.agg_bytes;
        let cpu_before = cpu_by_role(path);
        let t = measure::aggregate(path.entry, opts.agg_conns, b, b, timeout)
            .await
            .map_err(|e| fail("aggregate", e))?;
        account_cpu(path, res, &cpu_before, (t.up + t.down) as f64);
        progress.say(format!(
            "run {run}/{}: {:<LABEL_WIDTH$} {} conns both ways {:9.1} MiB/s",
            opts.runs,
            path.label,
            opts.agg_conns,
            t.mib_per_s()
        ));
        res.aggregate.push(t.mib_per_s());
    }
    path.check_alive()
}

fn res_label(path: &RunningPath) -> &str {
    &path.label
}

fn account_cpu(
    path: &RunningPath,
    res: &mut PathResults,
    before: &BTreeMap<String, f64>,
    bytes: f64,
) {
    for (role, after) in cpu_by_role(path) {
        if let Some(b) = before.get(&role) {
            *res.cpu.entry(role).or_default() += after - b;
        }
    }
    res.bytes_moved += bytes;
}

async fn idle_section(
    opts: &Opts,
    progress: &Progress,
    bin_dir: &std::path::Path,
    flavour: Flavour,
    target: SocketAddr,
    options: &TunnelOptions,
) -> io::Result<IdleResults> {
    progress.say(format!(
        "idle: starting a fresh {} with {} client process(es)",
        tunnel::tunnel_label(bin_dir, flavour, options.transport)?,
        options.clients
    ));
    let mut path = tunnel::start_tunnel(bin_dir, flavour, target, options).await?;
    // RSS by role; the client processes are summed under "client".
    let rss = |path: &RunningPath| -> io::Result<BTreeMap<String, u64>> {
        let mut by_role = BTreeMap::new();
        for (role, process) in &path.processes {
            let pid = process
                .id()
                .ok_or_else(|| io::Error::other(format!("{role} has no pid")))?;
            let key = if role.starts_with("client") {
                "client"
            } else {
                role.as_str()
            };
            *by_role.entry(key.to_string()).or_insert(0) += procfs::rss_bytes(pid)?;
        }
        Ok(by_role)
    };
    // Let the probe's connection finish so it does not count.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = rss(&path)?;
    let cpu_before = cpu_by_role(&path);
    progress.say(format!(
        "idle: relay RSS before {:.1} MiB; opening {} connections ({} at a time)",
        rss_before["relay"] as f64 / MIB,
        opts.idle_conns,
        IDLE_OPEN_PARALLEL
    ));
    let (streams, open) = measure::open_idle(
        &path.entries,
        opts.idle_conns,
        IDLE_OPEN_PARALLEL,
        opts.timeout(),
        |n| progress.say(format!("idle: {n} open")),
    )
    .await
    .map_err(|e| io::Error::new(e.kind(), format!("opening idle connections: {e}")))?;
    progress.say(format!(
        "idle: {} open in {:.2} s; one round trip on all",
        streams.len(),
        open.as_secs_f64()
    ));
    let (streams, rt_failed, rt_error, round_trip) =
        measure::round_trip_all(streams, opts.timeout()).await;
    if rt_failed > 0 {
        progress.say(format!(
            "idle: {rt_failed} round trips FAILED (first: {})",
            rt_error.as_deref().unwrap_or("?")
        ));
    }
    // Let queued work drain so RSS is what holding them costs.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_held = rss(&path)?;
    let mut cpu_secs = BTreeMap::new();
    for (role, after) in cpu_by_role(&path) {
        let key = if role.starts_with("client") {
            "client".to_string()
        } else {
            role.clone()
        };
        *cpu_secs.entry(key).or_insert(0.0) +=
            after - cpu_before.get(&role).copied().unwrap_or(after);
    }
    let relay_fds_held = path
        .processes
        .iter()
        .find(|(role, _)| role == "relay")
        .and_then(|(_, p)| p.id())
        .and_then(|pid| procfs::open_fds(pid).ok())
        .unwrap_or(0);
    path.check_alive()?;
    let result = IdleResults {
        flavour: path.label.clone(),
        conns: streams.len() + rt_failed,
        open_secs: open.as_secs_f64(),
        round_trip_secs: round_trip.as_secs_f64(),
        rss_before,
        rss_held,
        relay_fds_held,
        rt_failed,
        rt_error,
        cpu_secs,
    };
    progress.say(format!(
        "idle: round trip on all in {:.2} s; relay RSS held {:.1} MiB = {:.1} KiB per connection",
        round_trip.as_secs_f64(),
        result.rss_held["relay"] as f64 / MIB,
        result.per_conn("relay") / 1024.0
    ));
    drop(streams);
    Ok(result)
}

fn render_table(
    opts: &Opts,
    machine: &procfs::Machine,
    results: &[PathResults],
    idle: &[IdleResults],
    inproc_many: Option<&many::ManyResults>,
    soak: Option<&soak::SoakRun>,
) -> String {
    use std::fmt::Write;
    let mut t = String::new();
    let _ = writeln!(
        t,
        "Machine: {} cores, {}, Linux {}. Medians of {} runs; ratios are to the 3-hop TCP chain measured in the same run.",
        machine.cores, machine.cpu_model, machine.kernel, opts.runs
    );
    let base = results.iter().find(|r| r.label == "3-hop TCP chain");
    let m = |v: &[f64]| median(v);
    let r = |f: &dyn Fn(&PathResults) -> f64, res: &PathResults| {
        base.map_or(f64::NAN, |b| ratio(f(res), f(b)))
    };
    if opts.section("throughput") {
        let _ = writeln!(
            t,
            "\nOne connection, {} MiB per direction (MiB/s; 'both' counts both directions)",
            opts.bytes >> 20
        );
        let _ = writeln!(
            t,
            "{:<LABEL_WIDTH$} {:>9} {:>9} {:>9}   {:>7} {:>7} {:>7}",
            "path", "up", "down", "both", "up/3h", "down/3h", "both/3h"
        );
        for res in results {
            let _ = writeln!(
                t,
                "{:<LABEL_WIDTH$} {:>9} {:>9} {:>9}   {:>7} {:>7} {:>7}",
                res.label,
                num(m(&res.up), 1),
                num(m(&res.down), 1),
                num(m(&res.both), 1),
                num(r(&|x| m(&x.up), res), 2),
                num(r(&|x| m(&x.down), res), 2),
                num(r(&|x| m(&x.both), res), 2),
            );
        }
    }
    if opts.section("latency") {
        let _ = writeln!(t, "\nRound trip, ping-pong on one connection (µs)");
        let _ = writeln!(
            t,
            "{:<LABEL_WIDTH$} {:>9} {:>9} {:>10} {:>10}   {:>8} {:>9}",
            "path", "1B p50", "1B p99", "16KiB p50", "16KiB p99", "1Bp50/3h", "16Kp50/3h"
        );
        for res in results {
            let _ = writeln!(
                t,
                "{:<LABEL_WIDTH$} {:>9} {:>9} {:>10} {:>10}   {:>8} {:>9}",
                res.label,
                num(m(&res.p50_1b), 0),
                num(m(&res.p99_1b), 0),
                num(m(&res.p50_16k), 0),
                num(m(&res.p99_16k), 0),
                num(r(&|x| m(&x.p50_1b), res), 2),
                num(r(&|x| m(&x.p50_16k), res), 2),
            );
        }
    }
    if opts.section("aggregate") {
        let _ = writeln!(
            t,
            "\n{} connections busy at once, {} KiB each way each (MiB/s, both directions)",
            opts.agg_conns,
            opts.agg_bytes >> 10
        );
        for res in results {
            let _ = writeln!(
                t,
                "{:<LABEL_WIDTH$} {:>9}   {:>5}",
                res.label,
                num(m(&res.aggregate), 1),
                num(r(&|x| m(&x.aggregate), res), 2)
            );
        }
    }
    if opts.section("throughput") || opts.section("aggregate") {
        let _ = writeln!(
            t,
            "\nCPU seconds per GiB moved (throughput + aggregate sections)"
        );
        for res in results.iter().filter(|r| !r.cpu.is_empty()) {
            let gib = res.bytes_moved / GIB;
            let parts: Vec<String> = res
                .cpu
                .iter()
                .map(|(role, s)| format!("{role} {:.2}", s / gib))
                .collect();
            let _ = writeln!(t, "{:<LABEL_WIDTH$} {}", res.label, parts.join(", "));
        }
    }
    for idle in idle {
        let _ = writeln!(
            t,
            "\n{} idle connections held through one relay ({})",
            idle.conns, idle.flavour
        );
        let _ = writeln!(
            t,
            "open all (connect + first 1-byte round trip): {:.2} s",
            idle.open_secs
        );
        let _ = writeln!(
            t,
            "one round trip on all at once:                {:.2} s",
            idle.round_trip_secs
        );
        for role in ["relay", "broker", "client"] {
            let _ = writeln!(
                t,
                "{role:<7} RSS {:7.1} MiB -> {:7.1} MiB held: {:6.1} KiB per connection",
                idle.rss_before.get(role).copied().unwrap_or(0) as f64 / MIB,
                idle.rss_held.get(role).copied().unwrap_or(0) as f64 / MIB,
                idle.per_conn(role) / 1024.0
            );
        }
        let cpu: Vec<String> = idle
            .cpu_secs
            .iter()
            .map(|(r, s)| format!("{r} {s:.1}"))
            .collect();
        if idle.rt_failed > 0 {
            let _ = writeln!(
                t,
                "ROUND TRIPS FAILED: {} (first: {})",
                idle.rt_failed,
                idle.rt_error.as_deref().unwrap_or("?")
            );
        }
        let _ = writeln!(
            t,
            "relay descriptors while held: {}; CPU seconds to open + round trip: {}",
            idle.relay_fds_held,
            cpu.join(", ")
        );
    }
    if let Some(many) = inproc_many {
        many::render_table(many, &mut t);
    }
    if let Some(soak) = soak {
        soak::render_table(soak, &mut t);
    }
    let has_targets = base.is_some() || !idle.is_empty() || inproc_many.is_some();
    if has_targets {
        let _ = writeln!(t, "\nTargets:");
    }
    if let Some(b) = base {
        for res in results.iter().filter(|r| r.label.starts_with("tunnel")) {
            if opts.section("throughput") {
                let (up, down) = (ratio(m(&res.up), m(&b.up)), ratio(m(&res.down), m(&b.down)));
                let ok = up >= TARGET_THROUGHPUT_RATIO && down >= TARGET_THROUGHPUT_RATIO;
                let _ = writeln!(
                    t,
                    "  {:<LABEL_WIDTH$} throughput up {} down {} of 3-hop (>= {TARGET_THROUGHPUT_RATIO}): {}",
                    res.label,
                    num(up, 2),
                    num(down, 2),
                    verdict(ok)
                );
            }
            if opts.section("latency") {
                let l = ratio(m(&res.p50_1b), m(&b.p50_1b));
                let _ = writeln!(
                    t,
                    "  {:<LABEL_WIDTH$} 1-byte p50 {}x 3-hop (<= {TARGET_LATENCY_RATIO}x): {}",
                    res.label,
                    num(l, 2),
                    verdict(l <= TARGET_LATENCY_RATIO)
                );
            }
        }
    }
    render_old_vs_new(results, opts, &mut t);
    for idle in idle {
        let per = idle.per_conn("relay");
        let ok = idle.conns >= 10_000 && idle.rt_failed == 0 && per < TARGET_IDLE_BYTES;
        let _ = writeln!(
            t,
            "  {} idle connections, relay {:.1} KiB each (10,000 at < 32 KiB): {}",
            idle.conns,
            per / 1024.0,
            verdict(ok)
        );
        let client = idle.per_conn("client");
        let checks = [
            (
                format!("{} round trips failed (0)", idle.rt_failed),
                idle.rt_failed == 0,
            ),
            (
                format!(
                    "round trip on all {:.2} s (<= {TARGET_SESSION_ROUND_TRIP_SECS} s)",
                    idle.round_trip_secs
                ),
                idle.round_trip_secs <= TARGET_SESSION_ROUND_TRIP_SECS,
            ),
            (
                format!("relay {:.1} KiB/conn (<= 8)", per / 1024.0),
                per <= TARGET_SESSION_RELAY_BYTES,
            ),
            (
                format!("client {:.1} KiB/conn (<= 16)", client / 1024.0),
                client <= TARGET_SESSION_CLIENT_BYTES,
            ),
            (
                format!(
                    "relay {} descriptors (<= {TARGET_SESSION_RELAY_FDS})",
                    idle.relay_fds_held
                ),
                idle.relay_fds_held <= TARGET_SESSION_RELAY_FDS,
            ),
        ];
        let _ = writeln!(
            t,
            "  {} idle, {}: session targets (for 10,000 over HTTP/1.1):",
            idle.conns, idle.flavour
        );
        for (what, ok) in checks {
            let _ = writeln!(t, "      {what}: {}", verdict(ok));
        }
    }
    if let Some(many) = inproc_many {
        let per = many.relay_per_conn();
        let ok = many.opened >= 100_000 && many.failed() == 0 && per <= TARGET_SESSION_RELAY_BYTES;
        let _ = writeln!(
            t,
            "  inproc-many: {} of {} open, {} failed, relay {:.1} KiB each (100,000, none failed, <= 8 KiB): {}",
            many.opened,
            many.asked,
            many.failed(),
            per / 1024.0,
            verdict(ok)
        );
    }
    t
}

/// The issue-9 targets of one idle run: no failure, a round trip on all within 5 s, relay
/// at most 8 KiB and client 16 KiB per connection, relay at most 64 descriptors.
fn session_targets_met(i: &IdleResults) -> bool {
    i.rt_failed == 0
        && i.round_trip_secs <= TARGET_SESSION_ROUND_TRIP_SECS
        && i.per_conn("relay") <= TARGET_SESSION_RELAY_BYTES
        && i.per_conn("client") <= TARGET_SESSION_CLIENT_BYTES
        && i.relay_fds_held <= TARGET_SESSION_RELAY_FDS
}

/// Target lines comparing every path measured through `--old-bin-dir` ("old …") with the
/// new path of the same flavour: throughput and 1-byte latency no worse than before.
fn render_old_vs_new(results: &[PathResults], opts: &Opts, t: &mut String) {
    use std::fmt::Write;
    let m = |v: &[f64]| median(v);
    for old in results.iter().filter(|r| r.label.starts_with("old ")) {
        // "old tunnel HTTP/1.1 [per-conn]" pairs with "tunnel HTTP/1.1 [...]".
        let flavour = old.label["old ".len()..]
            .split(" [")
            .next()
            .unwrap_or_default();
        let Some(new) = results
            .iter()
            .find(|r| !r.label.starts_with("old ") && r.label.starts_with(&format!("{flavour} [")))
        else {
            continue;
        };
        if opts.section("throughput") {
            let (up, down) = (
                ratio(m(&new.up), m(&old.up)),
                ratio(m(&new.down), m(&old.down)),
            );
            let ok = up >= TARGET_NO_WORSE_THROUGHPUT && down >= TARGET_NO_WORSE_THROUGHPUT;
            let _ = writeln!(
                t,
                "  {:<LABEL_WIDTH$} throughput up {} down {} of old (>= {TARGET_NO_WORSE_THROUGHPUT}): {}",
                new.label,
                num(up, 2),
                num(down, 2),
                verdict(ok)
            );
        }
        if opts.section("latency") {
            let l = ratio(m(&new.p50_1b), m(&old.p50_1b));
            let _ = writeln!(
                t,
                "  {:<LABEL_WIDTH$} 1-byte p50 {}x old (<= {TARGET_NO_WORSE_LATENCY}x): {}",
                new.label,
                num(l, 2),
                verdict(l <= TARGET_NO_WORSE_LATENCY)
            );
        }
    }
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "PASS"
    } else {
        "FAIL"
    }
}

fn render_json(
    opts: &Opts,
    machine: &procfs::Machine,
    results: &[PathResults],
    idle: &[IdleResults],
) -> Json {
    let base = results.iter().find(|r| r.label == "3-hop TCP chain");
    let series = Json::series;
    let paths = results
        .iter()
        .map(|res| {
            let gib = res.bytes_moved / GIB;
            let cpu = res
                .cpu
                .iter()
                .map(|(role, s)| (role.clone(), Json::Num(s / gib)))
                .collect();
            Json::obj(vec![
                ("path", Json::Str(res.label.clone())),
                (
                    "throughput_up_mib_s",
                    series(&res.up, base.map(|b| b.up.as_slice())),
                ),
                (
                    "throughput_down_mib_s",
                    series(&res.down, base.map(|b| b.down.as_slice())),
                ),
                (
                    "throughput_both_mib_s",
                    series(&res.both, base.map(|b| b.both.as_slice())),
                ),
                (
                    "rtt_1b_p50_us",
                    series(&res.p50_1b, base.map(|b| b.p50_1b.as_slice())),
                ),
                (
                    "rtt_1b_p99_us",
                    series(&res.p99_1b, base.map(|b| b.p99_1b.as_slice())),
                ),
                (
                    "rtt_16k_p50_us",
                    series(&res.p50_16k, base.map(|b| b.p50_16k.as_slice())),
                ),
                (
                    "rtt_16k_p99_us",
                    series(&res.p99_16k, base.map(|b| b.p99_16k.as_slice())),
                ),
                (
                    "aggregate_mib_s",
                    series(&res.aggregate, base.map(|b| b.aggregate.as_slice())),
                ),
                ("cpu_s_per_gib", Json::Obj(cpu)),
            ])
        })
        .collect();
    let idle_json = idle
        .iter()
        .map(|i| {
            Json::obj(vec![
                ("flavour", Json::Str(i.flavour.clone())),
                ("connections", Json::Num(i.conns as f64)),
                ("open_all_s", Json::Num(i.open_secs)),
                ("round_trip_all_s", Json::Num(i.round_trip_secs)),
                ("relay_fds_held", Json::Num(i.relay_fds_held as f64)),
                ("round_trips_failed", Json::Num(i.rt_failed as f64)),
                (
                    "round_trip_first_error",
                    Json::Str(i.rt_error.clone().unwrap_or_default()),
                ),
                (
                    "cpu_s_open_and_round_trip",
                    Json::Obj(
                        i.cpu_secs
                            .iter()
                            .map(|(r, s)| (r.clone(), Json::Num(*s)))
                            .collect(),
                    ),
                ),
                (
                    "relay_rss_before_bytes",
                    Json::Num(i.rss_before.get("relay").copied().unwrap_or(0) as f64),
                ),
                (
                    "relay_rss_held_bytes",
                    Json::Num(i.rss_held.get("relay").copied().unwrap_or(0) as f64),
                ),
                ("relay_bytes_per_conn", Json::Num(i.per_conn("relay"))),
                ("broker_bytes_per_conn", Json::Num(i.per_conn("broker"))),
                ("client_bytes_per_conn", Json::Num(i.per_conn("client"))),
                (
                    "target_met",
                    Json::Bool(
                        i.conns >= 10_000
                            && i.rt_failed == 0
                            && i.per_conn("relay") < TARGET_IDLE_BYTES,
                    ),
                ),
                ("session_targets_met", Json::Bool(session_targets_met(i))),
            ])
        })
        .collect();
    Json::obj(vec![
        (
            "machine",
            Json::obj(vec![
                ("cores", Json::Num(machine.cores as f64)),
                ("cpu_model", Json::Str(machine.cpu_model.clone())),
                ("kernel", Json::Str(machine.kernel.clone())),
            ]),
        ),
        (
            "config",
            Json::obj(vec![
                ("runs", Json::Num(opts.runs as f64)),
                ("bytes", Json::Num(opts.bytes as f64)),
                ("pings", Json::Num(opts.pings as f64)),
                ("agg_conns", Json::Num(opts.agg_conns as f64)),
                ("agg_bytes", Json::Num(opts.agg_bytes as f64)),
                ("idle_conns", Json::Num(opts.idle_conns as f64)),
            ]),
        ),
        ("paths", Json::Arr(paths)),
        ("idle", Json::Arr(idle_json)),
    ])
}
