//! The admin listener of the relay binary (`--admin-listen`), looked at with real tools: the
//! `/status` page in headless Chromium (its text, and a screenshot kept as an artifact),
//! `/metrics` scraped by a real Prometheus and linted by `promtool`, and `/status.json`
//! read field by field. Also: `--public-metrics=false` takes `/metrics` off the public
//! listener, and without `--admin-listen` the relay listens on no third port.
//!
//! Every figure asserted is one the test caused: brokers it linked under its own names,
//! connections it opened through them.
//!
//! Needs chromium and prometheus (Debian packages of the same names; `.ci/run` installs
//! them) and the binaries: `cargo build --workspace --bins && cargo test -p tunnel-tests
//! --test admin`.

mod support_raw;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::Value;
use support_raw::{
    client, client_config, echo_transfer, metric, start_named_echo_broker, RelayProcess,
    LINK_SECRET,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tunnel_client::TunnelStream;
use tunnel_tests::observers::{promtool_check_metrics, visible_text, Chromium, Prometheus};
use tunnel_tests::{free_addr, init_tracing, ChildProcess, TestDir};

/// The brokers every case links: two plain names and one that is markup, which the page
/// must show as text.
const ALPHA: &str = "alpha";
const BRAVO: &str = "bravo";
const HOSTILE: &str = "<i>x</i>&\"y'";

/// Echo round trips made (and closed) through `alpha`, and their size.
const ALPHA_CONNECTIONS: u64 = 3;
const ECHO_BYTES: usize = 20_000;

/// The relay's connection limit in these tests, to see it on the page.
const MAX_CONNECTIONS: u64 = 500;

/// A relay with its admin listener and three linked echo brokers.
struct Setup {
    relay: RelayProcess,
    admin: SocketAddr,
    _brokers: Vec<ChildProcess>,
    dir: TestDir,
}

impl Setup {
    async fn start(label: &str, extra: &[&str]) -> Setup {
        let dir = TestDir::new(label).expect("temp dir");
        let admin = free_addr();
        let mut args = vec![
            "--admin-listen".to_string(),
            admin.to_string(),
            "--max-connections".into(),
            MAX_CONNECTIONS.to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let relay = RelayProcess::start(dir.path(), "relay", &args, "info").await;
        let brokers = [ALPHA, BRAVO, HOSTILE]
            .iter()
            .enumerate()
            .map(|(i, name)| {
                start_named_echo_broker(
                    dir.path(),
                    &format!("broker-{i}"),
                    name,
                    relay.link,
                    &relay.secret_file,
                    &[],
                    "info",
                )
            })
            .collect();
        let setup = Setup {
            relay,
            admin,
            _brokers: brokers,
            dir,
        };
        setup.wait_links_up(3).await;
        setup
    }

    fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    async fn wait_links_up(&self, want: u64) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let now = metric(self.admin, "tunnel_links_up").await;
            if now == Some(want) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "admin /metrics tunnel_links_up = {now:?}, expected {want} within 20 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Makes [`ALPHA_CONNECTIONS`] echo round trips through `alpha` (each closed), and
    /// opens one connection to `bravo` that stays open; returns it.
    async fn make_traffic(&self) -> TunnelStream {
        let url = self.relay.tunnel_url();
        for _ in 0..ALPHA_CONNECTIONS {
            let mut config = client_config(&url);
            config.server_name = ALPHA.into();
            let stream = tunnel_client::connect(config)
                .await
                .expect("connect to alpha");
            echo_transfer(stream, ECHO_BYTES, Duration::from_secs(30))
                .await
                .expect("echo through alpha");
        }
        let mut config = client_config(&url);
        config.server_name = BRAVO.into();
        let mut bravo = tunnel_client::connect(config)
            .await
            .expect("connect to bravo");
        bravo.write_all(b"held open").await.unwrap();
        let mut back = [0u8; 9];
        tokio::time::timeout(Duration::from_secs(20), bravo.read_exact(&mut back))
            .await
            .expect("echo from bravo within 20 s")
            .unwrap();
        assert_eq!(&back, b"held open");
        bravo
    }

    async fn get(&self, url: &str) -> (u16, String) {
        let resp = client().get(url).send().await.expect("GET");
        let status = resp.status().as_u16();
        (status, resp.text().await.unwrap_or_default())
    }

    async fn status_json(&self) -> Value {
        let (status, body) = self.get(&self.admin_url("/status.json")).await;
        assert_eq!(status, 200, "/status.json: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("/status.json: {e}: {body}"))
    }
}

fn broker<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["brokers"]
        .as_array()
        .expect("brokers is an array")
        .iter()
        .find(|b| b["name"] == name)
        .unwrap_or_else(|| panic!("no broker {name:?} in {status:#}"))
}

/// `target/artifacts`, next to the binaries.
fn artifacts_dir() -> PathBuf {
    let dir = tunnel_tests::bins::bin_dir()
        .parent()
        .expect("the profile dir has a parent")
        .join("artifacts");
    std::fs::create_dir_all(&dir).expect("creating target/artifacts");
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_json_reports_the_brokers_traffic_and_limits() {
    init_tracing();
    let setup = Setup::start("admin-json", &[]).await;
    let bravo_stream = setup.make_traffic().await;
    let status = setup.status_json().await;

    assert_eq!(status["version"], env!("CARGO_PKG_VERSION"));
    assert!(status["uptime_seconds"].as_u64().is_some(), "{status:#}");
    let started = status["started_unix_seconds"].as_u64().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        started <= now && now - started < 600,
        "started {started}, now {now}"
    );

    let alpha = broker(&status, ALPHA);
    assert_eq!(alpha["linked"], true, "{alpha:#}");
    assert_eq!(alpha["listening"], true, "{alpha:#}");
    assert_eq!(alpha["connections_opened"], ALPHA_CONNECTIONS, "{alpha:#}");
    // One instance per broker process, with a random id, its capacity and its placements.
    let id = alpha["instance"].as_str().unwrap();
    assert!(
        id.len() == 32 && id.chars().all(|c| c.is_ascii_hexdigit()) && id != "0".repeat(32),
        "{alpha:#}"
    );
    assert_eq!(alpha["mode"], "accepting", "{alpha:#}");
    assert_eq!(
        alpha["capacity"], 1024,
        "the broker's default --max-connections: {alpha:#}"
    );
    assert_eq!(alpha["placements"], ALPHA_CONNECTIONS, "{alpha:#}");
    assert_eq!(alpha["punts"], 0, "{alpha:#}");
    // Each round trip pushed ECHO_BYTES of payload, plus packet headers.
    let up = alpha["bytes_up"].as_u64().unwrap();
    let down = alpha["bytes_down"].as_u64().unwrap();
    assert!(up >= ALPHA_CONNECTIONS * ECHO_BYTES as u64, "{alpha:#}");
    assert!(down >= ALPHA_CONNECTIONS * ECHO_BYTES as u64, "{alpha:#}");
    let peer: SocketAddr = alpha["peer"].as_str().unwrap().parse().unwrap();
    assert!(peer.ip().is_loopback(), "{alpha:#}");
    assert!(alpha["link_age_seconds"].as_u64().is_some(), "{alpha:#}");
    assert!(alpha["grace_left_seconds"].is_null(), "{alpha:#}");

    let bravo = broker(&status, BRAVO);
    assert_eq!(bravo["connections_opened"], 1, "{bravo:#}");
    assert_eq!(bravo["connections"], 1, "the held connection: {bravo:#}");
    assert_eq!(broker(&status, HOSTILE)["connections_opened"], 0);

    let totals = &status["totals"];
    assert_eq!(totals["links_up"], 3, "{totals:#}");
    assert_eq!(
        totals["connects_total"],
        ALPHA_CONNECTIONS + 1,
        "{totals:#}"
    );
    assert!(totals["bytes_up"].as_u64().unwrap() >= up, "{totals:#}");
    let limits = status["limits"].as_array().unwrap();
    let connections = limits
        .iter()
        .find(|l| l["name"] == "connections")
        .expect("a connections limit");
    assert_eq!(connections["max"], MAX_CONNECTIONS, "{connections:#}");
    assert!(
        connections["used"].as_u64().unwrap() >= 1,
        "{connections:#}"
    );
    let names: HashSet<&str> = limits.iter().filter_map(|l| l["name"].as_str()).collect();
    for want in [
        "connections",
        "sessions",
        "http_connections",
        "links_in_handshake",
        "fullest_queue_bytes",
    ] {
        assert!(names.contains(want), "limit {want} missing: {limits:?}");
    }

    // No secret anywhere: not the link secret, not a connection token.
    let (_, json) = setup.get(&setup.admin_url("/status.json")).await;
    let (_, html) = setup.get(&setup.admin_url("/status")).await;
    for (what, text) in [("/status.json", &json), ("/status", &html)] {
        assert!(!text.contains(LINK_SECRET), "{what} shows the link secret");
        assert!(!text.to_lowercase().contains("token"), "{what}: {text}");
    }
    eprintln!("[report] /status.json after the test's traffic:\n{status:#}");
    drop(bravo_stream);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_in_headless_chromium_lists_the_brokers() {
    init_tracing();
    let setup = Setup::start("admin-chromium", &[]).await;
    let _bravo = setup.make_traffic().await;
    let mut chromium = Chromium::new(setup.dir.path()).unwrap_or_else(|e| panic!("{e}"));
    let url = setup.admin_url("/status");

    let started = Instant::now();
    let dom = chromium.dump_dom(&url).await.expect("chromium --dump-dom");
    let text = visible_text(&dom);
    assert!(text.contains("Tunnel relay"), "page text: {text}");
    assert!(
        text.contains("Brokers: 3 linked, 0 in grace period"),
        "page text: {text}"
    );
    for name in [ALPHA, BRAVO, HOSTILE] {
        // Name, the instance's first 8 hex digits, then the state.
        let linked = text.split(&format!(" {name} ")).skip(1).any(|rest| {
            rest.get(..8)
                .is_some_and(|id| id.chars().all(|c| c.is_ascii_hexdigit()))
                && rest.get(8..).is_some_and(|r| r.starts_with(" linked "))
        });
        assert!(
            linked,
            "broker {name:?} not listed as linked; page text: {text}"
        );
    }
    // The markup in a broker's name is text on the page, not an element.
    assert!(
        !dom.contains("<i>x</i>"),
        "the hostile name became markup:\n{dom}"
    );
    assert!(
        dom.contains("&lt;i&gt;x&lt;/i&gt;&amp;"),
        "the hostile name is not shown escaped:\n{dom}"
    );
    assert!(
        text.contains(&format!("version {}", env!("CARGO_PKG_VERSION"))),
        "{text}"
    );
    // The limits table: "virtual connections held USED MAX": the held connection to bravo,
    // plus alpha's closed ones still in TIME-WAIT.
    let row: Vec<u64> = text
        .split("virtual connections held ")
        .nth(1)
        .unwrap_or_else(|| panic!("no connections limit row: {text}"))
        .split(' ')
        .take(2)
        .map(|n| n.parse().unwrap_or_else(|_| panic!("limit row: {text}")))
        .collect();
    assert!(
        (1..=1 + ALPHA_CONNECTIONS).contains(&row[0]) && row[1] == MAX_CONNECTIONS,
        "connections limit row {row:?}"
    );
    let dump_took = started.elapsed();

    let png = artifacts_dir().join("status.png");
    let started = Instant::now();
    chromium
        .screenshot(&url, &png, 1200, 900)
        .await
        .expect("chromium --screenshot");
    let size = std::fs::metadata(&png).unwrap().len();
    assert!(
        size > 10_000,
        "screenshot of {size} bytes is too small to show the page"
    );
    eprintln!(
        "[report] status page in chromium: DOM {} bytes in {dump_took:.2?}; screenshot {} \
         ({size} bytes, 1200x900) in {:.2?}",
        dom.len(),
        png.display(),
        started.elapsed()
    );
}

/// The `value` of the first sample in a Prometheus query answer.
fn first_value(answer: &str) -> Option<String> {
    let json: Value = serde_json::from_str(answer).ok()?;
    json["data"]["result"][0]["value"][1]
        .as_str()
        .map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_admin_listener() {
    init_tracing();
    let setup = Setup::start("admin-prometheus", &["--public-metrics=false"]).await;
    let _bravo = setup.make_traffic().await;

    // The exposition passes Prometheus' own linter first.
    let (status, text) = setup.get(&setup.admin_url("/metrics")).await;
    assert_eq!(status, 200);
    if let Err(complaints) = promtool_check_metrics(&text)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
    {
        panic!("promtool check metrics:\n{complaints}\n--- /metrics:\n{text}");
    }

    let mut prometheus = Prometheus::start(setup.dir.path(), "tunnel-relay", setup.admin)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let started = Instant::now();
    let limit = Duration::from_secs(60);
    let expect = |query: &str, want: u64| {
        let query = query.to_string();
        let prometheus = &prometheus;
        async move {
            let answer = prometheus
                .wait_for(&query, limit, |body| {
                    first_value(body).as_deref() == Some(want.to_string().as_str())
                })
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            eprintln!("[report] prometheus: {query} = {want}: {answer}");
        }
    };
    expect(r#"up{job="tunnel-relay"}"#, 1).await;
    expect("tunnel_links_up", 3).await;
    expect(
        &format!(r#"tunnel_broker_connects_total{{server="{ALPHA}"}}"#),
        ALPHA_CONNECTIONS,
    )
    .await;
    expect(
        &format!(r#"tunnel_broker_open_connections{{server="{BRAVO}"}}"#),
        1,
    )
    .await;
    expect("tunnel_connects_total", ALPHA_CONNECTIONS + 1).await;
    expect(
        &format!(
            r#"tunnel_broker_bytes_total{{server="{ALPHA}",direction="up"}} >= bool {}"#,
            ALPHA_CONNECTIONS * ECHO_BYTES as u64
        ),
        1,
    )
    .await;
    eprintln!(
        "[report] prometheus answered every query within {:.2?} of starting",
        started.elapsed()
    );
    prometheus.process().kill9().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_metrics_flag_and_routes_of_each_listener() {
    init_tracing();
    // TUNNEL_PUBLIC_METRICS=false through the environment, not the flag.
    let dir = TestDir::new("admin-routes").unwrap();
    let admin = free_addr();
    let relay = RelayProcess::start_with_env(
        dir.path(),
        "relay",
        &["--admin-listen".to_string(), admin.to_string()],
        &[("TUNNEL_PUBLIC_METRICS", "false")],
        "info",
    )
    .await;
    let get = |url: String| async move {
        let resp = client().get(&url).send().await.expect("GET");
        resp.status().as_u16()
    };
    let public = relay.http;
    assert_eq!(get(format!("http://{public}/healthz")).await, 200);
    assert_eq!(get(format!("http://{public}/metrics")).await, 404);
    assert_eq!(get(format!("http://{public}/status")).await, 404);
    assert_eq!(get(format!("http://{public}/status.json")).await, 404);
    for path in ["/healthz", "/metrics", "/status", "/status.json"] {
        assert_eq!(get(format!("http://{admin}{path}")).await, 200, "{path}");
    }
    // The admin side serves nothing else, and only reads.
    assert_eq!(get(format!("http://{admin}/tunnel")).await, 404);
    let post = client()
        .post(format!("http://{admin}/status"))
        .send()
        .await
        .unwrap();
    assert_eq!(post.status().as_u16(), 405);
    assert_eq!(
        listening_sockets(relay.pid()).len(),
        3,
        "public, link and admin listeners"
    );

    // By default /metrics stays public, and without --admin-listen there is no third
    // listening socket at all.
    let plain = RelayProcess::start(dir.path(), "relay-plain", &[], "info").await;
    assert_eq!(get(format!("http://{}/metrics", plain.http)).await, 200);
    assert_eq!(get(format!("http://{}/status", plain.http)).await, 404);
    let listening = listening_sockets(plain.pid());
    assert_eq!(
        listening,
        HashSet::from([plain.http, plain.link]),
        "the relay without --admin-listen listens on exactly its two ports"
    );
}

/// The TCP sockets process `pid` listens on, from /proc (its socket descriptors matched
/// against the kernel's table of listening sockets).
fn listening_sockets(pid: u32) -> HashSet<SocketAddr> {
    let mut inodes = HashSet::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd")).expect("/proc/PID/fd") {
        let Ok(target) = std::fs::read_link(fd.unwrap().path()) else {
            continue;
        };
        let target = target.to_string_lossy().into_owned();
        if let Some(inode) = target
            .strip_prefix("socket:[")
            .and_then(|s| s.strip_suffix(']'))
        {
            inodes.insert(inode.to_string());
        }
    }
    let mut found = HashSet::new();
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            if fields.len() < 10 || fields[3] != "0A" || !inodes.contains(fields[9]) {
                continue;
            }
            found.insert(parse_proc_addr(fields[1]));
        }
    }
    found
}

/// `0100007F:1F90` (little-endian words, as /proc/net/tcp writes them) to an address.
fn parse_proc_addr(text: &str) -> SocketAddr {
    let (ip_hex, port_hex) = text.split_once(':').unwrap();
    let port = u16::from_str_radix(port_hex, 16).unwrap();
    let words: Vec<u32> = (0..ip_hex.len() / 8)
        .map(|i| u32::from_str_radix(&ip_hex[i * 8..i * 8 + 8], 16).unwrap())
        .collect();
    let ip: std::net::IpAddr = match words.as_slice() {
        [v4] => std::net::Ipv4Addr::from(v4.swap_bytes()).into(),
        four => {
            let mut bytes = [0u8; 16];
            for (i, w) in four.iter().enumerate() {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
            }
            std::net::Ipv6Addr::from(bytes).into()
        }
    };
    SocketAddr::new(ip, port)
}
