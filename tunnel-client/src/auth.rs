//! Credentials for a relay that requires client authentication ([`RelayAuth`]): sent as the
//! `Authorization` header of every connect, push and pull. A relay that refuses them answers
//! 401, which ends a connect at once with `ConnectError::Refused { status: 401, .. }` (never
//! retried: the same credentials would be refused again).

use std::fmt;

use base64::Engine;
use reqwest::header::HeaderValue;

use crate::error::ConnectError;

/// How the client proves itself to the relay.
#[derive(Clone, PartialEq, Eq)]
pub enum RelayAuth {
    /// `Authorization: Bearer <token>`.
    Bearer(String),
    /// `Authorization: Basic base64(user:password)` (RFC 7617).
    Basic {
        /// The user name (may appear in logs).
        user: String,
        /// The password (never logged).
        password: String,
    },
}

impl fmt::Debug for RelayAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The secret never goes to logs; the user name may.
        match self {
            RelayAuth::Bearer(_) => f.write_str("Bearer(<redacted>)"),
            RelayAuth::Basic { user, .. } => f
                .debug_struct("Basic")
                .field("user", user)
                .field("password", &"<redacted>")
                .finish(),
        }
    }
}

impl RelayAuth {
    /// The header value, marked sensitive so HTTP/2 never puts it in a compression table
    /// and `Debug` of the request does not show it. Errors never include the secret.
    pub fn header_value(&self) -> Result<HeaderValue, ConnectError> {
        let text = match self {
            RelayAuth::Bearer(token) => {
                if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
                    return Err(ConnectError::InvalidConfig(
                        "relay bearer token must be non-empty visible ASCII without spaces".into(),
                    ));
                }
                format!("Bearer {token}")
            }
            RelayAuth::Basic { user, password } => {
                if user.is_empty() || user.contains(':') {
                    return Err(ConnectError::InvalidConfig(
                        "relay user name must be non-empty and without ':'".into(),
                    ));
                }
                let encoded =
                    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
                format!("Basic {encoded}")
            }
        };
        let mut value = HeaderValue::from_str(&text).map_err(|_| {
            ConnectError::InvalidConfig("relay credentials cannot be sent in a header".into())
        })?;
        value.set_sensitive(true);
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_headers_and_redacts() {
        let bearer = RelayAuth::Bearer("abc123".into());
        assert_eq!(bearer.header_value().unwrap(), "Bearer abc123");
        assert!(bearer.header_value().unwrap().is_sensitive());
        let basic = RelayAuth::Basic {
            user: "Aladdin".into(),
            password: "open sesame".into(),
        };
        // The example of RFC 7617.
        assert_eq!(
            basic.header_value().unwrap(),
            "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ=="
        );
        let shown = format!("{bearer:?} {basic:?}");
        assert!(
            !shown.contains("abc123") && !shown.contains("sesame"),
            "{shown}"
        );
        assert!(RelayAuth::Bearer("a b".into()).header_value().is_err());
        assert!(RelayAuth::Basic {
            user: "a:b".into(),
            password: "x".into()
        }
        .header_value()
        .is_err());
    }
}
