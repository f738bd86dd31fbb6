//! Typed payloads: what CONN_INIT, LINK_INIT, LISTEN_STATE, CONN_OPTION, ACK and the reason
//! carrying packets hold (docs/protocol.md §3–§6). Each has an `encode` to `Bytes` and a
//! `decode` from the payload that rejects truncated, oversized or trailing input with a
//! [`PayloadError`]; only reasons are read leniently (docs/protocol.md §1).

use std::fmt;

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::error::PayloadError;

/// Length of a connection token, in bytes (128 bits).
pub const TOKEN_LEN: usize = 16;
/// Longest server name a broker may register, in bytes of UTF-8 (at least 1).
pub const MAX_SERVER_NAME_LEN: usize = 255;
/// Longest link secret accepted in LINK_INIT, in bytes (it may be empty).
pub const MAX_LINK_SECRET_LEN: usize = 1024;
/// Longest client address carried to the broker, in bytes of UTF-8; a longer one is cut on a
/// character boundary.
pub const MAX_CLIENT_ADDR_LEN: usize = 256;

/// The 128-bit per-connection secret, drawn by the relay from a cryptographic generator at
/// connect time (docs/protocol.md §3) and required on every push and pull. Its `Debug` output
/// never shows the value, so tokens do not end up in logs by accident.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Token(pub [u8; TOKEN_LEN]);

impl Token {
    /// The 32 lowercase hex digits carried in the `Tunnel-Token` header.
    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(TOKEN_LEN * 2);
        for b in self.0 {
            s.push(char::from_digit(u32::from(b >> 4), 16).unwrap_or('0'));
            s.push(char::from_digit(u32::from(b & 0xf), 16).unwrap_or('0'));
        }
        s
    }

    /// Parses exactly 32 hex digits (either case).
    pub fn from_hex(s: &str) -> Option<Token> {
        let s = s.as_bytes();
        if s.len() != TOKEN_LEN * 2 {
            return None;
        }
        let mut out = [0u8; TOKEN_LEN];
        for (i, pair) in s.chunks_exact(2).enumerate() {
            let hi = (pair[0] as char).to_digit(16)?;
            let lo = (pair[1] as char).to_digit(16)?;
            out[i] = (hi * 16 + lo) as u8;
        }
        Some(Token(out))
    }

    /// Compares without an early exit, so the time taken does not reveal how many leading
    /// bytes matched.
    pub fn ct_eq(&self, other: &Token) -> bool {
        let mut diff = 0u8;
        for (a, b) in self.0.iter().zip(other.0.iter()) {
            diff |= a ^ b;
        }
        diff == 0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// A cursor over a payload that turns running out of bytes into [`PayloadError::Truncated`].
struct Reader {
    what: &'static str,
    buf: Bytes,
}

impl Reader {
    fn new(what: &'static str, buf: Bytes) -> Reader {
        Reader { what, buf }
    }

    fn need(&self, n: usize) -> Result<(), PayloadError> {
        if self.buf.len() < n {
            Err(PayloadError::Truncated {
                what: self.what,
                needed: n - self.buf.len(),
            })
        } else {
            Ok(())
        }
    }

    fn u8(&mut self) -> Result<u8, PayloadError> {
        self.need(1)?;
        Ok(self.buf.get_u8())
    }

    fn u16(&mut self) -> Result<u16, PayloadError> {
        self.need(2)?;
        Ok(self.buf.get_u16())
    }

    fn u32(&mut self) -> Result<u32, PayloadError> {
        self.need(4)?;
        Ok(self.buf.get_u32())
    }

    fn bytes(&mut self, n: usize) -> Result<Bytes, PayloadError> {
        self.need(n)?;
        Ok(self.buf.split_to(n))
    }

    fn token(&mut self) -> Result<Token, PayloadError> {
        Ok(Token(self.array()?))
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], PayloadError> {
        let b = self.bytes(N)?;
        let mut t = [0u8; N];
        t.copy_from_slice(&b);
        Ok(t)
    }

    /// A u16 length followed by that many bytes, the length within `min..=max`.
    fn prefixed(&mut self, min: usize, max: usize) -> Result<Bytes, PayloadError> {
        let len = usize::from(self.u16()?);
        if len < min || len > max {
            return Err(PayloadError::BadLength {
                what: self.what,
                len,
                min,
                max,
            });
        }
        self.bytes(len)
    }

    fn prefixed_str(&mut self, min: usize, max: usize) -> Result<String, PayloadError> {
        let b = self.prefixed(min, max)?;
        String::from_utf8(b.to_vec()).map_err(|_| PayloadError::BadUtf8 { what: self.what })
    }

    fn end(self) -> Result<(), PayloadError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(PayloadError::TrailingBytes {
                what: self.what,
                extra: self.buf.len(),
            })
        }
    }
}

fn put_prefixed(out: &mut BytesMut, b: &[u8]) {
    out.put_u16(b.len() as u16);
    out.put_slice(b);
}

/// Payload of the CONN_INIT the relay sends back to the client: the token.
pub fn encode_token(token: &Token) -> Bytes {
    Bytes::copy_from_slice(&token.0)
}

/// Reads the token from the client's CONN_INIT answer: exactly [`TOKEN_LEN`] bytes.
pub fn decode_token(payload: Bytes) -> Result<Token, PayloadError> {
    let mut r = Reader::new("CONN_INIT token", payload);
    let t = r.token()?;
    r.end()?;
    Ok(t)
}

/// Payload of the CONN_INIT the relay forwards to the broker: token, then a u16-prefixed
/// client address (docs/protocol.md §3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerConnInit {
    /// The token the relay assigned to the connection; the broker announces it again in the
    /// LINK_INIT of every redial.
    pub token: Token,
    /// The client's address as the relay saw it: the first `X-Forwarded-For` entry if present,
    /// otherwise the TCP peer address. At most [`MAX_CLIENT_ADDR_LEN`] bytes on the wire.
    pub client_addr: String,
}

impl BrokerConnInit {
    /// The wire payload; a `client_addr` over [`MAX_CLIENT_ADDR_LEN`] bytes is cut on a
    /// character boundary.
    pub fn encode(&self) -> Bytes {
        let addr = truncate_utf8(&self.client_addr, MAX_CLIENT_ADDR_LEN);
        let mut out = BytesMut::with_capacity(TOKEN_LEN + 2 + addr.len());
        out.put_slice(&self.token.0);
        put_prefixed(&mut out, addr.as_bytes());
        out.freeze()
    }

    /// Parses the payload; rejects an address longer than [`MAX_CLIENT_ADDR_LEN`] bytes or
    /// not UTF-8, and truncated or trailing input.
    pub fn decode(payload: Bytes) -> Result<BrokerConnInit, PayloadError> {
        let mut r = Reader::new("CONN_INIT to broker", payload);
        let token = r.token()?;
        let client_addr = r.prefixed_str(0, MAX_CLIENT_ADDR_LEN)?;
        r.end()?;
        Ok(BrokerConnInit { token, client_addr })
    }
}

/// Payload of the client's SESSION_INIT (docs/protocol.md §2.1): the idle timeout the client
/// asks the relay to keep its session for, in milliseconds; 0 means the relay's default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionRequest {
    /// Asked idle timeout in ms; the relay caps it at its maximum.
    pub idle_timeout_ms: u32,
}

impl SessionRequest {
    /// The wire payload: one u32.
    pub fn encode(&self) -> Bytes {
        Bytes::copy_from_slice(&self.idle_timeout_ms.to_be_bytes())
    }

    /// Parses the payload: exactly 4 bytes.
    pub fn decode(payload: Bytes) -> Result<SessionRequest, PayloadError> {
        let mut r = Reader::new("SESSION_INIT request", payload);
        let idle_timeout_ms = r.u32()?;
        r.end()?;
        Ok(SessionRequest { idle_timeout_ms })
    }
}

/// Payload of a client's ATTACH (docs/protocol.md §2.1): the connection's token and its
/// server name, which proves the client owns the connection and tells the relay which
/// brokers' re-announcements to wait for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attach {
    /// The connection's token, as the relay gave it in the connect answer.
    pub token: Token,
    /// The server name the connection was opened to, 1 ..= [`MAX_SERVER_NAME_LEN`] bytes.
    pub server: String,
}

impl Attach {
    /// The wire payload: token, then the u16-prefixed server name.
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(TOKEN_LEN + 2 + self.server.len());
        out.put_slice(&self.token.0);
        put_prefixed(&mut out, self.server.as_bytes());
        out.freeze()
    }

    /// Parses the payload; rejects a server name that is empty, too long or not UTF-8, and
    /// truncated or trailing input.
    pub fn decode(payload: Bytes) -> Result<Attach, PayloadError> {
        let mut r = Reader::new("ATTACH", payload);
        let token = r.token()?;
        let server = r.prefixed_str(1, MAX_SERVER_NAME_LEN)?;
        r.end()?;
        Ok(Attach { token, server })
    }
}

/// One connection a broker still holds, announced in LINK_INIT so the relay can re-install it.
/// On the wire it takes 26 bytes (docs/protocol.md §5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnnouncedConn {
    /// The id the relay assigned to the connection (non-zero).
    pub conn_id: u32,
    /// The connection's token, as received in the relay's CONN_INIT.
    pub token: Token,
    /// Pull period last set by CONN_OPTION 1, in milliseconds; 0 means continuous long-poll.
    pub pull_period_ms: u32,
    /// The client's receive window from its CONN_INIT, in packets.
    pub client_window: u16,
}

const ANNOUNCED_CONN_LEN: usize = 4 + TOKEN_LEN + 4 + 2;

/// Payload of LINK_INIT (broker → relay), the first packet on a link (docs/protocol.md §5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInit {
    /// The name clients connect to (`ServerName`), 1 ..= [`MAX_SERVER_NAME_LEN`] bytes.
    pub server_name: String,
    /// The link secret the relay compares with its own, 0 ..= [`MAX_LINK_SECRET_LEN`] bytes.
    pub secret: Bytes,
    /// The connections the broker still holds, for the relay to re-install.
    pub connections: Vec<AnnouncedConn>,
    /// The pool extension (docs/protocol.md §5): who this broker instance is, its keepalive
    /// and its capacity. `None` is a version-1 LINK_INIT, which a relay treats as the single
    /// instance [`InstanceId::LEGACY`] of its name, with unknown capacity.
    pub extension: Option<LinkExtension>,
}

impl LinkInit {
    /// The wire payload. The lengths are not checked here: a name or secret outside its
    /// range makes the relay's [`LinkInit::decode`] fail.
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(
            8 + self.server_name.len()
                + self.secret.len()
                + self.connections.len() * ANNOUNCED_CONN_LEN,
        );
        put_prefixed(&mut out, self.server_name.as_bytes());
        put_prefixed(&mut out, &self.secret);
        out.put_u32(self.connections.len() as u32);
        for c in &self.connections {
            out.put_u32(c.conn_id);
            out.put_slice(&c.token.0);
            out.put_u32(c.pull_period_ms);
            out.put_u16(c.client_window);
        }
        if let Some(ext) = &self.extension {
            out.put_slice(&ext.instance.0);
            out.put_u32(ext.keepalive_ms);
            out.put_u8(ext.state.mode as u8);
            ext.state.capacity.unwrap_or_default().put(&mut out);
            if let Some(features) = ext.features {
                out.put_u8(features.0);
            }
        }
        out.freeze()
    }

    /// Parses the payload; rejects a name or secret outside its length range, a name that is
    /// not UTF-8, a connection count larger than the bytes present, an extension that is not
    /// exactly [`LINK_EXTENSION_LEN`] bytes (or one more, the features byte) or has an unknown
    /// listen mode, and trailing bytes.
    pub fn decode(payload: Bytes) -> Result<LinkInit, PayloadError> {
        let mut r = Reader::new("LINK_INIT", payload);
        let server_name = r.prefixed_str(1, MAX_SERVER_NAME_LEN)?;
        let secret = r.prefixed(0, MAX_LINK_SECRET_LEN)?;
        let count = r.u32()? as usize;
        // Check the count against the bytes present before allocating for it.
        r.need(count.saturating_mul(ANNOUNCED_CONN_LEN))?;
        let mut connections = Vec::with_capacity(count);
        for _ in 0..count {
            connections.push(AnnouncedConn {
                conn_id: r.u32()?,
                token: r.token()?,
                pull_period_ms: r.u32()?,
                client_window: r.u16()?,
            });
        }
        let extension = if r.buf.is_empty() {
            None
        } else {
            let instance = InstanceId(r.array()?);
            let keepalive_ms = r.u32()?;
            let mode = ListenMode::from_wire(r.u8()?, "LINK_INIT")?;
            let capacity = Capacity::read(&mut r)?;
            let features = if r.buf.is_empty() {
                None
            } else {
                Some(LinkFeatures(r.u8()?))
            };
            Some(LinkExtension {
                instance,
                keepalive_ms,
                state: ListenState {
                    mode,
                    capacity: Some(capacity),
                },
                features,
            })
        };
        r.end()?;
        Ok(LinkInit {
            server_name,
            secret,
            connections,
            extension,
        })
    }
}

/// Length of a broker instance identity, in bytes.
pub const INSTANCE_ID_LEN: usize = 16;

/// Bytes the pool extension adds at the end of LINK_INIT: instance id, u32 keepalive in
/// milliseconds, u8 listen mode, u32 maximum connections, u32 live connections.
pub const LINK_EXTENSION_LEN: usize = INSTANCE_ID_LEN + 4 + 1 + 4 + 4;

/// The stable identity of one broker instance among the instances serving a name
/// (docs/protocol.md §5). Chosen once per process (16 random bytes) or configured; a new link
/// with the same identity replaces the old link of that instance, a link with another joins
/// the name's pool.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct InstanceId(pub [u8; INSTANCE_ID_LEN]);

impl InstanceId {
    /// The identity a relay gives a version-1 LINK_INIT (without the extension): all zero.
    pub const LEGACY: InstanceId = InstanceId([0; INSTANCE_ID_LEN]);

    /// A fresh identity from a cryptographic generator (never [`InstanceId::LEGACY`]).
    #[cfg(feature = "driver")]
    pub fn random() -> InstanceId {
        use rand::Rng;
        let mut rng = rand::rng();
        loop {
            let id = InstanceId(rng.random());
            if id != InstanceId::LEGACY {
                return id;
            }
        }
    }

    /// The identity as 32 lowercase hex digits (logs, status page, metric labels).
    pub fn to_hex(&self) -> String {
        Token(self.0).to_hex()
    }

    /// Parses exactly 32 hex digits (either case).
    pub fn from_hex(s: &str) -> Option<InstanceId> {
        Token::from_hex(s).map(|t| InstanceId(t.0))
    }

    /// The first 8 hex digits: enough to tell a pool's instances apart in a log line.
    pub fn short(&self) -> String {
        let mut hex = self.to_hex();
        hex.truncate(8);
        hex
    }
}

impl fmt::Debug for InstanceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "InstanceId({})", self.to_hex())
    }
}

impl fmt::Display for InstanceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// Whether a broker instance takes new connections (docs/protocol.md §5, LISTEN_STATE).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ListenMode {
    /// 0: takes no new connections (paused); a relay with no other instance answers 404.
    NotAccepting = 0,
    /// 1: takes new connections.
    Accepting = 1,
    /// 2: takes no new connections and is going away (planned maintenance); a relay with no
    /// other instance answers 503 with `Retry-After`, since another instance is expected.
    Draining = 2,
}

impl ListenMode {
    fn from_wire(v: u8, what: &'static str) -> Result<ListenMode, PayloadError> {
        match v {
            0 => Ok(ListenMode::NotAccepting),
            1 => Ok(ListenMode::Accepting),
            2 => Ok(ListenMode::Draining),
            other => Err(PayloadError::BadValue {
                what,
                value: u32::from(other),
            }),
        }
    }
}

/// A broker instance's capacity and load as it reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct Capacity {
    /// Most connections the instance serves at once; 0 means not limited (or not known).
    pub max_connections: u32,
    /// Connections the instance holds now (accepted or waiting to be accepted).
    pub live_connections: u32,
}

impl Capacity {
    fn put(&self, out: &mut BytesMut) {
        out.put_u32(self.max_connections);
        out.put_u32(self.live_connections);
    }

    fn read(r: &mut Reader) -> Result<Capacity, PayloadError> {
        Ok(Capacity {
            max_connections: r.u32()?,
            live_connections: r.u32()?,
        })
    }
}

/// The pool extension at the end of LINK_INIT (docs/protocol.md §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkExtension {
    /// Which instance of the name this link belongs to (never [`InstanceId::LEGACY`] from a
    /// broker that sends the extension; a relay treats it as any other identity).
    pub instance: InstanceId,
    /// The broker's link keepalive interval in milliseconds. The relay declares the link
    /// dead only after three of the longer of this and its own interval.
    pub keepalive_ms: u32,
    /// The listen mode and capacity at link time; `capacity` is always `Some` here.
    pub state: ListenState,
    /// What the broker can do beyond the extension's first form: `None` when the extension
    /// is [`LINK_EXTENSION_LEN`] bytes, `Some` when it ends with the features byte.
    pub features: Option<LinkFeatures>,
}

/// One byte of feature bits that a broker (at the end of LINK_INIT's pool extension) and a
/// relay (in LINK_INIT_ACK, [`RelayHello`]) send to say what they understand
/// (docs/protocol.md §5.2). Bits a reader does not know are kept and ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct LinkFeatures(pub u8);

impl LinkFeatures {
    /// Bit 0: the sender understands CONN_MOVE (docs/protocol.md §5.2).
    pub const MOVES: LinkFeatures = LinkFeatures(1);

    /// Whether every bit of `other` is set here.
    pub fn has(self, other: LinkFeatures) -> bool {
        self.0 & other.0 == other.0
    }
}

/// Payload of LINK_INIT_ACK (relay → broker, docs/protocol.md §5.2): empty from a relay that
/// predates relay pools, otherwise 2 bytes: the relay's id in its pool and its features.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RelayHello {
    /// The relay's id in its pool (`tunnel-servlet --relay-id`), 0 when it is not in one.
    /// Every connection and session id made by relay `n` ≠ 0 has `n` in its top byte.
    pub relay_id: u8,
    /// What the relay understands; empty for an empty payload.
    pub features: LinkFeatures,
}

impl RelayHello {
    /// The 2-byte wire payload.
    pub fn encode(&self) -> Bytes {
        Bytes::copy_from_slice(&[self.relay_id, self.features.0])
    }

    /// Parses an empty payload (a relay from before pools: id 0, no features) or exactly 2
    /// bytes.
    pub fn decode(payload: Bytes) -> Result<RelayHello, PayloadError> {
        if payload.is_empty() {
            return Ok(RelayHello::default());
        }
        let mut r = Reader::new("LINK_INIT_ACK", payload);
        let relay_id = r.u8()?;
        let features = LinkFeatures(r.u8()?);
        r.end()?;
        Ok(RelayHello { relay_id, features })
    }
}

/// Payload of a relay's CONN_MOVE (relay → broker, docs/protocol.md §5.2): "if you hold the
/// connection with this conn_id and token, move it onto the link this came on".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MoveRequest {
    /// The token the client proved in its ATTACH.
    pub token: Token,
}

impl MoveRequest {
    /// The 16-byte wire payload.
    pub fn encode(&self) -> Bytes {
        encode_token(&self.token)
    }

    /// Parses exactly [`TOKEN_LEN`] bytes.
    pub fn decode(payload: Bytes) -> Result<MoveRequest, PayloadError> {
        let mut r = Reader::new("CONN_MOVE request", payload);
        let token = r.token()?;
        r.end()?;
        Ok(MoveRequest { token })
    }
}

/// Payload of a broker's CONN_MOVE (broker → relay, docs/protocol.md §5.2): a u8 outcome,
/// followed for [`MoveAnswer::Moved`] by the connection as LINK_INIT announces it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MoveAnswer {
    /// Outcome 0, on the link that asked: the connection is on this link now. Then the
    /// token, u32 pull period in ms and u16 client window (22 bytes), as in LINK_INIT.
    Moved {
        /// The connection's token.
        token: Token,
        /// Pull period last set by CONN_OPTION 1, in milliseconds; 0 = continuous.
        pull_period_ms: u32,
        /// The client's receive window from its CONN_INIT.
        client_window: u16,
    },
    /// Outcome 1, on the link that asked: this broker holds no such connection with that
    /// token.
    Unknown,
    /// Outcome 2, on the link the connection was on: it moved to another relay; forget it
    /// without telling its client or the broker anything.
    Left,
}

impl MoveAnswer {
    /// The wire payload: 23 bytes for `Moved`, 1 byte otherwise.
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(1 + TOKEN_LEN + 4 + 2);
        match self {
            MoveAnswer::Moved {
                token,
                pull_period_ms,
                client_window,
            } => {
                out.put_u8(0);
                out.put_slice(&token.0);
                out.put_u32(*pull_period_ms);
                out.put_u16(*client_window);
            }
            MoveAnswer::Unknown => out.put_u8(1),
            MoveAnswer::Left => out.put_u8(2),
        }
        out.freeze()
    }

    /// Parses the payload; an outcome other than 0–2 is [`PayloadError::BadValue`].
    pub fn decode(payload: Bytes) -> Result<MoveAnswer, PayloadError> {
        let mut r = Reader::new("CONN_MOVE answer", payload);
        let answer = match r.u8()? {
            0 => MoveAnswer::Moved {
                token: r.token()?,
                pull_period_ms: r.u32()?,
                client_window: r.u16()?,
            },
            1 => MoveAnswer::Unknown,
            2 => MoveAnswer::Left,
            other => {
                return Err(PayloadError::BadValue {
                    what: "CONN_MOVE answer",
                    value: u32::from(other),
                })
            }
        };
        r.end()?;
        Ok(answer)
    }
}

/// Length of the extended LISTEN_STATE payload: u8 mode, u32 maximum, u32 live.
pub const LISTEN_STATE_EXTENDED_LEN: usize = 1 + 4 + 4;

/// A LISTEN_STATE payload (docs/protocol.md §5): the listen mode alone (1 byte, version 1),
/// or the mode and the capacity (9 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenState {
    /// Whether the instance takes new connections.
    pub mode: ListenMode,
    /// Capacity and load; `None` in the 1-byte form.
    pub capacity: Option<Capacity>,
}

impl ListenState {
    /// The wire payload: 1 byte without capacity, 9 bytes with it.
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(LISTEN_STATE_EXTENDED_LEN);
        out.put_u8(self.mode as u8);
        if let Some(capacity) = &self.capacity {
            capacity.put(&mut out);
        }
        out.freeze()
    }

    /// Parses exactly 1 or exactly 9 bytes; a mode other than 0, 1 or 2 is
    /// [`PayloadError::BadValue`], any other length truncated or trailing.
    pub fn decode(payload: Bytes) -> Result<ListenState, PayloadError> {
        let mut r = Reader::new("LISTEN_STATE", payload);
        let mode = ListenMode::from_wire(r.u8()?, "LISTEN_STATE")?;
        let capacity = if r.buf.is_empty() {
            None
        } else {
            Some(Capacity::read(&mut r)?)
        };
        r.end()?;
        Ok(ListenState { mode, capacity })
    }
}

/// Payload of a version-1 LISTEN_STATE: whether the broker accepts new connections (the
/// 1-byte form of [`ListenState`]).
pub fn encode_listen_state(accepting: bool) -> Bytes {
    Bytes::from_static(if accepting { &[1] } else { &[0] })
}

/// Reads a LISTEN_STATE payload: exactly one byte, 1 (accepting) or 0 (not); any other
/// value is [`PayloadError::BadValue`].
pub fn decode_listen_state(payload: Bytes) -> Result<bool, PayloadError> {
    let mut r = Reader::new("LISTEN_STATE", payload);
    let v = r.u8()?;
    r.end()?;
    match v {
        0 => Ok(false),
        1 => Ok(true),
        other => Err(PayloadError::BadValue {
            what: "LISTEN_STATE",
            value: u32::from(other),
        }),
    }
}

/// A connection option (CONN_OPTION, docs/protocol.md §6): a u32 option code and a u32 value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnOption {
    /// Option 1, pull period in milliseconds. 0: continuous long-poll; otherwise the client
    /// sleeps that long after an empty pull.
    PullPeriodMs(u32),
    /// Option 2, in milliseconds: the relay aborts a connection whose client made no request
    /// for that long. 0 means the relay's default (60 s); larger values are capped at the
    /// relay's maximum (1 h by default).
    InactivityTimeoutMs(u32),
    /// An option this version does not know; kept so it can be ignored, not rejected.
    Unknown {
        /// The option code as received.
        option: u32,
        /// The value as received.
        value: u32,
    },
}

impl ConnOption {
    /// The 8-byte wire payload: option code, then value.
    pub fn encode(&self) -> Bytes {
        let (o, v) = match *self {
            ConnOption::PullPeriodMs(v) => (1, v),
            ConnOption::InactivityTimeoutMs(v) => (2, v),
            ConnOption::Unknown { option, value } => (option, value),
        };
        let mut out = BytesMut::with_capacity(8);
        out.put_u32(o);
        out.put_u32(v);
        out.freeze()
    }

    /// Parses exactly 8 bytes; an unknown option code gives [`ConnOption::Unknown`], not an
    /// error.
    pub fn decode(payload: Bytes) -> Result<ConnOption, PayloadError> {
        let mut r = Reader::new("CONN_OPTION", payload);
        let option = r.u32()?;
        let value = r.u32()?;
        r.end()?;
        Ok(match option {
            1 => ConnOption::PullPeriodMs(value),
            2 => ConnOption::InactivityTimeoutMs(value),
            option => ConnOption::Unknown { option, value },
        })
    }
}

/// A selective-ack block: numbers `first..=last` are held beyond the cumulative ack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SackBlock {
    /// First sequence number of the run.
    pub first: u32,
    /// Last sequence number of the run, inclusive (equal to `first` for a single packet).
    pub last: u32,
}

/// Most blocks an ACK carries; more would say little and cost a lot to process.
pub const MAX_SACK_BLOCKS: usize = 16;

/// The ACK payload for `blocks`: 8 bytes per block (u32 first, u32 last); blocks past
/// [`MAX_SACK_BLOCKS`] are left out.
pub fn encode_sack(blocks: &[SackBlock]) -> Bytes {
    let mut out = BytesMut::with_capacity(blocks.len() * 8);
    for b in blocks.iter().take(MAX_SACK_BLOCKS) {
        out.put_u32(b.first);
        out.put_u32(b.last);
    }
    out.freeze()
}

/// Decodes selective-ack blocks; at most [`MAX_SACK_BLOCKS`] are kept, extra ones ignored. A
/// payload that is not a whole number of 8-byte blocks is [`PayloadError::TrailingBytes`].
pub fn decode_sack(payload: Bytes) -> Result<Vec<SackBlock>, PayloadError> {
    if !payload.len().is_multiple_of(8) {
        return Err(PayloadError::TrailingBytes {
            what: "ACK selective blocks",
            extra: payload.len() % 8, // whole blocks are 8 bytes
        });
    }
    let mut r = Reader::new("ACK selective blocks", payload);
    let n = (r.buf.len() / 8).min(MAX_SACK_BLOCKS);
    let mut blocks = Vec::with_capacity(n);
    for _ in 0..n {
        blocks.push(SackBlock {
            first: r.u32()?,
            last: r.u32()?,
        });
    }
    Ok(blocks)
}

/// Payload of CONN_REJECTED or CONN_ABORT: a UTF-8 reason, cut to at most 1024 bytes on a
/// character boundary.
pub fn encode_reason(reason: &str) -> Bytes {
    Bytes::copy_from_slice(truncate_utf8(reason, 1024).as_bytes())
}

/// Reads a CONN_REJECTED or CONN_ABORT reason: the first 1024 bytes, lossily (a reason is for
/// logs, so invalid UTF-8 is replaced, not rejected). Never fails; an empty payload gives "".
pub fn decode_reason(payload: &[u8]) -> String {
    String::from_utf8_lossy(&payload[..payload.len().min(1024)]).into_owned()
}

/// The longest prefix of `s` that is at most `max` bytes and ends on a char boundary.
fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}
