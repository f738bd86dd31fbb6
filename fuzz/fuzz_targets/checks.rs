//! The properties the fuzz targets check, shared with the corpus replay test
//! (`tunnel-proto/tests/fuzz_corpus.rs` includes this file), so a crash kept in the corpus or
//! in `fuzz/regressions/` is re-checked by `cargo test` exactly as the fuzzer checked it.

use bytes::Bytes;
use tunnel_proto::codec::{decode_all, encode_all, Decoder};
use tunnel_proto::packet::HEADER_LEN;
use tunnel_proto::payload::{
    decode_listen_state, decode_reason, decode_sack, decode_token, encode_listen_state,
    encode_sack, encode_token, Attach, BrokerConnInit, ConnOption, LinkInit, ListenMode,
    ListenState, MoveAnswer, MoveRequest, RelayHello, SessionRequest, Token, MAX_SACK_BLOCKS,
    MAX_SERVER_NAME_LEN,
};

/// Input layout: byte 0 = chunk size for the streaming decoder (0 read as 1), byte 1 = packet
/// size limit in 16-byte steps above the header (small limits reach the size checks with
/// short inputs), then the body.
pub fn check_packets(data: &[u8]) {
    let (chunk, max, body) = match data {
        [c, m, rest @ ..] => (
            usize::from(*c).max(1),
            HEADER_LEN + usize::from(*m) * 16,
            rest,
        ),
        _ => return,
    };

    let whole = decode_all(Bytes::copy_from_slice(body), max);

    let mut decoder = Decoder::new(max);
    let mut streamed = Vec::new();
    let mut stream_err = None;
    'feed: for piece in body.chunks(chunk) {
        decoder.feed(piece);
        loop {
            match decoder.next_packet() {
                Ok(Some(p)) => streamed.push(p),
                Ok(None) => break,
                Err(e) => {
                    assert_eq!(decoder.next_packet(), Err(e.clone()), "decoder revived");
                    stream_err = Some(e);
                    break 'feed;
                }
            }
        }
    }
    if stream_err.is_none() {
        stream_err = decoder.finish().err();
    }

    // The third way, as a streamed upstream reads a request body: whole packets taken from
    // the decoder in runs (`take_whole`), each run decoded with `decode_all`.
    let mut runs = Decoder::new(max);
    let mut batched = Vec::new();
    let mut batch_err = None;
    'runs: for piece in body.chunks(chunk) {
        runs.feed(piece);
        loop {
            match runs.take_whole().and_then(|run| decode_all(run, max)) {
                Ok(packets) if packets.is_empty() => break,
                Ok(packets) => batched.extend(packets),
                Err(e) => {
                    batch_err = Some(e);
                    break 'runs;
                }
            }
        }
    }
    if batch_err.is_none() {
        batch_err = runs.finish().err();
    }
    assert_eq!(
        batch_err, stream_err,
        "take_whole and next_packet disagree on the error"
    );
    if batch_err.is_none() {
        assert_eq!(batched, streamed, "take_whole and next_packet disagree");
    }

    match whole {
        Ok(packets) => {
            assert_eq!(
                stream_err, None,
                "decode_all accepted what the Decoder rejected"
            );
            assert_eq!(streamed, packets, "decoders disagree");
            assert_eq!(&encode_all(&packets)[..], body, "re-encoding differs");
        }
        Err(e) => assert_eq!(stream_err, Some(e), "decoders disagree on the error"),
    }
    // Whatever the streaming decoder accepted before an error re-encodes to a prefix.
    let prefix = encode_all(&streamed);
    assert_eq!(&prefix[..], &body[..prefix.len()], "re-encoding differs");
}

/// The broker link's own messages, the handshake and the capacity/listen state (LINK_INIT with
/// and without its pool extension and features byte, LINK_INIT_ACK, LISTEN_STATE in its 1- and
/// 9-byte forms, CONN_MOVE both ways): no panic, and whatever decodes re-encodes to the same
/// bytes.
pub fn check_link(data: &[u8]) {
    let b = Bytes::copy_from_slice(data);
    if let Ok(li) = LinkInit::decode(b.clone()) {
        assert_eq!(li.encode(), b);
    }
    if let Ok(hello) = RelayHello::decode(b.clone()) {
        // The empty payload of an older relay decodes as id 0 without features.
        if !b.is_empty() {
            assert_eq!(hello.encode(), b);
        }
    }
    if let Ok(request) = MoveRequest::decode(b.clone()) {
        assert_eq!(request.encode(), b);
    }
    if let Ok(answer) = MoveAnswer::decode(b.clone()) {
        assert_eq!(answer.encode(), b);
    }
    if let Ok(accepting) = decode_listen_state(b.clone()) {
        assert_eq!(encode_listen_state(accepting), b);
    }
    if let Ok(state) = ListenState::decode(b.clone()) {
        assert_eq!(state.encode(), b);
        // The 1-byte form is the version-1 payload: both decoders agree on it.
        if b.len() == 1 {
            if let Ok(accepting) = decode_listen_state(b.clone()) {
                assert_eq!(accepting, state.mode == ListenMode::Accepting);
            }
        }
    }
}

/// The session's own messages (docs/protocol.md §2.1): the SESSION_INIT request and ATTACH.
/// No panic, whatever decodes re-encodes to the same bytes, and an ATTACH's server name is
/// within its bounds.
pub fn check_session(data: &[u8]) {
    let b = Bytes::copy_from_slice(data);
    if let Ok(request) = SessionRequest::decode(b.clone()) {
        assert_eq!(request.encode(), b);
    }
    if let Ok(attach) = Attach::decode(b.clone()) {
        assert!(!attach.server.is_empty() && attach.server.len() <= MAX_SERVER_NAME_LEN);
        assert_eq!(attach.encode(), b);
    }
}

/// Every payload decoder (LINK_INIT with and without its pool extension, LISTEN_STATE in both
/// forms, ...) on the whole input: no panic, and whatever decodes re-encodes to the
/// same bytes (each format has exactly one encoding).
pub fn check_payloads(data: &[u8]) {
    check_link(data);
    check_session(data);
    let b = Bytes::copy_from_slice(data);
    if let Ok(init) = BrokerConnInit::decode(b.clone()) {
        assert_eq!(init.encode(), b);
    }
    if let Ok(option) = ConnOption::decode(b.clone()) {
        assert_eq!(option.encode(), b);
    }
    if let Ok(blocks) = decode_sack(b.clone()) {
        assert!(blocks.len() <= MAX_SACK_BLOCKS);
        let n = blocks.len() * 8;
        assert_eq!(encode_sack(&blocks), b.slice(..n));
    }
    if let Ok(token) = decode_token(b.clone()) {
        assert_eq!(encode_token(&token), b);
        assert_eq!(Token::from_hex(&token.to_hex()), Some(token));
    }
    let reason = decode_reason(data);
    assert!(reason.chars().count() <= 1024);
    if let Ok(s) = std::str::from_utf8(data) {
        if let Some(token) = Token::from_hex(s) {
            assert_eq!(token.to_hex(), s.to_ascii_lowercase());
        }
    }
}
