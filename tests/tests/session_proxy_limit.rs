//! 500 tunnel connections of one client through a squid that allows each client 8 TCP
//! connections (`acl … maxconn 8` + `http_access deny`), each with a verified echo.
//!
//! Proxies limit connections per client. With one held pull per tunnel connection, an
//! HTTP/1.1 client needs one TCP connection to the proxy per tunnel connection and fails
//! behind such a proxy; a session (docs/protocol.md §2.1) carries all of a client's
//! connections in one held pull and a few pushes, and must pass: the client's requests in
//! flight (held pull, pushes and the connect requests of 500 `connect()` calls made at once)
//! and its idle pooled HTTP connections must stay within 8 TCP connections to the proxy
//! together (reqwest does not bound connections per host by itself). The test first proves the
//! limit is in force: a burst of parallel plain requests through the same squid gets some
//! of them denied (403, `TCP_DENIED` in squid's access.log), while a lone request passes.
//!
//! Relay and broker run in the test process (`tunnel_tests::inproc`), the broker splicing to
//! an echo server. Needs squid (Debian package squid; `.ci/run` installs it):
//! `cargo test -p tunnel-tests --test session_proxy_limit`.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Barrier;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tunnel_client::{ProxyConfig, TunnelClient};
use tunnel_tests::inproc::InProcessTunnel;
use tunnel_tests::services::Squid;
use tunnel_tests::transfer::join_all_until;
use tunnel_tests::{fdlimit, init_tracing, SeededBytes, TestDir};

/// TCP connections squid allows one client address (more are denied).
const MAXCONN: usize = 8;
/// Tunnel connections open at once through squid.
const CONNECTIONS: usize = 500;
/// Bytes each connection echoes: a payload of its own, from a random seed per run.
const PAYLOAD_BYTES: usize = 512;
/// Parallel plain requests that prove the limit: far more than `MAXCONN`.
const BURST: usize = 20;
/// Bound of the whole tunnel part (connects, echoes, the wait for all to be open): under a
/// minute on a debug build with two shared cores.
const TUNNEL_DEADLINE: Duration = Duration::from_secs(50);
/// Deadline of one read or write on an open connection.
const IO_TIMEOUT: Duration = Duration::from_secs(20);
/// Deadline of one plain request of the burst.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// squid.conf lines: deny every request of a client address that has more than `MAXCONN`
/// TCP connections open to squid (squid's `maxconn` acl counts established connections per
/// client address).
fn limit_rules() -> String {
    format!("acl per_client_limit maxconn {MAXCONN}\nhttp_access deny per_client_limit\n")
}

/// Lines of squid's access.log that record a denied request with `needle` in them.
fn denied_lines(squid: &Squid, needle: &str) -> usize {
    squid
        .access_log()
        .lines()
        .filter(|l| l.contains("TCP_DENIED/403") && l.contains(needle))
        .count()
}

/// Sends one `GET url` through squid on the connection `s`, reads the answer to its end and
/// returns the status code.
async fn status_of(mut s: TcpStream, url: &str) -> Result<u16, String> {
    let host = url
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap_or_default()
        .to_string();
    let request = format!("GET {url} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    tokio::time::timeout(PROBE_TIMEOUT, async {
        s.write_all(request.as_bytes()).await?;
        // Read the whole answer, up to squid's close (`Connection: close`): squid then no
        // longer counts this connection against the client's limit. A connection dropped
        // after its status line is only released once squid notices, and under load that
        // can be after the tunnel part has started and met a limit already taken.
        let mut answer = Vec::new();
        s.read_to_end(&mut answer).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&answer).into_owned())
    })
    .await
    .map_err(|_| format!("no answer within {PROBE_TIMEOUT:?}"))?
    .map_err(|e| e.to_string())
    .and_then(|head| {
        head.split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| format!("not an HTTP answer: {head:?}"))
    })
}

/// Proves the limit works: `BURST` connections to squid open at once, then one request on
/// each; some must be denied. Then a lone request must pass.
async fn assert_limit_in_force(squid: &Squid, relay_url: &str) {
    let probe_url = format!("{relay_url}/limit-probe");
    let mut conns = Vec::with_capacity(BURST);
    for _ in 0..BURST {
        conns.push(TcpStream::connect(squid.addr()).await.unwrap());
    }
    // squid counts a connection once it has accepted it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut probes = JoinSet::new();
    for conn in conns {
        let url = probe_url.clone();
        probes.spawn(async move { status_of(conn, &url).await });
    }
    let mut statuses = Vec::new();
    while let Some(done) = probes.join_next().await {
        statuses.push(
            done.unwrap()
                .unwrap_or_else(|e| panic!("burst request: {e}")),
        );
    }
    let denied = statuses.iter().filter(|&&s| s == 403).count();
    eprintln!(
        "[report] burst of {BURST} parallel requests through squid (maxconn {MAXCONN}): \
         {denied} denied with 403, statuses {statuses:?}"
    );
    assert!(
        denied > 0,
        "squid denied none of {BURST} parallel requests: its maxconn {MAXCONN} limit is not \
         in force, so the tunnel part would prove nothing (statuses {statuses:?})"
    );
    // squid logs a request when it ends; the burst's have.
    tunnel_tests::services::wait_for_log(
        "squid access.log",
        || squid.access_log(),
        "TCP_DENIED/403",
    )
    .await;
    assert!(
        denied_lines(squid, "/limit-probe") > 0,
        "squid's access.log has no TCP_DENIED/403 line for the burst:\n{}",
        squid.access_log()
    );
    // Alone, the same request passes squid (the relay answers it, whatever it answers).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let lone = status_of(TcpStream::connect(squid.addr()).await.unwrap(), &probe_url)
        .await
        .unwrap_or_else(|e| panic!("lone request: {e}"));
    assert_ne!(
        lone, 403,
        "squid denies even a lone request: the rule denies everything, not only beyond \
         {MAXCONN} connections"
    );
}

/// One tunnel connection's part: connect, wait until every connection has tried, echo a
/// payload of its own and compare, wait until every connection has echoed (so all are open
/// at once), close.
async fn one_connection(
    client: TunnelClient,
    index: usize,
    seed: u64,
    all_tried: Arc<Barrier>,
    all_echoed: Arc<Barrier>,
) -> Result<(), String> {
    let connected = client.connect().await;
    all_tried.wait().await;
    // Every task passes both barriers, whatever failed, so none waits for one that gave up.
    let outcome = match connected {
        Err(e) => Err(format!("connection {index}: connect: {e}")),
        Ok(mut stream) => {
            let sent = SeededBytes::new(seed ^ index as u64).take_vec(PAYLOAD_BYTES);
            let mut back = vec![0u8; PAYLOAD_BYTES];
            let echoed = tokio::time::timeout(IO_TIMEOUT, async {
                stream.write_all(&sent).await?;
                stream.read_exact(&mut back).await
            })
            .await;
            match echoed {
                Err(_) => Err(format!("connection {index}: no echo within {IO_TIMEOUT:?}")),
                Ok(Err(e)) => Err(format!("connection {index}: echo: {e}")),
                Ok(Ok(_)) if back != sent => Err(format!(
                    "connection {index}: the echo differs from what was sent"
                )),
                Ok(Ok(_)) => Ok(stream),
            }
        }
    };
    all_echoed.wait().await;
    let mut stream = outcome?;
    let _ = tokio::time::timeout(IO_TIMEOUT, stream.shutdown()).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_connections_through_a_squid_that_allows_eight_per_client() {
    init_tracing();
    // Per-connection transport: ~500 sockets to squid here, as many in squid and the relay.
    fdlimit::raise_nofile_limit(8192).unwrap();
    let dir = TestDir::new("session-proxy-limit").unwrap();
    let squid = Squid::start_with_rules(dir.path(), None, &limit_rules())
        .await
        .unwrap();
    let (tunnel, echo) = InProcessTunnel::start_echo().await.unwrap();
    assert_limit_in_force(&squid, &tunnel.relay_url()).await;
    let denied_before = denied_lines(&squid, "");

    let mut config = tunnel.client_config(&tunnel.relay_url());
    config.proxy = Some(ProxyConfig {
        url: squid.url(),
        username: None,
        password: None,
    });
    let client = TunnelClient::new(config).unwrap();
    let seed: u64 = rand::random();
    let all_tried = Arc::new(Barrier::new(CONNECTIONS));
    let all_echoed = Arc::new(Barrier::new(CONNECTIONS));
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for index in 0..CONNECTIONS {
        tasks.spawn(one_connection(
            client.clone(),
            index,
            seed,
            Arc::clone(&all_tried),
            Arc::clone(&all_echoed),
        ));
    }
    let failures = join_all_until(&mut tasks, started + TUNNEL_DEADLINE).await;
    let elapsed = started.elapsed();
    // squid logs a request when it ends: give the last ones (the held pull) a moment.
    drop(client);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let denied = denied_lines(&squid, "").saturating_sub(denied_before);
    eprintln!(
        "[report] {CONNECTIONS} tunnel connections through squid (maxconn {MAXCONN}): {} \
         failed, {elapsed:.2?}; squid denied {denied} of the client's requests; echo server: \
         {:?}",
        failures.len(),
        echo.stats()
    );
    assert!(
        failures.is_empty(),
        "{} of {CONNECTIONS} tunnel connections failed through a squid that allows {MAXCONN} \
         TCP connections per client; squid denied {denied} of the client's requests (403). \
         A client that needs a TCP connection to the proxy per tunnel connection (one held \
         pull each, i.e. without sessions) cannot pass; with a session, the held pull, the pushes \
         and the connect requests in flight, and the idle pooled connections, must stay within \
         {MAXCONN} together (measured on the first session client: 1 pull + 4 pushes + 2 \
         connects in flight pass, 1 + 4 + 3 do not; a streamed upstream takes a push slot). \
         First failures: {:#?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
}
