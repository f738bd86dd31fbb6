//! The link secret that brokers present in LINK_INIT and the relay checks
//! (docs/protocol.md §5), read from a file the same way by every part.
//!
//! The secret is the file's bytes as they are, except trailing line ends (`\n`, `\r`), which
//! editors and `echo` add and which are not part of it. Nothing else is trimmed or decoded: a
//! file made with `head -c 32 /dev/urandom | base64 > FILE` holds a base64 *text*, and that
//! text is the secret on both sides.

use std::io;
use std::path::Path;

use bytes::Bytes;

use crate::payload::MAX_LINK_SECRET_LEN;

/// Reads a link secret file as the relay and broker binaries do (see the module
/// documentation). Errors name the file; an empty secret or one over
/// [`MAX_LINK_SECRET_LEN`] bytes is `InvalidData`.
///
/// ```
/// # fn main() -> std::io::Result<()> {
/// # let dir = std::env::temp_dir().join(format!("tunnel-secret-doc-{}", std::process::id()));
/// # std::fs::create_dir_all(&dir)?;
/// let path = dir.join("link-secret");
/// std::fs::write(&path, "s3cret-shared-with-the-relay\n")?;
/// let secret = tunnel_proto::secret::read_link_secret_file(&path)?;
/// assert_eq!(&secret[..], b"s3cret-shared-with-the-relay");
/// # std::fs::remove_dir_all(&dir)?;
/// # Ok(())
/// # }
/// ```
pub fn read_link_secret_file(path: impl AsRef<Path>) -> io::Result<Bytes> {
    let path = path.as_ref();
    let raw = std::fs::read(path).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("link secret file {}: {e}", path.display()),
        )
    })?;
    link_secret_from_file_contents(raw).map_err(|problem| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("link secret file {}: {problem}", path.display()),
        )
    })
}

/// The secret in a file's contents: without trailing line ends, non-empty, within the limit.
fn link_secret_from_file_contents(mut raw: Vec<u8>) -> Result<Bytes, String> {
    while raw.last().is_some_and(|b| matches!(b, b'\n' | b'\r')) {
        raw.pop();
    }
    if raw.is_empty() {
        return Err("the file holds no secret (it is empty or only line ends)".into());
    }
    if raw.len() > MAX_LINK_SECRET_LEN {
        return Err(format!(
            "the secret has {} bytes; at most {MAX_LINK_SECRET_LEN} fit in LINK_INIT",
            raw.len()
        ));
    }
    Ok(Bytes::from(raw))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trailing_line_ends_are_not_part_of_the_secret() {
        let got = link_secret_from_file_contents(b"abc \r\n\n".to_vec()).unwrap();
        assert_eq!(&got[..], b"abc ");
        let inner = link_secret_from_file_contents(b"a\nb".to_vec()).unwrap();
        assert_eq!(&inner[..], b"a\nb");
    }

    #[test]
    fn empty_and_oversized_secrets_are_refused() {
        assert!(link_secret_from_file_contents(b"\r\n".to_vec()).is_err());
        assert!(link_secret_from_file_contents(Vec::new()).is_err());
        let max = vec![b'x'; MAX_LINK_SECRET_LEN];
        assert!(link_secret_from_file_contents(max.clone()).is_ok());
        let over = [max, b"y".to_vec()].concat();
        assert!(link_secret_from_file_contents(over).is_err());
    }

    #[test]
    fn a_missing_file_names_the_path() {
        let err = read_link_secret_file("/nonexistent/tunnel/link-secret").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(
            err.to_string().contains("/nonexistent/tunnel/link-secret"),
            "{err}"
        );
    }
}
