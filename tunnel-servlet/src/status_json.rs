//! `/status.json`: the [`StatusSnapshot`] as JSON, written by hand (a fixed shape; no
//! serialization crate in the relay for one document). Every string goes through
//! [`string`], which escapes what JSON requires.

use std::fmt::Write;

use crate::status::{BrokerStatus, LimitUse, Setting, SettingValue, StatusSnapshot};

/// `s` as a JSON string literal: quotes, backslash and control characters escaped.
pub(crate) fn string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Builds one JSON object, member by member.
struct Object {
    out: String,
}

impl Object {
    fn new() -> Object {
        Object {
            out: String::from("{"),
        }
    }

    /// Adds `"key": raw`, where `raw` is already JSON.
    fn raw(mut self, key: &str, raw: &str) -> Object {
        if self.out.len() > 1 {
            self.out.push(',');
        }
        self.out.push_str(&string(key));
        self.out.push(':');
        self.out.push_str(raw);
        self
    }

    fn num(self, key: &str, value: u64) -> Object {
        self.raw(key, &value.to_string())
    }

    fn text(self, key: &str, value: &str) -> Object {
        self.raw(key, &string(value))
    }

    fn flag(self, key: &str, value: bool) -> Object {
        self.raw(key, if value { "true" } else { "false" })
    }

    fn opt_num(self, key: &str, value: Option<u64>) -> Object {
        match value {
            Some(v) => self.num(key, v),
            None => self.raw(key, "null"),
        }
    }

    fn end(mut self) -> String {
        self.out.push('}');
        self.out
    }
}

fn array(items: impl Iterator<Item = String>) -> String {
    format!("[{}]", items.collect::<Vec<_>>().join(","))
}

fn broker(b: &BrokerStatus) -> String {
    let obj = Object::new()
        .text("name", &b.name)
        .text("instance", &b.instance)
        .text("mode", b.mode)
        .num("capacity", b.capacity)
        .num("reported_live", b.reported_live)
        .num("placements", b.placements)
        .num("punts", b.punts)
        .flag("linked", b.link.is_some());
    let obj = match &b.link {
        Some(link) => obj
            .flag("listening", link.listening)
            .text("peer", &link.peer.to_string())
            .num("link_age_seconds", link.age_seconds),
        None => obj
            .flag("listening", false)
            .raw("peer", "null")
            .raw("link_age_seconds", "null"),
    };
    obj.opt_num("grace_left_seconds", b.grace_left_seconds)
        .num("connections", b.connections)
        .num("connections_opened", b.connections_opened)
        .num("bytes_up", b.bytes_up)
        .num("bytes_down", b.bytes_down)
        .end()
}

fn limit(l: &LimitUse) -> String {
    Object::new()
        .text("name", l.name)
        .text("what", l.what)
        .num("used", l.used)
        .num("max", l.max)
        .end()
}

fn setting(s: &Setting) -> String {
    let obj = Object::new().text("name", s.name);
    match &s.value {
        SettingValue::Number(n) => obj.num("value", *n),
        SettingValue::Bool(b) => obj.flag("value", *b),
        SettingValue::Text(t) => obj.text("value", t),
    }
    .end()
}

impl StatusSnapshot {
    /// The snapshot as one JSON object (the keys are documented in docs/protocol.md).
    pub fn to_json(&self) -> String {
        let t = &self.totals;
        let totals = Object::new()
            .num("open_connections", t.open_connections)
            .num("links_up", t.links_up)
            .num("sessions", t.sessions)
            .num("connects_total", t.connects_total)
            .raw(
                "connects_rejected",
                &Object::new()
                    .num("bad_request", t.connects_rejected_bad_request)
                    .num("no_server", t.connects_rejected_no_server)
                    .num("limit", t.connects_rejected_limit)
                    .num("link_busy", t.connects_rejected_link_busy)
                    .num("no_instance", t.connects_rejected_no_instance)
                    .end(),
            )
            .num("pushes_total", t.pushes_total)
            .num("pulls_total", t.pulls_total)
            .num("streams_total", t.streams_total)
            .num("upstreams_total", t.upstreams_total)
            .num("bytes_up", t.bytes_up)
            .num("bytes_down", t.bytes_down)
            .num("packets_dropped", t.packets_dropped)
            .num("link_auth_failures", t.link_auth_failures)
            .num("client_auth_failures", t.client_auth_failures)
            .num("links_accepted", t.links_accepted)
            .num("connections_closed", t.connections_closed)
            .num("queued_bytes", self.queued_bytes)
            .num("http_connections", self.http_connections)
            .end();
        let mut out = Object::new()
            .text("version", self.version)
            .num("started_unix_seconds", self.started_unix_seconds)
            .num("uptime_seconds", self.uptime_seconds)
            .raw("totals", &totals)
            .raw("brokers", &array(self.brokers.iter().map(broker)))
            .raw("limits", &array(self.limits.iter().map(limit)))
            .raw("settings", &array(self.settings.iter().map(setting)))
            .end();
        out.push('\n');
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_escaped() {
        assert_eq!(string("plain"), r#""plain""#);
        assert_eq!(string("a\"b\\c"), r#""a\"b\\c""#);
        assert_eq!(string("l1\nl2\r\t"), r#""l1\nl2\r\t""#);
        assert_eq!(string("\u{0}\u{1f}\u{7f}"), r#""\u0000\u001f\u007f""#);
        assert_eq!(string("</script>é"), "\"</script>é\"");
    }

    #[test]
    fn objects_and_arrays() {
        let obj = Object::new()
            .num("n", 7)
            .text("s", "x\"y")
            .flag("b", true)
            .opt_num("none", None)
            .end();
        assert_eq!(obj, r#"{"n":7,"s":"x\"y","b":true,"none":null}"#);
        assert_eq!(array(std::iter::empty()), "[]");
        assert_eq!(
            array(["1".to_string(), "2".to_string()].into_iter()),
            "[1,2]"
        );
    }
}
