//! Several broker instances per name (docs/protocol.md §5.1), with real processes: placement
//! in proportion to capacity, a new instance that leaves the others' connections alone, a
//! rolling restart and a relay restart without a failed connect, punt, per-name link secrets,
//! and a broker keepalive longer than the relay's that does not flap.
//!
//! Needs the binaries: `cargo build --workspace --bins && cargo test -p tunnel-tests --test broker_pool -- --nocapture`.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tunnel_broker::{BrokerConfig, TunnelListener};
use tunnel_client::{ClientConfig, TunnelClient, TunnelStream};
use tunnel_tests::net::direct_http_client;
use tunnel_tests::{init_tracing, Chain, ChainOptions, ChildProcess, SeededBytes};

/// Deadline of one step that should work (a connect, an exchange, a wait for a link).
const STEP: Duration = Duration::from_secs(30);

/// Instance id `n` as the broker's `--instance-id` takes it and the relay's metrics show it.
fn instance(n: u8) -> String {
    format!("{n:02x}").repeat(16)
}

fn broker_args(n: u8, capacity: u32) -> Vec<String> {
    vec![
        "--instance-id".into(),
        instance(n),
        "--max-connections".into(),
        capacity.to_string(),
    ]
}

fn client(chain: &Chain) -> TunnelClient {
    let mut config = ClientConfig::new(chain.relay_url(), "e2e");
    config.env_proxy = false;
    config.connect_timeout = STEP;
    TunnelClient::new(config).expect("client config")
}

/// `metric{server="e2e",instance="…"} value` of the relay, by instance id.
async fn per_instance(chain: &Chain, metric: &str) -> HashMap<String, u64> {
    let url = format!("http://{}/metrics", chain.relay_http_addr());
    let text = direct_http_client()
        .get(&url)
        .send()
        .await
        .expect("relay /metrics")
        .text()
        .await
        .expect("relay /metrics body");
    let prefix = format!("{metric}{{");
    text.lines()
        .filter(|line| line.starts_with(&prefix))
        .filter_map(|line| {
            let (labels, value) = line.rsplit_once(' ')?;
            let id = labels.split("instance=\"").nth(1)?.split('"').next()?;
            Some((id.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// Waits until the relay counts `n` links up.
async fn wait_links(chain: &Chain, n: u64) {
    let deadline = Instant::now() + STEP;
    loop {
        if chain.relay_metric("tunnel_links_up").await == n.to_string() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{n} links not up within {STEP:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Writes `data` and reads as many bytes back (the brokers echo).
async fn echo(stream: &mut TunnelStream, data: &[u8]) -> io::Result<()> {
    stream.write_all(data).await?;
    let mut back = vec![0u8; data.len()];
    stream.read_exact(&mut back).await?;
    if back != data {
        return Err(io::Error::other("echo differs"));
    }
    Ok(())
}

async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(STEP, fut)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {STEP:?}"))
}

/// Two instances of capacity 10 and 30 get 20 connections in proportion (5 and 15); the
/// second instance joins while the first holds connections, which keep echoing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placement_follows_capacity_and_a_new_instance_disturbs_nobody() {
    init_tracing();
    let mut options = ChainOptions::echo();
    options.broker_args = broker_args(1, 10);
    let chain = Chain::start(options).await;
    let client = client(&chain);
    // The chain's readiness checks opened and closed connections: wait until the relay forgot
    // them, so they do not count as held.
    let deadline = Instant::now() + STEP;
    while chain.relay_metric("tunnel_open_connections").await != "0" {
        assert!(Instant::now() < deadline, "probe connections still held");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut first = Vec::new();
    for i in 0..2u64 {
        let mut s = within("connect", client.connect()).await.expect("connect");
        echo(&mut s, &SeededBytes::new(i).take_vec(10_000))
            .await
            .expect("echo");
        first.push(s);
    }
    let mut args = broker_args(2, 30);
    args.extend(["--drain-timeout-secs".to_string(), "1".to_string()]);
    let mut second = chain
        .spawn_broker("broker-2", &args)
        .expect("second broker");
    wait_links(&chain, 2).await;
    // The first instance's connections did not notice.
    for (i, s) in first.iter_mut().enumerate() {
        echo(s, &SeededBytes::new(100 + i as u64).take_vec(100_000))
            .await
            .expect("a connection of the first instance after the second joined");
    }
    let mut rest = Vec::new();
    for _ in 0..18 {
        rest.push(within("connect", client.connect()).await.expect("connect"));
    }
    let held = per_instance(&chain, "tunnel_broker_open_connections").await;
    let (a, b) = (held[&instance(1)], held[&instance(2)]);
    println!("placements with capacities 10 and 30: {a} and {b} of 20 connections");
    assert_eq!((a, b), (5, 15), "{held:?}");
    for (i, s) in first.iter_mut().chain(rest.iter_mut()).enumerate() {
        echo(s, &SeededBytes::new(200 + i as u64).take_vec(1_000))
            .await
            .expect("every connection echoes");
    }
    drop(first);
    drop(rest);
    second.terminate(STEP).await.expect("second broker stops");
}

/// What a long-lived connection saw during the rolling restart.
struct LongLived {
    conn_id: u32,
    /// When it failed (None: it echoed every round).
    failed_at: Option<Instant>,
    rounds: u64,
}

/// Echoes a seeded message every 20 ms until `stop`, checking every byte; records a failure.
async fn keep_echoing(mut stream: TunnelStream, seed: u64, stop: Instant) -> LongLived {
    let conn_id = stream.handle().conn_id();
    let mut rounds = 0;
    while Instant::now() < stop {
        let data = SeededBytes::new(seed + rounds).take_vec(2_000);
        if tokio::time::timeout(STEP, echo(&mut stream, &data))
            .await
            .map_or(true, |r| r.is_err())
        {
            return LongLived {
                conn_id,
                failed_at: Some(Instant::now()),
                rounds,
            };
        }
        rounds += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    LongLived {
        conn_id,
        failed_at: None,
        rounds,
    }
}

/// Percentile `p` (0–100) of sorted durations.
fn percentile(sorted: &[Duration], p: usize) -> Duration {
    sorted[(sorted.len() - 1) * p / 100]
}

/// A rolling restart of 3 instances (each drained by SIGTERM, then started again with a new
/// id) while a client opens a connection every 20 ms and echoes through it: no connect
/// fails, and long-lived connections lose no byte and stay up until their own instance is
/// restarted. Prints the time to place a connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_of_three_instances_fails_no_connect() {
    init_tracing();
    let mut options = ChainOptions::echo();
    // Drained instances abort what is left after 1 s.
    let drain = vec!["--drain-timeout-secs".to_string(), "1".to_string()];
    options.broker_args = drain.clone();
    // The broker logs' "connection opened" lines tell which instance a connection is on.
    options.rust_log = "info".into();
    let mut chain = Chain::start(options).await;
    let mut brokers: Vec<Option<ChildProcess>> = vec![None];
    for n in 2..=3 {
        brokers.push(Some(
            chain
                .spawn_broker(&format!("broker-{n}"), &drain)
                .expect("broker"),
        ));
    }
    wait_links(&chain, 3).await;
    let client = Arc::new(client(&chain));

    // Long-lived connections, spread over the three instances.
    let run_for = Duration::from_secs(15);
    let stop = Instant::now() + run_for;
    let mut long = tokio::task::JoinSet::new();
    for seed in 0..6u64 {
        let s = within("connect", client.connect()).await.expect("connect");
        long.spawn(keep_echoing(s, seed << 32, stop));
    }

    // Short connections every 20 ms until the restart is over.
    let restarting = Arc::new(AtomicU64::new(1));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let place_times = Arc::new(Mutex::new(Vec::<Duration>::new()));
    let opener = {
        let (client, restarting) = (client.clone(), restarting.clone());
        let (failures, place_times) = (failures.clone(), place_times.clone());
        tokio::spawn(async move {
            let mut tasks = tokio::task::JoinSet::new();
            let mut n = 0u64;
            while restarting.load(Ordering::SeqCst) == 1 && n < 5_000 {
                n += 1;
                let (client, failures, place_times) =
                    (client.clone(), failures.clone(), place_times.clone());
                tasks.spawn(async move {
                    let started = Instant::now();
                    let outcome = async {
                        let mut s = client.connect().await.map_err(io::Error::from)?;
                        place_times.lock().unwrap().push(started.elapsed());
                        echo(&mut s, &SeededBytes::new(n).take_vec(1_000)).await?;
                        s.shutdown().await
                    };
                    if let Err(e) = tokio::time::timeout(STEP, outcome)
                        .await
                        .unwrap_or_else(|_| Err(io::Error::other("timed out")))
                    {
                        failures.lock().unwrap().push(format!("connect {n}: {e}"));
                    }
                });
                tokio::time::sleep(Duration::from_millis(20)).await;
                while tasks.try_join_next().is_some() {}
            }
            while tasks.join_next().await.is_some() {}
            n
        })
    };

    // Restart each instance in turn: SIGTERM (drain), start again, wait for its link.
    let mut restarted_at = Vec::new();
    // The logs of the instances as they were before their restart, to find each long-lived
    // connection's instance by its conn_id.
    let mut logs = Vec::new();
    for (i, slot) in brokers.iter_mut().enumerate() {
        tokio::time::sleep(Duration::from_secs(1)).await;
        restarted_at.push(Instant::now());
        let log = match i {
            0 => {
                let log = chain.broker.as_ref().unwrap().log_contents();
                let mut old = chain.broker.take().unwrap();
                old.terminate(STEP).await.expect("drain the chain's broker");
                log
            }
            _ => {
                let mut old = slot.take().unwrap();
                let log = old.log_contents();
                old.terminate(STEP).await.expect("drain a broker");
                log
            }
        };
        logs.push(log);
        *slot = Some(
            chain
                .spawn_broker(&format!("broker-{}-again", i + 1), &drain)
                .expect("restarted broker"),
        );
        wait_links(&chain, 3).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    restarting.store(0, Ordering::SeqCst);
    let opened = within("the opener", opener).await.unwrap();

    let failures = failures.lock().unwrap().clone();
    let mut times = place_times.lock().unwrap().clone();
    times.sort();
    println!(
        "rolling restart: {opened} connects, {} failed; time to place: p50 {:?}, p99 {:?}, max {:?}",
        failures.len(),
        percentile(&times, 50),
        percentile(&times, 99),
        times.last().unwrap()
    );
    let placed = per_instance(&chain, "tunnel_broker_placements_total").await;
    println!("placements per instance after the restart: {placed:?}");
    assert!(failures.is_empty(), "failed connects: {failures:?}");

    // Long-lived connections: each failed only after its own instance began to drain.
    while let Some(done) = long.join_next().await {
        let done = done.unwrap();
        let needle = format!("conn_id={} ", done.conn_id);
        let home = logs.iter().position(|log| log.contains(&needle));
        match (done.failed_at, home) {
            (None, _) => {}
            (Some(at), Some(i)) => assert!(
                at >= restarted_at[i],
                "connection {} failed before its instance {i} was restarted",
                done.conn_id
            ),
            (Some(_), None) => panic!("connection {} failed; instance unknown", done.conn_id),
        }
        println!(
            "long-lived connection {} on instance {home:?}: {} rounds, {}",
            done.conn_id,
            done.rounds,
            if done.failed_at.is_some() {
                "ended when its instance was drained"
            } else {
                "never failed"
            }
        );
    }
    for broker in brokers.iter_mut().flatten() {
        broker.terminate(STEP).await.expect("broker stops");
    }
}

/// The relay is killed and started again 6 s later while a client keeps connecting: every
/// connect succeeds (network errors, then 503 with Retry-After until the broker re-links).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_restart_of_six_seconds_fails_no_connect() {
    init_tracing();
    let mut chain = Chain::start(ChainOptions::echo()).await;
    let client = Arc::new(client(&chain));
    let mut tasks = tokio::task::JoinSet::new();
    let started = Instant::now();
    let mut killed = false;
    let mut n = 0u64;
    while started.elapsed() < Duration::from_secs(10) {
        if !killed && started.elapsed() >= Duration::from_secs(1) {
            chain.kill_relay().await.expect("kill the relay");
            killed = true;
            let down = Instant::now();
            // Keep connecting while it is down.
            while down.elapsed() < Duration::from_secs(6) {
                n += 1;
                tasks.spawn(connect_and_echo(client.clone(), n));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            chain.start_relay().await.expect("restart the relay");
        }
        n += 1;
        tasks.spawn(connect_and_echo(client.clone(), n));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut failed = Vec::new();
    while let Some(done) = tasks.join_next().await {
        if let Err(e) = done.unwrap() {
            failed.push(e.to_string());
        }
    }
    println!(
        "relay restart of 6 s: {n} connects, {} failed",
        failed.len()
    );
    assert!(failed.is_empty(), "{failed:?}");
    chain.assert_alive();
}

async fn connect_and_echo(client: Arc<TunnelClient>, n: u64) -> io::Result<()> {
    let outcome = async {
        let mut s = client.connect().await.map_err(io::Error::from)?;
        echo(&mut s, &SeededBytes::new(n).take_vec(1_000)).await?;
        s.shutdown().await
    };
    tokio::time::timeout(Duration::from_secs(45), outcome)
        .await
        .unwrap_or_else(|_| Err(io::Error::other("timed out")))
}

/// An instance whose backlog is full refuses; the relay punts the connect to the other
/// instance and the client never sees the refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connect_is_punted_to_another_instance() {
    init_tracing();
    let mut options = ChainOptions::echo();
    options.broker_args = broker_args(2, 100);
    let chain = Chain::start(options).await;
    let client = client(&chain);
    // One connection held on instance 2 (the only one yet) makes its unused share 99 %, so
    // the relay deterministically prefers the instance below. (Connections closed both ways,
    // like the chain's readiness checks, no longer count.)
    let mut held = within("connect", client.connect()).await.expect("connect");
    echo(&mut held, &SeededBytes::new(99).take_vec(10))
        .await
        .expect("held connection echoes");
    // An instance that never accepts, with a backlog of one and no capacity limit: the relay
    // prefers it (all its capacity is unused) until it refuses.
    let mut config = BrokerConfig::new(
        chain.relay_link_addr().to_string(),
        "e2e",
        chain.link_secret(),
    );
    config.accept_backlog = 1;
    config.instance_id = tunnel_broker::InstanceId([1; 16]);
    let _refuser = within("bind", TunnelListener::bind(config))
        .await
        .expect("bind");
    wait_links(&chain, 2).await;
    let before = per_instance(&chain, "tunnel_broker_placements_total").await[&instance(2)];
    let mut streams = Vec::new();
    for _ in 0..5 {
        streams.push(within("connect", client.connect()).await.expect("connect"));
    }
    // The first one waits in the refuser's backlog; the other four were punted and echo.
    for (i, s) in streams.iter_mut().skip(1).enumerate() {
        echo(s, &SeededBytes::new(i as u64).take_vec(1_000))
            .await
            .expect("a punted connection echoes");
    }
    let punts = per_instance(&chain, "tunnel_broker_punts_total").await;
    let placed = per_instance(&chain, "tunnel_broker_placements_total").await;
    println!("punts {punts:?}, placements {placed:?}");
    assert_eq!(punts[&instance(1)], 4, "{punts:?}");
    assert_eq!(placed[&instance(1)], 5, "{placed:?}");
    assert_eq!(placed[&instance(2)] - before, 4, "the 4 punted: {placed:?}");
}

/// With `--link-secrets-file`, a listed name needs its own secret: the shared one, or another
/// name's, is refused; unlisted names still use the shared secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_name_link_secrets_refuse_a_wrong_pair() {
    init_tracing();
    let dir = tunnel_tests::TestDir::new("link-secrets").unwrap();
    let file = dir.path().join("link-secrets");
    std::fs::write(&file, "# name:secret\nvault:vault-own-secret\n").unwrap();
    let mut options = ChainOptions::echo();
    options.relay_args = vec!["--link-secrets-file".into(), file.display().to_string()];
    let chain = Chain::start(options).await;
    let link = chain.relay_link_addr().to_string();
    let bind = |name: &str, secret: &[u8]| {
        let mut config = BrokerConfig::new(link.clone(), name, secret.to_vec());
        config.handshake_timeout = Duration::from_secs(5);
        TunnelListener::bind(config)
    };
    let shared = chain.link_secret();
    let err = bind("vault", &shared)
        .await
        .expect_err("shared secret for vault");
    assert_eq!(err.kind(), io::ErrorKind::PermissionDenied, "{err}");
    let err = bind("other", b"vault-own-secret")
        .await
        .expect_err("vault's secret for another name");
    assert_eq!(err.kind(), io::ErrorKind::PermissionDenied, "{err}");
    let vault = bind("vault", b"vault-own-secret")
        .await
        .expect("vault with its own secret");
    let other = bind("other", &shared)
        .await
        .expect("an unlisted name with the shared secret");
    assert!(vault.is_link_up() && other.is_link_up());
    assert_eq!(
        chain
            .relay_metric("tunnel_auth_failures_total{side=\"link\"}")
            .await,
        "2"
    );
}

/// A relay keepalive of 1 s and a broker keepalive of 5 s: the relay waits three of the
/// broker's intervals, so the idle link stays up (it used to be redialed every few seconds).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mismatched_keepalives_do_not_flap() {
    init_tracing();
    let mut options = ChainOptions::echo();
    options.relay_args = vec!["--link-keepalive-ms".into(), "1000".into()];
    options.broker_args = vec!["--keepalive-secs".into(), "5".into()];
    let chain = Chain::start(options).await;
    let accepted = chain.relay_metric("tunnel_links_accepted_total").await;
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert_eq!(
        chain.relay_metric("tunnel_links_accepted_total").await,
        accepted
    );
    assert_eq!(chain.relay_metric("tunnel_links_up").await, "1");
}

/// Connects with the same `Affinity` key all go to one instance of an evenly loaded pool;
/// connects without one are spread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connects_with_one_affinity_key_share_an_instance() {
    init_tracing();
    let mut options = ChainOptions::echo();
    options.broker_args = broker_args(1, 100);
    let chain = Chain::start(options).await;
    let mut args = broker_args(2, 100);
    args.extend(["--drain-timeout-secs".to_string(), "1".to_string()]);
    let mut second = chain
        .spawn_broker("broker-2", &args)
        .expect("second broker");
    wait_links(&chain, 2).await;
    let before = per_instance(&chain, "tunnel_broker_placements_total").await;
    // The library's connects, with the key in the client's configuration.
    let mut config = tunnel_client::ClientConfig::new(chain.relay_url(), "e2e");
    config.env_proxy = false;
    config.affinity = Some("room-7".into());
    let client = tunnel_client::TunnelClient::new(config).expect("client");
    let mut streams = Vec::new();
    for i in 0..6u8 {
        let mut stream = client.connect().await.expect("connect");
        stream.write_all(&[i]).await.expect("write");
        let mut echo = [0u8; 1];
        stream.read_exact(&mut echo).await.expect("echo");
        assert_eq!(echo, [i]);
        streams.push(stream);
    }
    let after = per_instance(&chain, "tunnel_broker_placements_total").await;
    let delta = |n: u8| after[&instance(n)] - before.get(&instance(n)).copied().unwrap_or(0);
    println!("affinity: 6 connects placed {} and {}", delta(1), delta(2));
    assert!(
        (delta(1), delta(2)) == (6, 0) || (delta(1), delta(2)) == (0, 6),
        "{before:?} -> {after:?}"
    );
    second.terminate(STEP).await.expect("second broker stops");
}
