//! The bench's `peers` section (issue 10): GNU httptunnel beside the tunnel. One connection
//! per measurement, as GNU httptunnel carries one TCP connection per `hts`/`htc` pair:
//! 1-byte ping-pong p50/p99 and throughput up and down, through direct TCP, the 3-hop TCP
//! chain, the tunnel in each flavour and GNU httptunnel, all in the same run.
//!
//! A section of its own rather than rows in the latency and throughput sections: those run the
//! aggregate section's 100 connections on every path, which one `hts`/`htc` pair cannot carry;
//! the default sections must run on a machine without the `httptunnel` package; and every row
//! here is measured the same way, with the throughput ended by byte counts
//! ([`measure::throughput_counted`]) because GNU httptunnel carries no half-close.

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
pub struct PeersOptions {
    /// 1-byte ping-pongs per measurement.
    pub pings: usize,
    /// Bytes of one throughput measurement, per direction.
    pub bytes: u64,
    pub runs: usize,
    pub flavours: Vec<Flavour>,
    /// One row per flavour and mode.
    pub modes: Vec<Transport>,
    pub broker_max_conns: usize,
    pub timeout: Duration,
}

/// One path's figures, one value per run.
#[derive(Debug, Default)]
pub struct PeerRow {
    pub label: String,
    pub p50_us: Vec<f64>,
    pub p99_us: Vec<f64>,
    pub up: Vec<f64>,
    pub down: Vec<f64>,
}

/// The section's results.
#[derive(Debug)]
pub struct PeersResults {
    pub options: PeersOptions,
    pub rows: Vec<PeerRow>,
}

/// Starts the paths (GNU httptunnel first, so a machine without it fails at once), then
/// measures each `runs` times, the paths taking turns within a run.
pub async fn section(
    bin_dir: &Path,
    target: SocketAddr,
    options: &PeersOptions,
    say: impl Fn(String),
) -> io::Result<PeersResults> {
    say("peers: starting GNU httptunnel (hts, htc)".into());
    let httptunnel = tunnel::start_httptunnel(target).await?;
    let mut paths: Vec<RunningPath> = vec![tunnel::direct(target)?];
    say("peers: starting the 3-hop TCP chain".into());
    paths.push(tunnel::start_tcp_chain(target).await?);
    for flavour in &options.flavours {
        for mode in &options.modes {
            let label = tunnel::tunnel_label(bin_dir, *flavour, *mode)?;
            say(format!("peers: starting {label}"));
            let tunnel_options = TunnelOptions::new(options.broker_max_conns).with_transport(*mode);
            paths.push(tunnel::start_tunnel(bin_dir, *flavour, target, &tunnel_options).await?);
        }
    }
    paths.push(httptunnel);
    let mut rows: Vec<PeerRow> = paths
        .iter()
        .map(|p| PeerRow {
            label: p.label.clone(),
            ..Default::default()
        })
        .collect();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    for run in 1..=options.runs {
        for i in run_order(paths.len(), run) {
            let (path, row) = (&mut paths[i], &mut rows[i]);
            let fail = |what: &str, e: io::Error| {
                io::Error::new(e.kind(), format!("{} {what}: {e}", path.label))
            };
            let samples = measure::ping_pong(
                path.entry,
                1,
                options.pings,
                options.pings / 10 + 5,
                options.timeout,
            )
            .await
            .map_err(|e| fail("ping-pong", e))?;
            let (p50, p99) = (
                us(percentile(&samples, 50.0)),
                us(percentile(&samples, 99.0)),
            );
            let n = options.bytes;
            let up = measure::throughput_counted(path.entry, n, 0, options.timeout)
                .await
                .map_err(|e| fail("throughput up", e))?
                .mib_per_s();
            let down = measure::throughput_counted(path.entry, 0, n, options.timeout)
                .await
                .map_err(|e| fail("throughput down", e))?
                .mib_per_s();
            path.check_alive()?;
            say(format!(
                "peers run {run}/{}: {:<LABEL_WIDTH$} rtt 1 B p50 {p50:8.1} µs p99 {p99:8.1} µs  up {up:8.1} down {down:8.1} MiB/s",
                options.runs, path.label
            ));
            row.p50_us.push(p50);
            row.p99_us.push(p99);
            row.up.push(up);
            row.down.push(down);
        }
    }
    Ok(PeersResults {
        options: options.clone(),
        rows,
    })
}

pub fn render_table(results: &PeersResults, t: &mut String) {
    let o = &results.options;
    let base = results.rows.iter().find(|r| r.label == BASE);
    let r =
        |f: &dyn Fn(&PeerRow) -> f64, row: &PeerRow| base.map_or(f64::NAN, |b| ratio(f(row), f(b)));
    let _ = writeln!(
        t,
        "\nPeers, one connection: 1-byte ping-pong (µs) and {} MiB each way (MiB/s)",
        o.bytes >> 20
    );
    let _ = writeln!(
        t,
        "{:<LABEL_WIDTH$} {:>8} {:>8} {:>9} {:>9}   {:>7} {:>7} {:>7}",
        "path", "1B p50", "1B p99", "up", "down", "p50/3h", "up/3h", "down/3h"
    );
    for row in &results.rows {
        let _ = writeln!(
            t,
            "{:<LABEL_WIDTH$} {:>8} {:>8} {:>9} {:>9}   {:>7} {:>7} {:>7}",
            row.label,
            num(median(&row.p50_us), 0),
            num(median(&row.p99_us), 0),
            num(median(&row.up), 1),
            num(median(&row.down), 1),
            num(r(&|x| median(&x.p50_us), row), 2),
            num(r(&|x| median(&x.up), row), 2),
            num(r(&|x| median(&x.down), row), 2),
        );
    }
}

pub fn render_json(results: &PeersResults) -> Json {
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
                    "rtt_1b_p50_us",
                    series(&row.p50_us, base.map(|b| b.p50_us.as_slice())),
                ),
                (
                    "rtt_1b_p99_us",
                    series(&row.p99_us, base.map(|b| b.p99_us.as_slice())),
                ),
                (
                    "throughput_up_mib_s",
                    series(&row.up, base.map(|b| b.up.as_slice())),
                ),
                (
                    "throughput_down_mib_s",
                    series(&row.down, base.map(|b| b.down.as_slice())),
                ),
            ])
        })
        .collect();
    Json::obj(vec![
        ("pings", Json::Num(o.pings as f64)),
        ("bytes", Json::Num(o.bytes as f64)),
        ("paths", Json::Arr(rows)),
    ])
}
