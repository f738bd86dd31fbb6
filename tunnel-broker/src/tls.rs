//! TLS for the broker's link: a rustls client that verifies the relay and may present a
//! client certificate (mutual TLS).

use std::fmt;
use std::io::{self, BufReader};
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};

/// How the link is wrapped in TLS.
#[derive(Clone)]
pub struct LinkTls {
    /// Name sent as SNI and checked against the relay's certificate.
    pub server_name: ServerName<'static>,
    /// The rustls client configuration (roots, client certificate, versions).
    pub client_config: Arc<ClientConfig>,
}

impl fmt::Debug for LinkTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LinkTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl LinkTls {
    /// Builds the TLS settings from PEM files.
    ///
    /// - `server_name`: DNS name or IP address expected in the relay's certificate.
    /// - `ca_file`: certificates to trust for the relay; `None` uses the system's roots.
    /// - `client_identity`: `(certificate chain file, private key file)` for mutual TLS.
    pub fn from_files(
        server_name: &str,
        ca_file: Option<&Path>,
        client_identity: Option<(&Path, &Path)>,
    ) -> io::Result<LinkTls> {
        let server_name = ServerName::try_from(server_name.to_owned()).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid TLS server name {server_name:?}: {e}"),
            )
        })?;
        let roots = match ca_file {
            Some(path) => roots_from_file(path)?,
            None => system_roots()?,
        };
        let builder =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map_err(io::Error::other)?
                .with_root_certificates(roots);
        let config = match client_identity {
            Some((cert_file, key_file)) => {
                let chain = read_certs(cert_file)?;
                let key = read_key(key_file)?;
                builder.with_client_auth_cert(chain, key).map_err(|e| {
                    io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("client certificate {}: {e}", cert_file.display()),
                    )
                })?
            }
            None => builder.with_no_client_auth(),
        };
        Ok(LinkTls {
            server_name,
            client_config: Arc::new(config),
        })
    }
}

fn roots_from_file(path: &Path) -> io::Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(path)? {
        roots.add(cert).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("CA file {}: {e}", path.display()),
            )
        })?;
    }
    Ok(roots)
}

fn system_roots() -> io::Result<RootCertStore> {
    let loaded = rustls_native_certs::load_native_certs();
    for err in &loaded.errors {
        tracing::warn!(error = %err, "while loading system root certificates");
    }
    let mut roots = RootCertStore::empty();
    let (added, ignored) = roots.add_parsable_certificates(loaded.certs);
    tracing::debug!(added, ignored, "system root certificates loaded");
    if roots.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            "no system root certificates found; give a CA file for the relay",
        ));
    }
    Ok(roots)
}

fn open(path: &Path, what: &str) -> io::Result<BufReader<std::fs::File>> {
    std::fs::File::open(path)
        .map(BufReader::new)
        .map_err(|e| io::Error::new(e.kind(), format!("{what} {}: {e}", path.display())))
}

fn read_certs(path: &Path) -> io::Result<Vec<CertificateDer<'static>>> {
    let certs = rustls_pemfile::certs(&mut open(path, "certificate file")?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: no PEM certificate found", path.display()),
        ));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> io::Result<PrivateKeyDer<'static>> {
    rustls_pemfile::private_key(&mut open(path, "key file")?)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: no PEM private key found", path.display()),
            )
        })
}
