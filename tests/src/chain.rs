//! The whole tunnel as real processes: relay (`tunnel-servlet`), broker (`tunnel-broker`) and
//! client (`tunnel-client`), on free loopback ports, with a shared link secret in a temp dir.
//!
//! ```text
//! test ──TCP──▶ client --listen ──HTTP──▶ [proxy?] ──▶ relay --listen
//!                                                      relay --link-listen ◀──TCP── broker ──TCP──▶ target
//! ```

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::bins::bin_path;
use crate::net::{direct_http_client, free_addr, wait_for_http_ok, wait_for_tcp};
use crate::process::{ChildProcess, LOG_TAIL_LINES};
use crate::servers::sink_source::{sink_source_exchange, ExchangeSpec};
use crate::tempdir::TestDir;

/// Binary names.
pub const RELAY_BIN: &str = "tunnel-servlet";
pub const BROKER_BIN: &str = "tunnel-broker";
pub const CLIENT_BIN: &str = "tunnel-client";

/// What the broker serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The broker's built-in echo (`--echo`).
    BuiltinEcho,
    /// A TCP service (`--forward ADDR`).
    Forward(SocketAddr),
}

/// How [`Chain::start`] decides the whole path works.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadyProbe {
    /// A short message through the client comes back unchanged (echo-like targets).
    Echo,
    /// A small [`sink_source_exchange`] succeeds (the target is a `SinkSourceServer`).
    SinkSource,
    /// Only wait for each process's port; the test checks the path itself.
    PortsOnly,
}

/// Everything a chain can be started with. Build with [`ChainOptions::echo`] or
/// [`ChainOptions::forward_to_sink_source`] and adjust fields.
#[derive(Debug, Clone)]
pub struct ChainOptions {
    pub target: Target,
    pub probe: ReadyProbe,
    /// Server name the broker registers and the client asks for. Default `e2e`.
    pub server_name: String,
    /// Relay base path. Default `/tunnel`.
    pub base_path: String,
    /// The relay's HTTP address; default a free port. Set it when something (a proxy) must
    /// know it before the chain starts.
    pub relay_http: Option<SocketAddr>,
    /// URL the client uses for the relay; default `http://<relay_http><base_path>`. Point it
    /// at a proxy to put one in between.
    pub client_relay_url: Option<String>,
    pub relay_args: Vec<String>,
    pub broker_args: Vec<String>,
    pub client_args: Vec<String>,
    /// Extra environment per process.
    pub relay_env: Vec<(String, String)>,
    pub broker_env: Vec<(String, String)>,
    pub client_env: Vec<(String, String)>,
    /// `RUST_LOG` of the three processes. Default: `$TUNNEL_TEST_RUST_LOG`, else `info`.
    pub rust_log: String,
    /// Deadline for the whole start (ports, link, first round trip). Default 30 s.
    pub ready_timeout: Duration,
}

/// Environment variable that sets the default `RUST_LOG` of the chain's processes.
pub const RUST_LOG_ENV: &str = "TUNNEL_TEST_RUST_LOG";

impl ChainOptions {
    fn with_target(target: Target, probe: ReadyProbe) -> ChainOptions {
        ChainOptions {
            target,
            probe,
            server_name: "e2e".into(),
            base_path: "/tunnel".into(),
            relay_http: None,
            client_relay_url: None,
            relay_args: Vec::new(),
            broker_args: Vec::new(),
            client_args: Vec::new(),
            relay_env: Vec::new(),
            broker_env: Vec::new(),
            client_env: Vec::new(),
            rust_log: std::env::var(RUST_LOG_ENV).unwrap_or_else(|_| "info".into()),
            ready_timeout: Duration::from_secs(30),
        }
    }

    /// Broker with its built-in echo, echo probe.
    pub fn echo() -> ChainOptions {
        Self::with_target(Target::BuiltinEcho, ReadyProbe::Echo)
    }

    /// Broker forwarding to an echo-like server at `addr`, echo probe.
    pub fn forward_to_echo(addr: SocketAddr) -> ChainOptions {
        Self::with_target(Target::Forward(addr), ReadyProbe::Echo)
    }

    /// Broker forwarding to a `SinkSourceServer` at `addr`, sink/source probe.
    pub fn forward_to_sink_source(addr: SocketAddr) -> ChainOptions {
        Self::with_target(Target::Forward(addr), ReadyProbe::SinkSource)
    }
}

/// A running chain. Dropping it kills the three processes (printing their log tails if the
/// test is panicking) and removes the temp dir unless the test failed.
pub struct Chain {
    pub options: ChainOptions,
    relay_http: SocketAddr,
    relay_link: SocketAddr,
    client_listen: SocketAddr,
    client_relay_url: String,
    /// Process handles; `None` while stopped by the test.
    pub relay: Option<ChildProcess>,
    pub broker: Option<ChildProcess>,
    pub client: Option<ChildProcess>,
    /// How many times each was started, to name their log files.
    starts: [u32; 3],
    // Declared last so the processes die before their directory goes.
    dir: TestDir,
}

impl std::fmt::Debug for Chain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chain")
            .field("relay_http", &self.relay_http)
            .field("relay_link", &self.relay_link)
            .field("client_listen", &self.client_listen)
            .field("client_relay_url", &self.client_relay_url)
            .field("dir", &self.dir.path())
            .finish_non_exhaustive()
    }
}

impl Chain {
    /// Starts the three processes and waits until a round trip through the client works.
    ///
    /// # Panics
    /// When a binary is missing or the chain is not ready within `ready_timeout`; the
    /// message names the stage that failed and the logs' tails are printed.
    pub async fn start(options: ChainOptions) -> Chain {
        match Self::try_start(options).await {
            Ok(chain) => chain,
            Err((chain, e)) => {
                // Panic while the chain is alive: its drop during unwinding prints the
                // processes' log tails and keeps the temp dir.
                let _chain = chain;
                panic!("chain did not start: {e}");
            }
        }
    }

    /// Like [`Chain::start`] but returns the error with the (possibly half-started) chain, so
    /// a test can inspect it.
    pub async fn try_start(options: ChainOptions) -> Result<Chain, (Chain, io::Error)> {
        let dir = TestDir::new("chain").expect("creating the chain's temp dir");
        let secret_path = dir.path().join("link-secret");
        // Random enough for a test and different per chain; the trailing newline checks that
        // both ends ignore it as documented.
        let secret = format!(
            "e2e-secret-{}-{}\n",
            std::process::id(),
            crate::net::free_port()
        );
        std::fs::write(&secret_path, secret).expect("writing the link secret");
        let relay_http = options.relay_http.unwrap_or_else(free_addr);
        let relay_link = free_addr();
        let client_listen = free_addr();
        let client_relay_url = options
            .client_relay_url
            .clone()
            .unwrap_or_else(|| format!("http://{relay_http}{}", options.base_path));
        let mut chain = Chain {
            options,
            relay_http,
            relay_link,
            client_listen,
            client_relay_url,
            relay: None,
            broker: None,
            client: None,
            starts: [0; 3],
            dir,
        };
        let deadline = Instant::now() + chain.options.ready_timeout;
        let result = async {
            chain.start_relay().await?;
            chain.start_broker()?;
            chain.start_client().await?;
            chain.wait_path_ready(remaining(deadline)).await
        }
        .await;
        match result {
            Ok(()) => Ok(chain),
            Err(e) => Err((chain, e)),
        }
    }

    /// The relay's HTTP address (stable across restarts).
    pub fn relay_http_addr(&self) -> SocketAddr {
        self.relay_http
    }

    /// The relay's broker link address (stable across restarts).
    pub fn relay_link_addr(&self) -> SocketAddr {
        self.relay_link
    }

    /// Where the client accepts local TCP connections.
    pub fn client_addr(&self) -> SocketAddr {
        self.client_listen
    }

    /// The relay URL the client was given.
    pub fn client_relay_url(&self) -> &str {
        &self.client_relay_url
    }

    /// The relay's tunnel URL, bypassing any proxy.
    pub fn relay_url(&self) -> String {
        format!("http://{}{}", self.relay_http, self.options.base_path)
    }

    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    fn secret_path(&self) -> std::path::PathBuf {
        self.dir.path().join("link-secret")
    }

    fn env_for(&self, extra: &[(String, String)]) -> Vec<(String, String)> {
        let mut env = vec![("RUST_LOG".to_string(), self.options.rust_log.clone())];
        env.extend(extra.iter().cloned());
        env
    }

    fn next_label(&mut self, index: usize, name: &str) -> String {
        self.starts[index] += 1;
        match self.starts[index] {
            1 => name.to_string(),
            n => format!("{name}-{n}"),
        }
    }

    /// Starts the relay on the chain's ports (again, after a stop) and waits for /healthz.
    pub async fn start_relay(&mut self) -> io::Result<()> {
        assert!(self.relay.is_none(), "relay already running");
        let mut args = vec![
            "--listen".to_string(),
            self.relay_http.to_string(),
            "--link-listen".into(),
            self.relay_link.to_string(),
            "--link-secret-file".into(),
            self.secret_path().display().to_string(),
            "--base-path".into(),
            self.options.base_path.clone(),
        ];
        args.extend(self.options.relay_args.iter().cloned());
        let label = self.next_label(0, "relay");
        let env = self.env_for(&self.options.relay_env);
        let process =
            ChildProcess::spawn(&label, &bin_path(RELAY_BIN), args, &env, self.dir.path())?;
        self.relay = Some(process);
        let url = format!("http://{}/healthz", self.relay_http);
        let timeout = self.options.ready_timeout;
        let slot = &mut self.relay;
        wait_unless_exited(slot, timeout, |t| wait_for_http_ok(&url, t))
            .await
            .map_err(|e| stage_error("relay /healthz", e))
    }

    /// SIGKILLs the relay (a crash); its ports stay reserved for [`Chain::start_relay`].
    pub async fn kill_relay(&mut self) -> io::Result<()> {
        kill_slot(&mut self.relay).await
    }

    /// Kills the relay and starts a new one on the same ports.
    pub async fn restart_relay(&mut self) -> io::Result<()> {
        self.kill_relay().await?;
        self.start_relay().await
    }

    /// The link secret the chain's relay expects (as the broker reads it from its file).
    pub fn link_secret(&self) -> bytes::Bytes {
        tunnel_proto::secret::read_link_secret_file(self.secret_path())
            .expect("reading the chain's link secret")
    }

    /// Starts one more broker process for the chain's name (another instance of its pool,
    /// docs/protocol.md §5.1), with the chain's target and `args` (instead of the chain's
    /// `broker_args`). The caller owns it; it does not count in [`Chain::assert_alive`].
    pub fn spawn_broker(&self, label: &str, args: &[String]) -> io::Result<ChildProcess> {
        let mut all = self.broker_base_args();
        all.extend(args.iter().cloned());
        let args = all;
        let env = self.env_for(&self.options.broker_env);
        ChildProcess::spawn(label, &bin_path(BROKER_BIN), args, &env, self.dir.path())
    }

    /// Relay, name, secret and target of a broker, without `broker_args`.
    fn broker_base_args(&self) -> Vec<String> {
        let mut args = vec![
            "--relay".to_string(),
            self.relay_link.to_string(),
            "--name".into(),
            self.options.server_name.clone(),
            "--link-secret-file".into(),
            self.secret_path().display().to_string(),
        ];
        match self.options.target {
            Target::BuiltinEcho => args.push("--echo".into()),
            Target::Forward(addr) => {
                args.push("--forward".into());
                args.push(addr.to_string());
            }
        }
        args
    }

    /// Starts the broker (again); it links to the relay on its own.
    pub fn start_broker(&mut self) -> io::Result<()> {
        assert!(self.broker.is_none(), "broker already running");
        let mut args = self.broker_base_args();
        args.extend(self.options.broker_args.iter().cloned());
        let label = self.next_label(1, "broker");
        let env = self.env_for(&self.options.broker_env);
        self.broker = Some(ChildProcess::spawn(
            &label,
            &bin_path(BROKER_BIN),
            args,
            &env,
            self.dir.path(),
        )?);
        Ok(())
    }

    pub async fn kill_broker(&mut self) -> io::Result<()> {
        kill_slot(&mut self.broker).await
    }

    /// Starts the client (again) and waits for its listening port. The wait connects and
    /// closes at once, and the client turns even that into a tunnel connection: the target
    /// sees one connection that closes without a byte (`SinkSourceStats::empty`).
    pub async fn start_client(&mut self) -> io::Result<()> {
        assert!(self.client.is_none(), "client already running");
        let mut args = vec![
            "--relay".to_string(),
            self.client_relay_url.clone(),
            "--server".into(),
            self.options.server_name.clone(),
            "--listen".into(),
            self.client_listen.to_string(),
        ];
        args.extend(self.options.client_args.iter().cloned());
        let label = self.next_label(2, "client");
        let env = self.env_for(&self.options.client_env);
        self.client = Some(ChildProcess::spawn(
            &label,
            &bin_path(CLIENT_BIN),
            args,
            &env,
            self.dir.path(),
        )?);
        let (addr, timeout) = (self.client_listen, self.options.ready_timeout);
        wait_unless_exited(&mut self.client, timeout, |t| wait_for_tcp(addr, t))
            .await
            .map_err(|e| stage_error("client --listen port", e))
    }

    pub async fn kill_client(&mut self) -> io::Result<()> {
        kill_slot(&mut self.client).await
    }

    /// A new TCP connection to the client's port: one tunnel connection.
    pub async fn connect(&self) -> io::Result<TcpStream> {
        let stream = tokio::time::timeout(
            Duration::from_secs(10),
            TcpStream::connect(self.client_listen),
        )
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect to the client port"))??;
        stream.set_nodelay(true)?;
        Ok(stream)
    }

    /// Retries the chain's [`ReadyProbe`] until it passes or `timeout` runs out: the broker
    /// may not have linked yet, and the client closes a connection whose connect the relay
    /// refused (404 while no broker is listening).
    pub async fn wait_path_ready(&mut self, timeout: Duration) -> io::Result<()> {
        let deadline = Instant::now() + timeout;
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            self.check_processes_alive()?;
            let per_attempt = remaining(deadline).min(Duration::from_secs(10));
            let outcome = match self.options.probe {
                ReadyProbe::PortsOnly => return Ok(()),
                ReadyProbe::Echo => self.probe_echo(per_attempt).await,
                ReadyProbe::SinkSource => self.probe_sink_source(per_attempt).await,
            };
            let last = match outcome {
                Ok(()) => {
                    tracing::info!(attempts, "tunnel chain ready");
                    return Ok(());
                }
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                let links = self.relay_metric("tunnel_links_up").await;
                return Err(stage_error(
                    "first round trip through the tunnel",
                    io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "{attempts} attempts in {timeout:?}, last: {last}; relay metric tunnel_links_up = {links}"
                        ),
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn probe_echo(&self, timeout: Duration) -> io::Result<()> {
        const PROBE: &[u8] = b"tunnel-tests ready probe";
        let attempt = async {
            let mut s = self.connect().await?;
            s.write_all(PROBE).await?;
            s.shutdown().await?;
            let mut back = Vec::new();
            s.read_to_end(&mut back).await?;
            if back == PROBE {
                Ok(())
            } else {
                Err(io::Error::other(format!(
                    "echo probe got {} bytes back: {:?}",
                    back.len(),
                    String::from_utf8_lossy(&back)
                )))
            }
        };
        tokio::time::timeout(timeout, attempt)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "echo probe timed out"))?
    }

    async fn probe_sink_source(&self, timeout: Duration) -> io::Result<()> {
        let stream = self.connect().await?;
        sink_source_exchange(stream, &ExchangeSpec::symmetric(1024, 0xAB), timeout)
            .await
            .map(|_| ())
            .map_err(io::Error::other)
    }

    /// A process that exited on its own is a failure worth naming at once.
    pub fn check_processes_alive(&mut self) -> io::Result<()> {
        for process in [&mut self.relay, &mut self.broker, &mut self.client]
            .into_iter()
            .flatten()
        {
            process.check_running()?;
        }
        Ok(())
    }

    /// Panics, naming the process, if a running one has exited.
    pub fn assert_alive(&mut self) {
        if let Err(e) = self.check_processes_alive() {
            panic!("{e}");
        }
    }

    /// The value of a relay metric line `name value`, as text (`?` when unavailable).
    pub async fn relay_metric(&self, name: &str) -> String {
        let url = format!("http://{}/metrics", self.relay_http);
        let Ok(resp) = direct_http_client().get(&url).send().await else {
            return "? (metrics unreachable)".into();
        };
        let Ok(text) = resp.text().await else {
            return "? (metrics body unreadable)".into();
        };
        text.lines()
            .find_map(|line| {
                let (key, value) = line.split_once(' ')?;
                (key == name).then(|| value.trim().to_string())
            })
            .unwrap_or_else(|| "? (not in /metrics)".into())
    }

    /// Prints every process's log tail to stderr.
    pub fn print_logs(&self) {
        for process in [&self.relay, &self.broker, &self.client]
            .into_iter()
            .flatten()
        {
            process.print_log_tail(LOG_TAIL_LINES);
        }
    }
}

/// Runs `wait` in short slices until it succeeds or `timeout` passes, failing at once if the
/// process in `slot` exits meanwhile (a bad flag or a taken port should not cost the whole
/// timeout).
async fn wait_unless_exited<F, Fut>(
    slot: &mut Option<ChildProcess>,
    timeout: Duration,
    mut wait: F,
) -> io::Result<()>
where
    F: FnMut(Duration) -> Fut,
    Fut: std::future::Future<Output = io::Result<()>>,
{
    const SLICE: Duration = Duration::from_millis(250);
    let deadline = Instant::now() + timeout;
    loop {
        let last = match wait(SLICE.min(remaining(deadline))).await {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if let Some(process) = slot.as_mut() {
            if let Some(status) = process.try_exit_status()? {
                return Err(io::Error::other(format!(
                    "{} exited ({status}) before it was ready; log: {}",
                    process.label(),
                    process.log_path().display()
                )));
            }
        }
        if Instant::now() >= deadline {
            return Err(last);
        }
    }
}

fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

fn stage_error(stage: &str, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{stage}: {e}"))
}

async fn kill_slot(slot: &mut Option<ChildProcess>) -> io::Result<()> {
    if let Some(mut process) = slot.take() {
        process.kill9().await?;
    }
    Ok(())
}
