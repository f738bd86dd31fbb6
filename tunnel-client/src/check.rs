//! `tunnel-client --check`: probes the path to a relay with one real connection and reports
//! what a user behind a corporate proxy needs to know: the route (and how it was chosen),
//! the proxy authentication scheme negotiated, the HTTP version, the issuer of the
//! certificate seen for an https:// relay (a TLS-intercepting proxy shows its own), and
//! whether a held pull comes back intact, and after how long (a proxy that cuts long
//! requests shortens it).

use std::fmt;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tunnel_proto::payload::encode_reason;
use tunnel_proto::{Connection, Packet, PacketType};

use crate::config::ClientConfig;
use crate::error::ConnectError;
use crate::http::{ProbeAnswer, Relay};

/// The findings of [`check`], one line each; `Display` prints them aligned.
#[derive(Debug, Clone, Default)]
pub struct CheckReport {
    /// `(what, finding)` in the order probed.
    pub lines: Vec<(String, String)>,
    /// Whether every probe succeeded.
    pub ok: bool,
}

impl CheckReport {
    fn add(&mut self, what: &str, finding: impl Into<String>) {
        self.lines.push((what.to_string(), finding.into()));
    }

    /// The finding for `what`, if it was probed.
    pub fn get(&self, what: &str) -> Option<&str> {
        self.lines
            .iter()
            .find(|(w, _)| w == what)
            .map(|(_, f)| f.as_str())
    }
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let width = self.lines.iter().map(|(w, _)| w.len()).max().unwrap_or(0);
        for (what, finding) in &self.lines {
            writeln!(f, "{what:width$}  {finding}")?;
        }
        write!(f, "{}", if self.ok { "path OK" } else { "path NOT OK" })
    }
}

/// Probes the path to `config.relay_url` with one connection to `config.server_name`: the
/// connect request, the handshake, then one held pull (bounded by `config.pull_timeout`);
/// the connection is aborted at the end. Fails only on an invalid configuration; a failing
/// path is a report with `ok == false`.
pub async fn check(config: ClientConfig) -> Result<CheckReport, ConnectError> {
    let relay = Relay::new(&config)?;
    let mut report = CheckReport {
        ok: false,
        ..CheckReport::default()
    };
    report.add("relay", relay.display_url());
    let result = probe(&relay, &config, &mut report).await;
    // After the requests: a PAC fail-over may have moved on.
    report.add("route", relay.route_label());
    // After the requests too: the scheme is known once a handshake ran.
    report.add("proxy auth", relay.proxy_auth());
    match result {
        Ok(()) => report.ok = true,
        Err(e) => report.add("failed", e),
    }
    Ok(report)
}

async fn probe(
    relay: &Relay,
    config: &ClientConfig,
    report: &mut CheckReport,
) -> Result<(), String> {
    let init = Packet::new(PacketType::ConnInit, 0, Bytes::new())
        .with_window(config.connection.recv_window);
    let answer = relay
        .probe_connect(&init)
        .await
        .map_err(|e| format!("connect request: {e}"))?;
    report_transport(&answer, relay, report);
    let packets = answer
        .packets
        .map_err(|e| format!("connect request: {e}"))?;
    let (conn_id, token) = crate::connect::parse_connect_answer(packets)
        .map_err(|e| format!("connect request: {e}"))?;
    report.add("connect", format!("accepted, connection {conn_id}"));

    let result = held_pull(relay, config, conn_id, &token, report).await;
    let abort = Packet::new(
        PacketType::ConnAbort,
        conn_id,
        encode_reason("tunnel-client --check done"),
    );
    let _ = relay.push(conn_id, &token, abort.to_bytes()).await;
    result
}

fn report_transport(answer: &ProbeAnswer, relay: &Relay, report: &mut CheckReport) {
    report.add("HTTP version", format!("{:?}", answer.version));
    let tls = match &answer.peer_certificate {
        Some(der) => match issuer_of(der) {
            Some(issuer) => format!("certificate issued by {issuer}"),
            None => "certificate present, issuer unreadable".to_string(),
        },
        None if relay.display_url().starts_with("https:") => "no certificate seen".to_string(),
        None => "none (http:// relay)".to_string(),
    };
    report.add("TLS", tls);
}

/// Waits for the broker's CONN_INIT_ACK, acknowledges it (so the relay stops resending it),
/// then holds one pull and reports how long the path held it and whether its answer was intact.
async fn held_pull(
    relay: &Relay,
    config: &ClientConfig,
    conn_id: u32,
    token: &tunnel_proto::Token,
    report: &mut CheckReport,
) -> Result<(), String> {
    let deadline = Instant::now() + config.connect_timeout;
    let peer_window = loop {
        if Instant::now() >= deadline {
            return Err(format!(
                "the server did not accept the connection within {:?}",
                config.connect_timeout
            ));
        }
        let packets = relay
            .pull(conn_id, token)
            .await
            .map_err(|e| format!("handshake pull: {e}"))?;
        if let Some(p) = packets.iter().find(|p| p.kind == PacketType::ConnInitAck) {
            break p.window;
        }
        if let Some(p) = packets.iter().find(|p| p.kind == PacketType::ConnRejected) {
            return Err(format!(
                "the server rejected the connection: {}",
                tunnel_proto::payload::decode_reason(&p.payload)
            ));
        }
    };
    report.add("server", "accepted the connection");
    let now = tunnel_proto::driver::now();
    let mut conn = Connection::new(conn_id, peer_window, config.connection.clone(), now);
    conn.send_ack_now();
    let acks: Vec<Packet> = std::iter::from_fn(|| conn.poll_transmit(now)).collect();
    relay
        .push(conn_id, token, tunnel_proto::encode_all(&acks))
        .await
        .map_err(|e| format!("push: {e}"))?;
    report.add("push", "answered");

    let started = Instant::now();
    let outcome = relay.probe_pull(conn_id, token).await;
    let held = started.elapsed();
    match outcome.map(|answer| answer.packets) {
        Ok(Ok(packets)) => {
            let kinds: Vec<String> = packets.iter().map(|p| format!("{:?}", p.kind)).collect();
            report.add(
                "held pull",
                format!(
                    "held {} and answered intact ({}): long polls work",
                    seconds(held),
                    kinds.join(", ")
                ),
            );
            Ok(())
        }
        Ok(Err(e)) | Err(e) => Err(format!(
            "a held pull failed after {}: {e} (a proxy may cut requests held that long: \
             the relay's --pull-wait-ms must be shorter than what the path holds)",
            seconds(held)
        )),
    }
}

fn seconds(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

/// The issuer of a DER certificate as `CN=…, O=…, C=…` (the attributes people recognise),
/// read with a minimal DER walk: Certificate → tbsCertificate → [version], serial,
/// signature algorithm, issuer.
fn issuer_of(der: &[u8]) -> Option<String> {
    let (_, cert, _) = der_element(der)?;
    let (_, tbs, _) = der_element(cert)?;
    let mut rest = tbs;
    let (tag, _, after) = der_element(rest)?;
    if tag == 0xA0 {
        rest = after; // explicit version
    }
    let (_, _, after_serial) = der_element(rest)?;
    let (_, _, after_alg) = der_element(after_serial)?;
    let (_, issuer, _) = der_element(after_alg)?;
    let mut parts = Vec::new();
    let mut rdns = issuer;
    while !rdns.is_empty() {
        let (_, set, next) = der_element(rdns)?;
        rdns = next;
        let (_, attribute, _) = der_element(set)?;
        let (_, oid, value_rest) = der_element(attribute)?;
        let (_, value, _) = der_element(value_rest)?;
        let name = match oid {
            [0x55, 0x04, 0x03] => "CN",
            [0x55, 0x04, 0x0A] => "O",
            [0x55, 0x04, 0x0B] => "OU",
            [0x55, 0x04, 0x06] => "C",
            _ => continue,
        };
        parts.push(format!("{name}={}", String::from_utf8_lossy(value)));
    }
    (!parts.is_empty()).then(|| parts.join(", "))
}

/// One DER element: (tag, contents, the bytes after it). Lengths up to 4 bytes.
fn der_element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7F);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        rest = &rest[n..];
        len
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_certificates_have_no_issuer() {
        assert_eq!(issuer_of(&[]), None);
        assert_eq!(issuer_of(&[0x30, 0x82, 0xFF]), None);
        assert_eq!(issuer_of(&[0x30, 0x00]), None);
    }
}
