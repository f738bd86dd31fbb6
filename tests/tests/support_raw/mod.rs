//! Helpers shared by `security.rs` and `overload.rs`: the relay and an echo broker as real
//! processes on free loopback ports, raw protocol requests with reqwest (so a test holds a
//! connection's token itself), the relay's RSS and metrics, and echo round trips through an
//! in-process `TunnelStream`.

#![allow(dead_code)] // each test file uses its own subset

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use reqwest::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tunnel_client::{ClientConfig, TunnelStream};
use tunnel_proto::payload::decode_token;
use tunnel_proto::{decode_all, Packet, PacketType, Token};
use tunnel_tests::{bin_path, free_addr, wait_for_http_ok, ChildProcess, TestDir};

pub const SERVER: &str = "raw";
pub const LINK_SECRET: &str = "support-raw-link-secret-6d0f3c1a";

/// A relay process with its addresses.
pub struct RelayProcess {
    pub process: ChildProcess,
    pub http: SocketAddr,
    pub link: SocketAddr,
    pub secret_file: PathBuf,
}

impl RelayProcess {
    /// Starts `tunnel-servlet` with `extra` flags and waits for /healthz (10 s).
    pub async fn start(dir: &Path, label: &str, extra: &[String], rust_log: &str) -> RelayProcess {
        Self::start_with_env(dir, label, extra, &[], rust_log).await
    }

    /// Like [`RelayProcess::start`], with extra environment variables.
    pub async fn start_with_env(
        dir: &Path,
        label: &str,
        extra: &[String],
        extra_env: &[(&str, &str)],
        rust_log: &str,
    ) -> RelayProcess {
        let (http, link) = (free_addr(), free_addr());
        Self::start_on(dir, label, (http, link), extra, extra_env, rust_log).await
    }

    /// Like [`RelayProcess::start_with_env`], on the given HTTP and link addresses (to start
    /// a relay again where a killed one was).
    pub async fn start_on(
        dir: &Path,
        label: &str,
        (http, link): (SocketAddr, SocketAddr),
        extra: &[String],
        extra_env: &[(&str, &str)],
        rust_log: &str,
    ) -> RelayProcess {
        let secret_file = dir.join("link-secret");
        std::fs::write(&secret_file, format!("{LINK_SECRET}\n")).expect("write secret");
        let mut args = vec![
            "--listen".to_string(),
            http.to_string(),
            "--link-listen".into(),
            link.to_string(),
            "--link-secret-file".into(),
            secret_file.display().to_string(),
        ];
        args.extend(extra.iter().cloned());
        let mut env = vec![("RUST_LOG".to_string(), rust_log.to_string())];
        env.extend(
            extra_env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string())),
        );
        let process = ChildProcess::spawn(label, &bin_path("tunnel-servlet"), args, &env, dir)
            .expect("spawn tunnel-servlet (run `cargo build --workspace --bins` first)");
        wait_for_http_ok(&format!("http://{http}/healthz"), Duration::from_secs(10))
            .await
            .expect("relay /healthz");
        RelayProcess {
            process,
            http,
            link,
            secret_file,
        }
    }

    pub fn tunnel_url(&self) -> String {
        format!("http://{}/tunnel", self.http)
    }

    pub fn pid(&self) -> u32 {
        self.process.id().expect("relay running")
    }

    pub fn rss_kib(&self) -> u64 {
        vm_rss_kib(self.pid()).expect("VmRSS of the relay")
    }

    pub async fn metric(&self, name: &str) -> Option<u64> {
        metric(self.http, name).await
    }

    /// Waits until the relay reports a link up (10 s).
    pub async fn wait_link_up(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.metric("tunnel_links_up").await != Some(1) {
            assert!(Instant::now() < deadline, "broker did not link within 10 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Starts `tunnel-broker --echo` for [`SERVER`] with `secret_file` and `extra` flags.
pub fn start_echo_broker(
    dir: &Path,
    label: &str,
    relay_link: SocketAddr,
    secret_file: &Path,
    extra: &[&str],
    rust_log: &str,
) -> ChildProcess {
    start_named_echo_broker(dir, label, SERVER, relay_link, secret_file, extra, rust_log)
}

/// Starts `tunnel-broker --echo` registering `name`.
pub fn start_named_echo_broker(
    dir: &Path,
    label: &str,
    name: &str,
    relay_link: SocketAddr,
    secret_file: &Path,
    extra: &[&str],
    rust_log: &str,
) -> ChildProcess {
    let mut args = vec![
        "--relay".to_string(),
        relay_link.to_string(),
        "--name".into(),
        name.into(),
        "--link-secret-file".into(),
        secret_file.display().to_string(),
        "--echo".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let env = vec![("RUST_LOG".to_string(), rust_log.to_string())];
    ChildProcess::spawn(label, &bin_path("tunnel-broker"), args, &env, dir)
        .expect("spawn tunnel-broker")
}

/// A relay, an echo broker linked to it, and their temp dir.
pub struct EchoSetup {
    pub relay: RelayProcess,
    pub broker: ChildProcess,
    pub dir: TestDir,
}

impl EchoSetup {
    pub async fn start(relay_args: &[String], broker_args: &[&str], rust_log: &str) -> EchoSetup {
        let dir = TestDir::new("support-raw").expect("temp dir");
        let relay = RelayProcess::start(dir.path(), "relay", relay_args, rust_log).await;
        let broker = start_echo_broker(
            dir.path(),
            "broker",
            relay.link,
            &relay.secret_file,
            broker_args,
            rust_log,
        );
        relay.wait_link_up().await;
        EchoSetup { relay, broker, dir }
    }
}

/// VmRSS of `pid` in KiB, from /proc.
pub fn vm_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// The value of metric line `name value` (unlabelled) from /metrics.
pub async fn metric(http: SocketAddr, name: &str) -> Option<u64> {
    let text = client()
        .get(format!("http://{http}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines().find_map(|line| {
        let (key, value) = line.split_once(' ')?;
        (key == name).then(|| value.trim().parse().ok())?
    })
}

/// A direct (no proxy) reqwest client with a 30 s request deadline.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(256)
        .build()
        .expect("reqwest client")
}

/// Raw access to the relay's HTTP interface: a test holding its connection's token.
#[derive(Clone)]
pub struct Raw {
    pub http: reqwest::Client,
    pub url: String,
    pub server: String,
    /// Sent as `Authorization` when set.
    pub authorization: Option<String>,
}

/// One raw virtual connection.
#[derive(Debug, Clone, Copy)]
pub struct RawConn {
    pub id: u32,
    pub token: Token,
}

impl Raw {
    pub fn new(url: &str) -> Raw {
        Raw {
            http: client(),
            url: url.to_string(),
            server: SERVER.to_string(),
            authorization: None,
        }
    }

    fn query(&self, kind: &str, conn_id: Option<u32>) -> String {
        match conn_id {
            Some(id) => format!(
                "{}?Type={kind}&ServerName={}&ConnId={id}",
                self.url, self.server
            ),
            None => format!("{}?Type={kind}&ServerName={}", self.url, self.server),
        }
    }

    fn with_auth(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.authorization {
            Some(value) => req.header("authorization", value),
            None => req,
        }
    }

    /// POSTs `body` as a connect; status and body.
    pub async fn connect_body(&self, body: Bytes) -> (StatusCode, Bytes) {
        let req = self.with_auth(self.http.post(self.query("connect", None)).body(body));
        let resp = req.send().await.expect("connect request");
        let status = resp.status();
        (status, resp.bytes().await.unwrap_or_default())
    }

    /// A proper connect with receive window `window`; the assigned id and token, or the status.
    pub async fn connect(&self, window: u16) -> Result<RawConn, StatusCode> {
        let init = Packet::new(PacketType::ConnInit, 0, Bytes::new()).with_window(window);
        let (status, body) = self.connect_body(init.to_bytes()).await;
        if status != StatusCode::OK {
            return Err(status);
        }
        let packets = decode_all(body, 1 << 21).expect("connect answer is packets");
        let init = packets
            .into_iter()
            .find(|p| p.kind == PacketType::ConnInit)
            .expect("CONN_INIT in the connect answer");
        let token = decode_token(init.payload).expect("token in CONN_INIT");
        Ok(RawConn {
            id: init.conn_id,
            token,
        })
    }

    /// POSTs a push for `conn_id` with `token_hex` (no header when `None`).
    pub async fn push(
        &self,
        conn_id: u32,
        token_hex: Option<&str>,
        body: Bytes,
    ) -> (StatusCode, Bytes) {
        let mut req = self.http.post(self.query("push", Some(conn_id))).body(body);
        if let Some(t) = token_hex {
            req = req.header("tunnel-token", t);
        }
        let resp = self.with_auth(req).send().await.expect("push request");
        let status = resp.status();
        (status, resp.bytes().await.unwrap_or_default())
    }

    /// GETs a pull for `conn_id` with `token_hex`.
    pub async fn pull(&self, conn_id: u32, token_hex: Option<&str>) -> (StatusCode, Bytes) {
        let mut req = self.http.get(self.query("pull", Some(conn_id)));
        if let Some(t) = token_hex {
            req = req.header("tunnel-token", t);
        }
        let resp = self.with_auth(req).send().await.expect("pull request");
        let status = resp.status();
        (status, resp.bytes().await.unwrap_or_default())
    }

    /// Pushes `packets` on `conn` and returns the packets piggybacked on the answer.
    pub async fn push_packets(&self, conn: RawConn, packets: &[Packet]) -> Vec<Packet> {
        let body = tunnel_proto::encode_all(packets);
        let (status, answer) = self.push(conn.id, Some(&conn.token.to_hex()), body).await;
        assert_eq!(status, StatusCode::OK, "push on conn {}", conn.id);
        decode_all(answer, 1 << 21).expect("push answer is packets")
    }

    /// Pulls on `conn` until `done` says the collected packets suffice, within `limit`.
    pub async fn pull_until(
        &self,
        conn: RawConn,
        limit: Duration,
        mut done: impl FnMut(&[Packet]) -> bool,
    ) -> Vec<Packet> {
        let deadline = Instant::now() + limit;
        let mut got = Vec::new();
        while !done(&got) {
            assert!(
                Instant::now() < deadline,
                "pull_until timed out; got {:?}",
                got.iter()
                    .map(|p: &Packet| (p.kind, p.seq))
                    .collect::<Vec<_>>()
            );
            let (status, body) = self.pull(conn.id, Some(&conn.token.to_hex())).await;
            assert_eq!(status, StatusCode::OK, "pull on conn {}", conn.id);
            got.extend(decode_all(body, 1 << 21).expect("pull answer is packets"));
        }
        got
    }
}

/// A DATA packet of `conn` with `seq`.
pub fn data(conn: RawConn, seq: u32, payload: &'static [u8]) -> Packet {
    Packet::new(PacketType::Data, conn.id, Bytes::from_static(payload))
        .with_seq(seq)
        .with_window(16)
}

/// An ACK of everything up to `upto`, window 16.
pub fn ack(conn: RawConn, upto: u32) -> Packet {
    Packet::new(PacketType::Ack, conn.id, Bytes::new())
        .with_seq(upto)
        .with_window(16)
}

/// A client config for `url` with direct HTTP and short retries.
pub fn client_config(url: &str) -> ClientConfig {
    let mut config = ClientConfig::new(url, SERVER);
    config.env_proxy = false;
    config.connect_timeout = Duration::from_secs(15);
    config
}

/// Writes `len` seeded bytes through an echo connection while reading them back; the
/// throughput in MiB/s of the round trip.
pub async fn echo_transfer(stream: TunnelStream, len: usize, limit: Duration) -> io::Result<f64> {
    let data: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
    let started = Instant::now();
    let (mut rd, mut wr) = tokio::io::split(stream);
    let sent = data.clone();
    let work = async move {
        let writer = async {
            wr.write_all(&sent).await?;
            wr.shutdown().await?;
            Ok::<_, io::Error>(())
        };
        let reader = async {
            let mut back = Vec::with_capacity(len);
            rd.read_to_end(&mut back).await?;
            Ok::<_, io::Error>(back)
        };
        let (w, r) = tokio::join!(writer, reader);
        w?;
        r
    };
    let back = tokio::time::timeout(limit, work)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "echo transfer timed out"))??;
    if back != data {
        return Err(io::Error::other(format!(
            "echo returned {} bytes, different from the {len} sent",
            back.len()
        )));
    }
    let secs = started.elapsed().as_secs_f64().max(1e-6);
    Ok(len as f64 / (1024.0 * 1024.0) / secs)
}

/// Every text form a token could take in a log: hex either case, and the Rust `Debug` of
/// its byte array.
pub fn token_forms(token: &Token) -> Vec<String> {
    let hex = token.to_hex();
    vec![
        hex.clone(),
        hex.to_uppercase(),
        format!("{:?}", token.0),
        format!("{:x?}", token.0),
    ]
}
