//! The bench's `rr` section (issue 10): request/response. `conns` connections, each doing
//! sequential exchanges of a `request`-byte request and an `answer`-byte answer for
//! `duration` (the data server's `Q` exchange), through direct TCP, the 3-hop TCP chain and
//! the tunnel in each flavour, all measured in the same run. Reports exchanges per second over
//! all connections and the time of one exchange (p50, p99 over every exchange of the run).
//!
//! This is the load of a database or a message broker with small requests: each exchange
//! waits for the previous answer, so it measures per-message latency under concurrency,
//! which neither the one-connection ping-pong nor the bulk throughput sections show.

use std::fmt::Write;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use super::measure;
use super::report::{num, Json};
use super::stats::{median, percentile, ratio, run_order};
use super::tunnel::{self, Flavour, RunningPath, Transport, TunnelOptions};

/// Label of the baseline the ratios are to.
const BASE: &str = "3-hop TCP chain";
/// Width of the path column.
const LABEL_WIDTH: usize = 34;

/// Parameters of the section (from the bench's options).
#[derive(Debug, Clone)]
pub struct RrOptions {
    pub conns: usize,
    pub duration: Duration,
    pub request: u32,
    pub answer: u32,
    pub runs: usize,
    pub flavours: Vec<Flavour>,
    /// One row per flavour and mode.
    pub modes: Vec<Transport>,
    /// Connections the tunnel's broker must allow.
    pub broker_max_conns: usize,
    pub timeout: Duration,
}

/// One path's figures, one value per run.
#[derive(Debug, Default)]
pub struct RrRow {
    pub label: String,
    pub per_second: Vec<f64>,
    pub p50_us: Vec<f64>,
    pub p99_us: Vec<f64>,
}

/// The section's results.
#[derive(Debug)]
pub struct RrResults {
    pub options: RrOptions,
    pub rows: Vec<RrRow>,
}

/// Starts direct TCP, the chain and the tunnels, then measures each `runs` times, the paths
/// taking turns within a run so that a slow phase of the machine touches them all.
pub async fn section(
    bin_dir: &Path,
    target: SocketAddr,
    options: &RrOptions,
    say: impl Fn(String),
) -> io::Result<RrResults> {
    let mut paths: Vec<RunningPath> = vec![tunnel::direct(target)?];
    say("rr: starting the 3-hop TCP chain".into());
    paths.push(tunnel::start_tcp_chain(target).await?);
    for flavour in &options.flavours {
        for mode in &options.modes {
            let label = tunnel::tunnel_label(bin_dir, *flavour, *mode)?;
            say(format!("rr: starting {label}"));
            let tunnel_options = TunnelOptions::new(options.broker_max_conns).with_transport(*mode);
            paths.push(tunnel::start_tunnel(bin_dir, *flavour, target, &tunnel_options).await?);
        }
    }
    let mut rows: Vec<RrRow> = paths
        .iter()
        .map(|p| RrRow {
            label: p.label.clone(),
            ..Default::default()
        })
        .collect();
    for run in 1..=options.runs {
        for i in run_order(paths.len(), run) {
            let (path, row) = (&mut paths[i], &mut rows[i]);
            let done = measure::request_response(
                path.entry,
                options.conns,
                options.request,
                options.answer,
                options.duration,
                options.timeout,
            )
            .await
            .map_err(|e| {
                io::Error::new(e.kind(), format!("{} request/response: {e}", path.label))
            })?;
            path.check_alive()?;
            let us = |d: Duration| d.as_secs_f64() * 1e6;
            let (p50, p99) = (
                us(percentile(&done.latencies, 50.0)),
                us(percentile(&done.latencies, 99.0)),
            );
            say(format!(
                "rr run {run}/{}: {:<LABEL_WIDTH$} {:9.0} exchanges/s  p50 {p50:8.1} µs  p99 {p99:8.1} µs",
                options.runs,
                path.label,
                done.per_second()
            ));
            row.per_second.push(done.per_second());
            row.p50_us.push(p50);
            row.p99_us.push(p99);
        }
    }
    Ok(RrResults {
        options: options.clone(),
        rows,
    })
}

pub fn render_table(results: &RrResults, t: &mut String) {
    let o = &results.options;
    let base = results.rows.iter().find(|r| r.label == BASE);
    let r = |f: &dyn Fn(&RrRow) -> f64, row: &RrRow| base.map_or(f64::NAN, |b| ratio(f(row), f(b)));
    let _ = writeln!(
        t,
        "\nRequest/response: {} connections, each {}-byte requests and {}-byte answers in turn for {} s \
         (exchanges/s over all connections; one exchange's time in µs)",
        o.conns,
        o.request,
        o.answer,
        o.duration.as_secs_f64()
    );
    let _ = writeln!(
        t,
        "{:<LABEL_WIDTH$} {:>10} {:>9} {:>9}   {:>8} {:>7}",
        "path", "exch/s", "p50", "p99", "exch/3h", "p50/3h"
    );
    for row in &results.rows {
        let _ = writeln!(
            t,
            "{:<LABEL_WIDTH$} {:>10} {:>9} {:>9}   {:>8} {:>7}",
            row.label,
            num(median(&row.per_second), 0),
            num(median(&row.p50_us), 0),
            num(median(&row.p99_us), 0),
            num(r(&|x| median(&x.per_second), row), 2),
            num(r(&|x| median(&x.p50_us), row), 2),
        );
    }
}

pub fn render_json(results: &RrResults) -> Json {
    let o = &results.options;
    let base = results.rows.iter().find(|r| r.label == BASE);
    let series = Json::series;
    let rows = results
        .rows
        .iter()
        .map(|row| {
            Json::obj(vec![
                ("path", Json::Str(row.label.clone())),
                (
                    "exchanges_per_s",
                    series(&row.per_second, base.map(|b| b.per_second.as_slice())),
                ),
                (
                    "exchange_p50_us",
                    series(&row.p50_us, base.map(|b| b.p50_us.as_slice())),
                ),
                (
                    "exchange_p99_us",
                    series(&row.p99_us, base.map(|b| b.p99_us.as_slice())),
                ),
            ])
        })
        .collect();
    Json::obj(vec![
        ("connections", Json::Num(o.conns as f64)),
        ("seconds", Json::Num(o.duration.as_secs_f64())),
        ("request_bytes", Json::Num(o.request as f64)),
        ("answer_bytes", Json::Num(o.answer as f64)),
        ("paths", Json::Arr(rows)),
    ])
}
