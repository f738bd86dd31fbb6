//! Negotiate (RFC 4559, SPNEGO with Kerberos) toward a proxy through the system's GSSAPI
//! (MIT krb5's `libgssapi_krb5` on Linux), with the user's credential cache: `kinit` beforehand,
//! `KRB5CCNAME` to pick a cache; no password is typed or held here. The service is
//! `HTTP@<proxy host>`, which GSSAPI maps to the principal `HTTP/<proxy host>@REALM`.
//!
//! The binding is the `libgssapi` crate: a thin safe layer over the C API (names,
//! credentials, `gss_init_sec_context`), where `cross-krb5` would add a portability layer we do
//! not need and `sspi` a Kerberos implementation of its own instead of the system's (which
//! knows the user's ticket cache, `krb5.conf` and the site's KDCs). It builds against
//! libkrb5-dev with bindgen (libclang); the cargo feature `negotiate` leaves it out.
//!
//! The token a proxy may add to its final (non-407) answer for mutual authentication is not
//! checked: the proxy is not what the tunnel trusts (the relay's TLS certificate is).

use base64::Engine;
use libgssapi::context::{ClientCtx, CtxFlags};
use libgssapi::credential::{Cred, CredUsage};
use libgssapi::name::Name;
use libgssapi::oid::{GSS_MECH_SPNEGO, GSS_NT_HOSTBASED_SERVICE};

/// Whether GSSAPI has initiator credentials with time left (a ticket-granting ticket in the
/// credential cache).
pub(crate) fn credentials_available() -> bool {
    Cred::acquire(None, None, CredUsage::Initiate, None)
        .and_then(|cred| cred.lifetime())
        .is_ok_and(|left| !left.is_zero())
}

/// One Negotiate handshake: the security context, between the rounds.
pub(crate) struct NegotiateSession {
    context: Option<ClientCtx>,
    /// `HTTP@host`, for messages.
    pub(crate) service: String,
    /// The user's principal from the credential cache, for messages.
    pub(crate) principal: String,
}

impl NegotiateSession {
    /// Prepares a context for `HTTP@<proxy_host>` with the default credential cache's
    /// ticket; fails (with GSSAPI's reason) when there is none.
    pub(crate) fn new(proxy_host: &str) -> Result<NegotiateSession, String> {
        let service = format!("HTTP@{proxy_host}");
        let target = Name::new(service.as_bytes(), Some(GSS_NT_HOSTBASED_SERVICE))
            .map_err(|e| format!("Kerberos service name {service}: {e}"))?;
        let cred = Cred::acquire(None, None, CredUsage::Initiate, None)
            .map_err(|e| format!("no Kerberos credentials (run kinit; KRB5CCNAME): {e}"))?;
        let principal = cred
            .name()
            .map(|n| n.to_string())
            .unwrap_or_else(|_| "?".to_string());
        let context = ClientCtx::new(
            Some(cred),
            target,
            CtxFlags::GSS_C_MUTUAL_FLAG,
            Some(GSS_MECH_SPNEGO),
        );
        Ok(NegotiateSession {
            context: Some(context),
            service,
            principal,
        })
    }

    /// The next token (base64) for `Proxy-Authorization: Negotiate <token>`, given the
    /// proxy's token from its last 407 (none at first). `None` when GSSAPI has nothing more
    /// to send. GSSAPI may ask the KDC for a service ticket, a blocking call: it runs on the
    /// blocking pool.
    pub(crate) async fn step(
        &mut self,
        server_token: Option<&str>,
    ) -> Result<Option<String>, String> {
        let engine = base64::engine::general_purpose::STANDARD;
        let server_token = match server_token.map(str::trim).filter(|t| !t.is_empty()) {
            Some(t) => Some(
                engine
                    .decode(t)
                    .map_err(|e| format!("the proxy's Negotiate token is not base64: {e}"))?,
            ),
            None => None,
        };
        let mut context = self
            .context
            .take()
            .ok_or("the Negotiate context failed before")?;
        let service = self.service.clone();
        let (context, result) = tokio::task::spawn_blocking(move || {
            let result = context
                .step(server_token.as_deref(), None)
                .map(|token| token.map(|t| engine.encode(&*t)))
                .map_err(|e| format!("Kerberos ticket for {service}: {e}"));
            (context, result)
        })
        .await
        .map_err(|e| format!("GSSAPI call did not finish: {e}"))?;
        self.context = Some(context);
        result
    }
}
