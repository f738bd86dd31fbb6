//! Real programs that look at the relay from outside, as an operator's tools would: a
//! headless Chromium loading the status page, and Prometheus (with its `promtool`) scraping
//! the admin listener. Each runs as the test's own child process on loopback, with fresh
//! temporary state; a missing program is a test failure naming its Debian package.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;
use tokio::time::Instant;

use crate::net::{direct_http_client, free_addr, wait_for_http_ok, POLL_INTERVAL};
use crate::process::{find_program, ChildProcess};

/// Deadline of one Chromium run (start, load, render, exit) on two busy cores.
pub const CHROMIUM_TIMEOUT: Duration = Duration::from_secs(90);

/// Time Prometheus has to answer `/-/ready`.
pub const PROMETHEUS_START_TIMEOUT: Duration = Duration::from_secs(60);

/// Headless Chromium (Debian package `chromium`), one fresh profile per run.
#[derive(Debug)]
pub struct Chromium {
    program: PathBuf,
    dir: PathBuf,
    runs: u32,
}

impl Chromium {
    /// Finds `chromium`; profiles go under `<parent>/chromium`.
    pub fn new(parent: &Path) -> io::Result<Chromium> {
        let program = find_program("chromium", "chromium")?;
        let dir = parent.join("chromium");
        std::fs::create_dir_all(&dir)?;
        Ok(Chromium {
            program,
            dir,
            runs: 0,
        })
    }

    /// Runs Chromium with `extra` flags then `url`, within [`CHROMIUM_TIMEOUT`]; its stdout.
    /// Everything that would reach the network or other profiles is off, and no proxy is
    /// used: the test loads loopback URLs only.
    async fn run(&mut self, extra: &[String], url: &str) -> io::Result<String> {
        self.runs += 1;
        let profile = self.dir.join(format!("profile-{}", self.runs));
        std::fs::create_dir_all(&profile)?;
        let mut args: Vec<String> = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--no-proxy-server",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            "--disable-dev-shm-usage",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.push(format!("--user-data-dir={}", profile.display()));
        args.extend(extra.iter().cloned());
        args.push(url.to_string());
        let stderr_path = self.dir.join(format!("chromium-{}.stderr", self.runs));
        let child = Command::new(&self.program)
            .args(&args)
            // Its crash reporter and caches write under HOME: keep them in the test dir.
            .env("HOME", &self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr_path)?)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("spawning chromium: {e}")))?;
        let output = tokio::time::timeout(CHROMIUM_TIMEOUT, child.wait_with_output())
            .await
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("chromium did not finish within {CHROMIUM_TIMEOUT:?} ({url})"),
                )
            })??;
        if !output.status.success() {
            let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
            return Err(io::Error::other(format!(
                "chromium {args:?} exited with {}; stderr:\n{stderr}",
                output.status
            )));
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// The DOM of `url` after it was loaded and laid out (`--dump-dom`).
    pub async fn dump_dom(&mut self, url: &str) -> io::Result<String> {
        self.run(&["--dump-dom".to_string()], url).await
    }

    /// A PNG screenshot of `url` at `width`×`height` into `png`.
    pub async fn screenshot(
        &mut self,
        url: &str,
        png: &Path,
        width: u32,
        height: u32,
    ) -> io::Result<()> {
        let _ = std::fs::remove_file(png);
        self.run(
            &[
                format!("--screenshot={}", png.display()),
                format!("--window-size={width},{height}"),
                "--hide-scrollbars".to_string(),
            ],
            url,
        )
        .await?;
        let header = std::fs::read(png)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", png.display())))?;
        if !header.starts_with(b"\x89PNG\r\n\x1a\n") {
            return Err(io::Error::other(format!(
                "{} is not a PNG ({} bytes)",
                png.display(),
                header.len()
            )));
        }
        Ok(())
    }
}

/// The text of an HTML fragment: tags dropped, the five entities the status page uses
/// decoded, whitespace collapsed. Enough to check what a reader of the page sees.
pub fn visible_text(html: &str) -> String {
    let mut text = String::with_capacity(html.len());
    let mut in_tag = false;
    for c in html.chars() {
        match c {
            '<' => in_tag = true,
            '>' if in_tag => {
                in_tag = false;
                text.push(' ');
            }
            c if !in_tag => text.push(c),
            _ => {}
        }
    }
    let text = text
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&amp;", "&");
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// A Prometheus server (Debian package `prometheus`) scraping one target every second.
#[derive(Debug)]
pub struct Prometheus {
    addr: SocketAddr,
    process: ChildProcess,
}

impl Prometheus {
    /// Writes `<parent>/prometheus/prometheus.yml` scraping `target` (`HOST:PORT`, path
    /// `/metrics`) as job `job` every second, and starts Prometheus on a free loopback port
    /// with its database in the same directory; waits for `/-/ready`.
    pub async fn start(parent: &Path, job: &str, target: SocketAddr) -> io::Result<Prometheus> {
        let program = find_program("prometheus", "prometheus")?;
        let dir = parent.join("prometheus");
        let data = dir.join("data");
        std::fs::create_dir_all(&data)?;
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: {job}\n    static_configs:\n      - targets: ['{target}']\n"
        );
        let config_path = dir.join("prometheus.yml");
        std::fs::write(&config_path, config)?;
        let addr = free_addr();
        let args = vec![
            format!("--config.file={}", config_path.display()),
            format!("--storage.tsdb.path={}", data.display()),
            format!("--web.listen-address={addr}"),
            "--log.level=info".to_string(),
        ];
        let mut process = ChildProcess::spawn("prometheus", &program, args, &[], &dir)?;
        process
            .wait_listening(addr, PROMETHEUS_START_TIMEOUT)
            .await?;
        wait_for_http_ok(&format!("http://{addr}/-/ready"), PROMETHEUS_START_TIMEOUT).await?;
        Ok(Prometheus { addr, process })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The raw JSON answer of the instant query `query` (`/api/v1/query`).
    pub async fn query(&self, query: &str) -> io::Result<String> {
        let url = format!("http://{}/api/v1/query", self.addr);
        let resp = direct_http_client()
            .get(&url)
            .query(&[("query", query)])
            .send()
            .await
            .map_err(io::Error::other)?;
        let status = resp.status();
        let body = resp.text().await.map_err(io::Error::other)?;
        if !status.is_success() {
            return Err(io::Error::other(format!(
                "{url}?query={query}: {status}: {body}"
            )));
        }
        Ok(body)
    }

    /// Polls `query` until `accept` takes its JSON answer, at most `timeout`; the last
    /// answer either way.
    pub async fn wait_for(
        &self,
        query: &str,
        timeout: Duration,
        accept: impl Fn(&str) -> bool,
    ) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match self.query(query).await {
                Ok(body) if accept(&body) => return Ok(body),
                Ok(body) => body,
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                return Err(format!(
                    "{query}: not as expected within {timeout:?}; last answer: {last}"
                ));
            }
            tokio::time::sleep(POLL_INTERVAL * 4).await;
        }
    }

    pub fn process(&mut self) -> &mut ChildProcess {
        &mut self.process
    }
}

/// `promtool check metrics` (package `prometheus`) on an exposition text: `Ok` if it found
/// nothing to say, else its complaints.
pub async fn promtool_check_metrics(text: &str) -> io::Result<Result<(), String>> {
    use tokio::io::AsyncWriteExt;
    let program = find_program("promtool", "prometheus")?;
    let mut child = Command::new(program)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    stdin.write_all(text.as_bytes()).await?;
    drop(stdin);
    let output = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "promtool took over 30 s"))??;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if output.status.success() && said.trim().is_empty() {
        Ok(Ok(()))
    } else {
        Ok(Err(format!("promtool ({}): {said}", output.status)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The linter really lints (needs promtool, package prometheus, like the admin tests).
    #[tokio::test]
    async fn promtool_complains_about_a_counter_without_total() {
        let bad = "# HELP x_requests Requests.\n# TYPE x_requests counter\nx_requests 1\n";
        let verdict = promtool_check_metrics(bad).await.expect("promtool runs");
        let complaint = verdict.expect_err("promtool accepted a counter without _total");
        assert!(complaint.contains("_total"), "{complaint}");
        let good = "# HELP x_requests_total Requests.\n# TYPE x_requests_total counter\nx_requests_total 1\n";
        assert_eq!(promtool_check_metrics(good).await.unwrap(), Ok(()));
    }

    #[test]
    fn visible_text_strips_tags_and_decodes_entities() {
        assert_eq!(
            visible_text("<td class=\"n\">a &amp; b</td><td>&lt;x&gt;</td>\n  <p>c</p>"),
            "a & b <x> c"
        );
    }
}
