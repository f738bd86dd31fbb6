//! Property tests of the codec: encoding then decoding is the identity, however the bytes are
//! split, and no input whatever makes a decoder panic.
//!
//! Case counts follow proptest's defaults; `PROPTEST_CASES=10000` runs more.

use bytes::Bytes;
use proptest::collection::vec;
use proptest::prelude::*;
use tunnel_proto::codec::{decode_all, encode_all, Decoder};
use tunnel_proto::error::DecodeError;
use tunnel_proto::packet::{Packet, PacketType, DEFAULT_MAX_PACKET_SIZE, HEADER_LEN};
use tunnel_proto::payload::{
    decode_listen_state, decode_reason, decode_sack, decode_token, encode_sack, AnnouncedConn,
    BrokerConnInit, ConnOption, LinkInit, SackBlock, Token, MAX_CLIENT_ADDR_LEN,
    MAX_LINK_SECRET_LEN, MAX_SACK_BLOCKS,
};

fn arb_kind() -> impl Strategy<Value = PacketType> {
    proptest::sample::select(PacketType::ALL.to_vec())
}

fn arb_packet() -> impl Strategy<Value = Packet> {
    (
        arb_kind(),
        any::<u32>(),
        any::<u32>(),
        any::<u16>(),
        any::<u16>(),
        // Mostly small payloads, sometimes a few KB.
        prop_oneof![4 => vec(any::<u8>(), 0..64), 1 => vec(any::<u8>(), 0..8192)],
    )
        .prop_map(|(kind, conn_id, seq, window, flags, payload)| Packet {
            kind,
            conn_id,
            seq,
            window,
            flags,
            payload: Bytes::from(payload),
        })
}

/// Splits `bytes` into consecutive chunks whose lengths cycle through `sizes` (each >= 1).
fn chunks<'a>(bytes: &'a [u8], sizes: &[usize]) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    let mut at = 0;
    let mut i = 0;
    while at < bytes.len() {
        let n = sizes[i % sizes.len()].min(bytes.len() - at);
        out.push(&bytes[at..at + n]);
        at += n;
        i += 1;
    }
    out
}

/// Feeds `bytes` to a fresh decoder in the given chunks and returns what it produced: the
/// packets up to the first error, and the error (a cut-off packet at the end included).
fn stream_decode(bytes: &[u8], sizes: &[usize], max: usize) -> (Vec<Packet>, Option<DecodeError>) {
    let mut d = Decoder::new(max);
    let mut out = Vec::new();
    for chunk in chunks(bytes, sizes) {
        d.feed(chunk);
        loop {
            match d.next_packet() {
                Ok(Some(p)) => out.push(p),
                Ok(None) => break,
                Err(e) => {
                    // A failed decoder stays failed.
                    assert_eq!(d.next_packet(), Err(e.clone()));
                    assert_eq!(d.finish(), Err(e.clone()));
                    return (out, Some(e));
                }
            }
        }
        // An incomplete packet always asks for at least one more byte.
        assert_eq!(d.wanted() == 0, d.buffered() == 0);
    }
    (out, d.finish().err())
}

/// The same for `decode_all`: all packets or the first error. (`decode_all` returns no
/// packets with an error, so only the error is compared.)
fn whole_decode(bytes: &[u8], max: usize) -> Result<Vec<Packet>, DecodeError> {
    decode_all(Bytes::copy_from_slice(bytes), max)
}

fn arb_split() -> impl Strategy<Value = Vec<usize>> {
    vec(1usize..300, 1..16)
}

/// A valid stream with some bytes overwritten: reaches the checks past the version field
/// far more often than random bytes.
fn arb_mutated_stream() -> impl Strategy<Value = Vec<u8>> {
    (
        vec(arb_packet(), 1..5),
        vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
        any::<prop::sample::Index>(),
        any::<bool>(),
    )
        .prop_map(|(packets, edits, cut, do_cut)| {
            let mut bytes = encode_all(&packets).to_vec();
            for (at, value) in edits {
                let i = at.index(bytes.len());
                bytes[i] = value;
            }
            if do_cut {
                bytes.truncate(cut.index(bytes.len() + 1));
            }
            bytes
        })
}

fn arb_token() -> impl Strategy<Value = Token> {
    any::<[u8; 16]>().prop_map(Token)
}

fn arb_link_init() -> impl Strategy<Value = LinkInit> {
    (
        "[a-zA-Z0-9._-]{1,255}",
        vec(any::<u8>(), 0..=MAX_LINK_SECRET_LEN),
        vec(
            (any::<u32>(), arb_token(), any::<u32>(), any::<u16>()).prop_map(
                |(conn_id, token, pull_period_ms, client_window)| AnnouncedConn {
                    conn_id,
                    token,
                    pull_period_ms,
                    client_window,
                },
            ),
            0..40,
        ),
    )
        .prop_map(|(server_name, secret, connections)| LinkInit {
            extension: None,
            server_name,
            secret: Bytes::from(secret),
            connections,
        })
}

fn arb_conn_option() -> impl Strategy<Value = ConnOption> {
    prop_oneof![
        any::<u32>().prop_map(ConnOption::PullPeriodMs),
        any::<u32>().prop_map(ConnOption::InactivityTimeoutMs),
        (
            any::<u32>().prop_filter("known option", |o| *o != 1 && *o != 2),
            any::<u32>()
        )
            .prop_map(|(option, value)| ConnOption::Unknown { option, value }),
    ]
}

/// Runs every payload decoder on `bytes`; they may fail but never panic.
fn decode_every_payload(bytes: &[u8]) {
    let b = Bytes::copy_from_slice(bytes);
    if let Ok(li) = LinkInit::decode(b.clone()) {
        // Whatever decodes re-encodes to the same bytes.
        assert_eq!(li.encode(), b);
    }
    if let Ok(init) = BrokerConnInit::decode(b.clone()) {
        assert_eq!(init.encode(), b);
    }
    if let Ok(opt) = ConnOption::decode(b.clone()) {
        assert_eq!(opt.encode(), b);
    }
    if let Ok(state) = decode_listen_state(b.clone()) {
        assert_eq!(&b[..], &[u8::from(state)]);
    }
    if let Ok(blocks) = decode_sack(b.clone()) {
        assert!(blocks.len() <= MAX_SACK_BLOCKS);
        assert_eq!(blocks.len(), (b.len() / 8).min(MAX_SACK_BLOCKS));
    }
    if let Ok(t) = decode_token(b.clone()) {
        assert_eq!(&t.0[..], &b[..]);
    }
    let reason = decode_reason(&b);
    assert!(reason.len() <= 1024 * 3, "reason grew to {}", reason.len());
    if let Ok(s) = std::str::from_utf8(bytes) {
        let _ = Token::from_hex(s);
    }
}

proptest! {
    #[test]
    fn encode_then_decode_all_is_identity(packets in vec(arb_packet(), 0..8)) {
        let body = encode_all(&packets);
        prop_assert_eq!(body.len(), packets.iter().map(Packet::wire_len).sum::<usize>());
        prop_assert_eq!(decode_all(body, DEFAULT_MAX_PACKET_SIZE).unwrap(), packets);
    }

    #[test]
    fn encode_then_stream_decode_is_identity_for_any_split(
        packets in vec(arb_packet(), 0..8),
        split in arb_split(),
    ) {
        let body = encode_all(&packets);
        let (decoded, err) = stream_decode(&body, &split, DEFAULT_MAX_PACKET_SIZE);
        prop_assert_eq!(err, None);
        prop_assert_eq!(decoded, packets);
    }

    #[test]
    fn single_packet_round_trips_through_to_bytes(p in arb_packet()) {
        let wire = p.to_bytes();
        prop_assert_eq!(wire.len(), p.wire_len());
        let mut d = Decoder::default();
        d.feed(&wire);
        prop_assert_eq!(d.next_packet().unwrap(), Some(p));
        prop_assert_eq!(d.buffered(), 0);
    }

    /// Random bytes: never a panic, and the streaming and whole-body decoders agree on the
    /// outcome however the stream is split.
    #[test]
    fn random_bytes_never_panic(
        bytes in vec(any::<u8>(), 0..2048),
        split in arb_split(),
        max in prop_oneof![Just(DEFAULT_MAX_PACKET_SIZE), HEADER_LEN..2048usize],
    ) {
        let (streamed, stream_err) = stream_decode(&bytes, &split, max);
        match whole_decode(&bytes, max) {
            Ok(all) => {
                prop_assert_eq!(stream_err, None);
                prop_assert_eq!(streamed, all);
            }
            Err(e) => prop_assert_eq!(stream_err, Some(e)),
        }
    }

    #[test]
    fn mutated_streams_never_panic_and_decoders_agree(
        bytes in arb_mutated_stream(),
        split in arb_split(),
        max in prop_oneof![Just(DEFAULT_MAX_PACKET_SIZE), HEADER_LEN..4096usize],
    ) {
        let (streamed, stream_err) = stream_decode(&bytes, &split, max);
        match whole_decode(&bytes, max) {
            Ok(all) => {
                prop_assert_eq!(stream_err, None);
                // Every accepted packet re-encodes to the very bytes it came from.
                prop_assert_eq!(&encode_all(&all)[..], &bytes[..]);
                prop_assert_eq!(streamed, all);
            }
            Err(e) => prop_assert_eq!(stream_err, Some(e)),
        }
    }

    #[test]
    fn random_payloads_never_panic(bytes in vec(any::<u8>(), 0..600)) {
        decode_every_payload(&bytes);
    }

    #[test]
    fn mutated_link_inits_never_panic(
        li in arb_link_init(),
        edits in vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut bytes = li.encode().to_vec();
        for (at, value) in edits {
            let i = at.index(bytes.len());
            bytes[i] = value;
        }
        decode_every_payload(&bytes);
        bytes.truncate(cut.index(bytes.len() + 1));
        decode_every_payload(&bytes);
    }

    #[test]
    fn link_init_round_trips(li in arb_link_init()) {
        prop_assert_eq!(LinkInit::decode(li.encode()).unwrap(), li);
    }

    #[test]
    fn conn_option_round_trips(opt in arb_conn_option()) {
        let wire = opt.encode();
        prop_assert_eq!(wire.len(), 8);
        prop_assert_eq!(ConnOption::decode(wire).unwrap(), opt);
    }

    #[test]
    fn broker_conn_init_round_trips(token in arb_token(), addr in "\\PC{0,80}") {
        let init = BrokerConnInit { token, client_addr: addr.clone() };
        let decoded = BrokerConnInit::decode(init.encode()).unwrap();
        prop_assert_eq!(decoded.token, token);
        if addr.len() <= MAX_CLIENT_ADDR_LEN {
            prop_assert_eq!(decoded.client_addr, addr);
        } else {
            // Over-long addresses are cut on a char boundary.
            prop_assert!(decoded.client_addr.len() <= MAX_CLIENT_ADDR_LEN);
            prop_assert!(addr.starts_with(&decoded.client_addr));
        }
    }

    #[test]
    fn sack_round_trips(blocks in vec((any::<u32>(), any::<u32>()), 0..=MAX_SACK_BLOCKS)) {
        let blocks: Vec<SackBlock> =
            blocks.into_iter().map(|(first, last)| SackBlock { first, last }).collect();
        prop_assert_eq!(decode_sack(encode_sack(&blocks)).unwrap(), blocks);
    }

    #[test]
    fn token_hex_round_trips(token in arb_token()) {
        prop_assert_eq!(Token::from_hex(&token.to_hex()), Some(token));
        prop_assert_eq!(Token::from_hex(&token.to_hex().to_uppercase()), Some(token));
    }

    #[test]
    fn token_from_hex_never_panics(s in "\\PC{0,40}") {
        if let Some(t) = Token::from_hex(&s) {
            prop_assert_eq!(t.to_hex(), s.to_lowercase());
        }
    }
}
