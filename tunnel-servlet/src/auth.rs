//! Optional client authentication at the relay ([`ClientAuth`]): bearer tokens and/or HTTP
//! basic credentials, checked on every tunnel request (connect, push, pull) before the body
//! is read. `/healthz` and `/metrics` stay open: they carry no secret, no server name and no
//! connection id, and load balancers and scrapers should not need a tunnel credential
//! (restrict `/metrics` at the front web server if its counts are sensitive).
//!
//! Only SHA-256 digests of the credentials are kept. A presented credential is hashed and
//! compared with every stored digest in constant time, without an early exit, so neither
//! the time taken nor a length difference tells how close a guess was or which entry matched.

use std::fmt;
use std::io;
use std::path::Path;

use base64::Engine;
use hyper::header::{HeaderValue, AUTHORIZATION};
use hyper::HeaderMap;
use sha2::{Digest, Sha256};
use subtle::{Choice, ConstantTimeEq};

/// Shortest bearer token accepted when loading: a bearer token is the whole secret, so a
/// short one is guessable.
pub const MIN_BEARER_TOKEN_LEN: usize = 16;

type Digest32 = [u8; 32];

fn digest(bytes: &[u8]) -> Digest32 {
    Sha256::digest(bytes).into()
}

/// Whether `candidate` equals one of `known`, in time that depends only on the number of
/// entries (the candidate is a digest, so its length is fixed).
fn matches_any(known: &[Digest32], candidate: &Digest32) -> bool {
    let mut found = Choice::from(0);
    for entry in known {
        found |= entry.ct_eq(candidate);
    }
    found.into()
}

/// Compares two secrets of any lengths in constant time: both are hashed first, so neither
/// the contents nor the length of `presented` leaks through timing.
pub fn secret_eq(presented: &[u8], expected: &[u8]) -> bool {
    digest(presented).ct_eq(&digest(expected)).into()
}

/// Per-name link secrets (`--link-secrets-file`): a broker linking a listed name must present
/// that name's secret, and the shared link secret is not accepted for it; names not listed
/// use the shared secret. Only SHA-256 digests are kept, compared in constant time.
#[derive(Clone, Default)]
pub struct LinkSecrets {
    by_name: std::collections::HashMap<String, Digest32>,
}

impl fmt::Debug for LinkSecrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Names are not secret, digests are kept out of logs all the same.
        f.debug_struct("LinkSecrets")
            .field("names", &self.by_name.len())
            .finish()
    }
}

impl LinkSecrets {
    /// An empty set: every name uses the shared secret.
    pub fn new() -> LinkSecrets {
        LinkSecrets::default()
    }

    /// Requires `secret` for links of `name` (replacing an earlier entry of that name).
    pub fn add(&mut self, name: &str, secret: &[u8]) -> Result<(), String> {
        if name.is_empty() || name.len() > tunnel_proto::payload::MAX_SERVER_NAME_LEN {
            return Err("server name must be 1..=255 bytes".into());
        }
        if secret.is_empty() {
            return Err("the secret must not be empty".into());
        }
        self.by_name.insert(name.to_string(), digest(secret));
        Ok(())
    }

    /// Loads `name:secret` lines (split at the first `:`, so names cannot hold `:` but
    /// secrets may); blank lines and `#` comments are skipped; only the line ending is
    /// stripped from the secret. Errors name the line, never its content.
    pub fn load_file(&mut self, path: &Path) -> io::Result<()> {
        let text = read_secret_file(path)?;
        for (number, line) in meaningful_lines(&text) {
            let Some((name, secret)) = line.split_once(':') else {
                return Err(invalid(path, number, "expected name:secret"));
            };
            self.add(name.trim(), secret.as_bytes())
                .map_err(|e| invalid(path, number, &e))?;
        }
        Ok(())
    }

    /// Whether `presented` is the secret for links of `name`: the name's own if it is
    /// listed, otherwise `shared`.
    pub fn check(&self, name: &str, presented: &[u8], shared: &[u8]) -> bool {
        match self.by_name.get(name) {
            Some(expected) => digest(presented).ct_eq(expected).into(),
            None => secret_eq(presented, shared),
        }
    }

    /// Number of names with their own secret.
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    /// Whether no name has its own secret.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}

/// Credentials the relay accepts from clients. Build with [`ClientAuth::new`] and the
/// `add_*`/`load_*` methods; an empty one refuses everybody, so [`ClientAuth::validate`]
/// rejects it.
#[derive(Clone, Default)]
pub struct ClientAuth {
    bearer: Vec<Digest32>,
    /// Digests of `user:password`.
    basic: Vec<Digest32>,
}

impl fmt::Debug for ClientAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Counts only: not even digests go to logs.
        f.debug_struct("ClientAuth")
            .field("bearer_tokens", &self.bearer.len())
            .field("basic_users", &self.basic.len())
            .finish()
    }
}

/// Why a request was refused; the text is for logs and never contains the credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    /// No `Authorization` header.
    Missing,
    /// A scheme the relay is not configured for (or not Bearer/Basic at all).
    WrongScheme,
    /// The credentials are not well formed (bad base64, no `:` in basic, not ASCII).
    Malformed,
    /// Well formed but not one of the configured credentials.
    Rejected,
}

impl AuthFailure {
    /// A short reason for log lines (never the credential).
    pub fn as_str(self) -> &'static str {
        match self {
            AuthFailure::Missing => "no Authorization header",
            AuthFailure::WrongScheme => "unsupported authorization scheme",
            AuthFailure::Malformed => "malformed credentials",
            AuthFailure::Rejected => "wrong credentials",
        }
    }
}

impl fmt::Display for AuthFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A bearer token must fit in a header as one token68-like word.
fn valid_bearer(token: &str) -> bool {
    !token.is_empty() && token.bytes().all(|b| b.is_ascii_graphic())
}

impl ClientAuth {
    /// No credentials yet: add them before use (`validate` refuses an empty set).
    pub fn new() -> ClientAuth {
        ClientAuth::default()
    }

    /// Accepts `Authorization: Bearer <token>`. The token must be at least
    /// [`MIN_BEARER_TOKEN_LEN`] visible ASCII characters without spaces.
    pub fn add_bearer_token(&mut self, token: &str) -> Result<(), String> {
        if !valid_bearer(token) {
            return Err("a bearer token must be visible ASCII without spaces".into());
        }
        if token.len() < MIN_BEARER_TOKEN_LEN {
            return Err(format!(
                "a bearer token must be at least {MIN_BEARER_TOKEN_LEN} characters"
            ));
        }
        self.bearer.push(digest(token.as_bytes()));
        Ok(())
    }

    /// Accepts `Authorization: Basic base64(user:password)`. The user name must not be empty
    /// nor contain `:` (RFC 7617); the password must not be empty.
    pub fn add_basic_user(&mut self, user: &str, password: &str) -> Result<(), String> {
        if user.is_empty() || user.contains(':') || user.chars().any(char::is_control) {
            return Err(
                "a basic-auth user name must be non-empty, without ':' or control characters"
                    .into(),
            );
        }
        if password.is_empty() {
            return Err(format!("user {user:?} has an empty password"));
        }
        self.basic
            .push(digest(format!("{user}:{password}").as_bytes()));
        Ok(())
    }

    /// Loads bearer tokens from a file, one per line; blank lines and lines starting with
    /// `#` are skipped, surrounding whitespace is ignored. Errors name the line, never its
    /// content.
    pub fn load_bearer_file(&mut self, path: &Path) -> io::Result<()> {
        let text = read_secret_file(path)?;
        for (number, line) in meaningful_lines(&text) {
            self.add_bearer_token(line.trim())
                .map_err(|e| invalid(path, number, &e))?;
        }
        Ok(())
    }

    /// Loads `user:password` lines (split at the first `:`, so passwords may hold `:`);
    /// blank lines and `#` comments are skipped; only the line ending is stripped from the
    /// password.
    pub fn load_basic_file(&mut self, path: &Path) -> io::Result<()> {
        let text = read_secret_file(path)?;
        for (number, line) in meaningful_lines(&text) {
            let Some((user, password)) = line.split_once(':') else {
                return Err(invalid(path, number, "expected user:password"));
            };
            self.add_basic_user(user.trim(), password)
                .map_err(|e| invalid(path, number, &e))?;
        }
        Ok(())
    }

    /// An empty set would lock every client out, which is never what was meant.
    pub fn validate(&self) -> Result<(), String> {
        if self.bearer.is_empty() && self.basic.is_empty() {
            return Err("client_auth is set but holds no token and no user".into());
        }
        Ok(())
    }

    /// How many bearer tokens are configured.
    pub fn bearer_token_count(&self) -> usize {
        self.bearer.len()
    }

    /// How many basic-auth users are configured.
    pub fn basic_user_count(&self) -> usize {
        self.basic.len()
    }

    /// Checks the request's `Authorization` header.
    pub fn check(&self, headers: &HeaderMap) -> Result<(), AuthFailure> {
        let value = headers.get(AUTHORIZATION).ok_or(AuthFailure::Missing)?;
        let value = value.to_str().map_err(|_| AuthFailure::Malformed)?.trim();
        let (scheme, credentials) = value.split_once(' ').unwrap_or((value, ""));
        let credentials = credentials.trim();
        if scheme.eq_ignore_ascii_case("bearer") && !self.bearer.is_empty() {
            if !valid_bearer(credentials) {
                return Err(AuthFailure::Malformed);
            }
            return if matches_any(&self.bearer, &digest(credentials.as_bytes())) {
                Ok(())
            } else {
                Err(AuthFailure::Rejected)
            };
        }
        if scheme.eq_ignore_ascii_case("basic") && !self.basic.is_empty() {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(credentials)
                .map_err(|_| AuthFailure::Malformed)?;
            if !decoded.contains(&b':') {
                return Err(AuthFailure::Malformed);
            }
            return if matches_any(&self.basic, &digest(&decoded)) {
                Ok(())
            } else {
                Err(AuthFailure::Rejected)
            };
        }
        Err(AuthFailure::WrongScheme)
    }

    /// The `WWW-Authenticate` values of a 401: one challenge per configured scheme.
    pub fn challenges(&self) -> Vec<HeaderValue> {
        let mut out = Vec::new();
        if !self.bearer.is_empty() {
            out.push(HeaderValue::from_static("Bearer realm=\"tunnel-relay\""));
        }
        if !self.basic.is_empty() {
            out.push(HeaderValue::from_static(
                "Basic realm=\"tunnel-relay\", charset=\"UTF-8\"",
            ));
        }
        out
    }
}

fn read_secret_file(path: &Path) -> io::Result<String> {
    std::fs::read_to_string(path)
        .map_err(|e| io::Error::new(e.kind(), format!("reading {}: {e}", path.display())))
}

/// Lines with their 1-based numbers, line endings stripped, blanks and `#` comments skipped.
fn meaningful_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines()
        .map(|line| line.strip_suffix('\r').unwrap_or(line))
        .enumerate()
        .map(|(i, line)| (i + 1, line))
        .filter(|(_, line)| {
            let trimmed = line.trim();
            !trimmed.is_empty() && !trimmed.starts_with('#')
        })
}

fn invalid(path: &Path, line: usize, why: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{} line {line}: {why}", path.display()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(value: &str) -> HeaderMap {
        let mut map = HeaderMap::new();
        map.insert(AUTHORIZATION, HeaderValue::from_str(value).unwrap());
        map
    }

    fn basic(user_password: &str) -> String {
        let encoded = base64::engine::general_purpose::STANDARD.encode(user_password);
        format!("Basic {encoded}")
    }

    #[test]
    fn bearer_tokens_match_exactly() {
        let mut auth = ClientAuth::new();
        auth.add_bearer_token("0123456789abcdef-token").unwrap();
        assert_eq!(
            auth.check(&headers("Bearer 0123456789abcdef-token")),
            Ok(())
        );
        assert_eq!(
            auth.check(&headers("bearer 0123456789abcdef-token")),
            Ok(())
        );
        assert_eq!(
            auth.check(&headers("Bearer 0123456789abcdef-tokeN")),
            Err(AuthFailure::Rejected)
        );
        assert_eq!(
            auth.check(&headers("Bearer 0123456789abcdef-token-longer")),
            Err(AuthFailure::Rejected)
        );
        assert_eq!(auth.check(&headers("Bearer ")), Err(AuthFailure::Malformed));
        assert_eq!(auth.check(&HeaderMap::new()), Err(AuthFailure::Missing));
        // Basic is not configured, so it is not a way in.
        assert_eq!(
            auth.check(&headers(&basic("u:0123456789abcdef-token"))),
            Err(AuthFailure::WrongScheme)
        );
        assert_eq!(auth.challenges().len(), 1);
    }

    #[test]
    fn basic_credentials_match_user_and_password() {
        let mut auth = ClientAuth::new();
        auth.add_basic_user("alice", "pa:ss word").unwrap();
        auth.add_basic_user("bob", "hunter2").unwrap();
        assert_eq!(auth.check(&headers(&basic("alice:pa:ss word"))), Ok(()));
        assert_eq!(auth.check(&headers(&basic("bob:hunter2"))), Ok(()));
        assert_eq!(
            auth.check(&headers(&basic("bob:pa:ss word"))),
            Err(AuthFailure::Rejected)
        );
        assert_eq!(
            auth.check(&headers("Basic !!notbase64")),
            Err(AuthFailure::Malformed)
        );
        assert_eq!(
            auth.check(&headers(&basic("no-colon"))),
            Err(AuthFailure::Malformed)
        );
        assert_eq!(
            auth.check(&headers("Digest username=x")),
            Err(AuthFailure::WrongScheme)
        );
    }

    #[test]
    fn rejects_weak_or_unusable_entries() {
        let mut auth = ClientAuth::new();
        assert!(auth.add_bearer_token("short").is_err());
        assert!(auth
            .add_bearer_token("has a space in it, long enough")
            .is_err());
        assert!(auth.add_basic_user("", "pw").is_err());
        assert!(auth.add_basic_user("a:b", "pw").is_err());
        assert!(auth.add_basic_user("a", "").is_err());
        assert!(auth.validate().is_err(), "empty set must not validate");
    }

    #[test]
    fn files_load_and_errors_do_not_echo_secrets() {
        let dir = std::env::temp_dir().join(format!("relay-auth-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let tokens = dir.join("tokens");
        std::fs::write(
            &tokens,
            "# comment\n\n  tok-aaaaaaaaaaaaaaaa  \r\ntok-bbbbbbbbbbbbbbbb\n",
        )
        .unwrap();
        let users = dir.join("users");
        std::fs::write(&users, "carol:se:cret\r\n").unwrap();
        let mut auth = ClientAuth::new();
        auth.load_bearer_file(&tokens).unwrap();
        auth.load_basic_file(&users).unwrap();
        assert_eq!((auth.bearer_token_count(), auth.basic_user_count()), (2, 1));
        assert_eq!(auth.check(&headers("Bearer tok-bbbbbbbbbbbbbbbb")), Ok(()));
        assert_eq!(auth.check(&headers(&basic("carol:se:cret"))), Ok(()));

        std::fs::write(&tokens, "weak-secret\n").unwrap();
        let err = ClientAuth::new().load_bearer_file(&tokens).unwrap_err();
        assert!(err.to_string().contains("line 1"), "{err}");
        assert!(!err.to_string().contains("weak-secret"), "{err}");
        std::fs::write(&users, "dave-no-password-field\n").unwrap();
        let err = ClientAuth::new().load_basic_file(&users).unwrap_err();
        assert!(!err.to_string().contains("dave"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
        assert!(!format!("{auth:?}").contains("tok-"));
    }

    #[test]
    fn secret_eq_handles_lengths() {
        assert!(secret_eq(b"abc", b"abc"));
        assert!(!secret_eq(b"abc", b"abcd"));
        assert!(!secret_eq(b"", b"abc"));
    }

    #[test]
    fn a_listed_name_needs_its_own_secret_and_others_the_shared_one() {
        let dir = std::env::temp_dir().join(format!("link-secrets-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("secrets");
        std::fs::write(
            &path,
            "# pool secrets\nredis: s3cret:with:colons\r\n\nmqtt:m\n",
        )
        .unwrap();
        let mut secrets = LinkSecrets::new();
        secrets.load_file(&path).unwrap();
        assert_eq!(secrets.len(), 2);
        assert!(secrets.check("redis", b" s3cret:with:colons", b"shared"));
        assert!(
            !secrets.check("redis", b"shared", b"shared"),
            "shared secret for a listed name"
        );
        assert!(
            !secrets.check("redis", b"m", b"shared"),
            "another name's secret"
        );
        assert!(secrets.check("mqtt", b"m", b"shared"));
        assert!(secrets.check("other", b"shared", b"shared"));
        assert!(!secrets.check("other", b"m", b"shared"));
        std::fs::write(&path, "redis\n").unwrap();
        let err = LinkSecrets::new().load_file(&path).unwrap_err().to_string();
        assert!(
            err.contains("line 1") && err.contains("name:secret"),
            "{err}"
        );
        std::fs::write(&path, "redis:\n").unwrap();
        assert!(LinkSecrets::new().load_file(&path).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(!format!("{secrets:?}").contains("s3cret"));
    }
}
