//! Parsing the tunnel request's query string (`Type`, `ServerName`, `ConnId`, `Session`,
//! `Affinity`) and its `Tunnel-Token` and `Tunnel-Session-Token` headers.

use hyper::HeaderMap;
use tunnel_proto::Token;

/// Name of the header carrying the per-connection token as 32 hex digits.
pub const TOKEN_HEADER: &str = "tunnel-token";

/// Name of the header carrying the session token as 32 hex digits (docs/protocol.md §2.1).
pub const SESSION_TOKEN_HEADER: &str = "tunnel-session-token";
/// Header of the answer to a session opening: the relay's per-connection queue limit in bytes
/// (`--queue-limit`), so a client announces no larger receive window than the relay holds
/// for it (docs/protocol.md §2.1).
pub const QUEUE_LIMIT_HEADER: &str = "tunnel-queue-limit";

/// Longest `Affinity` key, in bytes of UTF-8; a longer one is ignored.
pub const MAX_AFFINITY_LEN: usize = 255;

/// The request kinds of the tunnel interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Connect,
    Push,
    Pull,
    /// Opens a session (docs/protocol.md §2.1).
    Session,
    /// Closes a session (docs/protocol.md §2.1).
    Close,
}

/// The tunnel parameters of one request.
#[derive(Debug, Default)]
pub(crate) struct Params {
    pub(crate) kind: Option<Kind>,
    pub(crate) server: Option<String>,
    pub(crate) conn_id: Option<u32>,
    /// `Session`: the session the request is made in (non-zero), docs/protocol.md §2.1.
    pub(crate) session: Option<u32>,
    /// Whether `Session` was given at all (a bad value is a 400, not a request without one).
    pub(crate) session_given: bool,
    /// `Affinity` of a connect: connections with the same key go to the same broker
    /// instance while it takes connections (docs/protocol.md §2, §5.1).
    pub(crate) affinity: Option<String>,
    /// `Stream=1` on a session pull: stream the answer (docs/protocol.md §2.2).
    pub(crate) stream: bool,
}

/// Parses the query; unknown keys are ignored, bad values leave the field `None`.
pub(crate) fn parse(query: Option<&str>) -> Params {
    let mut params = Params::default();
    for pair in query.unwrap_or("").split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let Some(value) = percent_decode(value) else {
            continue;
        };
        match key {
            "Type" => {
                params.kind = match value.as_str() {
                    "connect" => Some(Kind::Connect),
                    "push" => Some(Kind::Push),
                    "pull" => Some(Kind::Pull),
                    "session" => Some(Kind::Session),
                    "close" => Some(Kind::Close),
                    _ => None,
                }
            }
            "ServerName" if !value.is_empty() && value.len() <= 255 => params.server = Some(value),
            "ConnId" => params.conn_id = value.parse().ok().filter(|id| *id != 0),
            "Session" => {
                params.session_given = true;
                params.session = value.parse().ok().filter(|id| *id != 0);
            }
            "Stream" => params.stream = value == "1",
            "Affinity" if !value.is_empty() && value.len() <= MAX_AFFINITY_LEN => {
                params.affinity = Some(value)
            }
            _ => {}
        }
    }
    params
}

/// Decodes `%XX` escapes and `+` (space); `None` for a bad escape or non-UTF-8 result.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                let hi = (hex[0] as char).to_digit(16)?;
                let lo = (hex[1] as char).to_digit(16)?;
                out.push((hi * 16 + lo) as u8);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// The token of the request, if the header is present and well formed.
pub(crate) fn token(headers: &HeaderMap) -> Option<Token> {
    header_token(headers, TOKEN_HEADER)
}

/// The session token of the request, if the header is present and well formed.
pub(crate) fn session_token(headers: &HeaderMap) -> Option<Token> {
    header_token(headers, SESSION_TOKEN_HEADER)
}

fn header_token(headers: &HeaderMap, name: &str) -> Option<Token> {
    let value = headers.get(name)?.to_str().ok()?;
    Token::from_hex(value.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_all_fields() {
        let p = parse(Some("Type=push&ServerName=my%20broker&ConnId=42&x=y"));
        assert_eq!(p.kind, Some(Kind::Push));
        assert_eq!(p.server.as_deref(), Some("my broker"));
        assert_eq!(p.conn_id, Some(42));
        let p = parse(Some("Type=session"));
        assert_eq!((p.kind, p.session_given), (Some(Kind::Session), false));
        let p = parse(Some("Type=pull&Session=4294967295"));
        assert_eq!((p.session, p.session_given), (Some(u32::MAX), true));
        let p = parse(Some("Type=pull&Session=7&Stream=1"));
        assert!(p.stream);
        let p = parse(Some("Type=pull&Session=0&Stream=yes"));
        assert!(!p.stream);
        assert_eq!((p.session, p.session_given), (None, true));
    }

    #[test]
    fn rejects_bad_values() {
        let p = parse(Some("Type=nope&ServerName=&ConnId=0"));
        assert!(p.kind.is_none() && p.server.is_none() && p.conn_id.is_none());
        let p = parse(Some("ServerName=%zz&ConnId=-1"));
        assert!(p.server.is_none() && p.conn_id.is_none());
        let p = parse(None);
        assert!(p.kind.is_none());
    }
}
