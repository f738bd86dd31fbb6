//! Test certificates made with rcgen: a CA per test, and leaf certificates it signs for the
//! relay (server) and brokers (client), written as PEM files the binaries and libraries read.

use std::io;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

/// Names every relay certificate of the tests is valid for: the loopback address the tests
/// dial and the name a TLS client would use for it.
pub const LOOPBACK_NAMES: &[&str] = &["127.0.0.1", "localhost"];

/// What a leaf certificate is for (its extended key usage).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    /// A TLS server (the relay's HTTPS or link listener).
    Server,
    /// A TLS client presenting a certificate (a broker on a mutual-TLS link).
    Client,
}

/// A self-signed certificate authority.
pub struct TestCa {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa").finish_non_exhaustive()
    }
}

/// PEM files of a certificate and its private key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn rcgen_error(what: &str, e: rcgen::Error) -> io::Error {
    io::Error::other(format!("{what}: {e}"))
}

impl TestCa {
    /// A new CA whose subject common name is `name`.
    pub fn new(name: &str) -> io::Result<TestCa> {
        let mut params = CertificateParams::new(Vec::<String>::new())
            .map_err(|e| rcgen_error("CA parameters", e))?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().map_err(|e| rcgen_error("CA key", e))?;
        let cert = params
            .self_signed(&key)
            .map_err(|e| rcgen_error("CA certificate", e))?;
        Ok(TestCa { cert, key })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    /// Writes the CA certificate to `path` (the "CA file" clients and brokers trust).
    pub fn write_cert(&self, path: &Path) -> io::Result<PathBuf> {
        std::fs::write(path, self.cert_pem())?;
        Ok(path.to_owned())
    }

    /// Issues a leaf certificate for `names` (DNS names or IP addresses) and writes it and
    /// its key to `<dir>/<stem>.pem` and `<dir>/<stem>.key`.
    pub fn issue(
        &self,
        names: &[&str],
        usage: Usage,
        dir: &Path,
        stem: &str,
    ) -> io::Result<CertFiles> {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params =
            CertificateParams::new(names).map_err(|e| rcgen_error("leaf parameters", e))?;
        params
            .distinguished_name
            .push(DnType::CommonName, format!("tunnel-tests {stem}"));
        params.extended_key_usages = vec![match usage {
            Usage::Server => ExtendedKeyUsagePurpose::ServerAuth,
            Usage::Client => ExtendedKeyUsagePurpose::ClientAuth,
        }];
        let key = KeyPair::generate().map_err(|e| rcgen_error("leaf key", e))?;
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .map_err(|e| rcgen_error("signing the leaf", e))?;
        let files = CertFiles {
            cert: dir.join(format!("{stem}.pem")),
            key: dir.join(format!("{stem}.key")),
        };
        std::fs::write(&files.cert, cert.pem())?;
        std::fs::write(&files.key, key.serialize_pem())?;
        Ok(files)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_files_are_pem_and_the_leaf_differs_from_the_ca() {
        let dir = crate::TestDir::new("certs-unit").unwrap();
        let ca = TestCa::new("unit CA").unwrap();
        let ca_path = ca.write_cert(&dir.path().join("ca.pem")).unwrap();
        let leaf = ca
            .issue(LOOPBACK_NAMES, Usage::Server, dir.path(), "relay")
            .unwrap();
        let ca_pem = std::fs::read_to_string(ca_path).unwrap();
        let leaf_pem = std::fs::read_to_string(&leaf.cert).unwrap();
        let key_pem = std::fs::read_to_string(&leaf.key).unwrap();
        assert!(ca_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(leaf_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(key_pem.contains("PRIVATE KEY-----"));
        assert_ne!(ca_pem, leaf_pem);
    }
}
