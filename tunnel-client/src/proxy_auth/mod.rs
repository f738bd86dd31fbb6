//! Proxy authentication beyond what the HTTP client does by itself: NTLM (v2) and Negotiate
//! (Kerberos through the system's GSSAPI), chosen from the proxy's `Proxy-Authenticate`
//! challenges, with Basic as the last choice.
//!
//! # Why an in-process forwarder
//!
//! NTLM and Negotiate authenticate a *connection*, not a request: the handshake (two or three
//! requests) must run on the very keep-alive connection to the proxy that then carries the
//! traffic. reqwest 0.12 opens its proxy connections itself and cannot run such a handshake
//! on them. Two ways around that were weighed:
//!
//! - (a) **an authenticating forwarder inside the client** (what cntlm and px do as separate
//!   programs): a listener on `127.0.0.1:0` that reqwest uses as its proxy. Each connection
//!   reqwest opens to it gets its own connection to the real proxy, authenticated by the
//!   handshake on the first request (the CONNECT for an `https://` relay; for an `http://`
//!   relay the first absolute-form request, re-sent with each round, or, when it has a
//!   body, a body-less `OPTIONS` probe for the same URL before it). Then bytes are copied
//!   both ways. When the proxy closes its connection the forwarder closes
//!   reqwest's, and reqwest's next connection is authenticated afresh.
//! - (b) a hyper-util `Client` with a connector of our own for routes through such a proxy.
//!
//! (a) was chosen: reqwest keeps doing everything it does for every other route (TLS inside
//! CONNECT with the relay's CA, HTTP/2 by ALPN, the certificate `--check` reports, time-outs,
//! pooling, error classification), so the route through an authenticating proxy behaves
//! exactly like the others and `http.rs`'s request code does not fork in two. The cost is
//! one loopback hop and a task per proxy connection, bounded by [`ProxyAuthConfig`].
//!
//! The forwarder is used for an explicit `http://` proxy when a user is configured or a
//! Kerberos credential cache is usable, and for a PAC script's `http://` proxies when a
//! Kerberos credential cache is usable (they get no user); otherwise reqwest talks to the
//! proxy directly, as before. Scheme preference: Negotiate (when offered and a ticket can be had), then NTLM,
//! then Basic (both need `--proxy-user`). A proxy that refuses the credentials ends the
//! connect at once with a 407 whose hint names the scheme and user ([`AuthStatus`]).

mod challenge;
mod forwarder;
mod http1;
#[cfg(feature = "negotiate")]
mod negotiate;
mod ntlm;
mod session;

use std::sync::{Arc, Mutex};
use std::time::Duration;

pub(crate) use forwarder::Forwarder;

/// Bounds of the proxy-authenticating forwarder: for an explicit `http://` proxy, when a
/// proxy user is configured or a Kerberos ticket is usable, the client reaches the proxy
/// through a forwarder inside the process (on 127.0.0.1) that runs the NTLM, Negotiate or
/// Basic handshake on each proxy connection, because NTLM and Negotiate authenticate a
/// connection rather than a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyAuthConfig {
    /// Connections to the proxy open at once through the forwarder; further ones wait for a
    /// free slot. Default: 1024.
    pub max_connections: usize,
    /// Deadline for the whole authentication handshake of one connection (all its rounds,
    /// the first request's body included). Default: 20 s.
    pub handshake_timeout: Duration,
    /// Largest request or response head (request line or status line plus headers), and
    /// largest error body of a 407 that is skipped during the handshake. Default: 64 KiB.
    pub max_header_bytes: usize,
    /// How long a connection from the HTTP client may sit idle between two requests before
    /// the forwarder closes it (the HTTP client's own pool closes it much sooner).
    /// Default: 5 min.
    pub idle_timeout: Duration,
}

impl Default for ProxyAuthConfig {
    fn default() -> Self {
        ProxyAuthConfig {
            max_connections: 1024,
            handshake_timeout: Duration::from_secs(20),
            max_header_bytes: 64 * 1024,
            idle_timeout: Duration::from_secs(5 * 60),
        }
    }
}

/// What the forwarder of one route has negotiated, and why it last failed: for
/// `tunnel-client --check` and for the hint of a 407.
#[derive(Debug, Default)]
pub(crate) struct AuthStatus {
    negotiated: Mutex<Option<String>>,
    failure: Mutex<Option<String>>,
}

impl AuthStatus {
    /// A handshake succeeded: an earlier failure no longer explains a later 407.
    fn set_negotiated(&self, what: String) {
        *self.negotiated.lock().unwrap_or_else(|e| e.into_inner()) = Some(what);
        *self.failure.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    fn set_failure(&self, why: String) {
        *self.failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
    }

    /// The scheme (and user or SPN) the last successful handshake used.
    pub(crate) fn negotiated(&self) -> Option<String> {
        self.negotiated
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Why the last handshake that failed was refused.
    pub(crate) fn failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// The credentials and options one forwarder authenticates with.
#[derive(Clone)]
pub(crate) struct AuthSetup {
    /// `--proxy-user` and its password: for NTLM (`DOMAIN\user`) and Basic.
    pub credentials: Option<(String, String)>,
    /// The proxy's host name, for the Kerberos service name `HTTP@<host>`.
    pub proxy_host: String,
}

impl std::fmt::Debug for AuthSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthSetup")
            .field("user", &self.credentials.as_ref().map(|(u, _)| u))
            .field("proxy_host", &self.proxy_host)
            .finish()
    }
}

/// Whether the system's GSSAPI has Kerberos credentials to start a Negotiate handshake
/// with (a credential cache holding a ticket-granting ticket: `kinit`, `KRB5CCNAME`).
pub(crate) fn kerberos_credentials_available() -> bool {
    #[cfg(feature = "negotiate")]
    {
        negotiate::credentials_available()
    }
    #[cfg(not(feature = "negotiate"))]
    {
        false
    }
}

/// Starts the forwarder for `proxy_url` when it is needed (see the [module docs](self)):
/// `None` when reqwest can talk to the proxy itself.
pub(crate) fn forwarder_for(
    proxy_url: &str,
    user: Option<(&str, &str)>,
    config: &crate::config::ClientConfig,
) -> Result<Option<Arc<Forwarder>>, crate::error::ConnectError> {
    let invalid = crate::error::ConnectError::InvalidConfig;
    let url = reqwest::Url::parse(proxy_url)
        .map_err(|e| invalid(format!("proxy URL {proxy_url:?}: {e}")))?;
    // TLS to the proxy itself stays with reqwest (Basic only there).
    if url.scheme() != "http" || (user.is_none() && !kerberos_credentials_available()) {
        return Ok(None);
    }
    let host = url
        .host_str()
        .ok_or_else(|| invalid(format!("proxy URL {proxy_url:?}: no host")))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = url.port_or_known_default().unwrap_or(80);
    let setup = AuthSetup {
        credentials: user.map(|(u, p)| (u.to_string(), p.to_string())),
        proxy_host: host.clone(),
    };
    // The first request goes again with each round: at most a push body, or one packet.
    let max_first_body = config.max_push_body.max(config.max_packet_size);
    let forwarder = Forwarder::start(
        (host, port),
        setup,
        config.tcp_connect_timeout,
        max_first_body,
        config.proxy_auth.clone(),
    )
    .map_err(|e| invalid(format!("proxy authentication forwarder: {e}")))?;
    Ok(Some(Arc::new(forwarder)))
}
