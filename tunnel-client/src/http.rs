//! The relay's HTTP interface as seen from the client (docs/protocol.md §2): building the
//! `reqwest` client from the configuration, the three requests, bounded body reads, and the
//! classification of failures into "retry", "connection gone" and "refused for good".

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use reqwest::{StatusCode, Url};
use tunnel_proto::{Packet, Token};

use crate::config::{ClientConfig, HttpVersion};
use crate::error::ConnectError;

/// Longest affinity key the relay takes (a longer one would be ignored there).
const MAX_AFFINITY_LEN: usize = 255;

/// Header carrying the per-connection secret.
pub const TOKEN_HEADER: &str = "Tunnel-Token";

/// Why one request did not produce a 200 answer with a readable body.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("HTTP {status}{}", hint_suffix(*status))]
    Status { status: StatusCode },
    #[error("request failed: {0}")]
    Network(String),
    #[error("response body larger than the limit of {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("malformed response body: {0}")]
    BadBody(String),
    /// The relay's certificate was not accepted; retrying cannot help.
    #[error("TLS certificate of the relay not accepted: {0}")]
    Tls(String),
}

fn hint_suffix(status: StatusCode) -> String {
    match status_hint(status) {
        Some(h) => format!(" ({h})"),
        None => String::new(),
    }
}

/// A short explanation of a status for log lines and errors.
pub fn status_hint(status: StatusCode) -> Option<&'static str> {
    Some(match status.as_u16() {
        400 => "the relay found the request malformed; client and relay versions may differ",
        401 => "the relay requires client credentials or refused the ones given (ClientConfig::relay_auth; tunnel-client --relay-token-env or --relay-user with --relay-password-env)",
        403 => "refused by the relay or a proxy; check access rules",
        404 => "unknown server name or connection at the relay",
        407 => "Proxy Authentication Required: the proxy wants a user and password, or rejected the ones given",
        413 => "push body over the relay's limit; lower max_push_body",
        502 | 504 => "a proxy could not reach the relay",
        503 => "relay at its connection limit, or the broker's link is down; retrying",
        _ => return None,
    })
}

/// How the caller should treat a failed request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// 5xx, time-outs, network errors, unreadable bodies: retry with back-off.
    Transient,
    /// 404: the relay does not know the connection (or server): it is gone.
    Gone,
    /// Any other status: retrying the same request will not help.
    Permanent,
}

impl RequestError {
    pub fn failure(&self) -> Failure {
        match self {
            RequestError::Status { status } if *status == StatusCode::NOT_FOUND => Failure::Gone,
            RequestError::Status { status }
                if status.is_server_error() || *status == StatusCode::REQUEST_TIMEOUT =>
            {
                Failure::Transient
            }
            RequestError::Status { .. } | RequestError::Tls(_) => Failure::Permanent,
            RequestError::Network(_)
            | RequestError::BodyTooLarge { .. }
            | RequestError::BadBody(_) => Failure::Transient,
        }
    }

    pub fn status(&self) -> Option<StatusCode> {
        match self {
            RequestError::Status { status } => Some(*status),
            _ => None,
        }
    }
}

/// Texts with which hyper-util (and older reqwest) report a proxy's 407 answer to CONNECT.
/// The error type is not public, so its message is all there is to recognise it by.
const CONNECT_407_MESSAGES: &[&str] = &[
    "proxy authorization required",
    "proxy authentication required",
];

fn network_error(e: reqwest::Error) -> RequestError {
    // reqwest's Display omits the cause ("error sending request"); the chain says why.
    let mut msg = e.to_string();
    let mut certificate = false;
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        certificate |= is_certificate_error(s);
        source = s.source();
    }
    // A proxy refusing CONNECT for want of credentials answers 407 just as it would to a
    // plain request; both are final and reported alike.
    let lower = msg.to_lowercase();
    if CONNECT_407_MESSAGES.iter().any(|m| lower.contains(m)) {
        return RequestError::Status {
            status: StatusCode::PROXY_AUTHENTICATION_REQUIRED,
        };
    }
    if certificate {
        return RequestError::Tls(msg);
    }
    if e.is_timeout() {
        msg.push_str(" (timed out)");
    }
    RequestError::Network(msg)
}

/// Most `io::Error` wrappers looked through for a rustls error.
const MAX_IO_WRAPPERS: usize = 4;

/// Whether `error` is rustls rejecting a certificate (the relay's, or ours by the relay).
/// tokio-rustls wraps the rustls error in an `io::Error` (sometimes wrapped again), whose
/// `source` skips the wrapped error, so the wrapped errors are looked at too.
fn is_certificate_error(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current: &(dyn std::error::Error + 'static) = error;
    for _ in 0..=MAX_IO_WRAPPERS {
        if let Some(rustls_error) = current.downcast_ref::<rustls::Error>() {
            return is_certificate_rejection(rustls_error);
        }
        let inner = current
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref());
        match inner {
            Some(inner) => current = inner,
            None => return false,
        }
    }
    false
}

fn is_certificate_rejection(rustls_error: &rustls::Error) -> bool {
    matches!(
        rustls_error,
        rustls::Error::InvalidCertificate(_)
            | rustls::Error::NoCertificatesPresented
            | rustls::Error::AlertReceived(rustls::AlertDescription::BadCertificate)
            | rustls::Error::AlertReceived(rustls::AlertDescription::UnknownCA)
            | rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRequired)
    )
}

/// The HTTP side of one relay: a `reqwest` client and the URLs of the three requests.
/// Cloning is cheap and shares the client's connection pool.
#[derive(Debug, Clone)]
pub struct Relay {
    client: reqwest::Client,
    /// `Authorization` for the relay (sensitive: never logged, never HPACK-indexed).
    auth: Option<reqwest::header::HeaderValue>,
    base: Url,
    server_name: String,
    /// `ClientConfig::affinity`, sent with connects only.
    affinity: Option<String>,
    pull_timeout: Duration,
    request_timeout: Duration,
    max_response_body: usize,
    max_packet_size: usize,
}

impl Relay {
    pub fn new(config: &ClientConfig) -> Result<Relay, ConnectError> {
        let base = Url::parse(&config.relay_url).map_err(|e| {
            ConnectError::InvalidConfig(format!("relay URL {:?}: {e}", config.relay_url))
        })?;
        if base.scheme() != "http" && base.scheme() != "https" {
            return Err(ConnectError::InvalidConfig(format!(
                "relay URL {:?}: the scheme must be http or https",
                config.relay_url
            )));
        }
        if config.server_name.is_empty() {
            return Err(ConnectError::InvalidConfig("empty server name".into()));
        }
        if let Some(key) = &config.affinity {
            if key.is_empty() || key.len() > MAX_AFFINITY_LEN {
                return Err(ConnectError::InvalidConfig(format!(
                    "affinity key must be 1..={MAX_AFFINITY_LEN} bytes, got {}",
                    key.len()
                )));
            }
        }
        let mut builder = reqwest::Client::builder()
            .connect_timeout(config.tcp_connect_timeout)
            .tcp_nodelay(true)
            .pool_max_idle_per_host(config.http_pool_max_idle)
            .pool_idle_timeout(config.http_pool_idle_timeout)
            .user_agent(concat!("tunnel-client/", env!("CARGO_PKG_VERSION")));
        builder = match config.http_version {
            HttpVersion::Auto => builder,
            HttpVersion::Http1Only => builder.http1_only(),
            HttpVersion::Http2PriorKnowledge => builder.http2_prior_knowledge(),
        };
        if let Some(proxy) = &config.proxy {
            let mut p = reqwest::Proxy::all(&proxy.url).map_err(|e| {
                ConnectError::InvalidConfig(format!("proxy URL {:?}: {e}", proxy.url))
            })?;
            if let Some(user) = &proxy.username {
                p = p.basic_auth(user, proxy.password.as_deref().unwrap_or(""));
            }
            // An explicit proxy replaces the environment's.
            builder = builder.no_proxy().proxy(p);
        } else if !config.env_proxy {
            builder = builder.no_proxy();
        }
        if let Some(path) = &config.ca_file {
            let pem = std::fs::read(path).map_err(|e| {
                ConnectError::InvalidConfig(format!("CA file {}: {e}", path.display()))
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                ConnectError::InvalidConfig(format!("CA file {}: {e}", path.display()))
            })?;
            if certs.is_empty() {
                return Err(ConnectError::InvalidConfig(format!(
                    "CA file {}: no PEM certificate in it",
                    path.display()
                )));
            }
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        let client = builder
            .build()
            .map_err(|e| ConnectError::InvalidConfig(format!("HTTP client: {e}")))?;
        let auth = config
            .relay_auth
            .as_ref()
            .map(crate::auth::RelayAuth::header_value)
            .transpose()?;
        Ok(Relay {
            client,
            auth,
            base,
            server_name: config.server_name.clone(),
            affinity: config.affinity.clone(),
            pull_timeout: config.pull_timeout,
            request_timeout: config.request_timeout,
            max_response_body: config.max_response_body,
            max_packet_size: config.max_packet_size,
        })
    }

    /// The relay URL without credentials or query, for log lines.
    pub fn display_url(&self) -> String {
        let mut u = self.base.clone();
        let _ = u.set_username("");
        let _ = u.set_password(None);
        u.set_query(None);
        u.to_string()
    }

    fn url(&self, kind: &str, conn_id: Option<u32>) -> Url {
        let mut url = self.base.clone();
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("Type", kind);
            q.append_pair("ServerName", &self.server_name);
            if let Some(id) = conn_id {
                q.append_pair("ConnId", &id.to_string());
            }
            if let (Some(key), "connect") = (&self.affinity, kind) {
                q.append_pair("Affinity", key);
            }
        }
        url
    }

    /// `POST Type=connect` with one CONN_INIT; the answer's packets.
    pub async fn connect(&self, init: &Packet) -> Result<Vec<Packet>, RequestError> {
        let request = self
            .client
            .post(self.url("connect", None))
            .timeout(self.request_timeout)
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(init.to_bytes());
        self.exchange(request).await
    }

    /// `GET Type=pull`: the queued packets (at least a NO_OP when the relay's wait ran out).
    pub async fn pull(&self, conn_id: u32, token: &Token) -> Result<Vec<Packet>, RequestError> {
        let request = self
            .client
            .get(self.url("pull", Some(conn_id)))
            .timeout(self.pull_timeout)
            .header(TOKEN_HEADER, token.to_hex());
        self.exchange(request).await
    }

    /// `POST Type=push` with encoded packets; the packets piggybacked on the answer.
    pub async fn push(
        &self,
        conn_id: u32,
        token: &Token,
        body: Bytes,
    ) -> Result<Vec<Packet>, RequestError> {
        let request = self
            .client
            .post(self.url("push", Some(conn_id)))
            .timeout(self.request_timeout)
            .header(TOKEN_HEADER, token.to_hex())
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(body);
        self.exchange(request).await
    }

    async fn exchange(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<Vec<Packet>, RequestError> {
        // Every request carries the credentials: the relay checks each one.
        let request = match &self.auth {
            Some(value) => request.header(reqwest::header::AUTHORIZATION, value.clone()),
            None => request,
        };
        let response = request.send().await.map_err(network_error)?;
        let status = response.status();
        if status != StatusCode::OK {
            return Err(RequestError::Status { status });
        }
        let body = read_body(response, self.max_response_body).await?;
        tunnel_proto::decode_all(body, self.max_packet_size)
            .map_err(|e| RequestError::BadBody(e.to_string()))
    }
}

/// Reads a whole body, failing as soon as it grows past `limit` bytes.
async fn read_body(mut response: reqwest::Response, limit: usize) -> Result<Bytes, RequestError> {
    if response
        .content_length()
        .is_some_and(|len| len > limit as u64)
    {
        return Err(RequestError::BodyTooLarge { limit });
    }
    let mut first: Option<Bytes> = None;
    let mut rest = BytesMut::new();
    while let Some(chunk) = response.chunk().await.map_err(network_error)? {
        let have = first.as_ref().map_or(0, Bytes::len) + rest.len();
        if have + chunk.len() > limit {
            return Err(RequestError::BodyTooLarge { limit });
        }
        // A body that arrives in one chunk (the common case) is passed on without a copy.
        match &first {
            None => first = Some(chunk),
            Some(f) => {
                if rest.is_empty() {
                    rest.extend_from_slice(f);
                }
                rest.extend_from_slice(&chunk);
            }
        }
    }
    Ok(if rest.is_empty() {
        first.unwrap_or_default()
    } else {
        rest.freeze()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io_wrap(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::InvalidData, e)
    }

    #[test]
    fn certificate_rejections_are_found_through_io_error_wrappers() {
        let unknown = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        assert!(is_certificate_error(&unknown));
        assert!(is_certificate_error(&io_wrap(unknown.clone())));
        assert!(is_certificate_error(&io_wrap(io_wrap(unknown))));
        let alert = rustls::Error::AlertReceived(rustls::AlertDescription::UnknownCA);
        assert!(is_certificate_error(&io_wrap(alert)));
    }

    #[test]
    fn other_errors_are_not_certificate_errors() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert!(!is_certificate_error(&refused));
        let handshake = rustls::Error::HandshakeNotComplete;
        assert!(!is_certificate_error(&io_wrap(handshake)));
        assert!(!is_certificate_error(&io_wrap("plain message")));
    }

    #[test]
    fn tls_failures_are_permanent() {
        assert_eq!(RequestError::Tls("x".into()).failure(), Failure::Permanent);
    }
}
