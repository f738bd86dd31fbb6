//! Starting the measured paths as real processes: the tunnel (relay, broker, client from the
//! bin dir) in its three flavours, and the three-hop plain TCP chain (the bench's own
//! forwarder mode). Each path is entered by a TCP connect to `entry`.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tunnel_tests::{free_addr, wait_for_tcp, ChildProcess, TestDir};

/// Time a path gets to come up (ports, broker link, first round trip).
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Server name the broker registers.
const SERVER_NAME: &str = "bench";

/// How the client speaks to the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavour {
    Http1,
    Http2,
    Https,
}

impl Flavour {
    pub fn label(self) -> &'static str {
        match self {
            Flavour::Http1 => "tunnel HTTP/1.1",
            Flavour::Http2 => "tunnel HTTP/2 (h2c)",
            Flavour::Https => "tunnel HTTPS",
        }
    }

    pub fn key(self) -> &'static str {
        match self {
            Flavour::Http1 => "tunnel_http1",
            Flavour::Http2 => "tunnel_http2",
            Flavour::Https => "tunnel_https",
        }
    }
}

/// A running measured path. Processes die when it is dropped.
pub struct RunningPath {
    pub label: String,
    pub entry: SocketAddr,
    /// Every entry when the path has several clients (the idle section); `entry` is the first.
    pub entries: Vec<SocketAddr>,
    /// (role, process) pairs; for the tunnel: relay, broker, client.
    pub processes: Vec<(String, ChildProcess)>,
    // Last, so the processes die before their directory goes.
    _dir: TestDir,
}

impl RunningPath {
    /// Fails naming the process that has exited, with its log's tail.
    pub fn check_alive(&mut self) -> io::Result<()> {
        for (role, process) in &mut self.processes {
            if let Some(status) = process.try_exit_status()? {
                return Err(io::Error::other(format!(
                    "{role} exited ({status}); log tail:\n{}",
                    process.log_tail(20)
                )));
            }
        }
        Ok(())
    }
}

/// Tokio worker threads of the processes the bench starts (0: tokio's default).
static WORKER_THREADS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Sets the worker threads of this process's runtime and of every process it starts:
/// `TOKIO_WORKER_THREADS` (inherited; tokio's runtimes read it, old tunnel binaries and the
/// chain's forwarders included) and the tunnel binaries' `--worker-threads`. 0: tokio's
/// default. Call it before any runtime is built, while the process has one thread.
pub fn set_worker_threads(threads: usize) {
    WORKER_THREADS.store(threads, std::sync::atomic::Ordering::Relaxed);
    if threads > 0 {
        std::env::set_var("TOKIO_WORKER_THREADS", threads.to_string());
    }
}

/// The runtime of a bench process (the bench itself, a forwarder of the chain, the data
/// server), built as the tunnel binaries build theirs from `--worker-threads`
/// ([`tunnel_proto::runtime`]: one worker is the current-thread scheduler), so that the
/// baselines run on the same scheduler as the tunnel. The count is `TOKIO_WORKER_THREADS`:
/// set by [`set_worker_threads`], inherited by the processes the bench starts.
pub fn runtime() -> tokio::runtime::Runtime {
    let threads = std::env::var("TOKIO_WORKER_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    tunnel_proto::runtime::build(threads).expect("tokio runtime")
}

/// `--worker-threads N` for a tunnel binary that has the flag.
fn worker_args(program: &Path) -> Vec<String> {
    if !help_lists(program, "--worker-threads") {
        return Vec::new();
    }
    let threads = WORKER_THREADS.load(std::sync::atomic::Ordering::Relaxed);
    vec!["--worker-threads".into(), threads.to_string()]
}

pub fn rust_log() -> Vec<(String, String)> {
    // Per-connection info lines would cost the measured processes time (10,000 connections).
    // BENCH_RUST_LOG overrides it, to look into a run (the logs are in the tunnel's temporary
    // directory, /tmp/tunnel-tests-bench-*, while it runs).
    let level = std::env::var("BENCH_RUST_LOG").unwrap_or_else(|_| "warn".into());
    vec![("RUST_LOG".into(), level)]
}

pub fn bin(bin_dir: &Path, name: &str) -> io::Result<PathBuf> {
    let path = bin_dir.join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "{} not found: run `cargo build --release --workspace --bins` or pass --bin-dir",
                path.display()
            ),
        ))
    }
}

/// Whether `program --help` lists `flag`: the bench runs against binaries of other versions
/// (`--bin-dir`, `--old-bin-dir`) and passes newer flags only to binaries that have them.
pub fn help_lists(program: &Path, flag: &str) -> bool {
    std::process::Command::new(program)
        .arg("--help")
        .output()
        .map(|out| {
            String::from_utf8_lossy(&out.stdout)
                .split(|c: char| c.is_whitespace() || c == ',' || c == '=')
                .any(|word| word == flag)
        })
        .unwrap_or(false)
}

/// How the tunnel's client processes reach the relay: in one session per client process
/// (docs/protocol.md §2.1), its packets streamed down or polled (§2.2), or with
/// per-connection requests (`tunnel-client --no-session`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// A session, streamed (`--mode stream`; a client without `--mode` polls, and its
    /// label says so).
    Stream,
    /// A session, polled (`--mode poll`).
    Poll,
    /// `--no-session`: one held pull and its own pushes per connection.
    PerConnection,
}

impl Transport {
    /// The client arguments that select it, for the client binary `client`.
    fn client_args(self, client: &Path) -> Vec<String> {
        let flag = |flag: &str, value: Option<&str>| {
            if !help_lists(client, flag) {
                return Vec::new();
            }
            let mut args = vec![flag.to_string()];
            args.extend(value.map(String::from));
            args
        };
        match self {
            Transport::Stream => flag("--mode", Some("stream")),
            Transport::Poll => flag("--mode", Some("poll")),
            // An old client has no sessions: it is per-connection without the flag.
            Transport::PerConnection => flag("--no-session", None),
        }
    }
}

/// What a started tunnel is made of, beyond its flavour.
#[derive(Debug, Clone)]
pub struct TunnelOptions {
    /// Connections the broker (and the relay, and one session) must hold.
    pub max_conns: usize,
    /// Client processes sharing the relay (one process's open-file limit cannot hold 10,000
    /// local sockets plus 10,000 HTTP/1.1 connections).
    pub clients: usize,
    pub transport: Transport,
}

impl TunnelOptions {
    /// One client process in a streamed session.
    pub fn new(max_conns: usize) -> TunnelOptions {
        TunnelOptions {
            max_conns,
            clients: 1,
            transport: Transport::Stream,
        }
    }

    pub fn with_transport(self, transport: Transport) -> TunnelOptions {
        TunnelOptions { transport, ..self }
    }
}

/// The label of a tunnel of `flavour` run by the client binary in `bin_dir` with
/// `transport`: what actually runs, found from the client's `--help` (a client without
/// `--no-session` has no sessions, one without `--mode` polls): `tunnel HTTP/1.1 [stream]`,
/// `… [poll]` or `… [per-conn]`.
pub fn tunnel_label(bin_dir: &Path, flavour: Flavour, transport: Transport) -> io::Result<String> {
    let client = bin(bin_dir, "tunnel-client")?;
    let has_sessions = help_lists(&client, "--no-session");
    let has_modes = help_lists(&client, "--mode");
    let how = match (has_sessions, has_modes, transport) {
        (false, _, _) | (_, _, Transport::PerConnection) => "per-conn",
        (true, true, Transport::Stream) => "stream",
        _ => "poll",
    };
    Ok(format!("{} [{how}]", flavour.label()))
}

/// A relay process, its addresses and the link secret file brokers must use.
pub struct RelayProcess {
    pub process: ChildProcess,
    pub http: SocketAddr,
    pub link: SocketAddr,
    pub secret_file: PathBuf,
}

/// Relay connection limit the bench never goes below (the relay's default): the soak's
/// churn keeps thousands of finished connections in their time-wait.
const RELAY_MIN_MAX_CONNECTIONS: usize = 20_000;

/// Starts the relay from `bin_dir` with `extra_args`, allowing `max_conns` connections (at
/// least [`RELAY_MIN_MAX_CONNECTIONS`]; and, when the relay has sessions, as many in one
/// session), and waits until it listens. Its log goes to `dir`.
pub async fn start_relay(
    bin_dir: &Path,
    dir: &Path,
    max_conns: usize,
    extra_args: Vec<String>,
) -> io::Result<RelayProcess> {
    let secret_file = dir.join("link-secret");
    std::fs::write(
        &secret_file,
        format!("bench-{}-{}", std::process::id(), free_addr().port()),
    )?;
    let (http, link) = (free_addr(), free_addr());
    let program = bin(bin_dir, "tunnel-servlet")?;
    let max_conns = max_conns.max(RELAY_MIN_MAX_CONNECTIONS);
    let mut args: Vec<String> = vec![
        "--listen".into(),
        http.to_string(),
        "--link-listen".into(),
        link.to_string(),
        "--link-secret-file".into(),
        secret_file.display().to_string(),
        "--max-connections".into(),
        max_conns.to_string(),
    ];
    // Session limits exist once the relay has sessions; the defaults are below what the
    // bench holds in one session.
    for flag in ["--max-session-connections"] {
        if help_lists(&program, flag) {
            args.extend([flag.to_string(), max_conns.to_string()]);
        }
    }
    args.extend(worker_args(&program));
    args.extend(extra_args);
    let mut process = ChildProcess::spawn("relay", &program, args, &rust_log(), dir)?;
    process.wait_listening(http, READY_TIMEOUT).await?;
    Ok(RelayProcess {
        process,
        http,
        link,
        secret_file,
    })
}

/// Starts relay, broker (forwarding to `target`) and client(s), and waits until a round trip
/// through the client's port works. `options.max_conns` must cover the idle section.
pub async fn start_tunnel(
    bin_dir: &Path,
    flavour: Flavour,
    target: SocketAddr,
    options: &TunnelOptions,
) -> io::Result<RunningPath> {
    let dir = TestDir::new(&format!("bench-{}", flavour.key()))?;
    let listens: Vec<SocketAddr> = (0..options.clients.max(1)).map(|_| free_addr()).collect();
    let mut relay_args: Vec<String> = Vec::new();
    let mut client_args: Vec<String> = vec![
        "--server".into(),
        SERVER_NAME.into(),
        "--no-env-proxy".into(),
    ];
    match flavour {
        Flavour::Http1 => {
            client_args.push("--http1".into());
        }
        Flavour::Http2 => {
            client_args.push("--http2".into());
        }
        Flavour::Https => {
            let cert = rcgen::generate_simple_self_signed(vec![
                "localhost".to_string(),
                "127.0.0.1".to_string(),
            ])
            .map_err(|e| io::Error::other(format!("rcgen: {e}")))?;
            let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
            std::fs::write(&cert_path, cert.cert.pem())?;
            std::fs::write(&key_path, cert.key_pair.serialize_pem())?;
            relay_args.extend([
                "--tls-cert".into(),
                cert_path.display().to_string(),
                "--tls-key".into(),
                key_path.display().to_string(),
            ]);
            client_args.extend(["--ca-file".into(), cert_path.display().to_string()]);
        }
    }
    let client = bin(bin_dir, "tunnel-client")?;
    client_args.extend(options.transport.client_args(&client));
    client_args.extend(worker_args(&client));
    let relay = start_relay(bin_dir, dir.path(), options.max_conns, relay_args).await?;
    let (link, secret) = (relay.link, relay.secret_file.clone());
    let scheme = if flavour == Flavour::Https {
        "https"
    } else {
        "http"
    };
    client_args.extend([
        "--relay".into(),
        format!("{scheme}://{}/tunnel", relay.http),
    ]);
    let broker_max_conns = options.max_conns;
    let broker_program = bin(bin_dir, "tunnel-broker")?;
    let mut broker_args: Vec<String> = vec![
        "--relay".into(),
        link.to_string(),
        "--name".into(),
        SERVER_NAME.into(),
        "--link-secret-file".into(),
        secret.display().to_string(),
        "--forward".into(),
        target.to_string(),
        "--max-connections".into(),
        broker_max_conns.to_string(),
        "--accept-backlog".into(),
        broker_max_conns.to_string(),
    ];
    broker_args.extend(worker_args(&broker_program));
    let env = rust_log();
    let log_dir = dir.path().to_path_buf();
    let mut path = RunningPath {
        label: tunnel_label(bin_dir, flavour, options.transport)?,
        entry: listens[0],
        entries: listens.clone(),
        processes: vec![("relay".into(), relay.process)],
        _dir: dir,
    };
    let broker = ChildProcess::spawn("broker", &broker_program, broker_args, &env, &log_dir)?;
    path.processes.push(("broker".into(), broker));
    for (i, listen) in listens.iter().enumerate() {
        let role = if i == 0 {
            "client".to_string()
        } else {
            format!("client{}", i + 1)
        };
        let mut args = client_args.clone();
        args.extend(["--listen".to_string(), listen.to_string()]);
        let client =
            ChildProcess::spawn(&role, &bin(bin_dir, "tunnel-client")?, args, &env, &log_dir)?;
        path.processes.push((role, client));
        wait_up(&mut path, *listen).await?;
    }
    wait_round_trip(&mut path).await?;
    Ok(path)
}

/// The data server in its own process (the bench itself with `--serve-data`), so the bench's
/// open-file limit only has to cover the client ends of the idle connections.
pub async fn start_data_server() -> io::Result<(SocketAddr, ChildProcess, TestDir)> {
    let dir = TestDir::new("bench-data")?;
    let addr = free_addr();
    let mut process = ChildProcess::spawn(
        "data-server",
        &std::env::current_exe()?,
        ["--serve-data".to_string(), addr.to_string()],
        &[],
        dir.path(),
    )?;
    let deadline = Instant::now() + READY_TIMEOUT;
    while wait_for_tcp(addr, Duration::from_millis(300))
        .await
        .is_err()
    {
        if let Some(status) = process.try_exit_status()? {
            return Err(io::Error::other(format!(
                "data server exited ({status}): {}",
                process.log_tail(20)
            )));
        }
        if Instant::now() >= deadline {
            return Err(io::Error::other("data server did not listen"));
        }
    }
    Ok((addr, process, dir))
}

/// The direct baseline: the data server itself.
pub fn direct(target: SocketAddr) -> io::Result<RunningPath> {
    Ok(RunningPath {
        label: "direct TCP".into(),
        entry: target,
        entries: vec![target],
        processes: Vec::new(),
        _dir: TestDir::new("bench-direct")?,
    })
}

/// Starts three forwarder processes in a row in front of `target`.
pub async fn start_tcp_chain(target: SocketAddr) -> io::Result<RunningPath> {
    let dir = TestDir::new("bench-tcp3")?;
    let log_dir = dir.path().to_path_buf();
    let me = std::env::current_exe()?;
    let mut path = RunningPath {
        label: "3-hop TCP chain".into(),
        entry: target,
        entries: vec![target],
        processes: Vec::new(),
        _dir: dir,
    };
    let mut next = target;
    for hop in (1..=3).rev() {
        let listen = free_addr();
        let args = vec![
            "--forwarder-listen".to_string(),
            listen.to_string(),
            "--forwarder-to".into(),
            next.to_string(),
        ];
        let process = ChildProcess::spawn(&format!("hop{hop}"), &me, args, &[], &log_dir)?;
        path.processes.push((format!("hop{hop}"), process));
        wait_up(&mut path, listen).await?;
        next = listen;
    }
    path.entry = next;
    path.entries = vec![next];
    wait_round_trip(&mut path).await?;
    Ok(path)
}

/// Debian package of GNU httptunnel's `hts` and `htc`.
pub const HTTPTUNNEL_PACKAGE: &str = "httptunnel";

/// `program` (of GNU httptunnel) on this machine, or an error naming the package.
fn httptunnel_program(program: &str) -> io::Result<PathBuf> {
    tunnel_tests::process::find_program(program, HTTPTUNNEL_PACKAGE).map_err(|_| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "GNU httptunnel's {program} not found: the peers section needs the Debian \
                 package {HTTPTUNNEL_PACKAGE} (apt-get install {HTTPTUNNEL_PACKAGE}; CI does \
                 not install it, the bench does not run there)"
            ),
        )
    })
}

/// Starts GNU httptunnel in front of `target`: `hts` (its server, forwarding to `target`) and
/// `htc` (its client, listening for the one TCP connection it carries at a time), with their
/// defaults otherwise. The label carries the version `hts -V` prints.
pub async fn start_httptunnel(target: SocketAddr) -> io::Result<RunningPath> {
    let (hts, htc) = (httptunnel_program("hts")?, httptunnel_program("htc")?);
    let version = std::process::Command::new(&hts)
        .arg("-V")
        .output()
        .ok()
        .and_then(|out| {
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            // "hts (httptunnel) 3.3"
            text.lines()
                .next()?
                .split_whitespace()
                .nth(2)
                .map(String::from)
        })
        .unwrap_or_else(|| "?".into());
    let dir = TestDir::new("bench-httptunnel")?;
    let log_dir = dir.path().to_path_buf();
    let (http, listen) = (free_addr(), free_addr());
    let mut path = RunningPath {
        label: format!("GNU httptunnel {version} [1 conn]"),
        entry: listen,
        entries: vec![listen],
        processes: Vec::new(),
        _dir: dir,
    };
    // -w: stay in the foreground, so the process is ours to watch and to kill.
    let server = ChildProcess::spawn(
        "hts",
        &hts,
        [
            "-w".to_string(),
            "-F".into(),
            target.to_string(),
            http.to_string(),
        ],
        &[],
        &log_dir,
    )?;
    path.processes.push(("hts".into(), server));
    wait_up(&mut path, http).await?;
    // htc takes a port only and listens on every address; the bench enters on loopback.
    let client = ChildProcess::spawn(
        "htc",
        &htc,
        [
            "-w".to_string(),
            "-F".into(),
            listen.port().to_string(),
            http.to_string(),
        ],
        &[],
        &log_dir,
    )?;
    path.processes.push(("htc".into(), client));
    wait_up(&mut path, listen).await?;
    wait_round_trip(&mut path).await?;
    Ok(path)
}

async fn wait_up(path: &mut RunningPath, addr: SocketAddr) -> io::Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if wait_for_tcp(addr, Duration::from_millis(300)).await.is_ok() {
            return Ok(());
        }
        path.check_alive()?;
        if Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "{}: nothing listens on {addr} after {READY_TIMEOUT:?}",
                    path.label
                ),
            ));
        }
    }
}

/// Retries an echo of a few bytes through the path (the broker may not have linked yet).
/// One echo round trip through `entry`, within 5 s: the path is up end to end.
pub(super) async fn echo_probe(entry: SocketAddr) -> io::Result<()> {
    const PROBE: &[u8] = b"bench ready probe";
    let attempt = async {
        let mut s = TcpStream::connect(entry).await?;
        s.write_all(PROBE).await?;
        let mut back = vec![0u8; PROBE.len()];
        s.read_exact(&mut back).await?;
        if back == PROBE {
            Ok(())
        } else {
            Err(io::Error::other("probe came back changed"))
        }
    };
    tokio::time::timeout(Duration::from_secs(5), attempt)
        .await
        .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "probe timed out")))
}

async fn wait_round_trip(path: &mut RunningPath) -> io::Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let attempt = echo_probe(path.entry).await;
        match attempt {
            Ok(()) => return Ok(()),
            Err(e) => {
                path.check_alive()?;
                if Instant::now() >= deadline {
                    return Err(io::Error::other(format!(
                        "{}: no round trip within {READY_TIMEOUT:?}: {e}",
                        path.label
                    )));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}
