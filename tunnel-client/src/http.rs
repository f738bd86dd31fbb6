//! The relay's HTTP interface as seen from the client (docs/protocol.md §2): building the
//! `reqwest` client from the configuration, the three requests, bounded body reads, and the
//! classification of failures into "retry", "connection gone" and "refused for good".

use std::time::Duration;

use bytes::Bytes;
use reqwest::{StatusCode, Url};
use tunnel_proto::{Decoder, Packet, PacketType, Token};

use crate::body::PartsBody;
use crate::config::{ClientConfig, HttpVersion};
use crate::error::ConnectError;

/// Longest affinity key the relay takes (a longer one would be ignored there).
const MAX_AFFINITY_LEN: usize = 255;

/// Header carrying the per-connection secret.
pub const TOKEN_HEADER: &str = "Tunnel-Token";

/// Header carrying the session's secret (docs/protocol.md §2.1).
pub const SESSION_TOKEN_HEADER: &str = "Tunnel-Session-Token";
/// Header of the answer to a session opening: the relay's per-connection queue limit in bytes
/// (docs/protocol.md §2.1); relays before it do not send it.
pub const QUEUE_LIMIT_HEADER: &str = "Tunnel-Queue-Limit";

/// Largest HTTP/2 frame the client accepts: a few whole packets (HTTP/2's default is 16 KiB).
const HTTP2_MAX_FRAME_SIZE: u32 = 256 * 1024;

/// The header that names session `key`'s secret in a request.
fn session_secret(key: &SessionKey) -> (&'static str, String) {
    (SESSION_TOKEN_HEADER, key.token.to_hex())
}

/// One session at the relay as the client names it in requests: its id and token, which of
/// the client's sessions (their count, from 1) it is, and its request URLs, built once.
#[derive(Debug)]
pub struct SessionKey {
    pub id: u32,
    /// The session's secret; `Token`'s `Debug` never shows it.
    pub token: Token,
    /// 1 for the first session this client opened, then 2, ...: a connection attached in an
    /// older session must be attached again in a newer one.
    pub generation: u64,
    /// The relay's per-connection queue limit in bytes, as its answer to the opening
    /// announced it (`None`: it did not); it bounds the receive window the session's
    /// connections announce ([`ClientConfig::recv_window_for`](crate::ClientConfig::recv_window_for)).
    pub queue_limit: Option<u64>,
    urls: SessionUrls,
}

impl SessionKey {
    /// The key of session `id`, with the URLs of its requests at `relay`.
    pub fn new(relay: &Relay, id: u32, token: Token, generation: u64) -> SessionKey {
        SessionKey {
            id,
            token,
            generation,
            queue_limit: None,
            urls: SessionUrls {
                connect: relay.session_url("connect", id),
                pull: relay.session_url("pull", id),
                stream: relay.session_url("stream", id),
                push: relay.session_url("push", id),
                upstream: relay.session_url("upstream", id),
                close: relay.session_url("close", id),
            },
        }
    }
}

/// The URLs of a session's requests. Built and parsed once per session rather than once per
/// request: URL building and parsing (IDNA included) was about 1 % of the client's time per
/// message in a profile.
#[derive(Debug)]
struct SessionUrls {
    connect: Url,
    pull: Url,
    stream: Url,
    push: Url,
    upstream: Url,
    close: Url,
}

/// A session the relay opened.
#[derive(Debug)]
pub struct OpenedSession {
    pub id: u32,
    pub token: Token,
    /// The answer came over HTTP/2 (a streamed upstream needs no probe, §2.3).
    pub http2: bool,
    /// The relay's per-connection queue limit in bytes (its `Tunnel-Queue-Limit` header), or
    /// `None` from a relay that does not send it (or sent something that is not a number).
    pub queue_limit: Option<u64>,
}

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
        407 => "Proxy Authentication Required: the proxy wants credentials, or rejected the ones given (Basic or NTLM: --proxy-user, DOMAIN\\user for NTLM, with --proxy-password-env; Negotiate: a Kerberos ticket from kinit, KRB5CCNAME)",
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

/// What one request of `tunnel-client --check` saw: the HTTP version, the relay's
/// certificate (https:// only) and the answer's packets.
pub struct ProbeAnswer {
    pub version: reqwest::Version,
    /// DER of the certificate the TLS connection presented (an intercepting proxy's own).
    pub peer_certificate: Option<Vec<u8>>,
    pub packets: Result<Vec<Packet>, RequestError>,
}

/// One way to reach the relay: directly or through one proxy, with its HTTP client (and so
/// its own connection pool).
#[derive(Debug)]
struct Route {
    client: reqwest::Client,
    /// For log lines: "direct", or the proxy URL and how it was chosen.
    label: String,
    /// The forwarder that runs NTLM/Negotiate handshakes with this route's proxy, when the
    /// client uses one (`crate::proxy_auth`); the client's proxy is then the forwarder.
    proxy_auth: Option<std::sync::Arc<crate::proxy_auth::Forwarder>>,
    /// What `--check` says of proxy authentication on a route without a forwarder.
    auth_note: &'static str,
}

/// The HTTP side of one relay: the routes to it (one, or a PAC script's fail-over list) and
/// the URLs of the three requests. Cloning is cheap and shares the connection pools.
#[derive(Debug, Clone)]
pub struct Relay {
    routes: std::sync::Arc<[Route]>,
    /// Index of the route in use; requests move to the next one when a proxy does not answer.
    current: std::sync::Arc<std::sync::atomic::AtomicUsize>,
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

/// The settings every route's HTTP client shares: time-outs, pool, HTTP version, CA file.
fn client_builder(config: &ClientConfig) -> Result<reqwest::ClientBuilder, ConnectError> {
    let mut builder = reqwest::Client::builder()
        .connect_timeout(config.tcp_connect_timeout)
        .tcp_nodelay(true)
        .pool_max_idle_per_host(config.http_pool_max_idle)
        .pool_idle_timeout(config.http_pool_idle_timeout)
        // Keeps the relay's certificate with each response, for `tunnel-client --check`.
        .tls_info(true)
        // Streamed pulls carry the broker's packets of up to 64 KiB: with the default 16 KiB
        // frames nearly every packet is cut and copied back together.
        .http2_max_frame_size(HTTP2_MAX_FRAME_SIZE)
        .user_agent(concat!("tunnel-client/", env!("CARGO_PKG_VERSION")));
    builder = match config.http_version {
        HttpVersion::Auto => builder,
        HttpVersion::Http1Only => builder.http1_only(),
        HttpVersion::Http2PriorKnowledge => builder.http2_prior_knowledge(),
    };
    if let Some(path) = &config.ca_file {
        let pem = std::fs::read(path)
            .map_err(|e| ConnectError::InvalidConfig(format!("CA file {}: {e}", path.display())))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| ConnectError::InvalidConfig(format!("CA file {}: {e}", path.display())))?;
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
    Ok(builder)
}

fn build_client(builder: reqwest::ClientBuilder) -> Result<reqwest::Client, ConnectError> {
    builder
        .build()
        .map_err(|e| ConnectError::InvalidConfig(format!("HTTP client: {e}")))
}

fn proxy_of(url: &str, user: Option<(&str, &str)>) -> Result<reqwest::Proxy, ConnectError> {
    let mut p = reqwest::Proxy::all(url)
        .map_err(|e| ConnectError::InvalidConfig(format!("proxy URL {url:?}: {e}")))?;
    if let Some((user, password)) = user {
        p = p.basic_auth(user, password);
    }
    Ok(p)
}

/// The routes to the relay, in the order to try them. Precedence: an explicit proxy, then a
/// PAC script, then the environment's proxy variables (or direct without them).
fn routes(config: &ClientConfig, base: &Url) -> Result<Vec<Route>, ConnectError> {
    if let Some(proxy) = &config.proxy {
        let user = proxy
            .username
            .as_deref()
            .map(|u| (u, proxy.password.as_deref().unwrap_or("")));
        // With a user or a Kerberos ticket, the client talks to the proxy through the
        // forwarder, which picks the scheme from the proxy's challenges.
        let forwarder = crate::proxy_auth::forwarder_for(&proxy.url, user, config)?;
        let proxy_setting = match &forwarder {
            Some(forwarder) => proxy_of(&forwarder.url(), None)?,
            None => proxy_of(&proxy.url, user)?,
        };
        // An explicit proxy replaces the environment's.
        let builder = client_builder(config)?.no_proxy().proxy(proxy_setting);
        return Ok(vec![Route {
            client: build_client(builder)?,
            label: format!("proxy {} (--proxy)", proxy.url),
            proxy_auth: forwarder,
            auth_note: if user.is_some() {
                "Basic, sent by the HTTP client without a challenge (https:// proxy)"
            } else {
                "none offered (no --proxy-user, no Kerberos ticket)"
            },
        }]);
    }
    if let Some(source) = &config.pac {
        let script = crate::pac::load(source, config.pac_timeout)
            .map_err(|e| ConnectError::InvalidConfig(format!("PAC script: {e}")))?;
        let chosen = crate::pac::find_proxy(&script, base, config.pac_timeout)
            .map_err(|e| ConnectError::InvalidConfig(format!("PAC script: {e}")))?;
        tracing::info!(relay = %base, "PAC script chose {chosen:?}");
        return chosen
            .into_iter()
            .map(|route| {
                // A PAC proxy gets Negotiate when a Kerberos ticket is usable (no user: the
                // proxy user goes with --proxy only).
                let mut forwarder = None;
                let (builder, label) = match route {
                    crate::pac::PacRoute::Direct => (
                        client_builder(config)?.no_proxy(),
                        "direct (PAC script)".to_string(),
                    ),
                    crate::pac::PacRoute::Proxy(url) => {
                        forwarder = crate::proxy_auth::forwarder_for(&url, None, config)?;
                        let target = match &forwarder {
                            Some(forwarder) => forwarder.url(),
                            None => url.clone(),
                        };
                        (
                            client_builder(config)?
                                .no_proxy()
                                .proxy(proxy_of(&target, None)?),
                            format!("proxy {url} (PAC script)"),
                        )
                    }
                };
                Ok(Route {
                    client: build_client(builder)?,
                    label,
                    proxy_auth: forwarder,
                    auth_note: "none (PAC routes get Negotiate only, and no Kerberos ticket)",
                })
            })
            .collect();
    }
    let (builder, label) = if config.env_proxy {
        (client_builder(config)?, "environment proxy variables")
    } else {
        (client_builder(config)?.no_proxy(), "direct")
    };
    Ok(vec![Route {
        client: build_client(builder)?,
        label: label.to_string(),
        proxy_auth: None,
        auth_note: "none (no explicit proxy)",
    }])
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
        let routes = routes(config, &base)?;
        let auth = config
            .relay_auth
            .as_ref()
            .map(crate::auth::RelayAuth::header_value)
            .transpose()?;
        Ok(Relay {
            routes: routes.into(),
            current: Default::default(),
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

    /// How requests reach the relay now: "direct", or the proxy and how it was chosen.
    pub fn route_label(&self) -> &str {
        let i = self.current.load(std::sync::atomic::Ordering::Relaxed);
        &self.routes[i % self.routes.len()].label
    }

    /// The proxy authentication of the route in use: the scheme (and user or Kerberos
    /// service) its last handshake used, or why there is none. For `--check`.
    pub fn proxy_auth(&self) -> String {
        let i = self.current.load(std::sync::atomic::Ordering::Relaxed);
        let route = &self.routes[i % self.routes.len()];
        match &route.proxy_auth {
            Some(forwarder) => forwarder
                .status()
                .negotiated()
                .unwrap_or_else(|| "no handshake completed".to_string()),
            None => route.auth_note.to_string(),
        }
    }

    /// Why the proxy of the route in use last refused authentication (scheme and user), to
    /// explain a 407.
    pub fn proxy_auth_failure(&self) -> Option<String> {
        let i = self.current.load(std::sync::atomic::Ordering::Relaxed);
        let route = &self.routes[i % self.routes.len()];
        route.proxy_auth.as_ref()?.status().failure()
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
        self.post_packets(self.url("connect", None), None, init.to_bytes().into())
            .await
    }

    /// `POST url` with `body` (packets) and, if given, the secret header `(name, value)`;
    /// the packets of the answer. Connects and pushes of both transports.
    async fn post_packets(
        &self,
        url: Url,
        secret: Option<(&'static str, String)>,
        body: PartsBody,
    ) -> Result<Vec<Packet>, RequestError> {
        self.exchange(|client| {
            let request = client
                .post(url.clone())
                .timeout(self.request_timeout)
                .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
                .body(reqwest::Body::wrap(body.clone()));
            match &secret {
                Some((name, value)) => request.header(*name, value.clone()),
                None => request,
            }
        })
        .await
    }

    /// `GET Type=pull`: the queued packets (at least a NO_OP when the relay's wait ran out).
    pub async fn pull(&self, conn_id: u32, token: &Token) -> Result<Vec<Packet>, RequestError> {
        let url = self.url("pull", Some(conn_id));
        self.exchange(|client| {
            client
                .get(url.clone())
                .timeout(self.pull_timeout)
                .header(TOKEN_HEADER, token.to_hex())
        })
        .await
    }

    /// `POST Type=push` with encoded packets; the packets piggybacked on the answer.
    pub async fn push(
        &self,
        conn_id: u32,
        token: &Token,
        body: Bytes,
    ) -> Result<Vec<Packet>, RequestError> {
        let url = self.url("push", Some(conn_id));
        self.post_packets(url, Some((TOKEN_HEADER, token.to_hex())), body.into())
            .await
    }

    /// URL of a request in session `id`: `Type` and `Session`, plus `ServerName` (and the
    /// affinity key) on connect. `stream` is a pull with `Stream=1` (docs/protocol.md §2.2),
    /// `upstream` a push with `Stream=1` (§2.3).
    fn session_url(&self, kind: &str, id: u32) -> Url {
        let streamed = kind == "stream" || kind == "upstream";
        let mut url = self.base.clone();
        {
            let mut q = url.query_pairs_mut();
            let kind = match kind {
                "stream" => "pull",
                "upstream" => "push",
                other => other,
            };
            q.append_pair("Type", kind);
            if kind == "connect" {
                q.append_pair("ServerName", &self.server_name);
                if let Some(key) = &self.affinity {
                    q.append_pair("Affinity", key);
                }
            }
            q.append_pair("Session", &id.to_string());
            if streamed {
                q.append_pair("Stream", "1");
            }
        }
        url
    }

    /// `POST Type=session` with one SESSION_INIT: the new session's id and token, and
    /// whether the answer came over HTTP/2.
    pub async fn open_session(&self, init: &Packet) -> Result<OpenedSession, RequestError> {
        let mut url = self.base.clone();
        url.query_pairs_mut().append_pair("Type", "session");
        let response = self.post_response(url, init.to_bytes()).await?;
        let http2 = response.version() == reqwest::Version::HTTP_2;
        let queue_limit = response
            .headers()
            .get(QUEUE_LIMIT_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        let packets = self.packets_of(response).await?;
        let answer = packets
            .into_iter()
            .find(|p| p.kind == PacketType::SessionInit && p.conn_id != 0)
            .ok_or_else(|| RequestError::BadBody("session answer holds no SESSION_INIT".into()))?;
        let token = tunnel_proto::payload::decode_token(answer.payload)
            .map_err(|e| RequestError::BadBody(format!("session answer: {e}")))?;
        Ok(OpenedSession {
            id: answer.conn_id,
            token,
            http2,
            queue_limit,
        })
    }

    /// `POST Type=connect` in a session; the answer's packets.
    pub async fn session_connect(
        &self,
        key: &SessionKey,
        init: &Packet,
    ) -> Result<Vec<Packet>, RequestError> {
        let url = key.urls.connect.clone();
        self.post_packets(url, Some(session_secret(key)), init.to_bytes().into())
            .await
    }

    /// `GET Type=pull` of a session: packets of any of its connections.
    pub async fn session_pull(&self, key: &SessionKey) -> Result<Vec<Packet>, RequestError> {
        self.exchange(|client| {
            client
                .get(key.urls.pull.clone())
                .timeout(self.pull_timeout)
                .header(SESSION_TOKEN_HEADER, key.token.to_hex())
        })
        .await
    }

    /// `GET Type=pull&Stream=1` of a session (docs/protocol.md §2.2): the response, once its
    /// status is 200, to be read with [`Relay::stream_chunk`] as the relay writes it.
    pub async fn session_stream(
        &self,
        key: &SessionKey,
    ) -> Result<reqwest::Response, RequestError> {
        let response = self
            .send(|client| {
                client
                    .get(key.urls.stream.clone())
                    .timeout(self.pull_timeout)
                    .header(SESSION_TOKEN_HEADER, key.token.to_hex())
            })
            .await?;
        let status = response.status();
        if status != StatusCode::OK {
            return Err(RequestError::Status { status });
        }
        Ok(response)
    }

    /// `POST Type=push&Stream=1` of a session (docs/protocol.md §2.3), over HTTP/2: `body`
    /// goes up as it is written; the response (200, nothing in it) comes as soon as the
    /// relay has the request's headers, and ends when the upstream does. No deadline: it
    /// lives as long as its body (the caller bounds the wait for the headers).
    pub async fn session_upstream(
        &self,
        key: &SessionKey,
        body: reqwest::Body,
    ) -> Result<reqwest::Response, RequestError> {
        // A streamed body can be sent once; should the route fail over (no connection to
        // the proxy), the retry goes with an empty body, which ends that upstream at once.
        let body = std::sync::Mutex::new(Some(body));
        let response = self
            .send(|client| {
                let body = body
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take()
                    .unwrap_or_default();
                client
                    .post(key.urls.upstream.clone())
                    .header(SESSION_TOKEN_HEADER, key.token.to_hex())
                    .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
                    .body(body)
            })
            .await?;
        let status = response.status();
        if status != StatusCode::OK {
            return Err(RequestError::Status { status });
        }
        Ok(response)
    }

    /// The next bytes of a streamed pull, as they arrive; `None` at its end.
    pub async fn stream_chunk(
        response: &mut reqwest::Response,
    ) -> Result<Option<Bytes>, RequestError> {
        response.chunk().await.map_err(network_error)
    }

    /// `POST Type=push` of a session with packets of any of its connections (and ATTACHes);
    /// the packets of the answer.
    pub async fn session_push(
        &self,
        key: &SessionKey,
        body: PartsBody,
    ) -> Result<Vec<Packet>, RequestError> {
        let url = key.urls.push.clone();
        self.post_packets(url, Some(session_secret(key)), body)
            .await
    }

    /// `POST Type=close` of a session: the client is done with it.
    pub async fn close_session(&self, key: &SessionKey) -> Result<(), RequestError> {
        let url = key.urls.close.clone();
        self.post_packets(url, Some(session_secret(key)), PartsBody::default())
            .await
            .map(|_| ())
    }

    /// The server name connections are opened to.
    pub fn server_name(&self) -> &str {
        &self.server_name
    }

    /// `POST Type=connect` as [`Relay::connect`], keeping what `--check` reports.
    pub async fn probe_connect(&self, init: &Packet) -> Result<ProbeAnswer, RequestError> {
        let url = self.url("connect", None);
        let response = self.post_response(url, init.to_bytes()).await?;
        Ok(self.probe_answer(response).await)
    }

    /// POSTs packets without a secret; the response, whatever its status.
    async fn post_response(
        &self,
        url: Url,
        body: Bytes,
    ) -> Result<reqwest::Response, RequestError> {
        self.send(|client| {
            client
                .post(url.clone())
                .timeout(self.request_timeout)
                .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
                .body(body.clone())
        })
        .await
    }

    /// `GET Type=pull` as [`Relay::pull`], keeping what `--check` reports.
    pub async fn probe_pull(
        &self,
        conn_id: u32,
        token: &Token,
    ) -> Result<ProbeAnswer, RequestError> {
        let url = self.url("pull", Some(conn_id));
        let response = self
            .send(|client| {
                client
                    .get(url.clone())
                    .timeout(self.pull_timeout)
                    .header(TOKEN_HEADER, token.to_hex())
            })
            .await?;
        Ok(self.probe_answer(response).await)
    }

    async fn probe_answer(&self, response: reqwest::Response) -> ProbeAnswer {
        let version = response.version();
        let peer_certificate = response
            .extensions()
            .get::<reqwest::tls::TlsInfo>()
            .and_then(|info| info.peer_certificate())
            .map(<[u8]>::to_vec);
        ProbeAnswer {
            version,
            peer_certificate,
            packets: self.packets_of(response).await,
        }
    }

    async fn exchange(
        &self,
        make: impl Fn(&reqwest::Client) -> reqwest::RequestBuilder,
    ) -> Result<Vec<Packet>, RequestError> {
        let response = self.send(make).await?;
        self.packets_of(response).await
    }

    /// Sends the request `make` builds, on the route in use; when the route's proxy does not
    /// answer (no connection to it), moves on to the next route (PAC fail-over) and tries
    /// again, each route at most once per request.
    async fn send(
        &self,
        make: impl Fn(&reqwest::Client) -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, RequestError> {
        use std::sync::atomic::Ordering;
        let mut index = self.current.load(Ordering::Relaxed) % self.routes.len();
        let mut tries = 1;
        let response = loop {
            let request = make(&self.routes[index].client);
            // Every request carries the credentials: the relay checks each one.
            let request = match &self.auth {
                Some(value) => request.header(reqwest::header::AUTHORIZATION, value.clone()),
                None => request,
            };
            match request.send().await {
                Ok(response) => break response,
                Err(e) if e.is_connect() && tries < self.routes.len() => {
                    let next = (index + 1) % self.routes.len();
                    // Another request may have moved on already; only one logs the move.
                    if self
                        .current
                        .compare_exchange(index, next, Ordering::Relaxed, Ordering::Relaxed)
                        .is_ok()
                    {
                        tracing::warn!(
                            "{} does not answer ({}); trying {}",
                            self.routes[index].label,
                            network_error(e),
                            self.routes[next].label
                        );
                    }
                    index = next;
                    tries += 1;
                }
                Err(e) => return Err(network_error(e)),
            }
        };
        Ok(response)
    }

    /// A 200 answer's packets; any other status is an error.
    async fn packets_of(&self, response: reqwest::Response) -> Result<Vec<Packet>, RequestError> {
        let status = response.status();
        if status != StatusCode::OK {
            return Err(RequestError::Status { status });
        }
        read_packets(response, self.max_response_body, self.max_packet_size).await
    }
}

/// Reads a whole body's packets, failing as soon as the body grows past `limit` bytes. Each
/// chunk is decoded as it comes: the packets whole in it are slices of it, and only a packet
/// cut by a chunk's edge is copied (collecting a poll's chunks into one buffer first copied
/// every byte of it, 6 % of the client's time over polls).
async fn read_packets(
    mut response: reqwest::Response,
    limit: usize,
    max_packet_size: usize,
) -> Result<Vec<Packet>, RequestError> {
    if response
        .content_length()
        .is_some_and(|len| len > limit as u64)
    {
        return Err(RequestError::BodyTooLarge { limit });
    }
    let bad_body = |e: tunnel_proto::DecodeError| RequestError::BadBody(e.to_string());
    let mut decoder = Decoder::new(max_packet_size);
    let mut packets = Vec::new();
    let mut read = 0;
    while let Some(chunk) = response.chunk().await.map_err(network_error)? {
        read += chunk.len();
        if read > limit {
            return Err(RequestError::BodyTooLarge { limit });
        }
        decoder.feed_bytes(chunk);
        while let Some(packet) = decoder.next_packet().map_err(bad_body)? {
            packets.push(packet);
        }
    }
    decoder.finish().map_err(bad_body)?;
    Ok(packets)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 200 response whose body arrives as `chunks`.
    fn response_in(chunks: Vec<Bytes>) -> reqwest::Response {
        let body = reqwest::Body::wrap(crate::body::PartsBody::new(chunks));
        reqwest::Response::from(hyper::Response::new(body))
    }

    #[tokio::test]
    async fn a_body_in_chunks_gives_its_packets_and_its_errors() {
        let packets: Vec<Packet> = (0..4u32)
            .map(|i| Packet::new(PacketType::Data, 3, Bytes::from(vec![i as u8; 5000])).with_seq(i))
            .collect();
        let wire = tunnel_proto::encode_all(&packets);
        // Cuts inside the first and the third packet.
        let chunks = vec![
            wire.slice(..100),
            wire.slice(100..12_000),
            wire.slice(12_000..),
        ];
        let got = read_packets(response_in(chunks), 1 << 20, 1 << 16)
            .await
            .unwrap();
        assert_eq!(got, packets);

        let too_large = read_packets(response_in(vec![wire.clone()]), 1000, 1 << 16).await;
        assert!(matches!(
            too_large,
            Err(RequestError::BodyTooLarge { limit: 1000 })
        ));

        let cut = read_packets(
            response_in(vec![wire.slice(..wire.len() - 1)]),
            1 << 20,
            1 << 16,
        )
        .await;
        assert!(matches!(cut, Err(RequestError::BadBody(_))), "{cut:?}");
    }

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
