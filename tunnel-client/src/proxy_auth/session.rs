//! One authentication handshake with the proxy: choosing the scheme from its challenges
//! (Negotiate, then NTLM, then Basic) and answering each further 407 of the handshake.

use base64::Engine;

use super::challenge::{offered, Challenge, Scheme};
#[cfg(feature = "negotiate")]
use super::negotiate::NegotiateSession;
use super::ntlm::NtlmSession;
use super::AuthSetup;

/// The scheme chosen for one connection, between the rounds of its handshake.
pub(crate) enum Session {
    Basic {
        user: String,
    },
    Ntlm {
        ntlm: NtlmSession,
        user: String,
        answered_challenge: bool,
    },
    #[cfg(feature = "negotiate")]
    Negotiate(NegotiateSession),
}

fn token_of<'a>(challenges: &'a [Challenge], scheme: &Scheme) -> Option<&'a str> {
    challenges
        .iter()
        .find(|c| &c.scheme == scheme)
        .map(|c| c.data.as_str())
        .filter(|d| !d.trim().is_empty())
}

impl Session {
    /// Picks the scheme for the proxy's first 407 and makes its first
    /// `Proxy-Authorization` value; the error says what the proxy offers and what is
    /// missing for each of its schemes.
    pub(crate) async fn choose(
        challenges: &[Challenge],
        setup: &AuthSetup,
    ) -> Result<(Session, String), String> {
        let offers = |s: Scheme| challenges.iter().any(|c| c.scheme == s);
        let mut missing = Vec::new();
        if offers(Scheme::Negotiate) {
            #[cfg(feature = "negotiate")]
            match NegotiateSession::new(&setup.proxy_host) {
                Ok(mut session) => match session.step(None).await {
                    Ok(Some(token)) => {
                        return Ok((Session::Negotiate(session), format!("Negotiate {token}")))
                    }
                    Ok(None) => missing.push("Negotiate: GSSAPI produced no token".to_string()),
                    Err(e) => missing.push(format!("Negotiate: {e}")),
                },
                Err(e) => missing.push(format!("Negotiate: {e}")),
            }
            #[cfg(not(feature = "negotiate"))]
            missing
                .push("Negotiate: built without GSSAPI (cargo feature \"negotiate\")".to_string());
        }
        let credentials = setup.credentials.as_ref();
        if offers(Scheme::Ntlm) {
            match credentials {
                Some((user, password)) => {
                    let ntlm = NtlmSession::new(user, password);
                    let token = ntlm.negotiate_token()?;
                    let session = Session::Ntlm {
                        ntlm,
                        user: user.clone(),
                        answered_challenge: false,
                    };
                    return Ok((session, format!("NTLM {token}")));
                }
                None => missing.push(
                    "NTLM: needs --proxy-user DOMAIN\\user with --proxy-password-env".to_string(),
                ),
            }
        }
        if offers(Scheme::Basic) {
            match credentials {
                Some((user, password)) => {
                    let encoded = base64::engine::general_purpose::STANDARD
                        .encode(format!("{user}:{password}"));
                    let session = Session::Basic { user: user.clone() };
                    return Ok((session, format!("Basic {encoded}")));
                }
                None => missing.push("Basic: needs --proxy-user".to_string()),
            }
        }
        let mut why = format!("the proxy asks for {}", offered(challenges));
        if !missing.is_empty() {
            why.push_str("; ");
            why.push_str(&missing.join("; "));
        }
        Err(why)
    }

    /// The next `Proxy-Authorization` value after the proxy answered the last one with
    /// another 407 (`challenges` are that answer's); an error when that 407 means refusal.
    pub(crate) async fn next(&mut self, challenges: &[Challenge]) -> Result<String, String> {
        let refused = format!("the proxy refused {}", self.describe());
        match self {
            Session::Basic { .. } => Err(refused),
            Session::Ntlm {
                ntlm,
                answered_challenge,
                ..
            } => {
                if *answered_challenge {
                    return Err(refused);
                }
                let challenge = token_of(challenges, &Scheme::Ntlm).ok_or_else(|| {
                    format!("{refused}: its answer to the NTLM negotiate message has no challenge")
                })?;
                *answered_challenge = true;
                Ok(format!("NTLM {}", ntlm.authenticate_token(challenge)?))
            }
            #[cfg(feature = "negotiate")]
            Session::Negotiate(session) => {
                let token = token_of(challenges, &Scheme::Negotiate).ok_or(refused.clone())?;
                match session.step(Some(token)).await? {
                    Some(next) => Ok(format!("Negotiate {next}")),
                    None => Err(refused),
                }
            }
        }
    }

    /// The scheme and who authenticates, for logs, `--check` and errors:
    /// `NTLM as CORP\alice`.
    pub(crate) fn describe(&self) -> String {
        match self {
            Session::Basic { user } => format!("Basic as {user}"),
            Session::Ntlm { user, .. } => format!("NTLM as {user}"),
            #[cfg(feature = "negotiate")]
            Session::Negotiate(s) => {
                format!("Negotiate (Kerberos) as {} for {}", s.principal, s.service)
            }
        }
    }

    /// Whether the scheme authenticates the connection (so requests after the first need
    /// no header) rather than each request.
    pub(crate) fn binds_connection(&self) -> bool {
        !matches!(self, Session::Basic { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy_auth::challenge::parse_challenges;

    fn setup(credentials: bool) -> AuthSetup {
        AuthSetup {
            credentials: credentials.then(|| ("CORP\\alice".to_string(), "pw".to_string())),
            proxy_host: "proxy.example".to_string(),
        }
    }

    #[tokio::test]
    async fn ntlm_is_preferred_to_basic_and_each_refusal_names_the_scheme() {
        let offered: [&[u8]; 2] = [b"Basic realm=\"corp\"", b"NTLM"];
        let challenges = parse_challenges(offered);
        let (mut session, header) = Session::choose(&challenges, &setup(true)).await.unwrap();
        assert!(header.starts_with("NTLM TlRMTVNTUAAB"), "{header}");
        assert_eq!(session.describe(), "NTLM as CORP\\alice");
        assert!(session.binds_connection());
        // A bare NTLM challenge after our negotiate message: refused, naming the user.
        let bare = parse_challenges([&b"NTLM"[..]]);
        let err = session.next(&bare).await.unwrap_err();
        assert!(err.contains("NTLM as CORP\\alice"), "{err}");

        let basic_only = parse_challenges([&b"Basic realm=\"corp\""[..]]);
        let (mut basic, header) = Session::choose(&basic_only, &setup(true)).await.unwrap();
        assert_eq!(header, "Basic Q09SUFxhbGljZTpwdw==");
        assert!(!basic.binds_connection());
        let err = basic.next(&basic_only).await.unwrap_err();
        assert_eq!(err, "the proxy refused Basic as CORP\\alice");
    }

    #[tokio::test]
    async fn without_credentials_the_error_says_what_each_offered_scheme_needs() {
        let offered: [&[u8]; 3] = [b"NTLM", b"Basic realm=\"corp\"", b"Digest realm=\"x\""];
        let err = Session::choose(&parse_challenges(offered), &setup(false))
            .await
            .err()
            .unwrap();
        assert!(
            err.starts_with("the proxy asks for NTLM, Basic, Digest"),
            "{err}"
        );
        assert!(
            err.contains("DOMAIN\\user") && err.contains("--proxy-user"),
            "{err}"
        );
    }
}
