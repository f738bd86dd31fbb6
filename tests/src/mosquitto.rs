//! A private `mosquitto` MQTT broker for a test: its own free loopback port, its own config
//! file in a temp dir, no persistence, every log type to a log file, killed when dropped.
//! Also runs the `mosquitto_pub`/`mosquitto_sub` clients with a deadline.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Output, Stdio};
use std::time::Duration;

use tokio::process::{Child, Command};
use tokio::time::Instant;

use crate::net::{free_addr, POLL_INTERVAL};
use crate::process::{find_program, ChildProcess};
use crate::tempdir::TestDir;

/// Time `mosquitto` has to accept TCP after it is started.
pub const MOSQUITTO_START_TIMEOUT: Duration = Duration::from_secs(20);

/// Debian package of the broker and of the command-line clients.
pub const BROKER_PACKAGE: &str = "mosquitto";
pub const CLIENTS_PACKAGE: &str = "mosquitto-clients";

/// The configuration file: one loopback listener, anonymous clients, nothing on disk but
/// the log (stderr, which [`ChildProcess`] sends to a file). `user root` keeps a broker
/// started by root from switching to the `mosquitto` account (which could not write the
/// test's directory); a broker started by anyone else ignores the option.
fn config_text(addr: SocketAddr) -> String {
    format!(
        "listener {port} {ip}\n\
         allow_anonymous true\n\
         persistence false\n\
         user root\n\
         log_dest stderr\n\
         log_type all\n",
        port = addr.port(),
        ip = addr.ip(),
    )
}

/// A running mosquitto broker.
pub struct MosquittoServer {
    addr: SocketAddr,
    process: ChildProcess,
    // After the process, so it dies before its directory goes.
    dir: TestDir,
}

impl MosquittoServer {
    /// Writes a config in a fresh temp dir, starts `mosquitto -c <config>` and waits until
    /// it accepts TCP.
    pub async fn start() -> io::Result<MosquittoServer> {
        let program = find_program("mosquitto", BROKER_PACKAGE)?;
        let dir = TestDir::new("mosquitto")?;
        let addr = free_addr();
        let config = dir.path().join("mosquitto.conf");
        std::fs::write(&config, config_text(addr))?;
        let args = vec!["-c".to_string(), config.display().to_string()];
        let mut process = ChildProcess::spawn("mosquitto", &program, args, &[], dir.path())?;
        process
            .wait_listening(addr, MOSQUITTO_START_TIMEOUT)
            .await?;
        Ok(MosquittoServer { addr, process, dir })
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

    /// The broker's whole log so far.
    pub fn log_contents(&self) -> String {
        self.process.log_contents()
    }

    /// Waits until the broker's log contains `needle` (for example `Sending SUBACK to
    /// <client id>`, which proves a subscription is in place), at most `timeout`.
    pub async fn wait_for_log(&self, needle: &str, timeout: Duration) -> io::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log_contents().contains(needle) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "mosquitto's log did not show {needle:?} within {timeout:?}; last lines:\n{}",
                        self.process.log_tail(20)
                    ),
                ));
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }
}

/// Starts a mosquitto client (`mosquitto_sub`, `mosquitto_pub`) with `args`, stdout and
/// stderr captured, killed if dropped. Finish it with [`wait_client`].
pub fn spawn_client(program: &str, args: &[String]) -> io::Result<Child> {
    let path = find_program(program, CLIENTS_PACKAGE)?;
    Command::new(&path)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
}

/// Collects a client's output, killing it after `timeout`. The output is returned whatever
/// the exit status; a time-out is an error.
pub async fn wait_client(child: Child, what: &str, timeout: Duration) -> io::Result<Output> {
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(output) => output,
        // Dropping the future drops the child, which kill_on_drop kills.
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("{what} did not finish within {timeout:?}"),
        )),
    }
}

/// Runs a client to completion with a deadline.
pub async fn run_client(program: &str, args: &[String], timeout: Duration) -> io::Result<Output> {
    let child = spawn_client(program, args)?;
    wait_client(child, &format!("{program} {args:?}"), timeout).await
}
