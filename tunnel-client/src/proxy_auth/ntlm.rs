//! NTLM (v2) toward a proxy: the negotiate message (type 1), then the authenticate message
//! (type 3) answering the proxy's challenge (type 2). The messages and the NTLMv2 response are
//! made by the `ntlmclient` crate: small (pure Rust, the hash and cipher crates it needs), and
//! it does exactly the client side of these three messages, where `sspi` would bring a whole
//! SSPI emulation (Kerberos, CredSSP, a network stack) for the same.

use base64::Engine;

/// Flags of our negotiate message: Unicode strings, NTLM, and the server's target
/// information (which NTLMv2 signs).
fn negotiate_flags() -> ntlmclient::Flags {
    ntlmclient::Flags::NEGOTIATE_UNICODE
        | ntlmclient::Flags::REQUEST_TARGET
        | ntlmclient::Flags::NEGOTIATE_NTLM
        | ntlmclient::Flags::NEGOTIATE_ALWAYS_SIGN
        | ntlmclient::Flags::NEGOTIATE_NTLM2_KEY
        | ntlmclient::Flags::NEGOTIATE_TARGET_INFO
}

/// What the type 3 message needs of the proxy's type 2 message.
#[derive(Debug, PartialEq, Eq)]
struct ChallengeFields {
    server_challenge: [u8; 8],
    /// The raw AV pairs (NTLMv2 signs them); empty when the message has none.
    target_info: Vec<u8>,
}

/// Reads a type 2 message (MS-NLMP 2.2.1.2). `ntlmclient`'s own parser wants the long form
/// with the target information fields; servers may send the short form of 32 bytes or a
/// little more (squid's `ntlm_fake_auth` sends 49 bytes), which is read here, bounds-checked.
fn parse_challenge(bytes: &[u8]) -> Result<ChallengeFields, String> {
    const SIGNATURE: &[u8] = b"NTLMSSP\0";
    const SHORT_FORM: usize = 32;
    if bytes.len() < SHORT_FORM || &bytes[..8] != SIGNATURE {
        return Err("the proxy's NTLM challenge is not an NTLMSSP message".to_string());
    }
    let message_type = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if message_type != 2 {
        return Err(format!(
            "the proxy sent NTLM message type {message_type} where a challenge (type 2) belongs"
        ));
    }
    let server_challenge: [u8; 8] = bytes[24..32].try_into().expect("8 bytes");
    // Target information: a security buffer (length, allocated, offset) at 40..48, whose
    // data lies after that fixed part. Short forms have message data at 40 instead (squid's
    // fake helper: the target name, while it echoes our flag asking for target information),
    // so a buffer that does not fit the message is taken as no target information.
    let target_info = bytes
        .get(40..48)
        .and_then(|buffer| {
            let len = u16::from_le_bytes([buffer[0], buffer[1]]) as usize;
            let offset = u32::from_le_bytes(buffer[4..8].try_into().expect("4 bytes")) as usize;
            if offset < 48 {
                return None;
            }
            bytes.get(offset..offset.checked_add(len)?)
        })
        .map(<[u8]>::to_vec)
        .unwrap_or_default();
    Ok(ChallengeFields {
        server_challenge,
        target_info,
    })
}

/// One NTLM handshake with explicit credentials.
pub(crate) struct NtlmSession {
    credentials: ntlmclient::Credentials,
}

/// `DOMAIN\user` → (`DOMAIN`, `user`); `user@realm` and bare names keep an empty domain (the
/// server then takes the user name as it is, UPN form included).
pub(crate) fn split_user(user: &str) -> (&str, &str) {
    match user.split_once('\\') {
        Some((domain, name)) => (domain, name),
        None => ("", user),
    }
}

impl NtlmSession {
    pub(crate) fn new(user: &str, password: &str) -> NtlmSession {
        let (domain, name) = split_user(user);
        NtlmSession {
            credentials: ntlmclient::Credentials {
                username: name.to_string(),
                password: password.to_string(),
                domain: domain.to_string(),
            },
        }
    }

    /// The type 1 message, base64, for `Proxy-Authorization: NTLM <token>`.
    pub(crate) fn negotiate_token(&self) -> Result<String, String> {
        let message = ntlmclient::Message::Negotiate(ntlmclient::NegotiateMessage {
            flags: negotiate_flags(),
            supplied_domain: String::new(),
            supplied_workstation: String::new(),
            os_version: Default::default(),
        });
        let bytes = message
            .to_bytes()
            .map_err(|e| format!("encoding the NTLM negotiate message: {e:?}"))?;
        Ok(base64::engine::general_purpose::STANDARD.encode(bytes))
    }

    /// The type 3 message answering the proxy's type 2 `challenge` (base64).
    pub(crate) fn authenticate_token(&self, challenge: &str) -> Result<String, String> {
        let engine = base64::engine::general_purpose::STANDARD;
        let bytes = engine
            .decode(challenge.trim())
            .map_err(|e| format!("the proxy's NTLM challenge is not base64: {e}"))?;
        let challenge = parse_challenge(&bytes)?;
        let response = ntlmclient::respond_challenge_ntlm_v2(
            challenge.server_challenge,
            &challenge.target_info,
            ntlmclient::get_ntlm_time(),
            &self.credentials,
        );
        let flags = ntlmclient::Flags::NEGOTIATE_UNICODE | ntlmclient::Flags::NEGOTIATE_NTLM;
        let message = response.to_message(&self.credentials, "", flags);
        let bytes = message
            .to_bytes()
            .map_err(|e| format!("encoding the NTLM authenticate message: {e:?}"))?;
        Ok(engine.encode(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domain_and_user_are_split_at_the_backslash() {
        assert_eq!(split_user("CORP\\alice"), ("CORP", "alice"));
        assert_eq!(split_user("alice@corp.example"), ("", "alice@corp.example"));
        assert_eq!(split_user("alice"), ("", "alice"));
    }

    #[test]
    fn negotiate_message_is_an_ntlmssp_type_1() {
        let token = NtlmSession::new("CORP\\alice", "pw")
            .negotiate_token()
            .unwrap();
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(token)
            .unwrap();
        assert_eq!(&bytes[..8], b"NTLMSSP\0");
        assert_eq!(bytes[8], 1);
    }

    /// A type 2 message: short form (no target information fields) or long form with
    /// `target_info` after the header.
    fn type2(long: Option<&[u8]>) -> Vec<u8> {
        let mut m = b"NTLMSSP\0".to_vec();
        m.extend_from_slice(&2u32.to_le_bytes());
        m.extend_from_slice(&[0; 8]); // target name buffer
        m.extend_from_slice(&0x0000_0201u32.to_le_bytes()); // flags
        m.extend_from_slice(b"8 bytes!"); // server challenge
        if let Some(info) = long {
            m.extend_from_slice(&[0; 8]); // context
            m.extend_from_slice(&(info.len() as u16).to_le_bytes());
            m.extend_from_slice(&(info.len() as u16).to_le_bytes());
            m.extend_from_slice(&48u32.to_le_bytes());
            m.extend_from_slice(info);
        }
        m
    }

    #[test]
    fn short_and_long_challenges_are_read() {
        let short = parse_challenge(&type2(None)).unwrap();
        assert_eq!(&short.server_challenge, b"8 bytes!");
        assert!(short.target_info.is_empty());
        let long = parse_challenge(&type2(Some(b"\x02\x00\x02\x00A\x00\x00\x00\x00\x00"))).unwrap();
        assert_eq!(long.target_info.len(), 10);
        // A buffer that does not fit (squid's fake helper puts its target name at 40).
        let mut cut = type2(Some(b"0123456789"));
        cut.truncate(52);
        assert!(parse_challenge(&cut).unwrap().target_info.is_empty());
        let mut fake = type2(None);
        fake.extend_from_slice(&[0; 8]);
        fake.extend_from_slice(b"WORKGROUP");
        assert!(parse_challenge(&fake).unwrap().target_info.is_empty());
        let token = base64::engine::general_purpose::STANDARD.encode(type2(None));
        let type3 = NtlmSession::new("CORP\\alice", "pw")
            .authenticate_token(&token)
            .unwrap();
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(type3)
            .unwrap();
        assert_eq!((&bytes[..8], bytes[8]), (&b"NTLMSSP\0"[..], 3));
    }

    #[test]
    fn garbage_challenges_are_errors_not_panics() {
        let session = NtlmSession::new("alice", "pw");
        assert!(session.authenticate_token("%%%").is_err());
        assert!(session.authenticate_token("AAAA").is_err());
        let type1 = session.negotiate_token().unwrap();
        assert!(session.authenticate_token(&type1).is_err());
    }
}
