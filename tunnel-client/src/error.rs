//! Why opening a tunnel connection failed.

use std::io;
use std::time::Duration;

/// The outcome of a failed [`crate::connect`] or [`crate::TunnelClient::connect`].
///
/// It converts into [`std::io::Error`] with the kind a socket user expects (see the `From`
/// impl), so `?` works in functions that return `io::Result`; the `ConnectError` stays
/// reachable through the error's `get_ref()` / `into_inner()`.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The configuration cannot work (bad URL, unreadable CA file, bad proxy URL).
    #[error("invalid client configuration: {0}")]
    InvalidConfig(String),
    /// The relay has no broker registered under this name (HTTP 404 on connect).
    #[error("the relay knows no server named {server:?} (is its broker running and linked to the relay?)")]
    NoSuchServer {
        /// The server name asked for.
        server: String,
    },
    /// The relay or a proxy refused the request for good (400, 401, 403, 407, …). A proxy's
    /// 407 to a CONNECT (https:// relay) is reported here too, as status 407.
    #[error("the connect request was refused with HTTP {status} (by the relay or a proxy on the way): {hint}")]
    Refused {
        /// The HTTP status (0 if there was none).
        status: u16,
        /// What the status usually means here and what to check.
        hint: String,
    },
    /// TLS with the relay failed for good: its certificate could not be verified (unknown
    /// CA, wrong name, expired) or the handshake was refused. Retrying cannot fix it; give
    /// the relay's CA with `ca_file` if it is not a public one.
    #[error("TLS with the relay failed: {0}")]
    Tls(String),
    /// The relay answered something that is not the protocol (bad body, wrong packet).
    #[error("unexpected answer from the relay: {0}")]
    BadResponse(String),
    /// The broker refused the connection (CONN_REJECTED), e.g. its backlog is full or it is
    /// not accepting.
    #[error("the server rejected the connection: {0}")]
    Rejected(String),
    /// The relay or the broker ended the connection during the handshake (CONN_ABORT, or
    /// the relay forgot the connection).
    #[error("the connection was aborted during the handshake: {0}")]
    Aborted(String),
    /// No success within the connect timeout; `last_error` says what went wrong last.
    #[error("connect timed out after {after:?}; last problem: {last_error}")]
    TimedOut {
        /// The connect timeout that passed.
        after: Duration,
        /// The last failure seen while retrying.
        last_error: String,
    },
}

impl ConnectError {
    /// The `io::ErrorKind` a socket user would expect for this failure.
    pub fn io_kind(&self) -> io::ErrorKind {
        match self {
            ConnectError::InvalidConfig(_) => io::ErrorKind::InvalidInput,
            // Like a host name that does not resolve: nothing by that name exists.
            ConnectError::NoSuchServer { .. } => io::ErrorKind::NotFound,
            ConnectError::Refused {
                status: 401 | 403 | 407,
                ..
            } => io::ErrorKind::PermissionDenied,
            ConnectError::Refused { .. } => io::ErrorKind::ConnectionRefused,
            // tokio-rustls reports certificate failures as InvalidData too.
            ConnectError::Tls(_) | ConnectError::BadResponse(_) => io::ErrorKind::InvalidData,
            // The server is there but will not take the connection: like a TCP RST to SYN.
            ConnectError::Rejected(_) => io::ErrorKind::ConnectionRefused,
            ConnectError::Aborted(_) => io::ErrorKind::ConnectionAborted,
            ConnectError::TimedOut { .. } => io::ErrorKind::TimedOut,
        }
    }
}

/// `NoSuchServer` → `NotFound`; `Refused` with 401/403/407 → `PermissionDenied`, other
/// statuses → `ConnectionRefused`; `Rejected` → `ConnectionRefused`; `Aborted` →
/// `ConnectionAborted`; `TimedOut` → `TimedOut`; `Tls` and `BadResponse` → `InvalidData`;
/// `InvalidConfig` → `InvalidInput`.
///
/// ```
/// # mod doc_support { include!(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/doc_support/echo_tunnel.rs")); }
/// use std::io;
/// use tunnel_client::{ClientConfig, TunnelStream};
///
/// async fn open(relay_url: &str, server: &str) -> io::Result<TunnelStream> {
///     let stream = tunnel_client::connect(ClientConfig::new(relay_url, server)).await?;
///     Ok(stream)
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> io::Result<()> {
/// # let relay = doc_support::DocRelay::start().await?;
/// # let relay_url = relay.relay_url();
/// let error = open(&relay_url, "no-such-server").await.unwrap_err();
/// assert_eq!(error.kind(), io::ErrorKind::NotFound);
/// println!("{error}"); // the relay knows no server named "no-such-server" (is its broker …
/// # Ok(())
/// # }
/// ```
impl From<ConnectError> for io::Error {
    fn from(error: ConnectError) -> io::Error {
        io::Error::new(error.io_kind(), error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_a_socket_user_expects() {
        let refused = |status| ConnectError::Refused {
            status,
            hint: String::new(),
        };
        let cases = [
            (refused(407), io::ErrorKind::PermissionDenied),
            (refused(401), io::ErrorKind::PermissionDenied),
            (refused(400), io::ErrorKind::ConnectionRefused),
            (
                ConnectError::Rejected("backlog full".into()),
                io::ErrorKind::ConnectionRefused,
            ),
            (
                ConnectError::TimedOut {
                    after: Duration::from_secs(1),
                    last_error: String::new(),
                },
                io::ErrorKind::TimedOut,
            ),
        ];
        for (error, kind) in cases {
            let text = error.to_string();
            let io_error = io::Error::from(error);
            assert_eq!(io_error.kind(), kind, "{text}");
            assert_eq!(io_error.to_string(), text);
            assert!(io_error.into_inner().unwrap().is::<ConnectError>());
        }
    }
}
