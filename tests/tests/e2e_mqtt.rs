//! A real peer behind the tunnel: a mosquitto MQTT broker behind `tunnel-broker --forward`,
//! with both the subscriber and the publishers (`mosquitto_sub`, `mosquitto_pub`) connecting
//! through the client binary, so every message crosses the tunnel twice.
//!
//! Needs the binaries and the Debian packages mosquitto and mosquitto-clients:
//! `cargo build --workspace --bins && cargo test -p tunnel-tests --test e2e_mqtt`.

use std::process::Output;
use std::time::Duration;

use tokio::time::Instant;
use tunnel_tests::data::hex;
use tunnel_tests::mosquitto::{run_client, spawn_client, wait_client, MosquittoServer};
use tunnel_tests::{init_tracing, sha256, Chain, ChainOptions, ReadyProbe, SeededBytes, Target};

/// Deadline of one `mosquitto_pub`.
const PUB_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the subscriber waits for its messages (`mosquitto_sub -W`, seconds).
const SUB_WAIT_SECS: u64 = 20;
/// Deadline of a subscriber process: its own `-W` plus slack for start and exit.
const SUB_TIMEOUT: Duration = Duration::from_secs(SUB_WAIT_SECS + 10);
/// Deadline for the broker to acknowledge a subscription made through the tunnel.
const SUBACK_TIMEOUT: Duration = Duration::from_secs(20);
/// Deadline for the first publish through a freshly started chain to succeed.
const PATH_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Size of the QoS 1 message: several DATA packets (64 KiB each).
const BIG_MESSAGE_LEN: usize = 200 * 1024;

fn port_args(port: u16, client_id: &str) -> Vec<String> {
    vec![
        "-h".into(),
        "127.0.0.1".into(),
        "-p".into(),
        port.to_string(),
        "-i".into(),
        client_id.into(),
    ]
}

fn describe(output: &Output) -> String {
    format!(
        "exit {}; stdout {:?}; stderr {:?}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Publishes `extra` (topic, payload, QoS options) through the tunnel and requires success.
async fn publish(port: u16, client_id: &str, extra: &[&str]) {
    let mut args = port_args(port, client_id);
    args.extend(extra.iter().map(|s| s.to_string()));
    let output = run_client("mosquitto_pub", &args, PUB_TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("mosquitto_pub {extra:?}: {e}"));
    assert!(
        output.status.success(),
        "mosquitto_pub {extra:?} through the tunnel failed: {}",
        describe(&output)
    );
}

/// The broker may not have linked yet: the client then closes the connection before
/// CONNACK and mosquitto_pub fails; retry until a publish succeeds.
async fn wait_until_publish_works(port: u16) {
    let deadline = Instant::now() + PATH_READY_TIMEOUT;
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let mut args = port_args(port, &format!("e2e-probe-{attempt}"));
        args.extend(["-t", "probe", "-m", "ready"].map(String::from));
        let output = run_client("mosquitto_pub", &args, PUB_TIMEOUT)
            .await
            .unwrap_or_else(|e| panic!("cannot run this test: {e}"));
        if output.status.success() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no publish through the tunnel succeeded within {PATH_READY_TIMEOUT:?} \
             ({attempt} attempts); last: {}",
            describe(&output)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Starts `mosquitto_sub` through the tunnel and returns once the broker has acknowledged
/// the subscription, so nothing published afterwards can be missed.
async fn subscribe(
    mqtt: &MosquittoServer,
    port: u16,
    client_id: &str,
    extra: &[&str],
) -> tokio::process::Child {
    let mut args = port_args(port, client_id);
    args.extend(extra.iter().map(|s| s.to_string()));
    args.extend(["-W".to_string(), SUB_WAIT_SECS.to_string()]);
    let child = spawn_client("mosquitto_sub", &args)
        .unwrap_or_else(|e| panic!("cannot run this test: {e}"));
    mqtt.wait_for_log(&format!("Sending SUBACK to {client_id}"), SUBACK_TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("subscription of {client_id} through the tunnel: {e}"));
    child
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_publish_subscribe_through_the_tunnel() {
    init_tracing();
    let started = std::time::Instant::now();
    let mqtt = MosquittoServer::start()
        .await
        .unwrap_or_else(|e| panic!("cannot run this test: {e}"));
    let mut options = ChainOptions::echo();
    options.target = Target::Forward(mqtt.addr());
    // MQTT is not an echo; a successful publish is the readiness check.
    options.probe = ReadyProbe::PortsOnly;
    let mut chain = Chain::start(options).await;
    let port = chain.client_addr().port();
    wait_until_publish_works(port).await;

    // Five QoS 0 messages from five publisher connections, in order, to one subscriber.
    let subscriber = subscribe(&mqtt, port, "e2e-sub", &["-t", "t/1", "-C", "5"]).await;
    let expected: Vec<String> = (1..=5).map(|n| format!("msg-{n}")).collect();
    for (n, message) in expected.iter().enumerate() {
        publish(port, &format!("e2e-pub-{n}"), &["-t", "t/1", "-m", message]).await;
    }
    let output = wait_client(subscriber, "mosquitto_sub -C 5", SUB_TIMEOUT)
        .await
        .expect("subscriber");
    assert!(
        output.status.success(),
        "subscriber did not get 5 messages: {}",
        describe(&output)
    );
    let received: Vec<String> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(received, expected, "messages seen by the subscriber");

    // One QoS 1 message of 200 KiB of pseudo-random bytes, printed raw (-N: no newline).
    let payload = SeededBytes::new(0x4d51_5454).take_vec(BIG_MESSAGE_LEN);
    let payload_path = chain.dir().join("big-payload.bin");
    std::fs::write(&payload_path, &payload).expect("writing the payload file");
    let subscriber = subscribe(
        &mqtt,
        port,
        "e2e-sub-big",
        &["-t", "t/big", "-q", "1", "-C", "1", "-N"],
    )
    .await;
    let payload_file = payload_path.display().to_string();
    publish(
        port,
        "e2e-pub-big",
        &["-t", "t/big", "-q", "1", "-f", &payload_file],
    )
    .await;
    let output = wait_client(subscriber, "mosquitto_sub -q 1 -C 1", SUB_TIMEOUT)
        .await
        .expect("big-message subscriber");
    assert!(
        output.status.success(),
        "subscriber did not get the QoS 1 message: exit {}; {} bytes on stdout; stderr {:?}",
        output.status,
        output.stdout.len(),
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        output.stdout.len(),
        payload.len(),
        "length of the QoS 1 message received"
    );
    assert_eq!(
        hex(&sha256(&output.stdout)),
        hex(&sha256(&payload)),
        "SHA-256 of the QoS 1 message received"
    );
    // The broker itself saw one QoS 1 publish of the full size (not, say, a QoS 0 retry).
    let broker_log = mqtt.log_contents();
    assert!(
        broker_log.lines().any(|line| {
            line.contains("Received PUBLISH from e2e-pub-big (d0, q1")
                && line.contains(&format!("({BIG_MESSAGE_LEN} bytes)"))
        }),
        "the broker did not log a QoS 1 publish of {BIG_MESSAGE_LEN} bytes from e2e-pub-big"
    );
    chain.assert_alive();
    eprintln!("MQTT through the tunnel: {:?}", started.elapsed());
}
