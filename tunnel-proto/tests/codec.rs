//! Unit tests of the packet codec and the typed payload decoders (docs/protocol.md §1, §3–§6).
//!
//! Malformed input is built by hand here, with an independent CRC-32 implementation, so the
//! tests do not lean on the encoder they are checking.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tunnel_proto::codec::{decode_all, encode_all, Decoder, PacketParts};
use tunnel_proto::error::{DecodeError, PayloadError};
use tunnel_proto::packet::{Packet, PacketType, DEFAULT_MAX_PACKET_SIZE, HEADER_LEN};
use tunnel_proto::payload::{
    decode_listen_state, decode_reason, decode_sack, decode_token, encode_listen_state,
    encode_reason, encode_sack, encode_token, AnnouncedConn, BrokerConnInit, ConnOption, LinkInit,
    SackBlock, Token, MAX_CLIENT_ADDR_LEN, MAX_SACK_BLOCKS, MAX_SERVER_NAME_LEN,
};
use tunnel_proto::payload::{
    Attach, Capacity, InstanceId, LinkExtension, LinkFeatures, ListenMode, ListenState, MoveAnswer,
    MoveRequest, RelayHello, SessionRequest, LINK_EXTENSION_LEN, LISTEN_STATE_EXTENDED_LEN,
};

// ---------------------------------------------------------------------------------------------
// Allocation accounting: lets a test assert that a decoder did not reserve memory for a length
// it read from hostile input. Counted per thread because the test harness runs tests in
// parallel threads.

struct CountingAlloc;

thread_local! {
    static ALLOCATED_BYTES: Cell<usize> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCATED_BYTES.try_with(|c| c.set(c.get().saturating_add(layout.size())));
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = ALLOCATED_BYTES.try_with(|c| c.set(c.get().saturating_add(new_size)));
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

/// Bytes allocated on this thread while `f` runs.
fn allocated_during<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let before = ALLOCATED_BYTES.with(|c| c.get());
    let out = f();
    let after = ALLOCATED_BYTES.with(|c| c.get());
    (out, after - before)
}

#[test]
fn allocation_accounting_sees_allocations() {
    let (v, allocated) = allocated_during(|| vec![0u8; 10_000]);
    assert_eq!(v.len(), 10_000);
    assert!(allocated >= 10_000, "{allocated}");
}

// ---------------------------------------------------------------------------------------------
// Hand-made packets.

/// Bitwise CRC-32 (IEEE 802.3, reflected, polynomial 0xEDB88320): an oracle independent of
/// crc32fast.
fn crc32_ieee(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0xEDB8_8320 & mask);
        }
    }
    !crc
}

/// Header fields of a hand-built packet; `size` and `checksum` default to the correct values.
#[derive(Clone)]
struct Raw {
    version: u16,
    kind: u16,
    size: Option<u32>,
    conn_id: u32,
    seq: u32,
    window: u16,
    flags: u16,
    checksum: Option<u32>,
    payload: Vec<u8>,
}

impl Raw {
    fn valid(kind: PacketType, payload: &[u8]) -> Raw {
        Raw {
            version: 1,
            kind: kind.code(),
            size: None,
            conn_id: 0x0102_0304,
            seq: 0x0506_0708,
            window: 0x090a,
            flags: 0,
            checksum: None,
            payload: payload.to_vec(),
        }
    }

    fn bytes(&self) -> Vec<u8> {
        let size = self
            .size
            .unwrap_or((HEADER_LEN + self.payload.len()) as u32);
        let mut out = Vec::new();
        out.put_u16(self.version);
        out.put_u16(self.kind);
        out.put_u32(size);
        out.put_u32(self.conn_id);
        out.put_u32(self.seq);
        out.put_u16(self.window);
        out.put_u16(self.flags);
        out.put_u32(0);
        out.extend_from_slice(&self.payload);
        let sum = self.checksum.unwrap_or_else(|| crc32_ieee(&out));
        out[20..24].copy_from_slice(&sum.to_be_bytes());
        out
    }
}

fn sample_packet(kind: PacketType, i: u32) -> Packet {
    let payload: Vec<u8> = (0..(i as usize * 7) % 50).map(|b| b as u8 ^ 0x5a).collect();
    Packet {
        kind,
        conn_id: 0xdead_0000 + i,
        seq: u32::MAX - i,
        window: 1000 + i as u16,
        flags: i as u16,
        payload: Bytes::from(payload),
    }
}

fn all_sample_packets() -> Vec<Packet> {
    PacketType::ALL
        .iter()
        .enumerate()
        .map(|(i, &k)| sample_packet(k, i as u32))
        .collect()
}

fn decode_one_stream(bytes: &[u8]) -> Result<Option<Packet>, DecodeError> {
    let mut d = Decoder::default();
    d.feed(bytes);
    d.next_packet()
}

// ---------------------------------------------------------------------------------------------
// Packet codec.

#[test]
fn crc_oracle_matches_the_standard_check_value() {
    // The CRC-32/ISO-HDLC check value from the CRC catalogue.
    assert_eq!(crc32_ieee(b"123456789"), 0xCBF4_3926);
}

#[test]
fn encoding_matches_the_documented_layout() {
    let p = Packet {
        kind: PacketType::Data,
        conn_id: 0x0102_0304,
        seq: 0x0506_0708,
        window: 0x090a,
        flags: 0,
        payload: Bytes::from_static(b"hello"),
    };
    let expected = Raw::valid(PacketType::Data, b"hello").bytes();
    assert_eq!(&p.to_bytes()[..], &expected[..]);
    assert_eq!(p.wire_len(), 29);
    assert_eq!(&expected[..8], &[0, 1, 0, 4, 0, 0, 0, 29]);
}

#[test]
fn a_decoded_packet_comes_with_the_bytes_it_was_decoded_from() {
    let first = Packet::new(PacketType::Data, 3, Bytes::from_static(b"first")).with_seq(1);
    let second = Packet::new(PacketType::Ack, 3, Bytes::new()).with_window(9);
    let mut wire = first.to_bytes().to_vec();
    wire.extend_from_slice(&second.to_bytes());
    // Whole in one chunk (slices of it), then cut across two chunks (through the buffer).
    for cut in [wire.len(), first.wire_len() + 5] {
        let mut d = Decoder::default();
        d.feed_bytes(Bytes::copy_from_slice(&wire[..cut]));
        let mut got = Vec::new();
        while let Some(received) = d.next_packet_and_wire().unwrap() {
            got.push(received);
        }
        d.feed_bytes(Bytes::copy_from_slice(&wire[cut..]));
        while let Some(received) = d.next_packet_and_wire().unwrap() {
            got.push(received);
        }
        assert_eq!(got.len(), 2, "cut at {cut}");
        assert_eq!(got[0].0, first);
        assert_eq!(got[0].1, first.to_bytes());
        assert_eq!(got[1].0, second);
        assert_eq!(got[1].1, second.to_bytes());
    }
}

#[test]
fn every_packet_type_round_trips() {
    for (i, &kind) in PacketType::ALL.iter().enumerate() {
        assert_eq!(PacketType::from_code(kind.code()), Some(kind));
        assert_eq!(kind.code(), i as u16 + 1);
        let p = sample_packet(kind, i as u32);
        let wire = p.to_bytes();
        assert_eq!(wire.len(), p.wire_len());

        let all = decode_all(wire.clone(), DEFAULT_MAX_PACKET_SIZE).unwrap();
        assert_eq!(all, vec![p.clone()], "decode_all of {kind:?}");

        let mut d = Decoder::default();
        d.feed(&wire);
        assert_eq!(
            d.next_packet().unwrap(),
            Some(p.clone()),
            "Decoder of {kind:?}"
        );
        assert_eq!(d.next_packet().unwrap(), None);
        d.finish().unwrap();
    }
    assert_eq!(PacketType::from_code(0), None);
    assert_eq!(PacketType::from_code(17), None);
}

#[test]
fn sequenced_types_are_exactly_data_close_and_option() {
    let seqd: Vec<_> = PacketType::ALL
        .iter()
        .copied()
        .filter(|k| k.is_sequenced())
        .collect();
    assert_eq!(
        seqd,
        vec![
            PacketType::Data,
            PacketType::ConnClose,
            PacketType::ConnOption
        ]
    );
}

#[test]
fn nonzero_flags_are_carried_and_accepted() {
    let mut raw = Raw::valid(PacketType::NoOp, b"");
    raw.flags = 0xffff;
    let p = decode_one_stream(&raw.bytes()).unwrap().unwrap();
    assert_eq!(p.flags, 0xffff);
}

/// Each malformed packet gives its own error, both through `decode_all` and the `Decoder`.
#[test]
fn malformed_packets_give_their_own_error() {
    let good = Raw::valid(PacketType::Data, b"payload!");
    let good_sum = crc32_ieee(&{
        let mut b = good.bytes();
        b[20..24].fill(0);
        b
    });

    let mut bad_version = good.clone();
    bad_version.version = 2;
    let mut version_zero = good.clone();
    version_zero.version = 0;
    let mut size_small = good.clone();
    size_small.size = Some(23);
    let mut size_zero = good.clone();
    size_zero.size = Some(0);
    let mut size_large = good.clone();
    size_large.size = Some(DEFAULT_MAX_PACKET_SIZE as u32 + 1);
    let mut size_huge = good.clone();
    size_huge.size = Some(u32::MAX);
    let mut bad_sum = good.clone();
    bad_sum.checksum = Some(good_sum ^ 1);
    let mut unknown_type = good.clone();
    unknown_type.kind = 17;
    let mut type_zero = good.clone();
    type_zero.kind = 0;
    let mut type_max = good.clone();
    type_max.kind = u16::MAX;

    let cases: Vec<(&str, Vec<u8>, DecodeError)> = vec![
        ("version 2", bad_version.bytes(), DecodeError::BadVersion(2)),
        (
            "version 0",
            version_zero.bytes(),
            DecodeError::BadVersion(0),
        ),
        ("size 23", size_small.bytes(), DecodeError::SizeTooSmall(23)),
        ("size 0", size_zero.bytes(), DecodeError::SizeTooSmall(0)),
        (
            "size max+1",
            size_large.bytes(),
            DecodeError::SizeTooLarge {
                size: DEFAULT_MAX_PACKET_SIZE as u32 + 1,
                max: DEFAULT_MAX_PACKET_SIZE,
            },
        ),
        (
            "size u32::MAX",
            size_huge.bytes(),
            DecodeError::SizeTooLarge {
                size: u32::MAX,
                max: DEFAULT_MAX_PACKET_SIZE,
            },
        ),
        (
            "checksum",
            bad_sum.bytes(),
            DecodeError::BadChecksum {
                carried: good_sum ^ 1,
                computed: good_sum,
            },
        ),
        (
            "type 14",
            unknown_type.bytes(),
            DecodeError::UnknownType(17),
        ),
        ("type 0", type_zero.bytes(), DecodeError::UnknownType(0)),
        (
            "type 65535",
            type_max.bytes(),
            DecodeError::UnknownType(u16::MAX),
        ),
    ];

    for (name, bytes, expected) in cases {
        assert_eq!(
            decode_all(Bytes::from(bytes.clone()), DEFAULT_MAX_PACKET_SIZE),
            Err(expected.clone()),
            "decode_all: {name}"
        );
        assert_eq!(
            decode_one_stream(&bytes),
            Err(expected.clone()),
            "Decoder: {name}"
        );
        // The error message names the problem (it ends up in logs).
        assert!(!expected.to_string().is_empty());
    }
}

#[test]
fn any_single_bit_flip_in_a_packet_is_detected() {
    let wire = sample_packet(PacketType::Data, 5).to_bytes().to_vec();
    for bit in 0..wire.len() * 8 {
        let mut corrupt = wire.clone();
        corrupt[bit / 8] ^= 1 << (bit % 8);
        let mut d = Decoder::default();
        d.feed(&corrupt);
        // A flip in the size field may make the decoder wait for more bytes; everything else
        // must be an error. Nothing may come out as a packet.
        match d.next_packet() {
            Ok(Some(p)) => panic!("bit {bit}: corrupt packet accepted: {p:?}"),
            Ok(None) => assert!(d.finish().is_err(), "bit {bit}"),
            Err(_) => {}
        }
    }
}

#[test]
fn size_bounds_are_inclusive_at_the_maximum() {
    let max = HEADER_LEN + 100;
    let exact = Packet::new(PacketType::Data, 1, Bytes::from(vec![7u8; 100]));
    assert_eq!(
        decode_all(exact.to_bytes(), max).unwrap(),
        vec![exact.clone()]
    );
    let mut d = Decoder::new(max);
    d.feed(&exact.to_bytes());
    assert_eq!(d.next_packet().unwrap(), Some(exact));

    let over = Packet::new(PacketType::Data, 1, Bytes::from(vec![7u8; 101]));
    let err = DecodeError::SizeTooLarge {
        size: (HEADER_LEN + 101) as u32,
        max,
    };
    assert_eq!(decode_all(over.to_bytes(), max), Err(err.clone()));
    let mut d = Decoder::new(max);
    d.feed(&over.to_bytes());
    assert_eq!(d.next_packet(), Err(err));

    // The smallest packet: a header alone.
    let empty = Packet::new(PacketType::NoOp, 0, Bytes::new());
    assert_eq!(
        decode_all(empty.to_bytes(), HEADER_LEN).unwrap(),
        vec![empty]
    );
}

/// A hostile size is rejected from the header alone: the decoder neither waits for the
/// announced payload nor reserves memory for it.
#[test]
fn oversize_is_rejected_from_the_header_before_the_payload_arrives() {
    let mut raw = Raw::valid(PacketType::Data, b"");
    raw.size = Some(u32::MAX);
    let header = raw.bytes();
    assert_eq!(header.len(), HEADER_LEN);

    let mut d = Decoder::default();
    let (result, allocated) = allocated_during(|| {
        d.feed(&header);
        d.next_packet()
    });
    assert_eq!(
        result,
        Err(DecodeError::SizeTooLarge {
            size: u32::MAX,
            max: DEFAULT_MAX_PACKET_SIZE
        })
    );
    assert_eq!(
        d.wanted(),
        0,
        "a failed decoder must not ask for more bytes"
    );
    assert!(
        allocated < 4096,
        "decoder allocated {allocated} bytes for a rejected header"
    );

    // Just above a small configured maximum, also from the header alone.
    let mut raw = Raw::valid(PacketType::Data, b"");
    raw.size = Some(1000);
    let mut d = Decoder::new(999);
    d.feed(&raw.bytes());
    assert_eq!(
        d.next_packet(),
        Err(DecodeError::SizeTooLarge {
            size: 1000,
            max: 999
        })
    );
    // decode_all on the header alone reports the size, not truncation.
    assert_eq!(
        decode_all(Bytes::from(raw.bytes()), 999),
        Err(DecodeError::SizeTooLarge {
            size: 1000,
            max: 999
        })
    );
}

#[test]
fn a_valid_header_with_a_missing_payload_waits_for_exactly_the_rest() {
    let p = Packet::new(PacketType::Data, 9, Bytes::from(vec![1u8; 1000]));
    let wire = p.to_bytes();
    let mut d = Decoder::default();
    d.feed(&wire[..HEADER_LEN]);
    assert_eq!(d.next_packet().unwrap(), None);
    assert_eq!(d.wanted(), 1000);
    d.feed(&wire[HEADER_LEN..HEADER_LEN + 600]);
    assert_eq!(d.next_packet().unwrap(), None);
    assert_eq!(d.wanted(), 400);
    d.feed(&wire[HEADER_LEN + 600..]);
    assert_eq!(d.wanted(), 0);
    assert_eq!(d.next_packet().unwrap(), Some(p));
}

#[test]
fn a_small_configured_maximum_is_raised_to_the_header_length() {
    let p = Packet::new(PacketType::NoOp, 0, Bytes::new());
    let mut d = Decoder::new(0);
    d.feed(&p.to_bytes());
    assert_eq!(d.next_packet().unwrap(), Some(p));
}

#[test]
fn truncated_bodies_are_reported_by_decode_all_and_finish() {
    let p = Packet::new(PacketType::Data, 3, Bytes::from_static(b"0123456789"));
    let wire = p.to_bytes();
    assert_eq!(wire.len(), 34);
    for cut in 1..wire.len() {
        let expected_missing = wire.len() - cut;
        let body = wire.slice(..cut);
        match decode_all(body, DEFAULT_MAX_PACKET_SIZE) {
            Err(DecodeError::Truncated { missing }) => {
                if cut < HEADER_LEN {
                    assert_eq!(missing, HEADER_LEN - cut, "cut {cut}");
                } else {
                    assert_eq!(missing, expected_missing, "cut {cut}");
                }
            }
            other => panic!("cut {cut}: {other:?}"),
        }

        let mut d = Decoder::default();
        d.feed(&wire[..cut]);
        assert_eq!(d.next_packet(), Ok(None), "cut {cut}");
        match d.finish() {
            Err(DecodeError::Truncated { missing }) => {
                if cut < HEADER_LEN {
                    assert_eq!(missing, HEADER_LEN - cut, "cut {cut}");
                } else {
                    assert_eq!(missing, expected_missing, "cut {cut}");
                }
            }
            other => panic!("finish after cut {cut}: {other:?}"),
        }
    }

    // A whole packet followed by the start of another.
    let mut body = wire.to_vec();
    body.extend_from_slice(&wire[..5]);
    assert_eq!(
        decode_all(Bytes::from(body.clone()), DEFAULT_MAX_PACKET_SIZE),
        Err(DecodeError::Truncated {
            missing: HEADER_LEN - 5
        })
    );
    let mut d = Decoder::default();
    d.feed(&body);
    assert_eq!(d.next_packet().unwrap(), Some(p));
    assert_eq!(d.next_packet().unwrap(), None);
    assert!(matches!(d.finish(), Err(DecodeError::Truncated { .. })));
}

#[test]
fn empty_input_is_no_packets_and_no_error() {
    assert_eq!(
        decode_all(Bytes::new(), DEFAULT_MAX_PACKET_SIZE).unwrap(),
        vec![]
    );
    let mut d = Decoder::default();
    assert_eq!(d.next_packet().unwrap(), None);
    assert_eq!(d.wanted(), 0);
    assert_eq!(d.buffered(), 0);
    d.finish().unwrap();
}

#[test]
fn byte_at_a_time_feeding_yields_every_packet_once() {
    let packets = all_sample_packets();
    let body = encode_all(&packets);
    let mut d = Decoder::default();
    let mut out = Vec::new();
    for (i, b) in body.iter().enumerate() {
        let wanted_before = d.wanted();
        if d.buffered() > 0 {
            assert!(wanted_before >= 1, "byte {i}: incomplete packet wants 0");
        }
        d.feed(&[*b]);
        while let Some(p) = d.next_packet().unwrap() {
            out.push(p);
        }
    }
    assert_eq!(out, packets);
    assert_eq!(d.buffered(), 0);
    d.finish().unwrap();
}

#[test]
fn back_to_back_packets_decode_in_order() {
    let packets: Vec<Packet> = (0..100)
        .map(|i| sample_packet(PacketType::ALL[i % 13], i as u32))
        .collect();
    let body = encode_all(&packets);
    assert_eq!(
        body.len(),
        packets.iter().map(Packet::wire_len).sum::<usize>()
    );
    assert_eq!(
        decode_all(body.clone(), DEFAULT_MAX_PACKET_SIZE).unwrap(),
        packets
    );

    // Fed all at once: every packet comes out of one buffer.
    let mut d = Decoder::default();
    d.feed(&body);
    let mut out = Vec::new();
    while let Some(p) = d.next_packet().unwrap() {
        out.push(p);
    }
    assert_eq!(out, packets);

    // Fed through buffer_mut in uneven chunks.
    let mut d = Decoder::default();
    let mut out = Vec::new();
    for chunk in body.chunks(37) {
        d.buffer_mut().extend_from_slice(chunk);
        while let Some(p) = d.next_packet().unwrap() {
            out.push(p);
        }
    }
    assert_eq!(out, packets);
    d.finish().unwrap();
}

#[test]
fn decode_all_payloads_are_slices_of_the_body() {
    let packets: Vec<Packet> = (0..20)
        .map(|i| {
            Packet::new(PacketType::Data, 1, Bytes::from(vec![i as u8; 10 + i * 3]))
                .with_seq(i as u32)
        })
        .collect();
    let body = encode_all(&packets);
    let range = body.as_ptr() as usize..body.as_ptr() as usize + body.len();
    let decoded = decode_all(body.clone(), DEFAULT_MAX_PACKET_SIZE).unwrap();
    assert_eq!(decoded, packets);
    for p in &decoded {
        let start = p.payload.as_ptr() as usize;
        assert!(
            range.contains(&start) && start + p.payload.len() <= range.end,
            "payload of seq {} was copied out of the body",
            p.seq
        );
    }
}

#[test]
fn decoder_payloads_are_not_copied_per_packet() {
    // The decoder splits packets off its own buffer: consecutive payloads from one feed lie in
    // one allocation, in order.
    let packets: Vec<Packet> = (0..5)
        .map(|i| Packet::new(PacketType::Data, 1, Bytes::from(vec![i as u8; 100])))
        .collect();
    let mut d = Decoder::default();
    d.feed(&encode_all(&packets));
    let a = d.next_packet().unwrap().unwrap();
    let b = d.next_packet().unwrap().unwrap();
    let gap = b.payload.as_ptr() as usize - a.payload.as_ptr() as usize;
    assert_eq!(gap, 100 + HEADER_LEN);
}

#[test]
fn decoder_stays_failed_after_an_error() {
    let mut bad = Raw::valid(PacketType::Data, b"x");
    bad.version = 7;
    let good = sample_packet(PacketType::Ack, 1).to_bytes();

    let mut d = Decoder::default();
    d.feed(&good);
    d.feed(&bad.bytes());
    d.feed(&good);
    assert!(d.next_packet().unwrap().is_some());
    assert_eq!(d.next_packet(), Err(DecodeError::BadVersion(7)));
    // Later valid bytes do not revive it.
    for _ in 0..3 {
        assert_eq!(d.next_packet(), Err(DecodeError::BadVersion(7)));
    }
    d.feed(&good);
    assert_eq!(d.next_packet(), Err(DecodeError::BadVersion(7)));
    assert_eq!(d.finish(), Err(DecodeError::BadVersion(7)));
    assert_eq!(d.wanted(), 0);
    // What was buffered is released rather than kept.
    assert!(d.buffered() <= good.len(), "buffered {}", d.buffered());
}

#[test]
fn decoder_stays_failed_after_a_checksum_error() {
    let mut bad = Raw::valid(PacketType::Data, b"abc");
    bad.checksum = Some(1);
    let mut d = Decoder::default();
    d.feed(&bad.bytes());
    let err = d.next_packet().unwrap_err();
    assert!(matches!(err, DecodeError::BadChecksum { carried: 1, .. }));
    d.feed(&sample_packet(PacketType::NoOp, 0).to_bytes());
    assert_eq!(d.next_packet(), Err(err.clone()));
    assert_eq!(d.finish(), Err(err));
}

// ---------------------------------------------------------------------------------------------
// Typed payloads.

fn token(seed: u8) -> Token {
    let mut t = [0u8; 16];
    for (i, b) in t.iter_mut().enumerate() {
        *b = seed.wrapping_mul(31).wrapping_add(i as u8 * 17);
    }
    Token(t)
}

fn sample_link_init(conns: usize) -> LinkInit {
    LinkInit {
        extension: None,
        server_name: "mqtt-broker.example".to_string(),
        secret: Bytes::from_static(b"s3cret\x00\xff"),
        connections: (0..conns)
            .map(|i| AnnouncedConn {
                conn_id: 0xabcd_0000 + i as u32,
                token: token(i as u8),
                pull_period_ms: i as u32 * 100,
                client_window: 64 + i as u16,
            })
            .collect(),
    }
}

#[test]
fn link_init_round_trips() {
    for n in [0, 1, 3, 50] {
        let li = sample_link_init(n);
        let wire = li.encode();
        assert_eq!(
            wire.len(),
            2 + li.server_name.len() + 2 + li.secret.len() + 4 + n * 26
        );
        assert_eq!(LinkInit::decode(wire).unwrap(), li);
    }
    // Extremes of the allowed lengths.
    let li = LinkInit {
        extension: None,
        server_name: "x".repeat(MAX_SERVER_NAME_LEN),
        secret: Bytes::new(),
        connections: vec![],
    };
    assert_eq!(LinkInit::decode(li.encode()).unwrap(), li);
    let li = LinkInit {
        extension: None,
        server_name: "é".to_string(),
        secret: Bytes::from(vec![0xaa; 1024]),
        connections: vec![],
    };
    assert_eq!(LinkInit::decode(li.encode()).unwrap(), li);
}

#[test]
fn link_init_cut_at_every_length_is_truncated() {
    let wire = sample_link_init(3).encode();
    for cut in 0..wire.len() {
        match LinkInit::decode(wire.slice(..cut)) {
            Err(PayloadError::Truncated { what, needed }) => {
                assert_eq!(what, "LINK_INIT");
                assert!(needed >= 1, "cut {cut}");
            }
            other => panic!("cut {cut}: {other:?}"),
        }
    }
}

#[test]
fn link_init_huge_count_is_truncated_without_allocating() {
    let mut wire = BytesMut::new();
    wire.put_u16(4);
    wire.put_slice(b"name");
    wire.put_u16(0);
    wire.put_u32(u32::MAX);
    wire.put_slice(&[0u8; 26 * 2]); // two entries present out of four billion
    let wire = wire.freeze();
    let (result, allocated) = allocated_during(|| LinkInit::decode(wire));
    match result {
        Err(PayloadError::Truncated { needed, .. }) => {
            assert_eq!(needed, (u32::MAX as usize - 2) * 26)
        }
        other => panic!("{other:?}"),
    }
    assert!(
        allocated < 4096,
        "LinkInit::decode allocated {allocated} bytes for a count it could not fill"
    );

    // A count one higher than the entries present.
    let li = sample_link_init(2);
    let mut wire = li.encode().to_vec();
    let count_at = 2 + li.server_name.len() + 2 + li.secret.len();
    wire[count_at..count_at + 4].copy_from_slice(&3u32.to_be_bytes());
    assert_eq!(
        LinkInit::decode(Bytes::from(wire)),
        Err(PayloadError::Truncated {
            what: "LINK_INIT",
            needed: 26
        })
    );
}

#[test]
fn link_init_name_length_bounds() {
    let empty = LinkInit {
        server_name: String::new(),
        ..sample_link_init(0)
    };
    assert_eq!(
        LinkInit::decode(empty.encode()),
        Err(PayloadError::BadLength {
            what: "LINK_INIT",
            len: 0,
            min: 1,
            max: MAX_SERVER_NAME_LEN
        })
    );
    let long = LinkInit {
        server_name: "n".repeat(256),
        ..sample_link_init(0)
    };
    assert_eq!(
        LinkInit::decode(long.encode()),
        Err(PayloadError::BadLength {
            what: "LINK_INIT",
            len: 256,
            min: 1,
            max: MAX_SERVER_NAME_LEN
        })
    );
    let long_secret = LinkInit {
        secret: Bytes::from(vec![1u8; 1025]),
        ..sample_link_init(0)
    };
    assert!(matches!(
        LinkInit::decode(long_secret.encode()),
        Err(PayloadError::BadLength { len: 1025, .. })
    ));
}

#[test]
fn link_init_bad_utf8_name() {
    let mut wire = BytesMut::new();
    wire.put_u16(3);
    wire.put_slice(&[b'a', 0xff, b'b']);
    wire.put_u16(0);
    wire.put_u32(0);
    assert_eq!(
        LinkInit::decode(wire.freeze()),
        Err(PayloadError::BadUtf8 { what: "LINK_INIT" })
    );
}

#[test]
fn link_init_trailing_bytes() {
    // Bytes after the connections are the pool extension, which must be whole (trailing
    // bytes after a whole extension: `link_init_extension_cut_or_padded_is_rejected`).
    let mut wire = sample_link_init(1).encode().to_vec();
    wire.extend_from_slice(&[0, 0, 0]);
    assert_eq!(
        LinkInit::decode(Bytes::from(wire)),
        Err(PayloadError::Truncated {
            what: "LINK_INIT",
            needed: 13
        })
    );
}

#[test]
fn broker_conn_init_round_trips_and_rejects() {
    for addr in ["", "127.0.0.1:5555", "[::1]:80", "ünïcødé"] {
        let b = BrokerConnInit {
            token: token(9),
            client_addr: addr.to_string(),
        };
        let wire = b.encode();
        assert_eq!(wire.len(), 16 + 2 + addr.len());
        assert_eq!(BrokerConnInit::decode(wire.clone()).unwrap(), b);
        for cut in 0..wire.len() {
            assert!(
                matches!(
                    BrokerConnInit::decode(wire.slice(..cut)),
                    Err(PayloadError::Truncated { .. })
                ),
                "addr {addr:?} cut {cut}"
            );
        }
        let mut extra = wire.to_vec();
        extra.push(0);
        assert!(matches!(
            BrokerConnInit::decode(Bytes::from(extra)),
            Err(PayloadError::TrailingBytes { extra: 1, .. })
        ));
    }

    // An over-long address is cut on a char boundary when encoding, so it still decodes.
    let long = "é".repeat(200); // 400 bytes
    let b = BrokerConnInit {
        token: token(1),
        client_addr: long.clone(),
    };
    let decoded = BrokerConnInit::decode(b.encode()).unwrap();
    assert!(decoded.client_addr.len() <= MAX_CLIENT_ADDR_LEN);
    assert!(decoded.client_addr.len() >= MAX_CLIENT_ADDR_LEN - 1);
    assert!(long.starts_with(&decoded.client_addr));

    // On the wire, a length above the maximum is rejected.
    let mut wire = BytesMut::new();
    wire.put_slice(&token(1).0);
    wire.put_u16(MAX_CLIENT_ADDR_LEN as u16 + 1);
    wire.put_slice(&vec![b'a'; MAX_CLIENT_ADDR_LEN + 1]);
    assert!(matches!(
        BrokerConnInit::decode(wire.freeze()),
        Err(PayloadError::BadLength { len: 257, .. })
    ));

    let mut wire = BytesMut::new();
    wire.put_slice(&token(1).0);
    wire.put_u16(2);
    wire.put_slice(&[0xc3, 0x28]);
    assert!(matches!(
        BrokerConnInit::decode(wire.freeze()),
        Err(PayloadError::BadUtf8 { .. })
    ));
}

#[test]
fn conn_option_known_and_unknown() {
    let cases = [
        (ConnOption::PullPeriodMs(0), [0, 0, 0, 1, 0, 0, 0, 0]),
        (
            ConnOption::InactivityTimeoutMs(60_000),
            [0, 0, 0, 2, 0, 0, 0xea, 0x60],
        ),
        (
            ConnOption::Unknown {
                option: 77,
                value: u32::MAX,
            },
            [0, 0, 0, 77, 0xff, 0xff, 0xff, 0xff],
        ),
        (
            ConnOption::Unknown {
                option: 0,
                value: 5,
            },
            [0, 0, 0, 0, 0, 0, 0, 5],
        ),
    ];
    for (opt, wire) in cases {
        assert_eq!(&opt.encode()[..], &wire[..], "{opt:?}");
        assert_eq!(
            ConnOption::decode(Bytes::copy_from_slice(&wire)).unwrap(),
            opt
        );
    }
    for len in 0..8 {
        assert!(matches!(
            ConnOption::decode(Bytes::from(vec![0u8; len])),
            Err(PayloadError::Truncated { .. })
        ));
    }
    assert!(matches!(
        ConnOption::decode(Bytes::from(vec![0u8; 9])),
        Err(PayloadError::TrailingBytes { extra: 1, .. })
    ));
}

#[test]
fn listen_state_values() {
    assert_eq!(&encode_listen_state(true)[..], &[1]);
    assert_eq!(&encode_listen_state(false)[..], &[0]);
    assert_eq!(decode_listen_state(Bytes::from_static(&[0])), Ok(false));
    assert_eq!(decode_listen_state(Bytes::from_static(&[1])), Ok(true));
    assert_eq!(
        decode_listen_state(Bytes::from_static(&[2])),
        Err(PayloadError::BadValue {
            what: "LISTEN_STATE",
            value: 2
        })
    );
    assert_eq!(
        decode_listen_state(Bytes::from_static(&[255])),
        Err(PayloadError::BadValue {
            what: "LISTEN_STATE",
            value: 255
        })
    );
    assert!(matches!(
        decode_listen_state(Bytes::new()),
        Err(PayloadError::Truncated { needed: 1, .. })
    ));
    assert!(matches!(
        decode_listen_state(Bytes::from_static(&[1, 0])),
        Err(PayloadError::TrailingBytes { extra: 1, .. })
    ));
}

#[test]
fn sack_blocks_round_trip_and_bounds() {
    let blocks: Vec<SackBlock> = (0..5u32)
        .map(|i| SackBlock {
            // Blocks straddle the wrap of the sequence space.
            first: (u32::MAX - 10).wrapping_add(i * 4),
            last: (u32::MAX - 9).wrapping_add(i * 4),
        })
        .collect();
    let wire = encode_sack(&blocks);
    assert_eq!(wire.len(), 40);
    assert_eq!(decode_sack(wire).unwrap(), blocks);
    assert_eq!(decode_sack(Bytes::new()).unwrap(), vec![]);

    // More than the maximum: encode writes the first MAX_SACK_BLOCKS, decode keeps as many.
    let many: Vec<SackBlock> = (0..40u32)
        .map(|i| SackBlock {
            first: i * 10,
            last: i * 10 + 1,
        })
        .collect();
    let wire = encode_sack(&many);
    assert_eq!(wire.len(), MAX_SACK_BLOCKS * 8);
    assert_eq!(decode_sack(wire).unwrap(), many[..MAX_SACK_BLOCKS].to_vec());
    let mut long = BytesMut::new();
    for b in &many {
        long.put_u32(b.first);
        long.put_u32(b.last);
    }
    assert_eq!(
        decode_sack(long.freeze()).unwrap(),
        many[..MAX_SACK_BLOCKS].to_vec()
    );

    for len in [1, 7, 9, 15] {
        assert!(
            matches!(
                decode_sack(Bytes::from(vec![0u8; len])),
                Err(PayloadError::TrailingBytes { .. })
            ),
            "len {len}"
        );
    }
}

#[test]
fn token_hex_round_trip_and_rejects() {
    for seed in 0..=255u8 {
        let t = token(seed);
        let hex = t.to_hex();
        assert_eq!(hex.len(), 32);
        assert!(hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
        assert_eq!(Token::from_hex(&hex), Some(t));
        assert_eq!(Token::from_hex(&hex.to_uppercase()), Some(t));
    }
    assert_eq!(Token([0; 16]).to_hex(), "0".repeat(32));
    assert_eq!(Token([0xff; 16]).to_hex(), "f".repeat(32));
    assert_eq!(
        Token::from_hex("000102030405060708090a0b0c0d0e0f"),
        Some(Token([
            0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15
        ]))
    );

    let rejects = [
        String::new(),
        "0".repeat(31),
        "0".repeat(33),
        "0".repeat(64),
        format!("{}g", "0".repeat(31)),
        format!("{}+1", "0".repeat(30)),
        format!("{} 1", "0".repeat(30)),
        format!("{}-1", "0".repeat(30)),
        format!("0x{}", "0".repeat(30)),
        // 32 bytes, but not 32 hex digits.
        format!("é{}", "0".repeat(30)),
    ];
    for r in &rejects {
        assert_eq!(Token::from_hex(r), None, "{r:?} was accepted");
    }
}

#[test]
fn token_payload_and_comparison() {
    let t = token(3);
    assert_eq!(decode_token(encode_token(&t)), Ok(t));
    assert!(matches!(
        decode_token(Bytes::from(vec![0u8; 15])),
        Err(PayloadError::Truncated { needed: 1, .. })
    ));
    assert!(matches!(
        decode_token(Bytes::from(vec![0u8; 17])),
        Err(PayloadError::TrailingBytes { extra: 1, .. })
    ));
    assert!(t.ct_eq(&token(3)));
    for i in 0..16 {
        let mut other = t;
        other.0[i] ^= 0x80;
        assert!(!t.ct_eq(&other), "byte {i}");
    }
    // Debug output never shows the secret.
    let dbg = format!("{t:?}");
    assert!(!dbg.contains(&t.to_hex()));
    assert!(!dbg.contains(&format!("{:?}", t.0)));
}

#[test]
fn reasons_are_decoded_lossily_and_bounded() {
    assert_eq!(decode_reason(b"bye"), "bye");
    assert_eq!(decode_reason(b""), "");
    assert_eq!(decode_reason(b"a\xffb"), "a\u{FFFD}b");
    assert_eq!(&encode_reason("shutting down")[..], b"shutting down");

    // Encoding cuts on a char boundary at 1024 bytes.
    let long = "ß".repeat(700); // 1400 bytes
    let wire = encode_reason(&long);
    assert!(wire.len() <= 1024 && wire.len() >= 1023);
    assert!(std::str::from_utf8(&wire).is_ok());

    // Decoding keeps at most 1024 bytes; a char cut there becomes a replacement character.
    let raw = [b'x'; 5000];
    assert_eq!(decode_reason(&raw).len(), 1024);
    let mut cut = vec![b'y'; 1023];
    cut.extend_from_slice("ß".as_bytes());
    let decoded = decode_reason(&cut);
    assert!(decoded.starts_with(&"y".repeat(1023)));
    assert!(decoded.ends_with('\u{FFFD}'));
}

#[test]
fn payload_errors_name_what_failed() {
    let err = LinkInit::decode(Bytes::new()).unwrap_err();
    assert!(err.to_string().contains("LINK_INIT"), "{err}");
    let err = ConnOption::decode(Bytes::new()).unwrap_err();
    assert!(err.to_string().contains("CONN_OPTION"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// The pool extension of LINK_INIT and the extended LISTEN_STATE (docs/protocol.md §5).

fn extension() -> LinkExtension {
    LinkExtension {
        instance: InstanceId(std::array::from_fn(|i| i as u8 + 1)),
        keepalive_ms: 5000,
        state: ListenState {
            mode: ListenMode::Accepting,
            capacity: Some(Capacity {
                max_connections: 300,
                live_connections: 12,
            }),
        },
        features: None,
    }
}

#[test]
fn link_init_extension_round_trips_after_the_connections() {
    let v1 = sample_link_init(2);
    let li = LinkInit {
        extension: Some(extension()),
        ..v1.clone()
    };
    let wire = li.encode();
    assert_eq!(wire.len(), v1.encode().len() + LINK_EXTENSION_LEN);
    // The version-1 payload is a prefix: the extension is only appended.
    assert_eq!(&wire[..v1.encode().len()], &v1.encode()[..]);
    let tail = &wire[v1.encode().len()..];
    assert_eq!(&tail[..16], &extension().instance.0);
    assert_eq!(&tail[16..20], &5000u32.to_be_bytes());
    assert_eq!(tail[20], 1);
    assert_eq!(&tail[21..25], &300u32.to_be_bytes());
    assert_eq!(&tail[25..29], &12u32.to_be_bytes());
    assert_eq!(LinkInit::decode(wire).unwrap(), li);
    // Without the extension: a version-1 broker.
    assert_eq!(LinkInit::decode(v1.encode()).unwrap().extension, None);
}

#[test]
fn link_init_extension_cut_or_padded_is_rejected() {
    let li = LinkInit {
        extension: Some(extension()),
        ..sample_link_init(1)
    };
    let wire = li.encode();
    let v1_len = wire.len() - LINK_EXTENSION_LEN;
    // Every cut inside the extension is truncated (a cut at its start is version 1).
    for cut in v1_len + 1..wire.len() {
        assert!(
            matches!(
                LinkInit::decode(wire.slice(..cut)),
                Err(PayloadError::Truncated { .. })
            ),
            "cut at {cut}"
        );
    }
    // One more byte is the features byte (docs/protocol.md §5.2); two more are trailing.
    let mut padded = BytesMut::from(&wire[..]);
    padded.put_u8(0);
    padded.put_u8(0);
    assert_eq!(
        LinkInit::decode(padded.freeze()),
        Err(PayloadError::TrailingBytes {
            what: "LINK_INIT",
            extra: 1
        })
    );
    let mut bad_mode = BytesMut::from(&wire[..]);
    bad_mode[v1_len + 20] = 3;
    assert_eq!(
        LinkInit::decode(bad_mode.freeze()),
        Err(PayloadError::BadValue {
            what: "LINK_INIT",
            value: 3
        })
    );
}

#[test]
fn listen_state_has_a_one_byte_and_a_nine_byte_form() {
    let short = ListenState {
        mode: ListenMode::Accepting,
        capacity: None,
    };
    assert_eq!(&short.encode()[..], &[1]);
    assert_eq!(ListenState::decode(Bytes::from_static(&[1])), Ok(short));
    // The version-1 decoder reads the 1-byte form the same way.
    assert_eq!(decode_listen_state(short.encode()), Ok(true));
    let long = ListenState {
        mode: ListenMode::Draining,
        capacity: Some(Capacity {
            max_connections: 7,
            live_connections: 9,
        }),
    };
    let wire = long.encode();
    assert_eq!(&wire[..], &[2, 0, 0, 0, 7, 0, 0, 0, 9]);
    assert_eq!(wire.len(), LISTEN_STATE_EXTENDED_LEN);
    assert_eq!(ListenState::decode(wire.clone()), Ok(long));
    for cut in 2..wire.len() {
        assert!(
            matches!(
                ListenState::decode(wire.slice(..cut)),
                Err(PayloadError::Truncated { .. })
            ),
            "cut at {cut}"
        );
    }
    assert!(matches!(
        ListenState::decode(Bytes::new()),
        Err(PayloadError::Truncated { .. })
    ));
    assert!(matches!(
        ListenState::decode(Bytes::from_static(&[1, 0, 0, 0, 1, 0, 0, 0, 0, 0])),
        Err(PayloadError::TrailingBytes { extra: 1, .. })
    ));
    assert_eq!(
        ListenState::decode(Bytes::from_static(&[3])),
        Err(PayloadError::BadValue {
            what: "LISTEN_STATE",
            value: 3
        })
    );
}

#[test]
fn instance_ids_print_as_hex() {
    let id = extension().instance;
    assert_eq!(id.to_hex(), "0102030405060708090a0b0c0d0e0f10");
    assert_eq!(id.short(), "01020304");
    assert_eq!(InstanceId::from_hex(&id.to_hex()), Some(id));
    assert_eq!(InstanceId::from_hex("xyz"), None);
    assert_eq!(InstanceId::LEGACY.to_hex(), "0".repeat(32));
}

#[test]
fn session_messages_round_trip_and_reject() {
    let request = SessionRequest {
        idle_timeout_ms: 330_000,
    };
    assert_eq!(request.encode().len(), 4);
    assert_eq!(SessionRequest::decode(request.encode()).unwrap(), request);
    assert!(matches!(
        SessionRequest::decode(Bytes::from_static(&[0, 0, 1])),
        Err(PayloadError::Truncated { .. })
    ));
    assert!(matches!(
        SessionRequest::decode(Bytes::from_static(&[0, 0, 1, 0, 9])),
        Err(PayloadError::TrailingBytes { extra: 1, .. })
    ));

    let attach = Attach {
        token: token(3),
        server: "echo".into(),
    };
    let wire = attach.encode();
    assert_eq!(wire.len(), 16 + 2 + 4);
    assert_eq!(Attach::decode(wire.clone()).unwrap(), attach);
    for cut in 0..wire.len() {
        assert!(matches!(
            Attach::decode(wire.slice(..cut)),
            Err(PayloadError::Truncated { .. })
        ));
    }
    // An empty or over-long server name is refused.
    for len in [0usize, MAX_SERVER_NAME_LEN + 1] {
        let mut bad = BytesMut::new();
        bad.put_slice(&token(3).0);
        bad.put_u16(len as u16);
        bad.put_slice(&vec![b'a'; len]);
        assert!(matches!(
            Attach::decode(bad.freeze()),
            Err(PayloadError::BadLength { .. })
        ));
    }
    // The new packet types have their codes.
    assert_eq!(PacketType::from_code(14), Some(PacketType::SessionInit));
    assert_eq!(PacketType::from_code(15), Some(PacketType::Attach));
    assert_eq!(PacketType::from_code(16), Some(PacketType::ConnMove));
    assert_eq!(PacketType::from_code(17), None);
}

// ---------------------------------------------------------------------------------------------
// Relay pools: the features byte, LINK_INIT_ACK and CONN_MOVE (docs/protocol.md §5.2).

#[test]
fn the_features_byte_follows_the_extension_and_round_trips() {
    let li = LinkInit {
        extension: Some(LinkExtension {
            features: Some(LinkFeatures::MOVES),
            ..extension()
        }),
        ..sample_link_init(1)
    };
    let wire = li.encode();
    assert_eq!(wire[wire.len() - 1], 1);
    let back = LinkInit::decode(wire).unwrap();
    assert_eq!(back, li);
    assert!(back
        .extension
        .unwrap()
        .features
        .unwrap()
        .has(LinkFeatures::MOVES));
    // Unknown bits are kept, and do not claim moves.
    assert!(!LinkFeatures(2).has(LinkFeatures::MOVES));
}

#[test]
fn link_init_ack_is_empty_from_old_relays_and_two_bytes_from_new_ones() {
    assert_eq!(RelayHello::decode(Bytes::new()), Ok(RelayHello::default()));
    let hello = RelayHello {
        relay_id: 3,
        features: LinkFeatures::MOVES,
    };
    assert_eq!(&hello.encode()[..], &[3, 1]);
    assert_eq!(RelayHello::decode(hello.encode()), Ok(hello));
    assert!(matches!(
        RelayHello::decode(Bytes::from_static(&[3])),
        Err(PayloadError::Truncated { .. })
    ));
    assert!(matches!(
        RelayHello::decode(Bytes::from_static(&[3, 1, 0])),
        Err(PayloadError::TrailingBytes { .. })
    ));
}

#[test]
fn conn_move_request_and_answers_round_trip_and_reject_bad_input() {
    let request = MoveRequest {
        token: Token([7; 16]),
    };
    assert_eq!(request.encode().len(), 16);
    assert_eq!(MoveRequest::decode(request.encode()), Ok(request));
    assert!(MoveRequest::decode(Bytes::from_static(&[1; 15])).is_err());
    assert!(MoveRequest::decode(Bytes::from_static(&[1; 17])).is_err());

    let moved = MoveAnswer::Moved {
        token: Token([9; 16]),
        pull_period_ms: 250,
        client_window: 64,
    };
    let wire = moved.encode();
    assert_eq!(wire.len(), 23);
    assert_eq!(wire[0], 0);
    assert_eq!(MoveAnswer::decode(wire.clone()), Ok(moved));
    for cut in 1..wire.len() {
        assert!(matches!(
            MoveAnswer::decode(wire.slice(..cut)),
            Err(PayloadError::Truncated { .. })
        ));
    }
    assert_eq!(&MoveAnswer::Unknown.encode()[..], &[1]);
    assert_eq!(&MoveAnswer::Left.encode()[..], &[2]);
    assert_eq!(
        MoveAnswer::decode(Bytes::from_static(&[2])),
        Ok(MoveAnswer::Left)
    );
    assert!(matches!(
        MoveAnswer::decode(Bytes::from_static(&[1, 0])),
        Err(PayloadError::TrailingBytes { .. })
    ));
    assert_eq!(
        MoveAnswer::decode(Bytes::from_static(&[3])),
        Err(PayloadError::BadValue {
            what: "CONN_MOVE answer",
            value: 3
        })
    );
    assert!(MoveAnswer::decode(Bytes::new()).is_err());
}

/// `take_whole` hands out the whole packets buffered, back to back as they came, and keeps a
/// partial one for later; a bad header fails it only once the packets before it are taken.
#[test]
fn take_whole_hands_out_runs_of_whole_packets() {
    let packets = all_sample_packets();
    let body = encode_all(&packets);
    let first_two = packets[0].wire_len() + packets[1].wire_len();
    let mut d = Decoder::default();
    d.feed(&body[..first_two + 3]);
    let run = d.take_whole().unwrap();
    assert_eq!(
        &run[..],
        &body[..first_two],
        "the wire bytes of the whole packets"
    );
    assert_eq!(
        decode_all(run, DEFAULT_MAX_PACKET_SIZE).unwrap(),
        packets[..2]
    );
    assert!(d.take_whole().unwrap().is_empty(), "a partial packet waits");
    d.feed(&body[first_two + 3..]);
    let rest = d.take_whole().unwrap();
    assert_eq!(
        decode_all(rest, DEFAULT_MAX_PACKET_SIZE).unwrap(),
        packets[2..]
    );
    d.finish().unwrap();

    let mut d = Decoder::default();
    d.feed(&packets[0].to_bytes());
    d.feed(&[0xff; HEADER_LEN]);
    assert_eq!(d.take_whole().unwrap(), packets[0].to_bytes());
    assert!(matches!(d.take_whole(), Err(DecodeError::BadVersion(_))));
    assert!(d.take_whole().is_err(), "the stream stays failed");
}

#[test]
fn packet_parts_are_the_wire_bytes_and_share_long_payloads() {
    let long = Bytes::from((0..70_000u32).map(|i| (i % 253) as u8).collect::<Vec<_>>());
    let packets = vec![
        Packet::new(PacketType::Ack, 3, Bytes::new()).with_seq(9),
        Packet::new(PacketType::Data, 3, Bytes::from_static(b"short")).with_seq(10),
        Packet::new(PacketType::Data, 3, long.slice(..4096)).with_seq(11),
        Packet::new(PacketType::Data, 4, long.clone()).with_seq(1),
        Packet::new(PacketType::ConnClose, 4, Bytes::new()).with_seq(2),
        Packet::new(PacketType::Data, 5, long.slice(100..4095)).with_seq(1),
    ];
    let mut parts = PacketParts::new();
    assert!(parts.is_empty());
    for p in &packets {
        parts.push(p);
    }
    let whole = encode_all(&packets);
    assert_eq!(parts.len(), whole.len());
    let parts = parts.into_parts();
    assert!(parts.iter().all(|p| !p.is_empty()));
    assert_eq!(
        parts.concat(),
        whole.to_vec(),
        "the same bytes as encode_all"
    );
    // Payloads from 4 KiB up are their own parts, pointing into the sender's buffer.
    let shared: Vec<_> = parts
        .iter()
        .filter(|p| p.as_ptr() >= long.as_ptr() && p.as_ptr() < long[long.len()..].as_ptr())
        .map(|p| p.len())
        .collect();
    assert_eq!(shared, [4096, 70_000], "the 4095-byte payload is copied");
    assert_eq!(parts.len(), 5, "header, payload, header, payload, the rest");
    assert_eq!(
        decode_all(Bytes::from(parts.concat()), DEFAULT_MAX_PACKET_SIZE).unwrap(),
        packets
    );
}

#[test]
fn packet_parts_pass_encoded_packets_on_and_share_the_long_ones() {
    let long = Packet::new(PacketType::Data, 3, Bytes::from(vec![0x5a; 20_000])).with_seq(4);
    let ack = Packet::new(PacketType::Ack, 3, Bytes::new()).with_seq(7);
    let long_wire = long.to_bytes();
    let mut parts = PacketParts::new();
    parts.push(&ack);
    parts.push_encoded(ack.to_bytes());
    parts.push_encoded(long_wire.clone());
    parts.push_encoded(ack.to_bytes());
    let expected = encode_all(&[ack.clone(), ack.clone(), long.clone(), ack.clone()]);
    assert_eq!(parts.len(), expected.len());
    let list = parts.into_parts();
    assert_eq!(
        list.len(),
        3,
        "the two short ones together, the long one, the last one"
    );
    assert_eq!(
        list[1].as_ptr(),
        long_wire.as_ptr(),
        "the long packet is the bytes it came in"
    );
    assert_eq!(list.concat(), expected.to_vec());

    // As one buffer: the same bytes; a lone buffer is handed on without a copy.
    let mut parts = PacketParts::new();
    parts.push_encoded(ack.to_bytes());
    parts.push_encoded(long_wire.clone());
    assert_eq!(parts.into_bytes(), encode_all(&[ack.clone(), long.clone()]));
    let mut lone = PacketParts::new();
    lone.push_encoded(long_wire.clone());
    assert_eq!(lone.into_bytes().as_ptr(), long_wire.as_ptr());
    assert!(PacketParts::new().into_bytes().is_empty());

    // As a body of several buffers: the same bytes, read as one `Buf`.
    let mut parts = PacketParts::new();
    parts.push_encoded(ack.to_bytes());
    parts.push_encoded(long_wire.clone());
    let mut body = tunnel_proto::chunks::Chunks::from(parts);
    assert_eq!(body.count(), 2);
    assert_eq!(
        body.copy_to_bytes(body.remaining()),
        encode_all(&[ack, long])
    );
}

#[test]
fn feed_bytes_hands_out_whole_packets_as_slices_of_the_chunk() {
    let packets: Vec<Packet> = (0..6u32)
        .map(|i| {
            let payload: Vec<u8> = (0..10_000 + i).map(|b| (b % 251) as u8).collect();
            Packet::new(PacketType::Data, 5, Bytes::from(payload)).with_seq(i)
        })
        .collect();
    let wire = encode_all(&packets);
    // Three chunks: the cuts fall inside the second and the fifth packet.
    let cuts = [0, 15_000, 45_000, wire.len()];
    let mut decoder = Decoder::default();
    let mut got = Vec::new();
    let mut sliced = 0;
    for pair in cuts.windows(2) {
        let chunk = wire.slice(pair[0]..pair[1]);
        let range = chunk.as_ptr() as usize..chunk.as_ptr() as usize + chunk.len();
        decoder.feed_bytes(chunk);
        while let Some(packet) = decoder.next_packet().unwrap() {
            if range.contains(&(packet.payload.as_ptr() as usize)) {
                sliced += 1;
            }
            got.push(packet);
        }
    }
    decoder.finish().unwrap();
    assert_eq!(got, packets);
    assert_eq!(sliced, 4, "the packets no cut falls in are not copied");
    assert_eq!(decoder.buffered(), 0);
}
