//! TLS for the HTTP interface and the link listener: loads a PEM certificate chain and key
//! into a rustls server configuration (ring provider) and wraps it in a tokio-rustls acceptor.

use std::io;
use std::sync::Arc;

use tokio_rustls::rustls::{self, ServerConfig};
use tokio_rustls::TlsAcceptor;

use crate::config::TlsFiles;

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// Builds an acceptor from `files`, offering the given ALPN protocols (empty for none).
pub fn acceptor(files: &TlsFiles, alpn: &[&[u8]]) -> io::Result<TlsAcceptor> {
    let cert_pem = std::fs::read(&files.cert).map_err(|e| {
        invalid(format!(
            "reading TLS certificate {}: {e}",
            files.cert.display()
        ))
    })?;
    let key_pem = std::fs::read(&files.key)
        .map_err(|e| invalid(format!("reading TLS key {}: {e}", files.key.display())))?;
    let certs = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(format!("parsing {}: {e}", files.cert.display())))?;
    if certs.is_empty() {
        return Err(invalid(format!(
            "no certificate in {}",
            files.cert.display()
        )));
    }
    let key = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .map_err(|e| invalid(format!("parsing {}: {e}", files.key.display())))?
        .ok_or_else(|| invalid(format!("no private key in {}", files.key.display())))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid(format!("TLS versions: {e}")))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| invalid(format!("TLS certificate/key: {e}")))?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(TlsAcceptor::from(Arc::new(config)))
}
