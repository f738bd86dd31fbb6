//! Keeps the fuzzers' findings as tests: every file under `fuzz/corpus/<target>/` and
//! `fuzz/regressions/<target>/` is run through the same checks the fuzz target makes
//! (`fuzz/fuzz_targets/checks.rs`, included here), and the committed seed corpus is checked to
//! be what `seed_inputs` generates.
//!
//! Regenerate the seeds after a format change with
//! `FUZZ_WRITE_SEEDS=1 cargo test -p tunnel-proto --test fuzz_corpus`.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use bytes::{BufMut, Bytes, BytesMut};
use tunnel_proto::codec::encode_all;
use tunnel_proto::packet::{Packet, PacketType};
use tunnel_proto::payload::{
    encode_listen_state, encode_reason, encode_sack, encode_token, AnnouncedConn, Attach,
    BrokerConnInit, Capacity, ConnOption, InstanceId, LinkExtension, LinkFeatures, LinkInit,
    ListenMode, ListenState, MoveAnswer, MoveRequest, RelayHello, SackBlock, SessionRequest, Token,
};

#[path = "../../fuzz/fuzz_targets/checks.rs"]
mod checks;

/// A fuzz target's check: panics when the input breaks a property.
type Check = fn(&[u8]);

const TARGETS: [(&str, Check); 4] = [
    ("decode_packets", checks::check_packets),
    ("decode_payloads", checks::check_payloads),
    ("decode_link", checks::check_link),
    ("decode_session", checks::check_session),
];

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

fn token(n: u8) -> Token {
    Token(std::array::from_fn(|i| {
        n.wrapping_mul(37).wrapping_add(i as u8)
    }))
}

fn link_init(conns: u32) -> LinkInit {
    LinkInit {
        extension: None,
        server_name: "mqtt".to_string(),
        secret: Bytes::from_static(b"link-secret"),
        connections: (0..conns)
            .map(|i| AnnouncedConn {
                conn_id: 0x1000 + i,
                token: token(i as u8),
                pull_period_ms: 250 * i,
                client_window: 64,
            })
            .collect(),
    }
}

fn sack() -> Bytes {
    encode_sack(&[
        SackBlock { first: 5, last: 7 },
        SackBlock {
            first: 10,
            last: 10,
        },
        SackBlock {
            first: u32::MAX,
            last: 2,
        },
    ])
}

/// A typical packet of each type, with the payload its type carries.
fn typical_packets() -> Vec<(&'static str, Packet)> {
    use PacketType::*;
    let broker_init = BrokerConnInit {
        token: token(1),
        client_addr: "203.0.113.7:50123".to_string(),
    };
    let p = |kind, payload: Bytes| Packet::new(kind, 0x0a0b_0c0d, payload).with_window(64);
    vec![
        (
            "conn-init-client",
            Packet::new(ConnInit, 0, Bytes::new()).with_window(64),
        ),
        ("conn-init-token", p(ConnInit, encode_token(&token(1)))),
        ("conn-init-broker", p(ConnInit, broker_init.encode())),
        ("conn-init-ack", p(ConnInitAck, Bytes::new())),
        (
            "conn-rejected",
            p(ConnRejected, encode_reason("not listening")),
        ),
        ("data", p(Data, Bytes::from_static(b"PING\r\n")).with_seq(0)),
        ("conn-close", p(ConnClose, Bytes::new()).with_seq(1)),
        ("ack", p(Ack, Bytes::new()).with_seq(u32::MAX)),
        ("ack-sack", p(Ack, sack()).with_seq(4)),
        ("conn-shutdown", p(ConnShutdown, Bytes::new())),
        ("link-init", Packet::new(LinkInit, 0, link_init(2).encode())),
        ("conn-abort", p(ConnAbort, encode_reason("idle"))),
        (
            "conn-option",
            p(
                ConnOption,
                tunnel_proto::payload::ConnOption::PullPeriodMs(0).encode(),
            )
            .with_seq(2),
        ),
        (
            "listen-state",
            Packet::new(ListenState, 0, encode_listen_state(true)),
        ),
        ("no-op", Packet::new(NoOp, 0, Bytes::new())),
        ("link-init-ack", Packet::new(LinkInitAck, 0, Bytes::new())),
    ]
}

/// The seed corpus: (target, file name, contents).
fn seed_inputs() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut seeds = Vec::new();
    let packets = typical_packets();
    for (name, packet) in &packets {
        // Chunk size 7, the largest packet-size limit the input can pick.
        let mut input = vec![7, 255];
        input.extend_from_slice(&packet.to_bytes());
        seeds.push(("decode_packets", format!("seed-{name}"), input));
    }
    let stream = encode_all(packets.iter().map(|(_, p)| p));
    for (name, prefix) in [
        ("stream-bytewise", [1u8, 255]),
        ("stream-whole", [255, 255]),
    ] {
        let mut input = prefix.to_vec();
        input.extend_from_slice(&stream);
        seeds.push(("decode_packets", format!("seed-{name}"), input));
    }
    let mut cut = vec![13, 255];
    cut.extend_from_slice(&stream[..stream.len() - 3]);
    seeds.push(("decode_packets", "seed-stream-cut".to_string(), cut));
    // A limit of 24 + 16 bytes: the LINK_INIT packet is too large for it.
    let mut small = vec![5, 1];
    small.extend_from_slice(&stream);
    seeds.push((
        "decode_packets",
        "seed-stream-small-limit".to_string(),
        small,
    ));

    let mut payloads: Vec<(&str, Bytes)> = vec![
        ("link-init-empty", link_init(0).encode()),
        ("link-init-2", link_init(2).encode()),
        (
            "broker-conn-init",
            BrokerConnInit {
                token: token(3),
                client_addr: "[2001:db8::1]:443".to_string(),
            }
            .encode(),
        ),
        ("option-pull", ConnOption::PullPeriodMs(500).encode()),
        (
            "option-inactivity",
            ConnOption::InactivityTimeoutMs(60_000).encode(),
        ),
        (
            "option-unknown",
            ConnOption::Unknown {
                option: 99,
                value: 1,
            }
            .encode(),
        ),
        ("listen-on", encode_listen_state(true)),
        ("listen-off", encode_listen_state(false)),
        (
            "listen-capacity",
            ListenState {
                mode: ListenMode::Draining,
                capacity: Some(Capacity {
                    max_connections: 100,
                    live_connections: 7,
                }),
            }
            .encode(),
        ),
        (
            "link-init-extension",
            LinkInit {
                extension: Some(LinkExtension {
                    instance: InstanceId([0xab; 16]),
                    keepalive_ms: 5000,
                    state: ListenState {
                        mode: ListenMode::Accepting,
                        capacity: Some(Capacity {
                            max_connections: 10,
                            live_connections: 2,
                        }),
                    },
                    features: None,
                }),
                ..link_init(2)
            }
            .encode(),
        ),
        (
            "link-init-features",
            LinkInit {
                extension: Some(LinkExtension {
                    instance: InstanceId([0xcd; 16]),
                    keepalive_ms: 1000,
                    state: ListenState {
                        mode: ListenMode::Accepting,
                        capacity: Some(Capacity::default()),
                    },
                    features: Some(LinkFeatures::MOVES),
                }),
                ..link_init(1)
            }
            .encode(),
        ),
        (
            "link-init-ack",
            RelayHello {
                relay_id: 2,
                features: LinkFeatures::MOVES,
            }
            .encode(),
        ),
        (
            "link-move-request",
            MoveRequest { token: token(5) }.encode(),
        ),
        (
            "link-move-moved",
            MoveAnswer::Moved {
                token: token(6),
                pull_period_ms: 0,
                client_window: 128,
            }
            .encode(),
        ),
        ("link-move-left", MoveAnswer::Left.encode()),
        ("sack", sack()),
        ("token", encode_token(&token(9))),
        ("token-hex", Bytes::from(token(9).to_hex())),
        ("reason", encode_reason("relay shutting down")),
        (
            "session-request",
            SessionRequest {
                idle_timeout_ms: 330_000,
            }
            .encode(),
        ),
        (
            "session-attach",
            Attach {
                token: token(4),
                server: "echo".into(),
            }
            .encode(),
        ),
    ];
    let mut huge_count = BytesMut::new();
    huge_count.put_u16(4);
    huge_count.put_slice(b"mqtt");
    huge_count.put_u16(0);
    huge_count.put_u32(u32::MAX);
    payloads.push(("link-init-huge-count", huge_count.freeze()));
    for (name, bytes) in payloads {
        // The link's messages seed the link target too.
        if name.starts_with("link-") || name.starts_with("listen-") {
            seeds.push(("decode_link", format!("seed-{name}"), bytes.to_vec()));
        }
        if name.starts_with("session-") {
            seeds.push(("decode_session", format!("seed-{name}"), bytes.to_vec()));
        }
        seeds.push(("decode_payloads", format!("seed-{name}"), bytes.to_vec()));
    }
    seeds
}

#[test]
fn seed_corpus_is_current() {
    let write = std::env::var_os("FUZZ_WRITE_SEEDS").is_some();
    let seeds = seed_inputs();
    let mut stale = Vec::new();
    for (target, name, contents) in &seeds {
        let path = fuzz_dir().join("corpus").join(target).join(name);
        if write {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, contents).unwrap();
        } else if std::fs::read(&path).ok().as_ref() != Some(contents) {
            stale.push(path.display().to_string());
        }
    }
    // Seed files the generator no longer makes.
    for (target, _) in TARGETS {
        let dir = fuzz_dir().join("corpus").join(target);
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let name = entry.unwrap().file_name().to_string_lossy().into_owned();
            if name.starts_with("seed-")
                && !seeds.iter().any(|(t, n, _)| *t == target && *n == name)
            {
                stale.push(format!("{}/{name} (not generated any more)", dir.display()));
            }
        }
    }
    assert!(
        stale.is_empty(),
        "seed corpus out of date: {stale:#?}\nregenerate with \
         FUZZ_WRITE_SEEDS=1 cargo test -p tunnel-proto --test fuzz_corpus (and delete the \
         files no longer generated)"
    );
}

#[test]
fn corpus_and_regressions_replay() {
    let mut replayed = 0;
    let mut failures = Vec::new();
    for folder in ["corpus", "regressions"] {
        for (target, check) in TARGETS {
            let dir = fuzz_dir().join(folder).join(target);
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            let mut files: Vec<PathBuf> = entries.map(|e| e.unwrap().path()).collect();
            files.sort();
            for file in files.into_iter().filter(|f| f.is_file()) {
                let data = std::fs::read(&file).unwrap();
                if catch_unwind(AssertUnwindSafe(|| check(&data))).is_err() {
                    failures.push(file.display().to_string());
                }
                replayed += 1;
            }
        }
    }
    // The seeds alone are more than this; fewer means the corpus went missing.
    assert!(
        replayed >= 20,
        "only {replayed} corpus files found under {}",
        fuzz_dir().display()
    );
    assert!(
        failures.is_empty(),
        "inputs that fail their fuzz check: {failures:#?}"
    );
}
