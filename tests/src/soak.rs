//! Connection churn ("soak"): workers open a TCP connection to an entry port (the client
//! binary's `--listen`), echo a payload, close it cleanly and start over, at full speed, while
//! the processes behind it are sampled (resident memory, open descriptors) and their logs are
//! watched for WARN and ERROR lines.
//!
//! One implementation for the bench's `soak` section (release binaries, minutes) and the CI
//! test `tests/tests/soak.rs` (debug binaries, about 30 s). The caller starts the processes;
//! this module only needs the entry address and, per process, its pid and log file.

use std::collections::BTreeMap;
use std::io::{self, Read, Seek, SeekFrom};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::process::ChildProcess;
use crate::procfs::{self, Usage};

/// Failures whose message is kept for the report (the rest are only counted).
const FAILURE_EXAMPLES: usize = 5;
/// WARN/ERROR lines kept per process for the report.
const LOG_EXAMPLES: usize = 5;
/// How often the settle wait looks at the descriptors.
const SETTLE_POLL: Duration = Duration::from_millis(250);
/// Connections per figure of RSS growth.
pub const GROWTH_PER: f64 = 100_000.0;

/// What a churn run does.
#[derive(Debug, Clone)]
pub struct SoakConfig {
    /// Where each connection goes (the client binary's local port).
    pub entry: SocketAddr,
    /// Connections in progress at once (one per worker).
    pub workers: usize,
    /// How long new connections are started.
    pub duration: Duration,
    /// Bytes each connection sends and expects back (echo).
    pub payload_bytes: usize,
    /// Deadline of one connection (connect, echo, close); past it the connection fails.
    pub connection_timeout: Duration,
    /// Time between two samples of the processes.
    pub sample_interval: Duration,
    /// Samples before this point of the run are left out of the RSS growth rate: the first
    /// seconds fill the working set (connections in progress and in TIME-WAIT, pools).
    pub warmup: Duration,
    /// Longest wait after the churn for every process's descriptors to come back to their
    /// idle level (closed connections linger: TIME-WAIT, pooled HTTP connections).
    pub settle_timeout: Duration,
    /// Descriptors above the idle level still counted as "back" (see the caller's reason).
    pub fd_tolerance: usize,
}

impl SoakConfig {
    /// 32 workers, 60 s, 2 KiB echoed per connection, samples every 2 s.
    pub fn new(entry: SocketAddr) -> SoakConfig {
        SoakConfig {
            entry,
            workers: 32,
            duration: Duration::from_secs(60),
            payload_bytes: 2048,
            connection_timeout: Duration::from_secs(10),
            sample_interval: Duration::from_secs(2),
            warmup: Duration::from_secs(10),
            settle_timeout: Duration::from_secs(30),
            fd_tolerance: 0,
        }
    }
}

/// A process the run watches.
#[derive(Debug, Clone)]
pub struct Watched {
    pub role: String,
    pub pid: u32,
    /// Its stderr (WARN and ERROR lines are counted from where it ends when the churn starts).
    pub log: PathBuf,
}

impl Watched {
    pub fn of(role: &str, process: &ChildProcess) -> io::Result<Watched> {
        Ok(Watched {
            role: role.to_string(),
            pid: process
                .id()
                .ok_or_else(|| io::Error::other(format!("{role} has exited")))?,
            log: process.log_path().to_path_buf(),
        })
    }
}

/// The watched processes at one moment of the churn.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Since the churn started.
    pub at: Duration,
    /// Connections completed by then.
    pub connections: u64,
    pub usage: BTreeMap<String, Usage>,
}

/// WARN and ERROR lines one process logged during the run.
#[derive(Debug, Clone, Default)]
pub struct LogLevels {
    pub warn: usize,
    pub error: usize,
    /// The first few of them.
    pub examples: Vec<String>,
}

/// Everything a churn run measured.
#[derive(Debug, Clone)]
pub struct SoakReport {
    /// Connections that echoed their payload and closed cleanly.
    pub connections: u64,
    pub failures: u64,
    pub failure_examples: Vec<String>,
    /// From the first connection to the last one's end.
    pub elapsed: Duration,
    pub idle_before: BTreeMap<String, Usage>,
    /// Taken every `sample_interval` during the churn, and once at its end.
    pub samples: Vec<Sample>,
    pub after_settle: BTreeMap<String, Usage>,
    /// How long the descriptors took to come back (or the whole settle timeout).
    pub settle_time: Duration,
    /// Whether every process came back within the tolerance before the settle timeout.
    pub settled: bool,
    pub fd_tolerance: usize,
    pub warmup: Duration,
    pub logs: BTreeMap<String, LogLevels>,
}

impl SoakReport {
    pub fn connections_per_second(&self) -> f64 {
        self.connections as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub fn roles(&self) -> Vec<String> {
        self.idle_before.keys().cloned().collect()
    }

    /// Most descriptors `role` held in any sample.
    pub fn peak_fds(&self, role: &str) -> usize {
        self.samples
            .iter()
            .filter_map(|s| s.usage.get(role).map(|u| u.fds))
            .max()
            .unwrap_or(0)
    }

    /// RSS of `role` in the first sample after the warm-up and in the last sample.
    pub fn rss_after_warmup_and_end(&self, role: &str) -> (u64, u64) {
        let rss = |s: &Sample| s.usage.get(role).map_or(0, |u| u.rss_bytes);
        let steady: Vec<&Sample> = self.steady_samples();
        (
            steady.first().map_or(0, |s| rss(s)),
            steady.last().map_or(0, |s| rss(s)),
        )
    }

    /// Resident memory `role` gained per [`GROWTH_PER`] connections once warmed up: the
    /// least-squares slope of RSS against connections over the samples after the warm-up
    /// (NaN with fewer than two of them).
    pub fn rss_growth_per_100k(&self, role: &str) -> f64 {
        let points: Vec<(f64, f64)> = self
            .steady_samples()
            .iter()
            .filter_map(|s| {
                let u = s.usage.get(role)?;
                Some((s.connections as f64, u.rss_bytes as f64))
            })
            .collect();
        slope(&points) * GROWTH_PER
    }

    /// [`SoakReport::rss_growth_per_100k`] over the second half of the run only. A leak grows
    /// as fast in both halves; an allocator converging on its high-water mark slows down.
    pub fn rss_growth_per_100k_second_half(&self, role: &str) -> f64 {
        let half = self.elapsed / 2;
        let points: Vec<(f64, f64)> = self
            .samples
            .iter()
            .filter(|s| s.at >= half.max(self.warmup))
            .filter_map(|s| {
                let u = s.usage.get(role)?;
                Some((s.connections as f64, u.rss_bytes as f64))
            })
            .collect();
        slope(&points) * GROWTH_PER
    }

    fn steady_samples(&self) -> Vec<&Sample> {
        self.samples
            .iter()
            .filter(|s| s.at >= self.warmup)
            .collect()
    }

    /// Processes whose descriptors after the settle wait exceed their idle level plus the
    /// tolerance, described for an assertion message.
    pub fn fds_not_back(&self) -> Vec<String> {
        self.idle_before
            .iter()
            .filter_map(|(role, idle)| {
                let after = self.after_settle.get(role)?.fds;
                (after > idle.fds + self.fd_tolerance).then(|| {
                    format!(
                        "{role}: {after} descriptors after {:.1} s of settling, {} at idle \
                         (tolerance {})",
                        self.settle_time.as_secs_f64(),
                        idle.fds,
                        self.fd_tolerance
                    )
                })
            })
            .collect()
    }

    /// WARN + ERROR lines of every process together.
    pub fn warnings_and_errors(&self) -> usize {
        self.logs.values().map(|l| l.warn + l.error).sum()
    }
}

/// Least-squares slope of y against x; NaN with fewer than two distinct x.
fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if points.len() < 2 {
        return f64::NAN;
    }
    let (sx, sy) = points
        .iter()
        .fold((0.0, 0.0), |(sx, sy), (x, y)| (sx + x, sy + y));
    let (mx, my) = (sx / n, sy / n);
    let (num, den) = points.iter().fold((0.0, 0.0), |(num, den), (x, y)| {
        (num + (x - mx) * (y - my), den + (x - mx) * (x - mx))
    });
    if den == 0.0 {
        f64::NAN
    } else {
        num / den
    }
}

/// Counts of the run shared by the workers.
#[derive(Default)]
struct Tally {
    connections: AtomicU64,
    failures: AtomicU64,
    examples: Mutex<Vec<String>>,
}

impl Tally {
    fn failed(&self, error: String) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        let mut examples = self.examples.lock().unwrap_or_else(|e| e.into_inner());
        if examples.len() < FAILURE_EXAMPLES {
            examples.push(error);
        }
    }
}

/// Reads the usage of every watched process, failing with the role of one that is gone.
fn usage_of(watched: &[Watched]) -> io::Result<BTreeMap<String, Usage>> {
    watched
        .iter()
        .map(|w| {
            procfs::usage(w.pid)
                .map(|u| (w.role.clone(), u))
                .map_err(|e| io::Error::other(format!("{} (pid {}): {e}", w.role, w.pid)))
        })
        .collect()
}

/// Runs the churn against `config.entry` and measures `watched`; `progress` gets a line per
/// sample. Fails only when a process cannot be read (it has exited); failed connections are
/// counted in the report, not returned as errors.
pub async fn run(
    config: &SoakConfig,
    watched: &[Watched],
    progress: impl Fn(&str),
) -> io::Result<SoakReport> {
    let idle_before = usage_of(watched)?;
    let log_starts: Vec<u64> = watched
        .iter()
        .map(|w| std::fs::metadata(&w.log).map_or(0, |m| m.len()))
        .collect();

    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for worker in 0..config.workers.max(1) {
        let (tally, stop, config) = (tally.clone(), stop.clone(), config.clone());
        workers.spawn(async move {
            let mut round = 0u64;
            while !stop.load(Ordering::Relaxed) {
                round += 1;
                let payload = payload(config.payload_bytes, worker as u64, round);
                let attempt = tokio::time::timeout(
                    config.connection_timeout,
                    one_connection(config.entry, &payload),
                )
                .await;
                match attempt {
                    Ok(Ok(())) => {
                        tally.connections.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Err(e)) => tally.failed(format!("worker {worker}: {e}")),
                    Err(_) => tally.failed(format!(
                        "worker {worker}: no clean end within {:?}",
                        config.connection_timeout
                    )),
                }
            }
        });
    }

    let mut samples = Vec::new();
    let end = start + config.duration;
    let mut next_sample = start + config.sample_interval;
    while Instant::now() < end {
        tokio::time::sleep_until(next_sample.min(end)).await;
        if Instant::now() < next_sample {
            break;
        }
        next_sample += config.sample_interval;
        let sample = Sample {
            at: start.elapsed(),
            connections: tally.connections.load(Ordering::Relaxed),
            usage: usage_of(watched)?,
        };
        progress(&describe(&sample, tally.failures.load(Ordering::Relaxed)));
        samples.push(sample);
    }
    stop.store(true, Ordering::Relaxed);
    // Every worker ends within one connection timeout of the stop.
    while workers.join_next().await.is_some() {}
    let elapsed = start.elapsed();
    let last = Sample {
        at: elapsed,
        connections: tally.connections.load(Ordering::Relaxed),
        usage: usage_of(watched)?,
    };
    progress(&format!(
        "churn over: {}",
        describe(&last, tally.failures.load(Ordering::Relaxed))
    ));
    samples.push(last);

    let settle_start = Instant::now();
    let (after_settle, settled) = loop {
        let now = usage_of(watched)?;
        let back = now
            .iter()
            .all(|(role, u)| u.fds <= idle_before[role].fds + config.fd_tolerance);
        if back || settle_start.elapsed() >= config.settle_timeout {
            break (now, back);
        }
        tokio::time::sleep(SETTLE_POLL).await;
    };
    let settle_time = settle_start.elapsed();

    let mut logs = BTreeMap::new();
    for (w, from) in watched.iter().zip(log_starts) {
        logs.insert(w.role.clone(), count_levels(&w.log, from)?);
    }
    let failure_examples = tally
        .examples
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    Ok(SoakReport {
        connections: tally.connections.load(Ordering::Relaxed),
        failures: tally.failures.load(Ordering::Relaxed),
        failure_examples,
        elapsed,
        idle_before,
        samples,
        after_settle,
        settle_time,
        settled,
        fd_tolerance: config.fd_tolerance,
        warmup: config.warmup,
        logs,
    })
}

fn describe(sample: &Sample, failures: u64) -> String {
    let usage: Vec<String> = sample
        .usage
        .iter()
        .map(|(role, u)| {
            format!(
                "{role} {:.1} MiB {} fds",
                u.rss_bytes as f64 / (1024.0 * 1024.0),
                u.fds
            )
        })
        .collect();
    format!(
        "{:5.1} s: {} connections, {failures} failed; {}",
        sample.at.as_secs_f64(),
        sample.connections,
        usage.join(", ")
    )
}

/// A payload that differs per connection (so crossed streams would show), never starting
/// with the bench data server's throughput command byte `T`.
fn payload(len: usize, worker: u64, round: u64) -> Vec<u8> {
    let seed = worker.wrapping_mul(0x9E37_79B9).wrapping_add(round);
    let mut bytes: Vec<u8> = (0..len as u64)
        .map(|i| (seed.wrapping_add(i.wrapping_mul(131)) % 251) as u8)
        .collect();
    if let Some(first) = bytes.first_mut() {
        *first = b'S';
    }
    bytes
}

/// One connection: connect, send the payload, read it back, half-close, read the server's
/// end of stream. Anything else (an error, different bytes, bytes after the echo) fails it.
async fn one_connection(entry: SocketAddr, payload: &[u8]) -> io::Result<()> {
    let mut s = TcpStream::connect(entry).await?;
    s.set_nodelay(true)?;
    let (mut rd, mut wr) = s.split();
    let send = async {
        wr.write_all(payload).await?;
        wr.shutdown().await
    };
    let receive = async {
        let mut back = vec![0u8; payload.len()];
        rd.read_exact(&mut back)
            .await
            .map_err(|e| io::Error::new(e.kind(), format!("reading the echo: {e}")))?;
        if back != payload {
            return Err(io::Error::other("the echo differs from what was sent"));
        }
        let mut extra = [0u8; 1];
        match rd.read(&mut extra).await {
            Ok(0) => Ok(()),
            Ok(_) => Err(io::Error::other("bytes after the echo")),
            Err(e) => Err(io::Error::new(
                e.kind(),
                format!("waiting for end of stream: {e}"),
            )),
        }
    };
    tokio::try_join!(send, receive).map(|_| ())
}

/// WARN and ERROR lines in the log at `path` from byte `from` on. The binaries log through
/// `tracing`'s default format: `<timestamp>  <LEVEL> <target>: <message>`, no colours when
/// stderr is not a terminal.
pub fn count_levels(path: &std::path::Path, from: u64) -> io::Result<LogLevels> {
    let mut file = std::fs::File::open(path)?;
    file.seek(SeekFrom::Start(from))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    Ok(levels_in(&String::from_utf8_lossy(&bytes)))
}

fn levels_in(text: &str) -> LogLevels {
    let mut levels = LogLevels::default();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let stamped = words
            .next()
            .is_some_and(|w| w.starts_with(|c: char| c.is_ascii_digit()));
        match (stamped, words.next()) {
            (true, Some("WARN")) => levels.warn += 1,
            (true, Some("ERROR")) => levels.error += 1,
            _ => continue,
        }
        if levels.examples.len() < LOG_EXAMPLES {
            levels.examples.push(line.to_string());
        }
    }
    levels
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_warn_and_error_lines_only() {
        let log = "2026-12-02T14:05:41.1Z  INFO tunnel_client: tunnel connection closed\n\
                   2026-12-02T14:05:41.2Z  WARN tunnel_client::pull: pull failed\n\
                   2026-12-02T14:05:41.3Z ERROR tunnel_client: giving up\n\
                   a WARN in the middle of a line is not a level\n\
                   2026-12-02T14:05:41.4Z DEBUG x: WARN in a message\n";
        let levels = levels_in(log);
        assert_eq!((levels.warn, levels.error), (1, 1));
        assert_eq!(levels.examples.len(), 2);
        assert!(levels.examples[0].contains("pull failed"));
    }

    #[test]
    fn slope_of_a_line_and_of_too_few_points() {
        let points = [(0.0, 10.0), (100.0, 30.0), (200.0, 50.0)];
        assert!((slope(&points) - 0.2).abs() < 1e-12);
        assert!(slope(&points[..1]).is_nan());
        assert!(slope(&[(5.0, 1.0), (5.0, 2.0)]).is_nan());
    }

    #[test]
    fn payloads_differ_and_never_start_with_the_throughput_command() {
        let a = payload(2048, 1, 1);
        let b = payload(2048, 1, 2);
        assert_eq!(a.len(), 2048);
        assert_ne!(a, b);
        assert_eq!(a[0], b'S');
        assert!(payload(0, 0, 0).is_empty());
    }

    #[test]
    fn growth_rate_leaves_out_the_warmup() {
        let sample = |secs: u64, conns: u64, rss: u64| Sample {
            at: Duration::from_secs(secs),
            connections: conns,
            usage: BTreeMap::from([(
                "relay".to_string(),
                Usage {
                    rss_bytes: rss,
                    fds: 10,
                },
            )]),
        };
        let report = SoakReport {
            connections: 3000,
            failures: 0,
            failure_examples: vec![],
            elapsed: Duration::from_secs(30),
            idle_before: BTreeMap::from([(
                "relay".to_string(),
                Usage {
                    rss_bytes: 1,
                    fds: 10,
                },
            )]),
            // A big warm-up jump, then 1,000 bytes per 1,000 connections.
            samples: vec![
                sample(5, 500, 50_000_000),
                sample(10, 1000, 60_000_000),
                sample(20, 2000, 60_001_000),
                sample(30, 3000, 60_002_000),
            ],
            after_settle: BTreeMap::from([(
                "relay".to_string(),
                Usage {
                    rss_bytes: 1,
                    fds: 12,
                },
            )]),
            settle_time: Duration::from_secs(3),
            settled: false,
            fd_tolerance: 1,
            warmup: Duration::from_secs(10),
            logs: BTreeMap::new(),
        };
        assert!((report.rss_growth_per_100k("relay") - 100_000.0).abs() < 1e-6);
        // Second half: the samples from 15 s on (20 s and 30 s).
        assert!((report.rss_growth_per_100k_second_half("relay") - 100_000.0).abs() < 1e-6);
        assert_eq!(
            report.rss_after_warmup_and_end("relay"),
            (60_000_000, 60_002_000)
        );
        assert_eq!(report.peak_fds("relay"), 10);
        assert_eq!(report.fds_not_back().len(), 1, "12 > 10 + 1");
        assert!((report.connections_per_second() - 100.0).abs() < 1e-9);
    }
}
