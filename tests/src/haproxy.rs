//! HAProxy in front of a pool of relays, running the configurations shipped in
//! `deploy/haproxy/` (rendered with the test's addresses), as the test's own child process
//! (`haproxy -db`, foreground). A missing program is a failure naming the Debian package.
//!
//! The rendering adds a stats socket, through which the tests read each server's state and
//! request counts (`show stat`).

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use crate::net::free_addr;
use crate::process::{find_program, ChildProcess};
use crate::services::{workspace_root, SERVICE_START_TIMEOUT};

/// Which shipped configuration to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HaproxyVariant {
    /// `deploy/haproxy/haproxy.cfg`: requests naming a session or connection go to the relay
    /// whose id is the id's top byte; opens are balanced (leastconn).
    ById,
    /// `deploy/haproxy/haproxy-source.cfg`: `balance source`, every request of one client
    /// address to one relay.
    Source,
}

impl HaproxyVariant {
    /// The configuration file, relative to the workspace root.
    pub fn example_path(self) -> &'static str {
        match self {
            HaproxyVariant::ById => "deploy/haproxy/haproxy.cfg",
            HaproxyVariant::Source => "deploy/haproxy/haproxy-source.cfg",
        }
    }
}

/// The `maxconn` the tests run with instead of the shipped one: HAProxy needs two file
/// descriptors per connection and refuses to start when it cannot raise its limit that far,
/// and a test runner's hard limit may be as low as 4096.
pub const TEST_MAXCONN: u32 = 1500;

/// A relay as the configuration names it: `server relay<id> <addr>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayServer {
    pub id: u8,
    pub addr: SocketAddr,
}

impl RelayServer {
    /// The server's name in the configuration (and in `show stat`).
    pub fn name(&self) -> String {
        format!("relay{}", self.id)
    }
}

/// Replaces exactly one occurrence of `from`, so an edit of the example that breaks the
/// test's assumptions fails loudly instead of testing something else.
fn replace_once(text: &str, from: &str, to: &str, what: &str) -> io::Result<String> {
    match text.matches(from).count() {
        1 => Ok(text.replacen(from, to, 1)),
        n => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{what}: expected exactly one {from:?}, found {n}"),
        )),
    }
}

/// The example with the test's listen address and relays, a test-sized `maxconn`, and a
/// stats socket at `stats_socket`.
///
/// The example's `server relay` lines must be consecutive and of the form `server relayK
/// ADDR` (options belong on `default-server`): they are replaced by one such line per relay
/// of `relays`, so the rendered file has exactly the example's settings for N relays.
pub fn render_haproxy_example(
    example: &str,
    what: &str,
    listen: SocketAddr,
    relays: &[RelayServer],
    stats_socket: &Path,
) -> io::Result<String> {
    let bad = |msg: String| io::Error::new(io::ErrorKind::InvalidData, format!("{what}: {msg}"));
    let text = replace_once(
        example,
        "    bind :80\n",
        &format!("    bind {listen}\n"),
        what,
    )?;
    let text = replace_once(
        &text,
        "    maxconn 8000\n",
        &format!("    maxconn {TEST_MAXCONN}\n"),
        what,
    )?;
    let text = replace_once(
        &text,
        "\nglobal\n",
        &format!(
            "\nglobal\n    stats socket {} level admin\n",
            stats_socket.display()
        ),
        what,
    )?;

    let lines: Vec<&str> = text.lines().collect();
    let server_lines: Vec<usize> = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.trim_start().starts_with("server "))
        .map(|(i, _)| i)
        .collect();
    let (Some(&first), Some(&last)) = (server_lines.first(), server_lines.last()) else {
        return Err(bad("no `server` line".into()));
    };
    if last - first + 1 != server_lines.len() {
        return Err(bad("the `server` lines are not consecutive".into()));
    }
    for &i in &server_lines {
        let words: Vec<&str> = lines[i].split_whitespace().collect();
        let well_formed = words.len() == 3
            && words[1]
                .strip_prefix("relay")
                .is_some_and(|id| id.parse::<u8>().is_ok());
        if !well_formed {
            return Err(bad(format!(
                "line {:?} is not `server relayK ADDR` (put options on default-server)",
                lines[i]
            )));
        }
    }
    let mut out: Vec<String> = lines[..first].iter().map(|l| l.to_string()).collect();
    out.extend(
        relays
            .iter()
            .map(|r| format!("    server {} {}", r.name(), r.addr)),
    );
    out.extend(lines[last + 1..].iter().map(|l| l.to_string()));
    Ok(out.join("\n") + "\n")
}

/// One server's line of `show stat`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerStat {
    /// `UP`, `DOWN`, `UP 1/2` (going down), `DOWN 1/2` (coming up), `MAINT`, `no check`.
    pub status: String,
    /// Requests (HAProxy "sessions") sent to it in total.
    pub total: u64,
    /// Requests in progress on it now.
    pub current: u64,
}

impl ServerStat {
    /// Fully up (a server going down shows `UP 1/2`).
    pub fn is_up(&self) -> bool {
        self.status == "UP"
    }
}

/// HAProxy running a rendered example.
#[derive(Debug)]
pub struct Haproxy {
    addr: SocketAddr,
    socket: PathBuf,
    process: ChildProcess,
}

impl Haproxy {
    /// Renders `variant` for `relays` into `<parent>/haproxy`, starts HAProxy on a free port
    /// and waits until it accepts connections (not until the relays are up: see
    /// [`Haproxy::wait_server`]).
    pub async fn start(
        parent: &Path,
        variant: HaproxyVariant,
        relays: &[RelayServer],
    ) -> io::Result<Haproxy> {
        let program = find_program("haproxy", "haproxy")?;
        let dir = parent.join("haproxy");
        std::fs::create_dir_all(&dir)?;
        let example_path = variant.example_path();
        let example = std::fs::read_to_string(workspace_root().join(example_path))?;
        let addr = free_addr();
        let socket = dir.join("stats.sock");
        let config = render_haproxy_example(&example, example_path, addr, relays, &socket)?;
        let config_path = dir.join("haproxy.cfg");
        std::fs::write(&config_path, config)?;
        // -db: foreground, no daemon; its log (stdout, as configured) goes to the child's log.
        let args = vec![
            "-db".to_string(),
            "-f".into(),
            config_path.display().to_string(),
        ];
        let mut process = ChildProcess::spawn("haproxy", &program, args, &[], &dir)?;
        process.wait_listening(addr, SERVICE_START_TIMEOUT).await?;
        Ok(Haproxy {
            addr,
            socket,
            process,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The tunnel URL through HAProxy.
    pub fn tunnel_url(&self, base_path: &str) -> String {
        format!("http://{}{base_path}", self.addr)
    }

    /// HAProxy's log: one line per request (`relays/relayK`, status, retries) and one per
    /// server state change.
    pub fn log(&self) -> String {
        self.process.log_contents()
    }

    pub fn process(&mut self) -> &mut ChildProcess {
        &mut self.process
    }

    /// Sends one command to the stats socket and returns the answer.
    pub async fn command(&self, command: &str) -> io::Result<String> {
        let exchange = async {
            let mut stream = tokio::net::UnixStream::connect(&self.socket).await?;
            stream.write_all(format!("{command}\n").as_bytes()).await?;
            let mut answer = String::new();
            stream.read_to_string(&mut answer).await?;
            Ok::<_, io::Error>(answer)
        };
        tokio::time::timeout(Duration::from_secs(5), exchange)
            .await
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("HAProxy stats socket: no answer to {command:?} within 5 s"),
                )
            })?
    }

    /// Every server of the `relays` backend by name, from `show stat`.
    pub async fn servers(&self) -> io::Result<HashMap<String, ServerStat>> {
        let csv = self.command("show stat").await?;
        parse_show_stat(&csv, "relays")
    }

    /// Waits until `server` is fully up (`up`) or down (`!up`) in HAProxy's eyes.
    pub async fn wait_server(&self, server: &str, up: bool, timeout: Duration) -> io::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let servers = self.servers().await?;
            let status = servers.get(server).map(|s| s.status.clone());
            match &status {
                Some(s) if (s == "UP") == up && (up || s.starts_with("DOWN")) => return Ok(()),
                _ => {}
            }
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "HAProxy server {server} not {} within {timeout:?} (status {status:?})",
                        if up { "UP" } else { "DOWN" }
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The servers of `backend` in a `show stat` CSV answer (its first line names the columns).
pub fn parse_show_stat(csv: &str, backend: &str) -> io::Result<HashMap<String, ServerStat>> {
    let bad = |msg: &str| io::Error::new(io::ErrorKind::InvalidData, format!("show stat: {msg}"));
    let mut lines = csv.lines();
    let header = lines
        .next()
        .and_then(|l| l.strip_prefix("# "))
        .ok_or_else(|| bad("no header line"))?;
    let columns: Vec<&str> = header.split(',').collect();
    let column = |name: &str| {
        columns
            .iter()
            .position(|c| *c == name)
            .ok_or_else(|| bad(&format!("no column {name}")))
    };
    let (px, sv, status, stot, scur) = (
        column("pxname")?,
        column("svname")?,
        column("status")?,
        column("stot")?,
        column("scur")?,
    );
    let mut servers = HashMap::new();
    for line in lines.filter(|l| !l.is_empty()) {
        let fields: Vec<&str> = line.split(',').collect();
        let field = |i: usize| fields.get(i).copied().unwrap_or_default();
        if field(px) != backend || matches!(field(sv), "FRONTEND" | "BACKEND") {
            continue;
        }
        servers.insert(
            field(sv).to_string(),
            ServerStat {
                status: field(status).to_string(),
                total: field(stot).parse().unwrap_or(0),
                current: field(scur).parse().unwrap_or(0),
            },
        );
    }
    Ok(servers)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relays(n: u8) -> Vec<RelayServer> {
        (1..=n)
            .map(|id| RelayServer {
                id,
                addr: SocketAddr::from(([127, 0, 0, 1], 4000 + u16::from(id))),
            })
            .collect()
    }

    #[test]
    fn both_examples_render_for_one_to_five_relays() {
        let listen: SocketAddr = "127.0.0.1:4999".parse().unwrap();
        let socket = Path::new("/tmp/x/stats.sock");
        for variant in [HaproxyVariant::ById, HaproxyVariant::Source] {
            let path = variant.example_path();
            let example = std::fs::read_to_string(workspace_root().join(path)).unwrap();
            for n in 1..=5 {
                let out = render_haproxy_example(&example, path, listen, &relays(n), socket)
                    .unwrap_or_else(|e| panic!("{e}"));
                assert!(out.contains("    bind 127.0.0.1:4999\n"), "{out}");
                assert!(out.contains("stats socket /tmp/x/stats.sock level admin"));
                assert!(out.contains(&format!("maxconn {TEST_MAXCONN}\n")));
                let servers: Vec<&str> = out
                    .lines()
                    .filter(|l| l.trim_start().starts_with("server "))
                    .collect();
                let expected: Vec<String> = (1..=n)
                    .map(|id| format!("    server relay{id} 127.0.0.1:{}", 4000 + u16::from(id)))
                    .collect();
                assert_eq!(servers, expected, "{path}");
                assert!(
                    !out.contains("10.0.0."),
                    "{path}: an example address is left"
                );
            }
        }
    }

    #[test]
    fn rendering_refuses_a_changed_example() {
        let listen: SocketAddr = "127.0.0.1:4999".parse().unwrap();
        let socket = Path::new("/tmp/s");
        let example = "global\n    maxconn 8000\nfrontend f\n    bind :80\nbackend relays\n";
        let base = |extra: &str| format!("\n{example}{extra}");
        let err = render_haproxy_example(&base(""), "x", listen, &relays(1), socket).unwrap_err();
        assert!(err.to_string().contains("no `server` line"), "{err}");
        let err = render_haproxy_example(
            &base("    server relay1 a:1 check\n"),
            "x",
            listen,
            &relays(1),
            socket,
        )
        .unwrap_err();
        assert!(err.to_string().contains("default-server"), "{err}");
        let err = render_haproxy_example(
            &base("    server relay1 a:1\n    # gap\n    server relay2 b:1\n"),
            "x",
            listen,
            &relays(1),
            socket,
        )
        .unwrap_err();
        assert!(err.to_string().contains("not consecutive"), "{err}");
        let ok = render_haproxy_example(
            &base("    server relay1 a:1\n    server relay2 b:1\n"),
            "x",
            listen,
            &relays(3),
            socket,
        )
        .unwrap();
        assert!(ok.ends_with("server relay3 127.0.0.1:4003\n"), "{ok}");
        let err = render_haproxy_example(example, "x", listen, &relays(1), socket).unwrap_err();
        assert!(err.to_string().contains("expected exactly one"), "{err}");
    }

    #[test]
    fn show_stat_is_read_by_column_name() {
        let csv = "# pxname,svname,qcur,scur,stot,status,\n\
                   tunnel,FRONTEND,,3,10,OPEN,\n\
                   relays,relay1,0,2,7,UP,\n\
                   relays,relay2,0,0,5,DOWN,\n\
                   relays,BACKEND,0,2,12,UP,\n\n";
        let servers = parse_show_stat(csv, "relays").unwrap();
        assert_eq!(servers.len(), 2);
        assert_eq!(
            servers["relay1"],
            ServerStat {
                status: "UP".into(),
                total: 7,
                current: 2
            }
        );
        assert!(servers["relay1"].is_up() && !servers["relay2"].is_up());
        assert!(parse_show_stat("garbage", "relays").is_err());
    }
}
