//! Why opening a tunnel connection failed.

use std::time::Duration;

/// The outcome of a failed [`crate::TunnelStream::connect`].
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The configuration cannot work (bad URL, unreadable CA file, bad proxy URL).
    #[error("invalid client configuration: {0}")]
    InvalidConfig(String),
    /// The relay has no broker registered under this name (HTTP 404 on connect).
    #[error("the relay knows no server named {server:?} (is its broker running and linked to the relay?)")]
    NoSuchServer { server: String },
    /// The relay or a proxy refused the request for good (400, 401, 403, 407, …). A proxy's
    /// 407 to a CONNECT (https:// relay) is reported here too, as status 407.
    #[error("the connect request was refused with HTTP {status} (by the relay or a proxy on the way): {hint}")]
    Refused { status: u16, hint: String },
    /// TLS with the relay failed for good: its certificate could not be verified (unknown
    /// CA, wrong name, expired) or the handshake was refused. Retrying cannot fix it; give
    /// the relay's CA with `ca_file` if it is not a public one.
    #[error("TLS with the relay failed: {0}")]
    Tls(String),
    /// The relay answered something that is not the protocol (bad body, wrong packet).
    #[error("unexpected answer from the relay: {0}")]
    BadResponse(String),
    /// The broker refused the connection (CONN_REJECTED).
    #[error("the server rejected the connection: {0}")]
    Rejected(String),
    /// The relay or the broker ended the connection during the handshake (CONN_ABORT, or
    /// the relay forgot the connection).
    #[error("the connection was aborted during the handshake: {0}")]
    Aborted(String),
    /// No success within the connect timeout; `last_error` says what went wrong last.
    #[error("connect timed out after {after:?}; last problem: {last_error}")]
    TimedOut { after: Duration, last_error: String },
}
