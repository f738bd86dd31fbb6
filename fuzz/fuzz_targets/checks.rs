//! The properties the fuzz targets check, shared with the corpus replay test
//! (`tunnel-proto/tests/fuzz_corpus.rs` includes this file), so a crash kept in the corpus or
//! in `fuzz/regressions/` is re-checked by `cargo test` exactly as the fuzzer checked it.

use bytes::Bytes;
use tunnel_proto::codec::{decode_all, encode_all, Decoder};
use tunnel_proto::error::DecodeError;
use tunnel_proto::packet::Packet;
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

    // The Decoder fed by copy (`feed`, as the broker link's reads are) and fed the chunks
    // themselves (`feed_bytes`, as HTTP bodies are): the same packets and the same error.
    let (streamed, stream_err) = stream_decode(body, chunk, max, false);
    let by_chunks = stream_decode(body, chunk, max, true);
    assert_eq!(
        by_chunks,
        (streamed.clone(), stream_err.clone()),
        "feed_bytes and feed disagree"
    );

    // The third way, as a streamed upstream reads a request body: whole packets taken from
    // the decoder in runs (`take_whole`), each run decoded with `decode_all`; fed both ways.
    for feed_bytes in [false, true] {
        let (batched, batch_err) = runs_decode(body, chunk, max, feed_bytes);
        assert_eq!(
            batch_err, stream_err,
            "take_whole and next_packet disagree on the error"
        );
        if batch_err.is_none() {
            assert_eq!(batched, streamed, "take_whole and next_packet disagree");
        }
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

/// Feeds `body` to a Decoder `chunk` bytes at a time and, after each piece, takes what `take`
/// gives until it gives nothing: what it took, and the error that ended the stream, if any.
/// With `sticky`, an error of `take` must come again on the next call.
fn decode_in_pieces(
    body: &[u8],
    chunk: usize,
    max: usize,
    feed_bytes: bool,
    sticky: bool,
    take: impl Fn(&mut Decoder) -> Result<Vec<Packet>, DecodeError>,
) -> (Vec<Packet>, Option<DecodeError>) {
    let mut decoder = Decoder::new(max);
    let mut packets = Vec::new();
    for piece in body.chunks(chunk) {
        feed(&mut decoder, piece, feed_bytes);
        loop {
            match take(&mut decoder) {
                Ok(taken) if taken.is_empty() => break,
                Ok(taken) => packets.extend(taken),
                Err(e) => {
                    if sticky {
                        assert_eq!(take(&mut decoder), Err(e.clone()), "decoder revived");
                    }
                    return (packets, Some(e));
                }
            }
        }
    }
    (packets, decoder.finish().err())
}

/// One packet at a time, as the client reads a streamed pull.
fn stream_decode(
    body: &[u8],
    chunk: usize,
    max: usize,
    feed_bytes: bool,
) -> (Vec<Packet>, Option<DecodeError>) {
    decode_in_pieces(body, chunk, max, feed_bytes, true, |d| {
        d.next_packet().map(|p| p.into_iter().collect())
    })
}

/// Whole packets in runs (`take_whole`), each decoded with `decode_all`, as the relay reads
/// a streamed upstream.
fn runs_decode(
    body: &[u8],
    chunk: usize,
    max: usize,
    feed_bytes: bool,
) -> (Vec<Packet>, Option<DecodeError>) {
    decode_in_pieces(body, chunk, max, feed_bytes, false, |d| {
        d.take_whole().and_then(|run| decode_all(run, max))
    })
}

fn feed(decoder: &mut Decoder, piece: &[u8], feed_bytes: bool) {
    if feed_bytes {
        decoder.feed_bytes(Bytes::copy_from_slice(piece));
    } else {
        decoder.feed(piece);
    }
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
