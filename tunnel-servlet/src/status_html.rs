//! `/status`: the [`StatusSnapshot`] as one small HTML page (inline CSS, no script), for an
//! operator's browser. Every string from the snapshot goes through [`escape`]; broker
//! names come from the network (LINK_INIT), so they are treated as hostile.

use std::fmt::Write;

use crate::status::{BrokerStatus, LimitUse, SettingValue, StatusSnapshot};

/// How often the page reloads itself (an HTTP-equivalent meta refresh, no script).
const REFRESH_SECONDS: u32 = 10;

/// `s` with `& < > " '` replaced by entities: safe in element content and quoted
/// attributes.
pub(crate) fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `1536` → `1.5 KiB`.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// `3725` → `1h 02m 05s`.
fn duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s:02}s"),
        (0, _, _) => format!("{h}h {m:02}m {s:02}s"),
        _ => format!("{d}d {h:02}h {m:02}m"),
    }
}

/// Seconds since the epoch as `YYYY-MM-DD HH:MM:SS UTC` (proleptic Gregorian calendar).
fn utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's days-to-civil algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

const STYLE: &str = "\
body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#1d232a;background:#f6f7f9}\
h1{font-size:1.6em;margin:0}h2{font-size:1.15em;margin:1.6em 0 .5em}\
.meta{color:#55606d;margin:.3em 0 0}\
table{border-collapse:collapse;background:#fff;box-shadow:0 1px 2px #0002}\
th,td{padding:.35em .8em;border-bottom:1px solid #e3e6ea;text-align:left}\
th{background:#eef1f4;font-weight:600}td.n{text-align:right;font-variant-numeric:tabular-nums}\
.up{color:#137333;font-weight:600}.grace{color:#b06000;font-weight:600}\
.bar{width:12em;height:.8em;background:#e3e6ea;border-radius:3px;overflow:hidden}\
.bar span{display:block;height:100%;background:#1a73e8}.bar span.hot{background:#d93025}\
.empty{color:#55606d;font-style:italic}footer{margin-top:2em;color:#55606d}";

fn broker_row(out: &mut String, b: &BrokerStatus) {
    let (state, peer, age) = match &b.link {
        Some(link) => (
            match b.mode {
                "accepting" => "<span class=\"up\">linked</span>".to_string(),
                "draining" => "<span class=\"up\">linked</span>, draining".to_string(),
                _ => "<span class=\"up\">linked</span>, not listening".to_string(),
            },
            escape(&link.peer.to_string()),
            duration(link.age_seconds),
        ),
        None => (
            format!(
                "<span class=\"grace\">link lost</span>, grace {} left",
                duration(b.grace_left_seconds.unwrap_or(0))
            ),
            "&ndash;".to_string(),
            "&ndash;".to_string(),
        ),
    };
    let _ = write!(
        out,
        "<tr><td class=\"name\">{}</td><td title=\"{}\">{}</td><td>{state}</td><td>{peer}</td>\
         <td class=\"n\">{age}</td><td class=\"n\">{}</td><td class=\"n\">{}</td>\
         <td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td>\
         <td class=\"n\" title=\"{} bytes\">{}</td><td class=\"n\" title=\"{} bytes\">{}</td></tr>",
        escape(&b.name),
        b.instance,
        &b.instance[..8.min(b.instance.len())],
        b.connections,
        if b.capacity == 0 {
            "&ndash;".to_string()
        } else {
            b.capacity.to_string()
        },
        b.connections_opened,
        b.placements,
        b.punts,
        b.bytes_up,
        bytes(b.bytes_up),
        b.bytes_down,
        bytes(b.bytes_down),
    );
}

fn limit_row(out: &mut String, l: &LimitUse) {
    let percent = if l.max == 0 {
        0.0
    } else {
        (l.used as f64 * 100.0 / l.max as f64).min(100.0)
    };
    let hot = if percent >= 90.0 {
        " class=\"hot\""
    } else {
        ""
    };
    let _ = write!(
        out,
        "<tr><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{percent:.1}%</td>\
         <td><div class=\"bar\"><span{hot} style=\"width:{percent:.1}%\"></span></div></td></tr>",
        escape(l.what),
        l.used,
        l.max,
    );
}

impl StatusSnapshot {
    /// The status page.
    pub fn to_html(&self) -> String {
        let mut out = String::with_capacity(8192 + 512 * self.brokers.len());
        let linked = self.brokers.iter().filter(|b| b.link.is_some()).count();
        let _ = write!(
            out,
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
             <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
             <meta http-equiv=\"refresh\" content=\"{REFRESH_SECONDS}\">\
             <title>Tunnel relay status</title><style>{STYLE}</style></head><body>\
             <header><h1>Tunnel relay</h1><p class=\"meta\">version {} &middot; up {} \
             &middot; started {}</p></header>",
            escape(self.version),
            duration(self.uptime_seconds),
            utc(self.started_unix_seconds),
        );

        let _ = write!(
            out,
            "<section id=\"brokers\"><h2>Brokers: {linked} linked, {} in grace period</h2>",
            self.brokers.len() - linked
        );
        if self.brokers.is_empty() {
            out.push_str("<p class=\"empty\">No broker is linked.</p>");
        } else {
            out.push_str(
                "<table><thead><tr><th>Name</th><th>Instance</th><th>State</th>\
                 <th>Link peer</th><th>Link age</th><th>Live connections</th><th>Capacity</th>\
                 <th>Opened</th><th>Placed</th><th>Punted</th><th>Bytes up</th>\
                 <th>Bytes down</th></tr></thead><tbody>",
            );
            for b in &self.brokers {
                broker_row(&mut out, b);
            }
            out.push_str("</tbody></table>");
        }
        out.push_str("</section>");

        let t = &self.totals;
        let rejected = t.connects_rejected_bad_request
            + t.connects_rejected_no_server
            + t.connects_rejected_limit
            + t.connects_rejected_link_busy
            + t.connects_rejected_no_instance;
        let totals: [(&str, String); 11] = [
            ("Open connections", t.open_connections.to_string()),
            ("Sessions", t.sessions.to_string()),
            ("Connections opened", t.connects_total.to_string()),
            ("Connections closed", t.connections_closed.to_string()),
            (
                "Connects refused",
                format!(
                    "{rejected} (bad request {}, no broker {}, limit {}, link busy {}, \
                     no instance now {})",
                    t.connects_rejected_bad_request,
                    t.connects_rejected_no_server,
                    t.connects_rejected_limit,
                    t.connects_rejected_link_busy,
                    t.connects_rejected_no_instance
                ),
            ),
            (
                "Requests",
                format!(
                    "{} pushes, {} streamed upstreams, {} pulls ({} streamed)",
                    t.pushes_total, t.upstreams_total, t.pulls_total, t.streams_total
                ),
            ),
            (
                "Bytes",
                format!("{} up, {} down", bytes(t.bytes_up), bytes(t.bytes_down)),
            ),
            ("Queued for clients", bytes(self.queued_bytes)),
            (
                "Packets dropped (queue full)",
                t.packets_dropped.to_string(),
            ),
            (
                "Authentication failures",
                format!(
                    "{} links, {} clients",
                    t.link_auth_failures, t.client_auth_failures
                ),
            ),
            ("Links accepted", t.links_accepted.to_string()),
        ];
        out.push_str("<section id=\"totals\"><h2>Totals</h2><table><tbody>");
        for (what, value) in totals {
            let _ = write!(
                out,
                "<tr><th>{}</th><td>{}</td></tr>",
                escape(what),
                escape(&value)
            );
        }
        out.push_str("</tbody></table></section>");

        out.push_str(
            "<section id=\"limits\"><h2>Limits</h2><table><thead><tr><th>Bound</th>\
             <th>Used</th><th>Max</th><th>Use</th><th></th></tr></thead><tbody>",
        );
        for l in &self.limits {
            limit_row(&mut out, l);
        }
        out.push_str("</tbody></table></section>");

        out.push_str("<section id=\"settings\"><h2>Settings</h2><table><tbody>");
        for s in &self.settings {
            let value = match &s.value {
                SettingValue::Number(n) => n.to_string(),
                SettingValue::Bool(b) => if *b { "on" } else { "off" }.to_string(),
                SettingValue::Text(t) if t.is_empty() => "(none)".to_string(),
                SettingValue::Text(t) => t.clone(),
            };
            let _ = write!(
                out,
                "<tr><th>{}</th><td>{}</td></tr>",
                escape(s.name),
                escape(&value)
            );
        }
        out.push_str("</tbody></table></section>");
        out.push_str(
            "<footer>The same data: <a href=\"/status.json\">/status.json</a> &middot; \
             <a href=\"/metrics\">/metrics</a>.</footer></body></html>\n",
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::MetricsSnapshot;
    use crate::status::LinkStatus;

    #[test]
    fn escape_covers_markup_and_quotes() {
        assert_eq!(
            escape(r#"<script>alert('x')</script> & "q""#),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;q&quot;"
        );
    }

    #[test]
    fn human_figures() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(5 << 30), "5.0 GiB");
        assert_eq!(duration(5), "5s");
        assert_eq!(duration(3725), "1h 02m 05s");
        assert_eq!(duration(90_061), "1d 01h 01m");
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(1_796_221_445), "2026-12-02 14:24:05 UTC");
    }

    #[test]
    fn a_hostile_broker_name_is_escaped() {
        let snapshot = StatusSnapshot {
            version: "0.0.0",
            started_unix_seconds: 0,
            uptime_seconds: 1,
            totals: MetricsSnapshot::default(),
            queued_bytes: 0,
            http_connections: 0,
            brokers: vec![BrokerStatus {
                name: "<img src=x onerror=alert(1)>".into(),
                instance: "0".repeat(32),
                mode: "accepting",
                capacity: 0,
                reported_live: 0,
                placements: 2,
                punts: 0,
                link: Some(LinkStatus {
                    peer: "127.0.0.1:1".parse().unwrap(),
                    age_seconds: 3,
                    listening: true,
                }),
                grace_left_seconds: None,
                connections: 1,
                connections_opened: 2,
                bytes_up: 3,
                bytes_down: 4,
            }],
            limits: Vec::new(),
            settings: Vec::new(),
        };
        let html = snapshot.to_html();
        assert!(!html.contains("<img"), "{html}");
        assert!(
            html.contains("&lt;img src=x onerror=alert(1)&gt;"),
            "{html}"
        );
        assert!(!html.contains("<script"), "{html}");
    }
}
