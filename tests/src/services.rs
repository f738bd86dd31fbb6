//! Real HTTP intermediaries the tests put between the client and the relay: squid and
//! tinyproxy as forward proxies, nginx as a reverse proxy. Each runs as the test's own child
//! process on a free loopback port, with a minimal configuration written to the test's temp
//! dir (never the system service or its config). A missing program is a test failure with a
//! message naming the Debian package, never a silent skip.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::net::free_addr;
pub use crate::process::find_program;
use crate::process::ChildProcess;

/// Time a proxy has to start accepting connections.
pub const SERVICE_START_TIMEOUT: Duration = Duration::from_secs(20);

/// Time a proxy has to write the log line of a request that ended (squid logs a request, or
/// a CONNECT tunnel, when it ends).
pub const LOG_WAIT: Duration = Duration::from_secs(15);

/// Waits until `read()` (a proxy's log) contains `needle`, or panics showing what it had.
pub async fn wait_for_log(what: &str, read: impl Fn() -> String, needle: &str) {
    let deadline = std::time::Instant::now() + LOG_WAIT;
    loop {
        let text = read();
        if text.contains(needle) {
            return;
        }
        if std::time::Instant::now() >= deadline {
            panic!("{what} has no line with {needle:?} after {LOG_WAIT:?}:\n{text}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Where squid's helpers live on Debian.
const SQUID_HELPER_DIRS: &[&str] = &["/usr/lib/squid", "/usr/lib64/squid", "/usr/libexec/squid"];

/// The path of squid's helper `name` (package squid).
pub fn squid_helper(name: &str) -> io::Result<PathBuf> {
    SQUID_HELPER_DIRS
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "{name} not found in {SQUID_HELPER_DIRS:?}: install the Debian package squid"
                ),
            )
        })
}

/// Like [`find_program`], panicking with its message: these tests exist to run against the
/// real program, so its absence is a failure.
pub fn require_program(program: &str, package: &str) -> PathBuf {
    find_program(program, package).unwrap_or_else(|e| panic!("{e}"))
}

fn read_lossy(path: &Path) -> String {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// Makes `dir` writable for everyone: squid started as root drops to its
/// `cache_effective_user` (`proxy` on Debian) before it opens its logs.
#[cfg(unix)]
pub fn open_up(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777))
}

// ------------------------------------------------------------------------------------------
// squid

/// Proxy basic authentication for squid: one user, checked by squid's `basic_ncsa_auth`
/// helper against an htpasswd file the test writes.
#[derive(Debug, Clone)]
pub struct ProxyUser {
    pub name: String,
    pub password: String,
}

/// A squid forward proxy (`squid -N`, no cache, CONNECT to any port allowed for loopback).
#[derive(Debug)]
pub struct Squid {
    addr: SocketAddr,
    dir: PathBuf,
    process: ChildProcess,
}

impl Squid {
    /// Starts squid in `<parent>/squid`, requiring `user` to authenticate if given.
    pub async fn start(parent: &Path, user: Option<&ProxyUser>) -> io::Result<Squid> {
        Squid::start_with_rules(parent, user, "").await
    }

    /// Like [`Squid::start`], with `rules` (squid.conf lines, e.g. `acl` and `http_access
    /// deny` lines that limit clients) placed before the rule that allows loopback clients.
    pub async fn start_with_rules(
        parent: &Path,
        user: Option<&ProxyUser>,
        rules: &str,
    ) -> io::Result<Squid> {
        let dir = parent.join("squid");
        std::fs::create_dir_all(&dir)?;
        let auth = match user {
            None => String::new(),
            Some(user) => {
                let helper = squid_helper("basic_ncsa_auth")?;
                let htpasswd = dir.join("htpasswd");
                let line = format!("{}:{}\n", user.name, apr1_hash(&user.password)?);
                std::fs::write(&htpasswd, line)?;
                format!(
                    "auth_param basic program {} {}\n\
                     auth_param basic children 2 startup=1 idle=1\n\
                     auth_param basic realm tunnel-tests\n\
                     acl authenticated proxy_auth REQUIRED\n\
                     http_access deny !authenticated\n",
                    helper.display(),
                    htpasswd.display()
                )
            }
        };
        Squid::start_with(parent, &format!("{auth}{rules}"), &[]).await
    }

    /// Starts squid in `<parent>/squid` with `auth` (squid.conf lines: `auth_param`s, then
    /// `acl`s and `http_access deny` lines that come before the loopback allow) and `env`
    /// added to its environment (e.g. `KRB5_KTNAME` for its Kerberos helper).
    pub async fn start_with(
        parent: &Path,
        auth: &str,
        env: &[(String, String)],
    ) -> io::Result<Squid> {
        let program = find_program("squid", "squid")?;
        let dir = parent.join("squid");
        std::fs::create_dir_all(&dir)?;
        open_up(&dir)?;
        let addr = free_addr();
        let d = dir.display();
        // Everything squid writes goes to `dir`; no cache, no pinger, no ICP/HTCP, no netdb;
        // whole URLs in the access log (the tunnel token travels in a header, not the URL).
        // With a user, a request without valid credentials hits `deny !authenticated`, whose
        // last ACL is the authentication one, so squid answers 407 (not 403).
        let config = format!(
            "http_port {addr}\n\
             pid_filename {d}/squid.pid\n\
             cache_log {d}/cache.log\n\
             access_log stdio:{d}/access.log\n\
             cache_store_log none\n\
             strip_query_terms off\n\
             netdb_filename none\n\
             coredump_dir {d}\n\
             cache deny all\n\
             cache_mem 8 MB\n\
             pinger_enable off\n\
             icp_port 0\n\
             htcp_port 0\n\
             shutdown_lifetime 1 seconds\n\
             acl loopback src 127.0.0.0/8\n\
             {auth}\
             http_access allow loopback\n\
             http_access deny all\n"
        );
        let config_path = dir.join("squid.conf");
        std::fs::write(&config_path, config)?;
        let args = vec![
            "-N".to_string(),
            "-f".into(),
            config_path.display().to_string(),
        ];
        let mut process = ChildProcess::spawn("squid", &program, args, env, &dir)?;
        process.wait_listening(addr, SERVICE_START_TIMEOUT).await?;
        Ok(Squid { addr, dir, process })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// squid's access log (one line per request, written when the request ends).
    pub fn access_log(&self) -> String {
        read_lossy(&self.dir.join("access.log"))
    }

    /// squid's own log (startup, errors).
    pub fn cache_log(&self) -> String {
        read_lossy(&self.dir.join("cache.log"))
    }

    pub fn process(&mut self) -> &mut ChildProcess {
        &mut self.process
    }
}

/// The Apache MD5 (`$apr1$`) hash of `password`, which `basic_ncsa_auth` accepts, made with
/// `openssl passwd -apr1` (package openssl).
pub fn apr1_hash(password: &str) -> io::Result<String> {
    let openssl = find_program("openssl", "openssl")?;
    // The password goes through stdin, not argv, so it never shows in a process list.
    let mut child = std::process::Command::new(openssl)
        .args(["passwd", "-apr1", "-stdin"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("piped stdin");
        stdin.write_all(password.as_bytes())?;
        stdin.write_all(b"\n")?;
    }
    let out = child.wait_with_output()?;
    let hash = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() || !hash.starts_with("$apr1$") {
        return Err(io::Error::other(format!(
            "openssl passwd -apr1 failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(hash)
}

// ------------------------------------------------------------------------------------------
// tinyproxy

/// A tinyproxy forward proxy in the foreground (`-d`), logging to its child log.
#[derive(Debug)]
pub struct Tinyproxy {
    addr: SocketAddr,
    process: ChildProcess,
}

impl Tinyproxy {
    /// Starts tinyproxy in `<parent>/tinyproxy`, allowing CONNECT only to `connect_ports`.
    pub async fn start(parent: &Path, connect_ports: &[u16]) -> io::Result<Tinyproxy> {
        let program = find_program("tinyproxy", "tinyproxy")?;
        let dir = parent.join("tinyproxy");
        std::fs::create_dir_all(&dir)?;
        let addr = free_addr();
        let connect: String = connect_ports
            .iter()
            .map(|p| format!("ConnectPort {p}\n"))
            .collect();
        // No LogFile: with -d the log goes to stderr, i.e. the child's log file. Timeout is
        // tinyproxy's idle limit per connection; well above the relay's pull wait.
        let config = format!(
            "Port {}\n\
             Listen {}\n\
             Timeout 600\n\
             MaxClients 64\n\
             LogLevel Info\n\
             Allow 127.0.0.1\n\
             {connect}",
            addr.port(),
            addr.ip()
        );
        let config_path = dir.join("tinyproxy.conf");
        std::fs::write(&config_path, config)?;
        let args = vec![
            "-d".to_string(),
            "-c".into(),
            config_path.display().to_string(),
        ];
        let mut process = ChildProcess::spawn("tinyproxy", &program, args, &[], &dir)?;
        process.wait_listening(addr, SERVICE_START_TIMEOUT).await?;
        Ok(Tinyproxy { addr, process })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Everything tinyproxy logged (one `Request (file descriptor N): METHOD …` line per
    /// request it relays).
    pub fn log(&self) -> String {
        self.process.log_contents()
    }

    pub fn process(&mut self) -> &mut ChildProcess {
        &mut self.process
    }
}

// ------------------------------------------------------------------------------------------
// nginx

/// The example server block shipped in `deploy/nginx/tunnel.conf`, relative to the
/// workspace root.
pub const NGINX_EXAMPLE: &str = "deploy/nginx/tunnel.conf";

/// How the example is adapted for a test.
#[derive(Debug, Clone)]
pub struct NginxOptions {
    /// The relay's HTTP address (replaces the example's upstream `127.0.0.1:8080`).
    pub relay: SocketAddr,
    /// `proxy_buffering on` or `off` (the example ships `off`).
    pub buffering: bool,
    /// With `buffering`: also `proxy_ignore_headers X-Accel-Buffering`, so nginx buffers
    /// the relay's streamed pulls too (they ask it not to): a proxy that buffers whatever
    /// the relay says.
    pub ignore_accel_buffering: bool,
    /// Listen for HTTP/2 without TLS (h2c, prior knowledge) instead of HTTP/1.1; nginx
    /// still speaks HTTP/1.1 to the relay.
    pub http2: bool,
}

impl NginxOptions {
    /// The example as shipped (buffering off, HTTP/1.1), in front of the relay at `relay`.
    pub fn example(relay: SocketAddr) -> NginxOptions {
        NginxOptions {
            relay,
            buffering: false,
            ignore_accel_buffering: false,
            http2: false,
        }
    }
}

/// nginx in the foreground, single process, running the rendered example.
#[derive(Debug)]
pub struct Nginx {
    addr: SocketAddr,
    dir: PathBuf,
    process: ChildProcess,
}

/// The workspace root (the parent of this package's directory).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_owned()
}

/// Replaces exactly one occurrence of `from`, so an edit of the example that breaks the
/// test's assumptions fails loudly instead of testing something else.
fn replace_once(text: &str, from: &str, to: &str) -> io::Result<String> {
    match text.matches(from).count() {
        1 => Ok(text.replacen(from, to, 1)),
        n => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{NGINX_EXAMPLE}: expected exactly one {from:?}, found {n}"),
        )),
    }
}

/// The example with the test's listen address, relay address and buffering.
pub fn render_nginx_example(
    example: &str,
    listen: SocketAddr,
    options: &NginxOptions,
) -> io::Result<String> {
    let http2 = if options.http2 { " http2" } else { "" };
    let text = replace_once(example, "listen 80;", &format!("listen {listen}{http2};"))?;
    let text = replace_once(
        &text,
        "server 127.0.0.1:8080;",
        &format!("server {};", options.relay),
    )?;
    let buffering = match (options.buffering, options.ignore_accel_buffering) {
        (false, _) => "proxy_buffering off;",
        (true, false) => "proxy_buffering on;",
        (true, true) => "proxy_buffering on;\n        proxy_ignore_headers X-Accel-Buffering;",
    };
    replace_once(&text, "proxy_buffering off;", buffering)
}

impl Nginx {
    /// Renders the example into a complete nginx.conf in `<parent>/nginx-<on|off>` and
    /// starts nginx on a free port.
    pub async fn start(parent: &Path, options: &NginxOptions) -> io::Result<Nginx> {
        let program = find_program("nginx", "nginx")?;
        let tag = match (options.buffering, options.ignore_accel_buffering) {
            (false, _) => "off",
            (true, false) => "on",
            (true, true) => "on-always",
        };
        let h2 = if options.http2 { "-h2c" } else { "" };
        let dir = parent.join(format!("nginx-buffering-{tag}{h2}"));
        let temp = dir.join("temp");
        std::fs::create_dir_all(&temp)?;
        let example = std::fs::read_to_string(workspace_root().join(NGINX_EXAMPLE))?;
        let addr = free_addr();
        let server_block = render_nginx_example(&example, addr, options)?;
        std::fs::write(dir.join("tunnel.conf"), &server_block)?;
        let d = dir.display();
        let t = temp.display();
        // One process (no master, no privilege drop), everything in `dir`. The access log
        // records each request's duration (long-poll checks) and the upstream status.
        let config = format!(
            "daemon off;\n\
             master_process off;\n\
             worker_processes 1;\n\
             pid {d}/nginx.pid;\n\
             error_log {d}/error.log info;\n\
             events {{ worker_connections 256; }}\n\
             http {{\n\
             \x20   log_format timed '$remote_addr \"$request\" $status $body_bytes_sent rt=$request_time urt=$upstream_response_time ust=$upstream_status';\n\
             \x20   access_log {d}/access.log timed;\n\
             \x20   client_body_temp_path {t}/body;\n\
             \x20   proxy_temp_path {t}/proxy;\n\
             \x20   fastcgi_temp_path {t}/fastcgi;\n\
             \x20   uwsgi_temp_path {t}/uwsgi;\n\
             \x20   scgi_temp_path {t}/scgi;\n\
             \x20   include {d}/tunnel.conf;\n\
             }}\n"
        );
        let config_path = dir.join("nginx.conf");
        std::fs::write(&config_path, config)?;
        // -e: the error log before the config is read (nginx would otherwise open its
        // compiled-in /var/log/nginx/error.log); -p: prefix for relative paths.
        let args = vec![
            "-e".to_string(),
            format!("{d}/error.log"),
            "-p".into(),
            d.to_string(),
            "-c".into(),
            config_path.display().to_string(),
        ];
        let mut process = ChildProcess::spawn("nginx", &program, args, &[], &dir)?;
        process.wait_listening(addr, SERVICE_START_TIMEOUT).await?;
        Ok(Nginx { addr, dir, process })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The tunnel URL through nginx.
    pub fn tunnel_url(&self, base_path: &str) -> String {
        format!("http://{}{base_path}", self.addr)
    }

    pub fn access_log(&self) -> String {
        read_lossy(&self.dir.join("access.log"))
    }

    pub fn error_log(&self) -> String {
        read_lossy(&self.dir.join("error.log"))
    }

    pub fn process(&mut self) -> &mut ChildProcess {
        &mut self.process
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_program_error_names_the_package() {
        let err = find_program("no-such-proxy-xyz", "no-such-package").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(err.to_string().contains("no-such-package"), "{err}");
    }

    #[test]
    fn rendering_the_example_substitutes_each_placeholder_once() {
        let example = std::fs::read_to_string(workspace_root().join(NGINX_EXAMPLE)).unwrap();
        let listen: SocketAddr = "127.0.0.1:4001".parse().unwrap();
        let options = NginxOptions {
            relay: "127.0.0.1:4002".parse().unwrap(),
            buffering: true,
            ignore_accel_buffering: true,
            http2: false,
        };
        let out = render_nginx_example(&example, listen, &options).unwrap();
        assert!(out.contains("proxy_ignore_headers X-Accel-Buffering;"));
        assert!(out.contains("listen 127.0.0.1:4001;"));
        assert!(out.contains("server 127.0.0.1:4002;"));
        assert!(out.contains("proxy_buffering on;"));
        assert!(!out.contains("proxy_buffering off;"));
        let err = render_nginx_example("no placeholders", listen, &options).unwrap_err();
        assert!(err.to_string().contains("expected exactly one"), "{err}");
    }
}
