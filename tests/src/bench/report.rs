//! A minimal JSON value (the workspace has no serde) and number formatting for the table.

use std::fmt::Write;

use super::stats::{median, ratio};

/// A JSON value, written with [`Json::render`].
#[derive(Debug, Clone)]
pub enum Json {
    Num(f64),
    Str(String),
    Bool(bool),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl Json {
    pub fn obj<K: Into<String>>(fields: Vec<(K, Json)>) -> Json {
        Json::Obj(fields.into_iter().map(|(k, v)| (k.into(), v)).collect())
    }

    pub fn nums(values: &[f64]) -> Json {
        Json::Arr(values.iter().map(|v| Json::Num(*v)).collect())
    }

    /// One measured series: every run, the median, and its ratio to the same series of the
    /// 3-hop chain (`base`; null without one).
    pub fn series(values: &[f64], base: Option<&[f64]>) -> Json {
        Json::obj(vec![
            ("runs", Json::nums(values)),
            ("median", Json::Num(median(values))),
            (
                "ratio_to_3hop",
                Json::Num(base.map_or(f64::NAN, |b| ratio(median(values), median(b)))),
            ),
        ])
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        self.write(&mut out, 0);
        out
    }

    fn write(&self, out: &mut String, indent: usize) {
        match self {
            // JSON has no NaN: a measurement that did not happen is null.
            Json::Num(v) if !v.is_finite() => out.push_str("null"),
            Json::Num(v) => {
                let _ = write!(out, "{}", (v * 1000.0).round() / 1000.0);
            }
            Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Json::Str(s) => {
                out.push('"');
                for c in s.chars() {
                    match c {
                        '"' => out.push_str("\\\""),
                        '\\' => out.push_str("\\\\"),
                        c if (c as u32) < 0x20 => {
                            let _ = write!(out, "\\u{:04x}", c as u32);
                        }
                        c => out.push(c),
                    }
                }
                out.push('"');
            }
            Json::Arr(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    item.write(out, indent);
                }
                out.push(']');
            }
            Json::Obj(fields) => {
                out.push_str("{\n");
                for (i, (key, value)) in fields.iter().enumerate() {
                    out.push_str(&"  ".repeat(indent + 1));
                    Json::Str(key.clone()).write(out, indent + 1);
                    out.push_str(": ");
                    value.write(out, indent + 1);
                    if i + 1 < fields.len() {
                        out.push(',');
                    }
                    out.push('\n');
                }
                out.push_str(&"  ".repeat(indent));
                out.push('}');
            }
        }
    }
}

/// A number for the table; "-" when not measured.
pub fn num(v: f64, decimals: usize) -> String {
    if v.is_finite() {
        format!("{v:.decimals$}")
    } else {
        "-".into()
    }
}

/// Parses a byte count with an optional K/M/G suffix (binary multiples): "64M", "1G", "4096".
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let (digits, mult) = match t.chars().last() {
        Some('k' | 'K') => (&t[..t.len() - 1], 1u64 << 10),
        Some('m' | 'M') => (&t[..t.len() - 1], 1 << 20),
        Some('g' | 'G') => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    let n: u64 = digits
        .parse()
        .map_err(|e| format!("size {text:?}: {e} (use e.g. 64M, 1G, 4096)"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {text:?} overflows"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("16k"), Ok(16 << 10));
        assert_eq!(parse_size("7"), Ok(7));
        assert!(parse_size("x").is_err());
    }

    #[test]
    fn json_renders_nan_as_null_and_escapes() {
        let j = Json::obj(vec![
            ("a", Json::Num(f64::NAN)),
            ("b", Json::Str("q\"\n".into())),
        ]);
        assert_eq!(
            j.render(),
            "{\n  \"a\": null,\n  \"b\": \"q\\\"\\u000a\"\n}"
        );
    }
}
