//! TLS for the HTTP interface and the link listener: loads a PEM certificate chain and key
//! into a rustls server configuration (ring provider) and wraps it in a tokio-rustls acceptor.
//! The link listener may also require client certificates from a given CA (mutual TLS).

use std::io;
use std::path::Path;
use std::sync::Arc;

use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;

use crate::config::TlsFiles;

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// Builds an acceptor from `files`, offering the given ALPN protocols (empty for none). With
/// `client_ca`, every peer must present a certificate chaining to a CA in that PEM file;
/// the handshake fails otherwise.
pub fn acceptor(
    files: &TlsFiles,
    alpn: &[&[u8]],
    client_ca: Option<&Path>,
) -> io::Result<TlsAcceptor> {
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
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid(format!("TLS versions: {e}")))?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let roots = client_roots(path)?;
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| invalid(format!("client CA {}: {e}", path.display())))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| invalid(format!("TLS certificate/key: {e}")))?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The CA certificates of `path` (PEM), at least one.
fn client_roots(path: &Path) -> io::Result<RootCertStore> {
    let pem = std::fs::read(path)
        .map_err(|e| invalid(format!("reading client CA {}: {e}", path.display())))?;
    let mut roots = RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        let cert = cert.map_err(|e| invalid(format!("parsing {}: {e}", path.display())))?;
        roots
            .add(cert)
            .map_err(|e| invalid(format!("client CA {}: {e}", path.display())))?;
    }
    if roots.is_empty() {
        return Err(invalid(format!(
            "no certificate in client CA file {}",
            path.display()
        )));
    }
    Ok(roots)
}
