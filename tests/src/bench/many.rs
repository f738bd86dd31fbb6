//! The `inproc-many` section: many connections opened with the library, no local sockets.
//!
//! A relay process (so its memory and descriptors can be read from /proc), and in the bench
//! process a `TunnelClient` and a `TunnelListener` whose accept loop echoes every connection.
//! Opens `conns` connections (at most `open_parallel` connects in flight), then writes one
//! byte on every connection and waits for every echo: one round trip on all at once. Reports
//! the times, the failures, the relay's RSS and descriptors, and the bench process's RSS
//! (client and broker sides together).

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tunnel_broker::{read_link_secret_file, BrokerConfig, TunnelListener};
use tunnel_client::{ClientConfig, HttpVersion, TunnelClient, TunnelStream};
use tunnel_tests::{procfs, TestDir};

use super::report::Json;
use super::tunnel::{self, Flavour};

/// Server name of the in-process broker.
const SERVER_NAME: &str = "bench-many";
/// Bytes an echo task reads at a time: the section moves one byte per connection, and a
/// large buffer per connection would be most of what the bench measures.
const ECHO_BUF: usize = 64;
/// Time the in-process broker has to link to the relay.
const LINK_TIMEOUT: Duration = Duration::from_secs(30);
/// Tasks that do the round trip on all connections between them.
const ROUND_TRIP_WORKERS: usize = 64;
/// Pause before a memory reading, so queued work drains and RSS is what holding costs.
const SETTLE: Duration = Duration::from_secs(1);

/// What the section is asked to do.
#[derive(Debug, Clone)]
pub struct ManyOptions {
    pub conns: usize,
    /// Connects in flight at once.
    pub open_parallel: usize,
    /// http1 or http2 (h2c) between the client and the relay.
    pub flavour: Flavour,
    /// Deadline of the opening, and separately of the round trip.
    pub timeout: Duration,
}

/// What it measured.
#[derive(Debug)]
pub struct ManyResults {
    pub label: String,
    pub asked: usize,
    pub opened: usize,
    pub open_failed: usize,
    pub open_error: Option<String>,
    pub open_secs: f64,
    pub rt_failed: usize,
    pub rt_error: Option<String>,
    pub round_trip_secs: f64,
    pub relay_rss_before: u64,
    pub relay_rss_held: u64,
    pub relay_fds_held: usize,
    pub bench_rss_before: u64,
    pub bench_rss_held: u64,
    pub bench_fds_held: usize,
    /// CPU seconds to open and round-trip: the relay's, and the bench process's (client and
    /// broker sides, and the bench's own bookkeeping).
    pub relay_cpu_secs: f64,
    pub bench_cpu_secs: f64,
}

impl ManyResults {
    fn per_conn(&self, before: u64, held: u64) -> f64 {
        (held as f64 - before as f64) / self.opened.max(1) as f64
    }

    /// Relay RSS growth per open connection, in bytes.
    pub fn relay_per_conn(&self) -> f64 {
        self.per_conn(self.relay_rss_before, self.relay_rss_held)
    }

    /// Bench process RSS growth per open connection (client + broker sides), in bytes.
    pub fn bench_per_conn(&self) -> f64 {
        self.per_conn(self.bench_rss_before, self.bench_rss_held)
    }

    pub fn failed(&self) -> usize {
        self.open_failed + self.rt_failed
    }
}

/// Echoes one connection until its end, with a small buffer.
async fn echo(mut stream: TunnelStream) {
    let mut buf = [0u8; ECHO_BUF];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if stream.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
    let _ = stream.shutdown().await;
}

/// Accepts until the listener fails, echoing every connection in `echoes`.
async fn accept_loop(listener: Arc<TunnelListener>) {
    let mut echoes = JoinSet::new();
    loop {
        while echoes.try_join_next().is_some() {}
        match listener.accept().await {
            Ok((stream, _info)) => {
                echoes.spawn(echo(stream));
            }
            Err(e) => {
                tracing::warn!(error = %e, "bench broker stopped accepting");
                return;
            }
        }
    }
}

fn cpu(pid: u32) -> f64 {
    procfs::cpu_seconds(pid).unwrap_or(f64::NAN)
}

/// Opens `options.conns` connections through `client`, `options.open_parallel` at a time.
/// Returns the streams, the failures (count and first error) and the time it took.
async fn open_all(
    client: &TunnelClient,
    options: &ManyOptions,
    say: &impl Fn(&str),
) -> (Vec<TunnelStream>, usize, Option<String>, Duration) {
    let started = Instant::now();
    let deadline = started + options.timeout;
    let gate = Arc::new(Semaphore::new(options.open_parallel.max(1)));
    let mut tasks = JoinSet::new();
    let mut streams = Vec::with_capacity(options.conns);
    let (mut failed, mut first_error) = (0, None::<String>);
    let mut launched = 0;
    while streams.len() + failed < options.conns {
        // Launch while there is room: the tasks in flight stay below the gate.
        while launched < options.conns && gate.available_permits() > 0 {
            let Ok(permit) = Arc::clone(&gate).acquire_owned().await else {
                break;
            };
            let client = client.clone();
            tasks.spawn(async move {
                let _permit = permit;
                client.connect().await
            });
            launched += 1;
        }
        match tokio::time::timeout_at(deadline, tasks.join_next()).await {
            Ok(Some(Ok(Ok(stream)))) => {
                streams.push(stream);
                if streams.len() % 10_000 == 0 {
                    say(&format!("inproc-many: {} open", streams.len()));
                }
            }
            Ok(Some(result)) => {
                // A connect error or a task that panicked.
                let e = match result {
                    Err(join) => join.to_string(),
                    Ok(connect) => connect.err().map(|e| e.to_string()).unwrap_or_default(),
                };
                failed += 1;
                first_error.get_or_insert(e);
            }
            Ok(None) => break,
            Err(_) => {
                let unfinished = options.conns - streams.len() - failed;
                failed += unfinished;
                first_error.get_or_insert_with(|| {
                    format!(
                        "{unfinished} connects unfinished after {:?}",
                        options.timeout
                    )
                });
                tasks.abort_all();
                break;
            }
        }
    }
    (streams, failed, first_error, started.elapsed())
}

/// One byte on every stream of `part`, then every echo: the writes only queue (no stream
/// waits for another), so the reads, one after the other, find echoes that arrived at the
/// same time. Returns the streams that made it and the errors.
async fn round_trip_part(
    part: Vec<TunnelStream>,
    deadline: Instant,
) -> (Vec<TunnelStream>, Vec<io::Error>) {
    let timed_out = || io::Error::new(io::ErrorKind::TimedOut, "round trip past the deadline");
    let mut errors = Vec::new();
    let mut written = Vec::with_capacity(part.len());
    for mut stream in part {
        match tokio::time::timeout_at(deadline, stream.write_all(b"m")).await {
            Ok(Ok(())) => written.push(stream),
            Ok(Err(e)) => errors.push(e),
            Err(_) => errors.push(timed_out()),
        }
    }
    let mut back = Vec::with_capacity(written.len());
    for mut stream in written {
        let mut b = [0u8; 1];
        match tokio::time::timeout_at(deadline, stream.read_exact(&mut b)).await {
            Ok(Ok(_)) => back.push(stream),
            Ok(Err(e)) => errors.push(e),
            Err(_) => errors.push(timed_out()),
        }
    }
    (back, errors)
}

/// One round trip on every stream at once, by `ROUND_TRIP_WORKERS` tasks (not one task per
/// connection: 100,000 tasks would be part of what the bench measures). Returns the streams
/// that made it, the failures (count and first error) and the time to the last echo.
async fn round_trip_all(
    streams: Vec<TunnelStream>,
    timeout: Duration,
) -> (Vec<TunnelStream>, usize, Option<String>, Duration) {
    let started = Instant::now();
    let deadline = started + timeout;
    let total = streams.len();
    let per_worker = total.div_ceil(ROUND_TRIP_WORKERS).max(1);
    let mut streams = streams.into_iter();
    let mut tasks = JoinSet::new();
    loop {
        let part: Vec<TunnelStream> = streams.by_ref().take(per_worker).collect();
        if part.is_empty() {
            break;
        }
        tasks.spawn(round_trip_part(part, deadline));
    }
    let (mut back, mut first_error) = (Vec::with_capacity(total), None);
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok((ok, errors)) => {
                back.extend(ok);
                if let Some(e) = errors.first() {
                    first_error.get_or_insert_with(|| e.to_string());
                }
            }
            // A worker that panicked: its streams are gone, counted below as failed.
            Err(e) => {
                first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    let failed = total - back.len();
    (back, failed, first_error, started.elapsed())
}

/// Runs the section against the relay binary in `bin_dir`.
pub async fn section(
    bin_dir: &Path,
    options: &ManyOptions,
    say: impl Fn(&str),
) -> io::Result<ManyResults> {
    let dir = TestDir::new("bench-many")?;
    let mut relay = tunnel::start_relay(
        bin_dir,
        dir.path(),
        options.conns + options.open_parallel + 1024,
        Vec::new(),
    )
    .await?;
    let relay_pid = relay
        .process
        .id()
        .ok_or_else(|| io::Error::other("relay has no pid"))?;
    let mut broker_config = BrokerConfig::new(
        relay.link.to_string(),
        SERVER_NAME,
        read_link_secret_file(&relay.secret_file)?,
    );
    broker_config.handshake_timeout = LINK_TIMEOUT;
    broker_config.accept_backlog = options.open_parallel.max(1024) * 2;
    let listener = Arc::new(TunnelListener::bind(broker_config).await?);
    let accepting = tokio::spawn(accept_loop(Arc::clone(&listener)));

    let mut config = ClientConfig::new(format!("http://{}/tunnel", relay.http), SERVER_NAME);
    config.env_proxy = false;
    config.http_version = match options.flavour {
        Flavour::Http2 => HttpVersion::Http2PriorKnowledge,
        _ => HttpVersion::Http1Only,
    };
    let client = TunnelClient::new(config).map_err(|e| io::Error::other(format!("client: {e}")))?;
    // One connection first, so the pools, the session and the link are set up before the
    // memory reading.
    let mut warm = tokio::time::timeout(LINK_TIMEOUT, client.connect())
        .await
        .map_err(|_| io::Error::other("first connection did not open within 30 s"))?
        .map_err(|e| io::Error::other(format!("first connection: {e}")))?;
    warm.write_all(b"w").await?;
    let mut b = [0u8; 1];
    warm.read_exact(&mut b).await?;
    tokio::time::sleep(SETTLE).await;

    let me = std::process::id();
    let (relay_rss_before, bench_rss_before) =
        (procfs::rss_bytes(relay_pid)?, procfs::rss_bytes(me)?);
    let (relay_cpu_before, bench_cpu_before) = (cpu(relay_pid), cpu(me));
    say(&format!(
        "inproc-many: relay RSS {:.1} MiB, bench {:.1} MiB; opening {} connections ({} at a time)",
        relay_rss_before as f64 / (1 << 20) as f64,
        bench_rss_before as f64 / (1 << 20) as f64,
        options.conns,
        options.open_parallel
    ));
    let (streams, open_failed, open_error, open) = open_all(&client, options, &say).await;
    say(&format!(
        "inproc-many: {} open in {:.2} s ({open_failed} failed); one round trip on all",
        streams.len(),
        open.as_secs_f64()
    ));
    let opened = streams.len();
    let (streams, rt_failed, rt_error, round_trip) = round_trip_all(streams, options.timeout).await;
    tokio::time::sleep(SETTLE).await;
    if let Some(status) = relay.process.try_exit_status()? {
        return Err(io::Error::other(format!(
            "relay exited ({status}); log tail:\n{}",
            relay.process.log_tail(20)
        )));
    }
    let results = ManyResults {
        label: format!(
            "{} connections, library client and broker in process",
            options.flavour.label()
        ),
        asked: options.conns,
        opened,
        open_failed,
        open_error,
        open_secs: open.as_secs_f64(),
        rt_failed,
        rt_error,
        round_trip_secs: round_trip.as_secs_f64(),
        relay_rss_before,
        relay_rss_held: procfs::rss_bytes(relay_pid)?,
        relay_fds_held: procfs::open_fds(relay_pid)?,
        bench_rss_before,
        bench_rss_held: procfs::rss_bytes(me)?,
        bench_fds_held: procfs::open_fds(me)?,
        relay_cpu_secs: cpu(relay_pid) - relay_cpu_before,
        bench_cpu_secs: cpu(me) - bench_cpu_before,
    };
    say(&format!(
        "inproc-many: round trip on all in {:.2} s ({rt_failed} failed); relay {:.1} KiB per connection",
        results.round_trip_secs,
        results.relay_per_conn() / 1024.0
    ));
    // Stop the broker side first, so dropping the streams costs no broker work.
    accepting.abort();
    drop(streams);
    drop(warm);
    drop(client);
    Ok(results)
}

/// The section's lines of the table.
pub fn render_table(r: &ManyResults, t: &mut String) {
    use std::fmt::Write;
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let _ = writeln!(t, "\n{} of {} ({})", r.opened, r.asked, r.label);
    let outcome = |secs: f64, failed: usize, error: &Option<String>| {
        let first = error
            .as_deref()
            .map(|e| format!("; first: {e}"))
            .unwrap_or_default();
        format!("{secs:.2} s ({failed} failed{first})")
    };
    let _ = writeln!(
        t,
        "open all:                      {}",
        outcome(r.open_secs, r.open_failed, &r.open_error)
    );
    let _ = writeln!(
        t,
        "one round trip on all at once: {}",
        outcome(r.round_trip_secs, r.rt_failed, &r.rt_error)
    );
    let _ = writeln!(
        t,
        "relay RSS {:7.1} MiB -> {:7.1} MiB held: {:6.1} KiB per connection; {} descriptors",
        mib(r.relay_rss_before),
        mib(r.relay_rss_held),
        r.relay_per_conn() / 1024.0,
        r.relay_fds_held
    );
    let _ = writeln!(
        t,
        "bench RSS {:7.1} MiB -> {:7.1} MiB held: {:6.1} KiB per connection (client + broker); {} descriptors",
        mib(r.bench_rss_before),
        mib(r.bench_rss_held),
        r.bench_per_conn() / 1024.0,
        r.bench_fds_held
    );
    let _ = writeln!(
        t,
        "CPU seconds to open + round trip: relay {:.1}, bench (client + broker) {:.1}",
        r.relay_cpu_secs, r.bench_cpu_secs
    );
}

/// The section as JSON.
pub fn render_json(r: &ManyResults) -> Json {
    Json::obj(vec![
        ("label", Json::Str(r.label.clone())),
        ("connections_asked", Json::Num(r.asked as f64)),
        ("connections_opened", Json::Num(r.opened as f64)),
        ("open_failed", Json::Num(r.open_failed as f64)),
        (
            "open_first_error",
            Json::Str(r.open_error.clone().unwrap_or_default()),
        ),
        ("open_all_s", Json::Num(r.open_secs)),
        ("round_trips_failed", Json::Num(r.rt_failed as f64)),
        (
            "round_trip_first_error",
            Json::Str(r.rt_error.clone().unwrap_or_default()),
        ),
        ("round_trip_all_s", Json::Num(r.round_trip_secs)),
        (
            "relay_rss_before_bytes",
            Json::Num(r.relay_rss_before as f64),
        ),
        ("relay_rss_held_bytes", Json::Num(r.relay_rss_held as f64)),
        ("relay_bytes_per_conn", Json::Num(r.relay_per_conn())),
        ("relay_fds_held", Json::Num(r.relay_fds_held as f64)),
        ("bench_bytes_per_conn", Json::Num(r.bench_per_conn())),
        ("bench_fds_held", Json::Num(r.bench_fds_held as f64)),
        ("relay_cpu_s", Json::Num(r.relay_cpu_secs)),
        ("bench_cpu_s", Json::Num(r.bench_cpu_secs)),
    ])
}
