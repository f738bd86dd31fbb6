//! A real peer behind the tunnel: redis-server behind `tunnel-broker --forward`, driven by
//! redis-cli and redis-benchmark through the client binary.
//!
//! Needs the binaries and the Debian packages redis-server and redis-tools:
//! `cargo build --workspace --bins && cargo test -p tunnel-tests --test e2e_redis`.

use std::time::Duration;

use tunnel_tests::redis::{run_tool, RedisServer};
use tunnel_tests::{init_tracing, Chain, ChainOptions, ReadyProbe, Target};

/// Deadline of one redis-cli command.
const CLI_TIMEOUT: Duration = Duration::from_secs(30);
/// Deadline of the benchmark (6000 requests; seconds on loopback, wide for slow CI).
const BENCH_TIMEOUT: Duration = Duration::from_secs(180);

async fn redis_cli(port: u16, command: &[&str]) -> String {
    let mut args = vec![
        "-h".to_string(),
        "127.0.0.1".into(),
        "-p".into(),
        port.to_string(),
    ];
    args.extend(command.iter().map(|s| s.to_string()));
    let output = run_tool("redis-cli", &args, CLI_TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("redis-cli {command:?}: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout).trim().to_string();
    assert!(
        output.status.success(),
        "redis-cli {command:?} failed ({}): stdout {stdout:?}, stderr {:?}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// The requests-per-second figure of each test in redis-benchmark's `-q` output, which
/// overwrites progress lines with `\r`: `SET: 12345.68 requests per second, p50=…`.
fn parse_benchmark(output: &str) -> Vec<(String, f64)> {
    output
        .split(['\r', '\n'])
        .filter_map(|line| {
            let (name, rest) = line.trim().split_once(": ")?;
            let rps = rest.split_once(" requests per second")?.0.trim();
            Some((name.to_string(), rps.parse().ok()?))
        })
        .collect()
}

#[test]
fn benchmark_output_is_parsed() {
    let out = "SET: rps=0.0 (overall: nan) avg_msec=nan\rSET: 4000.00 requests per second, p50=1.0 msec\nGET: 5000.50 requests per second, p50=0.9 msec\n";
    assert_eq!(
        parse_benchmark(out),
        vec![("SET".to_string(), 4000.0), ("GET".to_string(), 5000.5)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_through_the_tunnel() {
    init_tracing();
    let redis = RedisServer::start()
        .await
        .unwrap_or_else(|e| panic!("cannot run this test: {e}"));
    let mut options = ChainOptions::echo();
    options.target = Target::Forward(redis.addr());
    // Redis is not an echo; the PING below is the readiness check.
    options.probe = ReadyProbe::PortsOnly;
    let mut chain = Chain::start(options).await;
    let port = chain.client_addr().port();

    // The broker may not have linked yet: the client then closes the connection and
    // redis-cli reports an error; retry PING until it answers.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mut args = vec!["-h".to_string(), "127.0.0.1".into(), "-p".into()];
        args.push(port.to_string());
        args.push("PING".into());
        let output = run_tool("redis-cli", &args, CLI_TIMEOUT).await.unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout).trim().to_string();
        if output.status.success() && stdout == "PONG" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "PING through the tunnel never answered PONG: {stdout:?} {:?}",
            String::from_utf8_lossy(&output.stderr)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    assert_eq!(
        redis_cli(port, &["SET", "tunnel:key", "value-through-the-tunnel"]).await,
        "OK"
    );
    assert_eq!(
        redis_cli(port, &["GET", "tunnel:key"]).await,
        "value-through-the-tunnel"
    );
    // A value bigger than one DATA packet (64 KiB), checked directly against redis too.
    let big: String = (0..100_000)
        .map(|i| (b'a' + (i % 26) as u8) as char)
        .collect();
    assert_eq!(redis_cli(port, &["SET", "tunnel:big", &big]).await, "OK");
    assert_eq!(redis_cli(port, &["STRLEN", "tunnel:big"]).await, "100000");
    assert_eq!(redis_cli(port, &["GET", "tunnel:big"]).await, big);
    assert_eq!(
        redis_cli(redis.addr().port(), &["GET", "tunnel:key"]).await,
        "value-through-the-tunnel",
        "direct read of what was written through the tunnel"
    );

    let args: Vec<String> = [
        "-h",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-n",
        "2000",
        "-c",
        "10",
        "-t",
        "set,get,incr",
        "-q",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let started = std::time::Instant::now();
    let output = run_tool("redis-benchmark", &args, BENCH_TIMEOUT)
        .await
        .expect("redis-benchmark");
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    eprintln!(
        "redis-benchmark through the tunnel ({:?}):\n{}",
        started.elapsed(),
        stdout.replace('\r', "\n")
    );
    assert!(
        output.status.success(),
        "redis-benchmark failed ({}): {stdout}\n{stderr}",
        output.status
    );
    let lowered = format!("{stdout}\n{stderr}").to_lowercase();
    assert!(
        !lowered.contains("error") && !lowered.contains("err "),
        "redis-benchmark reported errors:\n{stdout}\n{stderr}"
    );
    let results = parse_benchmark(&stdout);
    for test in ["SET", "GET", "INCR"] {
        let rps = results
            .iter()
            .find(|(name, _)| name == test)
            .map(|(_, rps)| *rps)
            .unwrap_or_else(|| panic!("no {test} result in redis-benchmark output:\n{stdout}"));
        assert!(rps > 0.0, "{test}: {rps} requests per second");
    }
    // INCR ran 2000 times on redis-benchmark's key: the server's counter proves every
    // request arrived once.
    assert_eq!(
        redis_cli(redis.addr().port(), &["GET", "counter:__rand_int__"]).await,
        "2000",
        "INCR count seen by redis"
    );
    chain.assert_alive();
}
