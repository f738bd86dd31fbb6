//! The bench's `soak` section: a fresh tunnel (relay, broker, client), connections churned
//! through it at full speed by [`tunnel_tests::soak`], and the report's table and JSON.

use std::fmt::Write;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use tunnel_tests::soak::{self, SoakConfig, SoakReport, Watched, GROWTH_PER};

use super::report::{num, Json};
use super::tunnel::{self, Flavour};

const MIB: f64 = 1024.0 * 1024.0;

/// What the section was asked to do, for the report.
#[derive(Debug, Clone)]
pub struct SoakRun {
    pub flavour: String,
    pub config: SoakConfig,
    pub report: SoakReport,
}

/// Parameters of the section (from the bench's options).
pub struct SoakOptions {
    pub flavour: Flavour,
    pub workers: usize,
    pub duration: Duration,
    pub settle: Duration,
    /// How long to keep the processes after the figures are taken.
    pub hold: Duration,
    pub broker_max_conns: usize,
}

/// Starts a fresh tunnel in front of `target` (the data server, which echoes) and churns.
pub async fn section(
    bin_dir: &Path,
    target: SocketAddr,
    options: &SoakOptions,
    say: impl Fn(&str),
) -> io::Result<SoakRun> {
    say(&format!(
        "soak: starting a fresh {}; {} workers for {:?}",
        options.flavour.label(),
        options.workers,
        options.duration
    ));
    let mut path = tunnel::start_tunnel(
        bin_dir,
        options.flavour,
        target,
        &tunnel::TunnelOptions::new(options.broker_max_conns),
    )
    .await?;
    let watched = path
        .processes
        .iter()
        .map(|(role, process)| Watched::of(role, process))
        .collect::<io::Result<Vec<_>>>()?;
    let mut config = SoakConfig::new(path.entry);
    config.workers = options.workers;
    config.duration = options.duration;
    config.settle_timeout = options.settle;
    // The warm-up (TIME-WAIT of 5 s fills up, pools grow) is left out of the growth rate.
    config.warmup = Duration::from_secs(10).min(options.duration / 3);
    let report = soak::run(&config, &watched, |line| say(&format!("soak: {line}"))).await?;
    path.check_alive()?;
    if !options.hold.is_zero() {
        let pids: Vec<String> = watched
            .iter()
            .map(|w| format!("{} {}", w.role, w.pid))
            .collect();
        say(&format!(
            "soak: holding the processes for {:?}: {}",
            options.hold,
            pids.join(", ")
        ));
        tokio::time::sleep(options.hold).await;
    }
    Ok(SoakRun {
        flavour: options.flavour.label().into(),
        config,
        report,
    })
}

pub fn render_table(run: &SoakRun, t: &mut String) {
    let r = &run.report;
    let c = &run.config;
    let _ = writeln!(
        t,
        "\nSoak: {} workers, each connecting, echoing {} bytes and closing, for {:.0} s ({})",
        c.workers,
        c.payload_bytes,
        c.duration.as_secs_f64(),
        run.flavour
    );
    let _ = writeln!(
        t,
        "connections: {} ({:.1}/s), failures: {}",
        r.connections,
        r.connections_per_second(),
        r.failures
    );
    for example in &r.failure_examples {
        let _ = writeln!(t, "  failure: {example}");
    }
    let _ = writeln!(
        t,
        "{:<7} {:>5} {:>5}  {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}  {:>6} {:>6} {:>7}",
        "process",
        "WARN",
        "ERROR",
        "RSS idle",
        "warm",
        "end",
        "settled",
        "MiB/100k",
        "2nd half",
        "fd idl",
        "peak",
        "settled"
    );
    for role in r.roles() {
        let levels = r.logs.get(&role).cloned().unwrap_or_default();
        let idle = r.idle_before[&role];
        let settled = r.after_settle.get(&role).copied().unwrap_or_default();
        let (warm, end) = r.rss_after_warmup_and_end(&role);
        let _ = writeln!(
            t,
            "{:<7} {:>5} {:>5}  {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}  {:>6} {:>6} {:>7}",
            role,
            levels.warn,
            levels.error,
            num(idle.rss_bytes as f64 / MIB, 1),
            num(warm as f64 / MIB, 1),
            num(end as f64 / MIB, 1),
            num(settled.rss_bytes as f64 / MIB, 1),
            num(r.rss_growth_per_100k(&role) / MIB, 2),
            num(r.rss_growth_per_100k_second_half(&role) / MIB, 2),
            idle.fds,
            r.peak_fds(&role),
            settled.fds
        );
        for line in &levels.examples {
            let _ = writeln!(t, "  {role}: {line}");
        }
    }
    let _ = writeln!(
        t,
        "RSS in MiB: idle before, first sample after {:.0} s of warm-up, end of churn, after \
         settling; growth = least-squares slope of RSS over the samples after the warm-up, and \
         over the second half of the run (a leak grows as fast in both).",
        r.warmup.as_secs_f64()
    );
    let _ = writeln!(
        t,
        "descriptors back to idle (+{}) after {:.1} s: {}",
        r.fd_tolerance,
        r.settle_time.as_secs_f64(),
        if r.settled { "yes" } else { "NO" }
    );
}

pub fn render_json(run: &SoakRun) -> Json {
    let r = &run.report;
    let processes = r
        .roles()
        .into_iter()
        .map(|role| {
            let levels = r.logs.get(&role).cloned().unwrap_or_default();
            let idle = r.idle_before[&role];
            let settled = r.after_settle.get(&role).copied().unwrap_or_default();
            let (warm, end) = r.rss_after_warmup_and_end(&role);
            let fields = Json::obj(vec![
                ("warn_lines", Json::Num(levels.warn as f64)),
                ("error_lines", Json::Num(levels.error as f64)),
                ("rss_idle_bytes", Json::Num(idle.rss_bytes as f64)),
                ("rss_after_warmup_bytes", Json::Num(warm as f64)),
                ("rss_end_bytes", Json::Num(end as f64)),
                ("rss_settled_bytes", Json::Num(settled.rss_bytes as f64)),
                (
                    "rss_growth_bytes_per_100k_conns",
                    Json::Num(r.rss_growth_per_100k(&role)),
                ),
                (
                    "rss_growth_bytes_per_100k_conns_second_half",
                    Json::Num(r.rss_growth_per_100k_second_half(&role)),
                ),
                ("fds_idle", Json::Num(idle.fds as f64)),
                ("fds_peak", Json::Num(r.peak_fds(&role) as f64)),
                ("fds_settled", Json::Num(settled.fds as f64)),
            ]);
            (role, fields)
        })
        .collect();
    Json::obj(vec![
        ("flavour", Json::Str(run.flavour.clone())),
        ("workers", Json::Num(run.config.workers as f64)),
        ("seconds", Json::Num(run.config.duration.as_secs_f64())),
        ("payload_bytes", Json::Num(run.config.payload_bytes as f64)),
        ("connections", Json::Num(r.connections as f64)),
        ("connections_per_s", Json::Num(r.connections_per_second())),
        ("failures", Json::Num(r.failures as f64)),
        (
            "failure_examples",
            Json::Arr(r.failure_examples.iter().cloned().map(Json::Str).collect()),
        ),
        ("warmup_s", Json::Num(r.warmup.as_secs_f64())),
        ("growth_per_conns", Json::Num(GROWTH_PER)),
        ("settle_s", Json::Num(r.settle_time.as_secs_f64())),
        ("settled", Json::Bool(r.settled)),
        ("processes", Json::Obj(processes)),
    ])
}
