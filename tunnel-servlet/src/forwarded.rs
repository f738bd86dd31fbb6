//! The client's address as the relay reports it to the broker (in CONN_INIT).
//!
//! A request's socket peer is the client unless the peer is a trusted proxy
//! (`RelayConfig::trusted_proxies`). Only then are `X-Forwarded-For` or, without it,
//! `Forwarded` (RFC 7239) read. Their hops are walked from the right, the side written by the
//! proxy closest to the relay: every trusted address is skipped, and the first untrusted one
//! is the client. Anyone can write the left part of these headers, so nothing left of that
//! point is believed. A hop that is not an address (`unknown`, an obfuscated `_name`,
//! garbage, a `Forwarded` element without `for=`) ends the walk: the client is then the last
//! address the walk could establish, i.e. the trusted proxy that wrote the opaque hop.
//!
//! The headers are scanned once, left to right, in constant memory: their size is already
//! bounded by the HTTP server's header limits, and nothing here allocates per hop.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use hyper::header::HeaderMap;

use crate::cidr::Cidr;

/// Where the reported client address came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAddr {
    /// The TCP peer of the request (with its port).
    Peer(SocketAddr),
    /// A hop named by a trusted proxy's `X-Forwarded-For` or `Forwarded` header.
    Forwarded(IpAddr),
}

impl fmt::Display for ClientAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientAddr::Peer(addr) => addr.fmt(f),
            ClientAddr::Forwarded(ip) => ip.fmt(f),
        }
    }
}

/// The client address of a request from `peer` with `headers`, trusting `trusted`.
pub fn client_addr(headers: &HeaderMap, peer: SocketAddr, trusted: &[Cidr]) -> ClientAddr {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(peer.ip()) {
        if headers.contains_key("x-forwarded-for") || headers.contains_key("forwarded") {
            tracing::debug!(%peer, "forwarding headers from an untrusted peer ignored");
        }
        return ClientAddr::Peer(peer);
    }
    let mut walk = Walk::new(&is_trusted);
    if headers.contains_key("x-forwarded-for") {
        for value in headers.get_all("x-forwarded-for") {
            match value.to_str() {
                Ok(text) => text.split(',').for_each(|hop| walk.hop(parse_node(hop))),
                Err(_) => walk.hop(None),
            }
        }
    } else {
        for value in headers.get_all("forwarded") {
            match value.to_str() {
                Ok(text) => {
                    for element in split_unquoted(text, b',') {
                        walk.hop(forwarded_for(element).and_then(parse_node));
                    }
                }
                Err(_) => walk.hop(None),
            }
        }
    }
    match walk.finish() {
        Some(ip) => ClientAddr::Forwarded(ip),
        None => ClientAddr::Peer(peer),
    }
}

/// The right-to-left walk, computed from a left-to-right scan of the hops.
///
/// Walking from the right stops at the right-most hop that is not a trusted address (the
/// "break"). So the scan only remembers the latest break, the address right after it (the
/// answer if the break is opaque) and the left-most hop (the answer if there is no break).
struct Walk<'a> {
    is_trusted: &'a dyn Fn(IpAddr) -> bool,
    first: Option<Option<IpAddr>>,
    /// The latest hop that was opaque (`None`) or an untrusted address.
    break_at: Option<Option<IpAddr>>,
    /// The first address after `break_at`.
    after_break: Option<IpAddr>,
}

impl<'a> Walk<'a> {
    fn new(is_trusted: &'a dyn Fn(IpAddr) -> bool) -> Walk<'a> {
        Walk {
            is_trusted,
            first: None,
            break_at: None,
            after_break: None,
        }
    }

    /// The next hop to the right; `None` for one that is not an address.
    fn hop(&mut self, hop: Option<IpAddr>) {
        self.first.get_or_insert(hop);
        match hop {
            Some(ip) if (self.is_trusted)(ip) => {
                if self.after_break.is_none() {
                    self.after_break = Some(ip);
                }
            }
            _ => {
                self.break_at = Some(hop);
                self.after_break = None;
            }
        }
    }

    /// The client's address; `None` means the peer itself (no hop, or an opaque right-most
    /// hop).
    fn finish(self) -> Option<IpAddr> {
        match self.break_at {
            Some(Some(untrusted)) => Some(untrusted),
            Some(None) => self.after_break,
            // Every hop is a trusted address: the left-most is as far as anyone can tell.
            None => self.first.flatten(),
        }
    }
}

/// Splits `text` at `sep` outside double-quoted strings (with `\` escapes inside them). An
/// unterminated quote runs to the end of the text.
fn split_unquoted(text: &str, sep: u8) -> impl Iterator<Item = &str> {
    let mut rest = Some(text);
    std::iter::from_fn(move || {
        let s = rest?;
        let bytes = s.as_bytes();
        let (mut quoted, mut escaped) = (false, false);
        for (i, &b) in bytes.iter().enumerate() {
            if escaped {
                escaped = false;
            } else if quoted && b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                quoted = !quoted;
            } else if b == sep && !quoted {
                rest = Some(&s[i + 1..]);
                return Some(&s[..i]);
            }
        }
        rest = None;
        Some(s)
    })
}

/// The `for=` value of one `Forwarded` element (`for=…;proto=…;by=…`), unquoted; `None` if
/// the element has none, or two.
fn forwarded_for(element: &str) -> Option<&str> {
    let mut found = None;
    for pair in split_unquoted(element, b';') {
        let Some((name, value)) = pair.split_once('=') else {
            continue;
        };
        if name.trim().eq_ignore_ascii_case("for") {
            if found.is_some() {
                return None;
            }
            found = Some(unquote(value.trim())?);
        }
    }
    found
}

/// A token as is, or a quoted-string without its quotes. Escapes are refused rather than
/// decoded: no valid node needs one.
fn unquote(value: &str) -> Option<&str> {
    match value.strip_prefix('"') {
        None => Some(value),
        Some(inner) => {
            let inner = inner.strip_suffix('"')?;
            (!inner.contains(['"', '\\'])).then_some(inner)
        }
    }
}

/// A node (RFC 7239 §6, also the usual `X-Forwarded-For` forms) as an address: `1.2.3.4`,
/// `1.2.3.4:80`, `2001:db8::1`, `[2001:db8::1]`, `[2001:db8::1]:80`. `None` for `unknown`,
/// obfuscated names (`_hidden`), bad ports and anything else.
fn parse_node(node: &str) -> Option<IpAddr> {
    let node = node.trim();
    if let Ok(ip) = node.parse::<IpAddr>() {
        return Some(ip);
    }
    let (host, port) = match node.strip_prefix('[') {
        Some(bracketed) => {
            let (v6, after) = bracketed.split_once(']')?;
            let ip = IpAddr::V6(v6.parse().ok()?);
            match after {
                "" => return Some(ip),
                _ => (ip, after.strip_prefix(':')?),
            }
        }
        None => {
            let (v4, port) = node.split_once(':')?;
            (IpAddr::V4(v4.parse().ok()?), port)
        }
    };
    valid_port(port).then_some(host)
}

/// A port number, or an obfuscated port (`_` and letters, digits, `.`, `_`, `-`).
fn valid_port(port: &str) -> bool {
    let obfuscated = port.len() > 1
        && port.starts_with('_')
        && port
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    let numeric = !port.is_empty()
        && port.len() <= 5
        && port.bytes().all(|b| b.is_ascii_digit())
        && port.parse::<u32>().is_ok_and(|p| p <= 65535);
    obfuscated || numeric
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    fn nets(list: &[&str]) -> Vec<Cidr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn peer(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    /// The address reported for `pairs` from 127.0.0.1:5000 with 127.0.0.0/8 trusted.
    fn via_local_proxy(pairs: &[(&'static str, &str)]) -> String {
        let trusted = nets(&["127.0.0.0/8"]);
        client_addr(&headers(pairs), peer("127.0.0.1:5000"), &trusted).to_string()
    }

    #[test]
    fn headers_from_an_untrusted_peer_are_ignored() {
        let h = headers(&[
            ("x-forwarded-for", "203.0.113.7"),
            ("forwarded", "for=198.51.100.1"),
        ]);
        let got = client_addr(&h, peer("192.0.2.9:4000"), &nets(&["127.0.0.0/8"]));
        assert_eq!(got, ClientAddr::Peer(peer("192.0.2.9:4000")));
        // No trusted proxies at all (the default): the same.
        let got = client_addr(&h, peer("127.0.0.1:4000"), &[]);
        assert_eq!(got, ClientAddr::Peer(peer("127.0.0.1:4000")));
    }

    #[test]
    fn a_trusted_peer_without_headers_is_the_client() {
        assert_eq!(via_local_proxy(&[]), "127.0.0.1:5000");
    }

    #[test]
    fn the_right_most_untrusted_hop_wins() {
        // Two trusted proxies: 127.0.0.2 forwarded to 127.0.0.1 (the peer).
        assert_eq!(
            via_local_proxy(&[("x-forwarded-for", "203.0.113.7, 127.0.0.2")]),
            "203.0.113.7"
        );
        // A client-supplied first entry is left of the untrusted client: not believed.
        assert_eq!(
            via_local_proxy(&[("x-forwarded-for", "10.9.9.9, 203.0.113.7, 127.0.0.2")]),
            "203.0.113.7"
        );
        // Split over several header lines, in order.
        assert_eq!(
            via_local_proxy(&[
                ("x-forwarded-for", "10.9.9.9"),
                ("x-forwarded-for", "203.0.113.7"),
                ("x-forwarded-for", "127.0.0.2"),
            ]),
            "203.0.113.7"
        );
    }

    #[test]
    fn every_hop_trusted_gives_the_left_most() {
        assert_eq!(
            via_local_proxy(&[("x-forwarded-for", "127.0.0.3, 127.0.0.2")]),
            "127.0.0.3"
        );
    }

    #[test]
    fn ports_and_ipv6_forms_in_x_forwarded_for() {
        assert_eq!(
            via_local_proxy(&[("x-forwarded-for", "203.0.113.7:4711")]),
            "203.0.113.7"
        );
        assert_eq!(
            via_local_proxy(&[("x-forwarded-for", "2001:db8::17")]),
            "2001:db8::17"
        );
        assert_eq!(
            via_local_proxy(&[("x-forwarded-for", "[2001:db8::17]:4711, 127.0.0.2")]),
            "2001:db8::17"
        );
        assert_eq!(
            via_local_proxy(&[("x-forwarded-for", "[2001:db8::17]")]),
            "2001:db8::17"
        );
    }

    #[test]
    fn forwarded_rfc7239_forms() {
        assert_eq!(
            via_local_proxy(&[("forwarded", "for=192.0.2.60;proto=http;by=203.0.113.43")]),
            "192.0.2.60"
        );
        assert_eq!(
            via_local_proxy(&[("forwarded", r#"For="[2001:db8:cafe::17]:4711""#)]),
            "2001:db8:cafe::17"
        );
        assert_eq!(
            via_local_proxy(&[(
                "forwarded",
                r#"for=198.51.100.1, for="[2001:db8::1]";proto=https, for=127.0.0.2"#
            )]),
            "2001:db8::1"
        );
        // Elements over two header lines; `by` and `host` may hold commas in quotes.
        assert_eq!(
            via_local_proxy(&[
                ("forwarded", r#"for=198.51.100.1;host="a,b""#),
                ("forwarded", "for=127.0.0.2"),
            ]),
            "198.51.100.1"
        );
    }

    #[test]
    fn x_forwarded_for_takes_precedence_over_forwarded() {
        assert_eq!(
            via_local_proxy(&[
                ("forwarded", "for=198.51.100.1"),
                ("x-forwarded-for", "203.0.113.7"),
            ]),
            "203.0.113.7"
        );
    }

    #[test]
    fn opaque_hops_end_the_walk_at_the_proxy_that_wrote_them() {
        // The right-most hop is opaque: the peer is as far as the relay can see.
        for opaque in ["unknown", "_hidden", "not an address", "", "300.1.1.1"] {
            assert_eq!(
                via_local_proxy(&[("x-forwarded-for", &format!("203.0.113.7, {opaque}"))]),
                "127.0.0.1:5000",
                "{opaque:?}"
            );
        }
        // Opaque behind a trusted hop: that trusted hop wrote it.
        assert_eq!(
            via_local_proxy(&[("x-forwarded-for", "203.0.113.7, unknown, 127.0.0.2")]),
            "127.0.0.2"
        );
        assert_eq!(
            via_local_proxy(&[("forwarded", "for=203.0.113.7, for=_gazonk, for=127.0.0.2")]),
            "127.0.0.2"
        );
        // An element without `for=`, or with two, is opaque too.
        assert_eq!(
            via_local_proxy(&[("forwarded", "for=203.0.113.7, proto=https")]),
            "127.0.0.1:5000"
        );
        assert_eq!(
            via_local_proxy(&[("forwarded", "for=203.0.113.7;for=198.51.100.1")]),
            "127.0.0.1:5000"
        );
    }

    #[test]
    fn garbage_never_panics_and_never_becomes_an_address() {
        let garbage = [
            ",,,,",
            "[",
            "[::1",
            "[::1]x",
            "[::1]:",
            "[::1]:99999",
            "1.2.3.4:",
            "1.2.3.4:port",
            "1.2.3.4:_",
            "1.2.3.4:123456",
            "::ffff:1.2.3.4]:80",
            "\"203.0.113.7\"",
            "203.0.113.7 198.51.100.1",
            "𝕏",
        ];
        for g in garbage {
            assert_eq!(
                via_local_proxy(&[("x-forwarded-for", g)]),
                "127.0.0.1:5000",
                "x-forwarded-for {g:?}"
            );
        }
        let forwarded_garbage = [
            "for",
            "for=",
            "for=\"",
            "for=\"[2001:db8::1]",
            r#"for="[2001:db8::1]\"""#,
            "for=[2001:db8::1]:80:80",
            ";;;,,,===",
            "for=\"unterminated, for=203.0.113.7",
        ];
        for g in forwarded_garbage {
            assert_eq!(
                via_local_proxy(&[("forwarded", g)]),
                "127.0.0.1:5000",
                "forwarded {g:?}"
            );
        }
        // Bytes that are not visible ASCII (obs-text): the header line is one opaque hop.
        let mut h = HeaderMap::new();
        h.append(
            "x-forwarded-for",
            HeaderValue::from_bytes(b"203.0.113.7\xff").unwrap(),
        );
        let got = client_addr(&h, peer("127.0.0.1:5000"), &nets(&["127.0.0.0/8"]));
        assert_eq!(got, ClientAddr::Peer(peer("127.0.0.1:5000")));
    }

    #[test]
    fn obfuscated_ports_are_accepted_on_real_addresses() {
        assert_eq!(
            via_local_proxy(&[("forwarded", "for=\"203.0.113.7:_p1\"")]),
            "203.0.113.7"
        );
    }

    #[test]
    fn huge_headers_are_walked_in_one_pass() {
        // 100,000 trusted hops after the client, and 100,000 commas.
        let mut chain = String::from("203.0.113.7");
        for _ in 0..100_000 {
            chain.push_str(", 127.0.0.2");
        }
        assert_eq!(
            via_local_proxy(&[("x-forwarded-for", &chain)]),
            "203.0.113.7"
        );
        let commas = ",".repeat(100_000);
        assert_eq!(
            via_local_proxy(&[("x-forwarded-for", &commas)]),
            "127.0.0.1:5000"
        );
        let quotes = "\"".repeat(100_001);
        assert_eq!(via_local_proxy(&[("forwarded", &quotes)]), "127.0.0.1:5000");
    }

    #[test]
    fn ipv6_peers_and_ranges() {
        let trusted = nets(&["::1/128", "2001:db8:1::/48"]);
        let h = headers(&[("x-forwarded-for", "198.51.100.1, 2001:db8:1::5")]);
        let got = client_addr(&h, peer("[::1]:5000"), &trusted);
        assert_eq!(got, ClientAddr::Forwarded("198.51.100.1".parse().unwrap()));
        let got = client_addr(&h, peer("[::2]:5000"), &trusted);
        assert_eq!(got.to_string(), "[::2]:5000");
    }
}
