//! A child process whose output goes to a log file, killed when dropped.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::process::{Child, Command};

/// Lines of the log shown when a test fails while the process is alive.
pub const LOG_TAIL_LINES: usize = 50;

/// Environment variables that would make a child route its HTTP through a proxy of the
/// machine instead of the one a test chose; removed from every child's environment.
const PROXY_ENV_VARS: &[&str] = &[
    "HTTP_PROXY",
    "http_proxy",
    "HTTPS_PROXY",
    "https_proxy",
    "ALL_PROXY",
    "all_proxy",
    "NO_PROXY",
    "no_proxy",
];

/// Prefix of the binaries' configuration variables, removed from every child's environment.
const INHERITED_CONFIG_PREFIX: &str = "TUNNEL_";

/// A running binary. stdout and stderr both go to `log_path()`. On drop the process gets
/// SIGKILL; if the drop happens while the test is panicking, the log's path and its last
/// [`LOG_TAIL_LINES`] lines are printed first.
#[derive(Debug)]
pub struct ChildProcess {
    label: String,
    program: PathBuf,
    child: Child,
    log_path: PathBuf,
    exited: Option<ExitStatus>,
}

impl ChildProcess {
    /// Waits up to `timeout` for `addr` to accept TCP, failing early (with the log's tail)
    /// if the process exits first: a server that cannot start says why at once.
    pub async fn wait_listening(&mut self, addr: SocketAddr, timeout: Duration) -> io::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if crate::net::wait_for_tcp(addr, Duration::from_millis(250))
                .await
                .is_ok()
            {
                return Ok(());
            }
            if let Some(status) = self.try_exit_status()? {
                return Err(io::Error::other(format!(
                    "{} exited ({status}) before listening on {addr}; log {}:\n{}",
                    self.label(),
                    self.log_path().display(),
                    self.log_tail(30)
                )));
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "{} did not listen on {addr} within {timeout:?}; log {}:\n{}",
                        self.label(),
                        self.log_path().display(),
                        self.log_tail(30)
                    ),
                ));
            }
        }
    }

    /// Starts `program` with `args` and extra `env` (the machine's proxy variables are
    /// removed first, so set them in `env` if a test wants them). `label` names the log file:
    /// `<log_dir>/<label>.log`, appended to if it exists.
    pub fn spawn<I, S>(
        label: &str,
        program: &Path,
        args: I,
        env: &[(String, String)],
        log_dir: &Path,
    ) -> io::Result<ChildProcess>
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        let log_path = log_dir.join(format!("{label}.log"));
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        let log_err: File = log.try_clone()?;
        let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
        let mut command = Command::new(program);
        command
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err))
            .kill_on_drop(true);
        for var in PROXY_ENV_VARS {
            command.env_remove(var);
        }
        // The binaries read their settings from TUNNEL_* variables too; one left over in the
        // test runner's shell must not change what a test asked for.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with(INHERITED_CONFIG_PREFIX) {
                command.env_remove(key);
            }
        }
        for (key, value) in env {
            command.env(key, value);
        }
        let child = command.spawn().map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("spawning {} {:?}: {e}", program.display(), args),
            )
        })?;
        tracing::debug!(label, program = %program.display(), ?args, log = %log_path.display(), "spawned");
        Ok(ChildProcess {
            label: label.to_owned(),
            program: program.to_owned(),
            child,
            log_path,
            exited: None,
        })
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// OS process id, while the process has not been reaped.
    pub fn id(&self) -> Option<u32> {
        self.child.id()
    }

    /// The whole log so far (lossy UTF-8; empty if it cannot be read).
    pub fn log_contents(&self) -> String {
        std::fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The last `n` lines of the log.
    pub fn log_tail(&self, n: usize) -> String {
        let all = self.log_contents();
        let lines: Vec<&str> = all.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Prints the log's path and its last `n` lines to stderr (shown by the test runner).
    pub fn print_log_tail(&self, n: usize) {
        eprintln!(
            "----- {} ({}) log {}: last {n} lines -----\n{}\n----- end of {} log -----",
            self.label,
            self.program.display(),
            self.log_path.display(),
            self.log_tail(n),
            self.label
        );
    }

    /// Whether the process has exited, without waiting.
    pub fn try_exit_status(&mut self) -> io::Result<Option<ExitStatus>> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait()?;
        }
        Ok(self.exited)
    }

    /// An error naming the process and its log if it has exited.
    pub fn check_running(&mut self) -> io::Result<()> {
        match self.try_exit_status()? {
            Some(status) => Err(io::Error::other(format!(
                "{} exited unexpectedly ({status}); log: {}",
                self.label(),
                self.log_path().display()
            ))),
            None => Ok(()),
        }
    }

    /// Waits for the process to exit on its own, at most `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> io::Result<ExitStatus> {
        if let Some(status) = self.exited {
            return Ok(status);
        }
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(Ok(status)) => {
                self.exited = Some(status);
                Ok(status)
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("{} did not exit within {timeout:?}", self.label),
            )),
        }
    }

    /// SIGKILL (no chance to clean up, like a crash) and reap the process.
    pub async fn kill9(&mut self) -> io::Result<ExitStatus> {
        if let Some(status) = self.try_exit_status()? {
            return Ok(status);
        }
        self.child.start_kill()?;
        // SIGKILL cannot be ignored; the deadline only guards against a wedged kernel.
        self.wait_exit(Duration::from_secs(10)).await
    }

    /// SIGTERM (graceful stop), then wait for the exit at most `timeout`.
    #[cfg(unix)]
    pub async fn terminate(&mut self, timeout: Duration) -> io::Result<ExitStatus> {
        if let Some(status) = self.try_exit_status()? {
            return Ok(status);
        }
        let pid = self
            .child
            .id()
            .ok_or_else(|| io::Error::other("process already reaped"))?;
        // No libc dependency: the `kill` utility is in every Unix base system.
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()?;
        if !status.success() {
            return Err(io::Error::other(format!("kill -TERM {pid} failed")));
        }
        self.wait_exit(timeout).await
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.print_log_tail(LOG_TAIL_LINES);
        }
        let _ = self.child.start_kill();
    }
}

/// Directories searched for the programs, after `$PATH` (sbin is often not on a test
/// runner's PATH).
const EXTRA_BIN_DIRS: &[&str] = &["/usr/sbin", "/usr/local/sbin", "/sbin"];

/// The path of `program`, or an error naming the package that provides it.
pub fn find_program(program: &str, package: &str) -> io::Result<PathBuf> {
    let path_dirs = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    path_dirs
        .into_iter()
        .chain(EXTRA_BIN_DIRS.iter().map(PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "{program} not found on PATH or in {EXTRA_BIN_DIRS:?}: install the Debian \
                     package {package} (.ci/run does)"
                ),
            )
        })
}
