//! Proxy auto-configuration (PAC): runs a PAC script's `FindProxyForURL(url, host)` in an
//! embedded JavaScript engine (QuickJS, through `rquickjs`) and parses its answer into the
//! ordered list of routes to try (`PROXY a; PROXY b; DIRECT`).
//!
//! The standard helper functions are defined in JavaScript (`PAC_HELPERS`) on top of two
//! native ones, `dnsResolve` and `myIpAddress`. An evaluation runs under a deadline (the
//! engine's interrupt handler stops a script that loops), a memory limit and a stack limit.

use std::io::{Read, Write};
use std::net::{IpAddr, TcpStream, ToSocketAddrs, UdpSocket};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use reqwest::Url;
use rquickjs::{CatchResultExt, Context, Function, Runtime};

/// Where the PAC script comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PacSource {
    /// A local file (`tunnel-client --pac-file`).
    File(PathBuf),
    /// An `http://` URL (`tunnel-client --pac-url`), fetched directly, never through a proxy,
    /// once when the client is made. `https://` PAC URLs are not supported: download the file
    /// and use [`PacSource::File`].
    Url(String),
}

/// One entry of a PAC answer, in the order to try them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PacRoute {
    /// `PROXY host:port` (or `HTTP host:port`): an HTTP proxy, as a URL `http://host:port`.
    /// `HTTPS host:port` gives `https://host:port`.
    Proxy(String),
    /// `DIRECT`: no proxy.
    Direct,
}

/// Largest PAC script read, file or download: real ones are a few KiB.
const MAX_PAC_BYTES: usize = 1024 * 1024;
/// Memory the JavaScript engine may allocate while evaluating a PAC script.
const PAC_MEMORY_LIMIT: usize = 32 * 1024 * 1024;
/// Native stack the engine may use (a runaway recursion fails instead of crashing).
const PAC_STACK_LIMIT: usize = 512 * 1024;

/// Reads the script (from the file, or by one HTTP GET within `timeout`).
pub fn load(source: &PacSource, timeout: Duration) -> Result<String, String> {
    let bytes = match source {
        PacSource::File(path) => {
            let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
            if bytes.len() > MAX_PAC_BYTES {
                return Err(format!(
                    "{}: larger than {MAX_PAC_BYTES} bytes",
                    path.display()
                ));
            }
            bytes
        }
        PacSource::Url(url) => fetch(url, timeout).map_err(|e| format!("{url}: {e}"))?,
    };
    String::from_utf8(bytes).map_err(|_| "the PAC script is not UTF-8".to_string())
}

/// `GET url` over HTTP/1.0 with a deadline and a size limit: a blocking fetch that works
/// inside and outside an async runtime, done once when the client is made.
fn fetch(url: &str, timeout: Duration) -> Result<Vec<u8>, String> {
    let parsed = Url::parse(url).map_err(|e| e.to_string())?;
    if parsed.scheme() != "http" {
        return Err("only http:// PAC URLs are fetched; save the file and use --pac-file".into());
    }
    let host = parsed.host_str().ok_or("no host in the URL")?;
    let port = parsed.port_or_known_default().unwrap_or(80);
    let deadline = Instant::now() + timeout;
    let addr = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {host}: {e}"))?
        .next()
        .ok_or_else(|| format!("{host} has no address"))?;
    let mut stream = TcpStream::connect_timeout(&addr, timeout).map_err(|e| e.to_string())?;
    let left = || {
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    };
    stream
        .set_write_timeout(Some(left()))
        .map_err(|e| e.to_string())?;
    let path = match parsed.query() {
        Some(q) => format!("{}?{q}", parsed.path()),
        None => parsed.path().to_string(),
    };
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: tunnel-client\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut response = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        if Instant::now() >= deadline {
            return Err(format!("no complete answer within {timeout:?}"));
        }
        stream
            .set_read_timeout(Some(left()))
            .map_err(|e| e.to_string())?;
        let n = stream.read(&mut chunk).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        response.extend_from_slice(&chunk[..n]);
        if response.len() > MAX_PAC_BYTES + 16 * 1024 {
            return Err(format!("larger than {MAX_PAC_BYTES} bytes"));
        }
    }
    let end = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("malformed HTTP answer")?;
    let head = String::from_utf8_lossy(&response[..end]);
    let status = head.split_whitespace().nth(1).unwrap_or("");
    if status != "200" {
        let line = head.lines().next().unwrap_or_default();
        return Err(format!("answered {line:?}"));
    }
    Ok(response[end + 4..].to_vec())
}

/// The PAC helper functions every browser provides, in JavaScript, on top of the native
/// `dnsResolve(host)` and `myIpAddress()`.
const PAC_HELPERS: &str = r#"
function isPlainHostName(host) { return host.indexOf('.') < 0; }
function dnsDomainIs(host, domain) {
  return host.length >= domain.length &&
    host.substring(host.length - domain.length) === domain;
}
function localHostOrDomainIs(host, hostdom) {
  return host === hostdom || (host.indexOf('.') < 0 && hostdom.lastIndexOf(host + '.', 0) === 0);
}
function isResolvable(host) { return dnsResolve(host) !== null; }
function __ipv4(text) {
  var m = /^(\d+)\.(\d+)\.(\d+)\.(\d+)$/.exec(text);
  if (!m) return null;
  var n = 0;
  for (var i = 1; i <= 4; i++) { var b = +m[i]; if (b > 255) return null; n = n * 256 + b; }
  return n;
}
function isInNet(host, pattern, mask) {
  var ip = __ipv4(host);
  if (ip === null) { var r = dnsResolve(host); if (r === null) return false; ip = __ipv4(r); }
  var p = __ipv4(pattern), m = __ipv4(mask);
  if (ip === null || p === null || m === null) return false;
  for (var i = 0; i < 4; i++) {
    var d = Math.pow(256, 3 - i);
    var ib = Math.floor(ip / d) % 256, pb = Math.floor(p / d) % 256, mb = Math.floor(m / d) % 256;
    if ((ib & mb) !== (pb & mb)) return false;
  }
  return true;
}
function dnsDomainLevels(host) { return host.split('.').length - 1; }
function shExpMatch(str, shexp) {
  var re = shexp.replace(/[.+^${}()|[\]\\]/g, '\\$&').replace(/\*/g, '.*').replace(/\?/g, '.');
  return new RegExp('^' + re + '$').test(str);
}
function __gmt(args) { return args.length > 0 && args[args.length - 1] === 'GMT'; }
function __inRange(value, lo, hi) { return lo <= hi ? (value >= lo && value <= hi) : (value >= lo || value <= hi); }
var __days = ['SUN', 'MON', 'TUE', 'WED', 'THU', 'FRI', 'SAT'];
var __months = ['JAN', 'FEB', 'MAR', 'APR', 'MAY', 'JUN', 'JUL', 'AUG', 'SEP', 'OCT', 'NOV', 'DEC'];
function weekdayRange(wd1, wd2, gmt) {
  var now = new Date();
  var today = __gmt(arguments) ? now.getUTCDay() : now.getDay();
  var a = __days.indexOf(wd1);
  var b = (wd2 === undefined || wd2 === 'GMT') ? a : __days.indexOf(wd2);
  if (a < 0 || b < 0) return false;
  return __inRange(today, a, b);
}
function dateRange() {
  var args = Array.prototype.slice.call(arguments);
  var gmt = __gmt(args); if (gmt) args.pop();
  var now = new Date();
  var day = gmt ? now.getUTCDate() : now.getDate();
  var month = gmt ? now.getUTCMonth() : now.getMonth();
  var year = gmt ? now.getUTCFullYear() : now.getFullYear();
  function value(x) {
    if (typeof x === 'string') return { month: __months.indexOf(x) };
    if (x > 31) return { year: x };
    return { day: x };
  }
  var vals = args.map(value);
  function key(v, i) {
    if (v.year !== undefined) return v.year;
    if (v.month !== undefined) return v.month;
    return v.day;
  }
  function current(v) {
    if (v.year !== undefined) return year;
    if (v.month !== undefined) return month;
    return day;
  }
  if (vals.length === 1) return current(vals[0]) === key(vals[0]);
  if (vals.length === 2) return __inRange(current(vals[0]), key(vals[0]), key(vals[1]));
  // Several fields per bound (day month [year] ...): compare as one number.
  var half = vals.length / 2;
  function pack(list, cur) {
    var n = 0;
    for (var i = 0; i < list.length; i++) {
      var v = list[i];
      var k = cur ? current(v) : key(v);
      var weight = v.year !== undefined ? 10000 : (v.month !== undefined ? 100 : 1);
      n += k * weight;
    }
    return n;
  }
  var lo = pack(vals.slice(0, half), false), hi = pack(vals.slice(half), false);
  var now_ = pack(vals.slice(0, half), true);
  return __inRange(now_, lo, hi);
}
function timeRange() {
  var args = Array.prototype.slice.call(arguments);
  var gmt = __gmt(args); if (gmt) args.pop();
  var now = new Date();
  var h = gmt ? now.getUTCHours() : now.getHours();
  var m = gmt ? now.getUTCMinutes() : now.getMinutes();
  var s = gmt ? now.getUTCSeconds() : now.getSeconds();
  if (args.length === 1) return h === args[0];
  if (args.length === 2) return __inRange(h, args[0], args[1]);
  if (args.length === 4) return __inRange(h * 60 + m, args[0] * 60 + args[1], args[2] * 60 + args[3]);
  if (args.length === 6) {
    return __inRange(h * 3600 + m * 60 + s, args[0] * 3600 + args[1] * 60 + args[2],
      args[3] * 3600 + args[4] * 60 + args[5]);
  }
  return false;
}
"#;

/// The first address of `host`, as text (IPv4 preferred, as browsers do for PAC).
fn resolve(host: &str) -> Option<String> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Some(ip.to_string());
    }
    let addrs: Vec<_> = (host, 0).to_socket_addrs().ok()?.map(|a| a.ip()).collect();
    addrs
        .iter()
        .find(|ip| ip.is_ipv4())
        .or(addrs.first())
        .map(IpAddr::to_string)
}

/// The local address used toward `toward` (a UDP "connect" sends nothing); 127.0.0.1 when
/// there is no route.
fn local_address_toward(toward: Option<IpAddr>) -> String {
    let Some(target) = toward else {
        return "127.0.0.1".into();
    };
    let bind: IpAddr = if target.is_ipv4() {
        [0, 0, 0, 0].into()
    } else {
        [0u16; 8].into()
    };
    UdpSocket::bind((bind, 0))
        .and_then(|s| s.connect((target, 9)).map(|()| s))
        .and_then(|s| s.local_addr())
        .map(|a| a.ip().to_string())
        .unwrap_or_else(|_| "127.0.0.1".into())
}

/// Runs `FindProxyForURL(url, host)` of `script` for `url`, within `timeout`, and parses the
/// answer. Errors are texts meant for the user (syntax error with its line, a script that
/// ran out of time, an answer that names no usable route).
pub fn find_proxy(script: &str, url: &Url, timeout: Duration) -> Result<Vec<PacRoute>, String> {
    let host = url.host_str().unwrap_or_default().to_string();
    let my_ip = local_address_toward(resolve(&host).and_then(|ip| ip.parse().ok()));
    let runtime = Runtime::new().map_err(|e| format!("JavaScript engine: {e}"))?;
    runtime.set_memory_limit(PAC_MEMORY_LIMIT);
    runtime.set_max_stack_size(PAC_STACK_LIMIT);
    let deadline = Instant::now() + timeout;
    runtime.set_interrupt_handler(Some(Box::new(move || Instant::now() >= deadline)));
    let context = Context::full(&runtime).map_err(|e| format!("JavaScript engine: {e}"))?;
    let answer = context.with(|ctx| -> Result<String, String> {
        let js_error = |e: rquickjs::CaughtError<'_>| {
            if Instant::now() >= deadline {
                format!("the PAC script did not finish within {timeout:?}")
            } else {
                e.to_string()
            }
        };
        let globals = ctx.globals();
        let dns = Function::new(ctx.clone(), |host: String| resolve(&host))
            .and_then(|f| f.with_name("dnsResolve"))
            .map_err(|e| e.to_string())?;
        globals.set("dnsResolve", dns).map_err(|e| e.to_string())?;
        let mine = Function::new(ctx.clone(), move || my_ip.clone())
            .and_then(|f| f.with_name("myIpAddress"))
            .map_err(|e| e.to_string())?;
        globals
            .set("myIpAddress", mine)
            .map_err(|e| e.to_string())?;
        ctx.eval::<(), _>(PAC_HELPERS)
            .catch(&ctx)
            .map_err(|e| format!("PAC helpers: {}", js_error(e)))?;
        ctx.eval::<(), _>(script).catch(&ctx).map_err(js_error)?;
        let find: Function = globals
            .get("FindProxyForURL")
            .map_err(|_| "the PAC script defines no function FindProxyForURL".to_string())?;
        find.call::<_, String>((url.as_str(), host.as_str()))
            .catch(&ctx)
            .map_err(|e| format!("FindProxyForURL: {}", js_error(e)))
    })?;
    parse_answer(&answer)
}

/// Parses `PROXY a:1; HTTPS b:2; DIRECT` into routes, skipping kinds this client cannot use
/// (SOCKS) with a log line. An answer with no usable route is an error.
pub fn parse_answer(answer: &str) -> Result<Vec<PacRoute>, String> {
    let mut routes = Vec::new();
    for entry in answer.split(';').map(str::trim).filter(|e| !e.is_empty()) {
        let mut words = entry.split_whitespace();
        let kind = words.next().unwrap_or_default().to_ascii_uppercase();
        let target = words.next();
        match (kind.as_str(), target) {
            ("DIRECT", _) => routes.push(PacRoute::Direct),
            ("PROXY" | "HTTP", Some(hostport)) => {
                routes.push(PacRoute::Proxy(format!("http://{hostport}")))
            }
            ("HTTPS", Some(hostport)) => {
                routes.push(PacRoute::Proxy(format!("https://{hostport}")))
            }
            _ => tracing::warn!("PAC answer entry {entry:?} is not usable here; skipped"),
        }
    }
    if routes.is_empty() {
        return Err(format!("the PAC answer {answer:?} names no usable route"));
    }
    Ok(routes)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    fn run(script: &str, url: &str) -> Result<Vec<PacRoute>, String> {
        find_proxy(script, &Url::parse(url).unwrap(), 2 * SECOND)
    }

    fn eval_bool(expr: &str) -> bool {
        let script = format!(
            "function FindProxyForURL(u, h) {{ return ({expr}) ? 'DIRECT' : 'PROXY no:1'; }}"
        );
        run(&script, "http://relay.example.com/tunnel").unwrap() == vec![PacRoute::Direct]
    }

    #[test]
    fn answers_are_parsed_in_fail_over_order() {
        assert_eq!(
            parse_answer("PROXY a:3128; HTTPS b:443;SOCKS5 c:1080; DIRECT").unwrap(),
            vec![
                PacRoute::Proxy("http://a:3128".into()),
                PacRoute::Proxy("https://b:443".into()),
                PacRoute::Direct
            ]
        );
        assert!(parse_answer("SOCKS c:1080").is_err());
        assert!(parse_answer("").is_err());
    }

    #[test]
    fn the_standard_helpers_work() {
        assert!(eval_bool(
            "isPlainHostName('relay') && !isPlainHostName('relay.example.com')"
        ));
        assert!(eval_bool(
            "dnsDomainIs(h, '.example.com') && !dnsDomainIs(h, '.example.org')"
        ));
        assert!(eval_bool("localHostOrDomainIs('www', 'www.example.com')"));
        assert!(eval_bool(
            "localHostOrDomainIs('www.example.com', 'www.example.com')"
        ));
        assert!(eval_bool(
            "!localHostOrDomainIs('www.other.com', 'www.example.com')"
        ));
        assert!(eval_bool(
            "dnsDomainLevels(h) === 2 && dnsDomainLevels('relay') === 0"
        ));
        assert!(eval_bool(
            "shExpMatch(u, '*.example.com/*') && !shExpMatch(u, 'https:*')"
        ));
        assert!(eval_bool(
            "shExpMatch('a.b', 'a?b') && !shExpMatch('axxb', 'a?b')"
        ));
        assert!(eval_bool("isInNet('10.1.2.3', '10.0.0.0', '255.0.0.0')"));
        assert!(eval_bool("!isInNet('11.1.2.3', '10.0.0.0', '255.0.0.0')"));
        assert!(eval_bool("isInNet('localhost', '127.0.0.0', '255.0.0.0')"));
        assert!(eval_bool("dnsResolve('127.0.0.1') === '127.0.0.1'"));
        assert!(eval_bool("isResolvable('localhost')"));
        assert!(eval_bool(
            "/^\\d+\\.\\d+\\.\\d+\\.\\d+$/.test(myIpAddress())"
        ));
        assert!(eval_bool("weekdayRange('SUN', 'SAT') && timeRange(0, 23)"));
        assert!(eval_bool("dateRange(1, 31) && dateRange('JAN', 'DEC')"));
        assert!(eval_bool("dateRange(1970, 9999) && !dateRange(1970, 1971)"));
    }

    #[test]
    fn a_script_that_never_ends_is_stopped_at_its_deadline() {
        let started = Instant::now();
        let error = find_proxy(
            "function FindProxyForURL(u, h) { for (;;) {} }",
            &Url::parse("http://relay/").unwrap(),
            Duration::from_millis(300),
        )
        .unwrap_err();
        assert!(error.contains("did not finish within"), "{error}");
        assert!(
            started.elapsed() < 5 * SECOND,
            "took {:?}",
            started.elapsed()
        );
        // A loop at the top level too.
        let error = run("while (true) {}", "http://relay/").unwrap_err();
        assert!(error.contains("did not finish within"), "{error}");
    }

    #[test]
    fn broken_scripts_give_clear_errors() {
        let error = run(
            "function FindProxyForURL(u, h) { return 'DIRECT' ",
            "http://r/",
        )
        .unwrap_err();
        // QuickJS names the place: line 1, column 50.
        assert!(
            error.contains("unexpected token") && error.contains(":1:50"),
            "{error}"
        );
        let error = run("var x = 1;", "http://r/").unwrap_err();
        assert!(error.contains("no function FindProxyForURL"), "{error}");
        let error = run(
            "function FindProxyForURL(u, h) { return 'BOGUS'; }",
            "http://r/",
        )
        .unwrap_err();
        assert!(error.contains("no usable route"), "{error}");
        let error = run(
            "function FindProxyForURL(u, h) { throw new Error('nope'); }",
            "http://r/",
        )
        .unwrap_err();
        assert!(error.contains("nope"), "{error}");
    }

    /// Serves one HTTP answer on a loopback port; returns the URL of `/proxy.pac` on it.
    fn serve_once(answer: &'static str) -> String {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            if let Ok((mut socket, _)) = listener.accept() {
                // Read the whole request head: closing with unread bytes would reset the
                // connection, and the client could lose the answer (a flaky test).
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match socket.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = socket.write_all(answer.as_bytes());
            }
        });
        format!("http://{addr}/proxy.pac")
    }

    #[test]
    fn pac_urls_are_fetched_and_bad_answers_named() {
        let url = serve_once(
            "HTTP/1.0 200 OK\r\nContent-Type: application/x-ns-proxy-autoconfig\r\n\r\nfunction FindProxyForURL(u, h) { return 'DIRECT'; }",
        );
        let script = load(&PacSource::Url(url), 5 * SECOND).unwrap();
        assert!(script.starts_with("function FindProxyForURL"), "{script}");
        let url = serve_once("HTTP/1.0 404 Not Found\r\n\r\n");
        let error = load(&PacSource::Url(url), 5 * SECOND).unwrap_err();
        assert!(error.contains("404 Not Found"), "{error}");
        let error = load(&PacSource::Url("https://wpad/wpad.dat".into()), SECOND).unwrap_err();
        assert!(error.contains("--pac-file"), "{error}");
    }
}
