//! `Proxy-Authenticate` challenges (RFC 9110 §11.6.1): the schemes a proxy offers, and the
//! token it sends back in a connection-bound handshake (NTLM's type 2 message, Negotiate's
//! continuation).

/// The schemes this client knows; others are kept by name for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Scheme {
    Negotiate,
    Ntlm,
    Basic,
    Other(String),
}

impl Scheme {
    fn parse(name: &str) -> Scheme {
        match name.to_ascii_lowercase().as_str() {
            "negotiate" => Scheme::Negotiate,
            "ntlm" => Scheme::Ntlm,
            "basic" => Scheme::Basic,
            _ => Scheme::Other(name.to_string()),
        }
    }

    /// The scheme's name as it goes in `Proxy-Authorization`.
    pub(crate) fn name(&self) -> &str {
        match self {
            Scheme::Negotiate => "Negotiate",
            Scheme::Ntlm => "NTLM",
            Scheme::Basic => "Basic",
            Scheme::Other(name) => name,
        }
    }
}

/// One challenge: the scheme and what follows it (a base64 token for NTLM and Negotiate,
/// `realm="..."` parameters for Basic; empty when bare).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Challenge {
    pub scheme: Scheme,
    pub data: String,
}

/// The challenges of a 407's `Proxy-Authenticate` header values. A value may hold several
/// challenges separated by commas; a new challenge starts at a comma followed by a word
/// that is not a `name=value` parameter.
pub(crate) fn parse_challenges<'a>(values: impl IntoIterator<Item = &'a [u8]>) -> Vec<Challenge> {
    let mut challenges: Vec<Challenge> = Vec::new();
    for value in values {
        let Ok(text) = std::str::from_utf8(value) else {
            continue;
        };
        for part in text.split(',') {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            let (first, rest) = match part.split_once(' ') {
                Some((first, rest)) => (first, rest.trim()),
                None => (part, ""),
            };
            // `realm="x", charset="UTF-8"`: a parameter of the previous challenge. A token68
            // (base64) may end in '=' but has no '=' before its padding.
            let is_param = first.trim_end_matches('=').contains('=');
            match challenges.last_mut() {
                Some(last) if is_param => {
                    if !last.data.is_empty() {
                        last.data.push_str(", ");
                    }
                    last.data.push_str(part);
                }
                _ => challenges.push(Challenge {
                    scheme: Scheme::parse(first),
                    data: rest.to_string(),
                }),
            }
        }
    }
    challenges
}

/// The offered schemes' names, for messages: `Negotiate, NTLM, Basic`.
pub(crate) fn offered(challenges: &[Challenge]) -> String {
    if challenges.is_empty() {
        return "no scheme (no Proxy-Authenticate header)".to_string();
    }
    challenges
        .iter()
        .map(|c| c.scheme.name())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_header_per_scheme_as_squid_sends_them() {
        let values: [&[u8]; 3] = [b"Negotiate", b"NTLM", b"Basic realm=\"tunnel-tests\""];
        let c = parse_challenges(values);
        assert_eq!(
            c.iter().map(|c| c.scheme.clone()).collect::<Vec<_>>(),
            [Scheme::Negotiate, Scheme::Ntlm, Scheme::Basic]
        );
        assert_eq!(c[2].data, "realm=\"tunnel-tests\"");
        assert_eq!(offered(&c), "Negotiate, NTLM, Basic");
    }

    #[test]
    fn several_challenges_in_one_value_and_tokens_with_padding() {
        let c =
            parse_challenges([&b"Basic realm=\"a\", charset=\"UTF-8\", NTLM TlRMTVNTUAACAA=="[..]]);
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].scheme, Scheme::Basic);
        assert_eq!(c[0].data, "realm=\"a\", charset=\"UTF-8\"");
        assert_eq!(c[1].scheme, Scheme::Ntlm);
        assert_eq!(c[1].data, "TlRMTVNTUAACAA==");
        let other = parse_challenges([&b"Digest realm=\"x\""[..]]);
        assert_eq!(other[0].scheme, Scheme::Other("Digest".into()));
    }
}
