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

fn rust_log() -> Vec<(String, String)> {
    // Per-connection info lines would cost the measured processes time (10,000 connections).
    vec![("RUST_LOG".into(), "warn".into())]
}

fn bin(bin_dir: &Path, name: &str) -> io::Result<PathBuf> {
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

/// Starts relay, broker (forwarding to `target`) and client, and waits until a round trip
/// through the client's port works. `broker_max_conns` must cover the idle section. With
/// `clients` > 1, that many client processes share the relay (one process's open-file limit
/// cannot hold 10,000 local sockets plus 10,000 HTTP/1.1 connections).
pub async fn start_tunnel(
    bin_dir: &Path,
    flavour: Flavour,
    target: SocketAddr,
    broker_max_conns: usize,
    clients: usize,
) -> io::Result<RunningPath> {
    let dir = TestDir::new(&format!("bench-{}", flavour.key()))?;
    let secret = dir.path().join("link-secret");
    std::fs::write(
        &secret,
        format!("bench-{}-{}", std::process::id(), target.port()),
    )?;
    let (http, link) = (free_addr(), free_addr());
    let listens: Vec<SocketAddr> = (0..clients.max(1)).map(|_| free_addr()).collect();
    let mut relay_args: Vec<String> = vec![
        "--listen".into(),
        http.to_string(),
        "--link-listen".into(),
        link.to_string(),
        "--link-secret-file".into(),
        secret.display().to_string(),
    ];
    let mut client_args: Vec<String> = vec![
        "--server".into(),
        SERVER_NAME.into(),
        "--no-env-proxy".into(),
    ];
    match flavour {
        Flavour::Http1 => {
            client_args.extend([
                "--http1".into(),
                "--relay".into(),
                format!("http://{http}/tunnel"),
            ]);
        }
        Flavour::Http2 => {
            client_args.extend([
                "--http2".into(),
                "--relay".into(),
                format!("http://{http}/tunnel"),
            ]);
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
            client_args.extend([
                "--ca-file".into(),
                cert_path.display().to_string(),
                "--relay".into(),
                format!("https://{http}/tunnel"),
            ]);
        }
    }
    let broker_args: Vec<String> = vec![
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
    let env = rust_log();
    let mut path = RunningPath {
        label: flavour.label().into(),
        entry: listens[0],
        entries: listens.clone(),
        processes: Vec::new(),
        _dir: dir,
    };
    let log_dir = path._dir.path().to_path_buf();
    let relay = ChildProcess::spawn(
        "relay",
        &bin(bin_dir, "tunnel-servlet")?,
        relay_args,
        &env,
        &log_dir,
    )?;
    path.processes.push(("relay".into(), relay));
    wait_up(&mut path, http).await?;
    let broker = ChildProcess::spawn(
        "broker",
        &bin(bin_dir, "tunnel-broker")?,
        broker_args,
        &env,
        &log_dir,
    )?;
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
async fn wait_round_trip(path: &mut RunningPath) -> io::Result<()> {
    const PROBE: &[u8] = b"bench ready probe";
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let attempt = tokio::time::timeout(Duration::from_secs(5), async {
            let mut s = TcpStream::connect(path.entry).await?;
            s.write_all(PROBE).await?;
            let mut back = vec![0u8; PROBE.len()];
            s.read_exact(&mut back).await?;
            if back == PROBE {
                Ok(())
            } else {
                Err(io::Error::other("probe came back changed"))
            }
        })
        .await
        .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "probe timed out")));
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
