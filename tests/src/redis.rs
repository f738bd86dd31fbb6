//! A private `redis-server` for a test: its own free port, its own directory, no persistence,
//! killed when dropped. Also runs the redis command-line tools with a deadline.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use crate::net::free_addr;
use crate::process::{find_program, ChildProcess};
use crate::tempdir::TestDir;

/// Time `redis-server` has to accept TCP after it is started.
pub const REDIS_START_TIMEOUT: Duration = Duration::from_secs(20);

/// A running redis-server.
pub struct RedisServer {
    addr: SocketAddr,
    process: ChildProcess,
    // After the process, so it dies before its directory goes.
    dir: TestDir,
}

impl RedisServer {
    /// Starts redis-server on a free loopback port, without persistence (`--save ''
    /// --appendonly no`), and waits until it accepts TCP.
    pub async fn start() -> io::Result<RedisServer> {
        let program = find_program("redis-server", "redis-server")?;
        let dir = TestDir::new("redis")?;
        let addr = free_addr();
        let args: Vec<String> = vec![
            "--port".into(),
            addr.port().to_string(),
            "--bind".into(),
            addr.ip().to_string(),
            "--save".into(),
            String::new(),
            "--appendonly".into(),
            "no".into(),
            "--daemonize".into(),
            "no".into(),
            "--dir".into(),
            dir.path().display().to_string(),
        ];
        let mut process = ChildProcess::spawn("redis-server", &program, args, &[], dir.path())?;
        process.wait_listening(addr, REDIS_START_TIMEOUT).await?;
        Ok(RedisServer { addr, process, dir })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn log_path(&self) -> &Path {
        self.process.log_path()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// Runs a redis tool (`redis-cli`, `redis-benchmark`) with `args`, killing it after
/// `timeout`. The output is returned whatever the exit status; a time-out is an error.
pub async fn run_tool(program: &str, args: &[String], timeout: Duration) -> io::Result<Output> {
    let path = find_program(program, "redis-tools")?;
    let child = tokio::process::Command::new(&path)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(output) => output,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("{program} {args:?} did not finish within {timeout:?}"),
        )),
    }
}
