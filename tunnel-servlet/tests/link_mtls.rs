//! Mutual TLS on the broker link (`RelayConfig::link_tls_client_ca`): a broker whose client
//! certificate chains to the configured CA links; one without a certificate, or with one from
//! another CA, is refused before its LINK_INIT is read.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use common::*;
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};
use tunnel_proto::payload::LinkInit;
use tunnel_proto::{Decoder, Packet, PacketType};
use tunnel_servlet::TlsFiles;

struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

fn ca(name: &str) -> Ca {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    Ca { cert, key }
}

/// A leaf certificate signed by `ca`: (certificate PEM, key PEM).
fn leaf(ca: &Ca, names: &[&str], usage: ExtendedKeyUsagePurpose) -> (String, String) {
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let mut params = CertificateParams::new(names).unwrap();
    params.extended_key_usages = vec![usage];
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca.cert, &ca.key).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn write(dir: &Path, name: &str, contents: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

fn temp_dir(tag: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("tunnel-servlet-mtls-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Dials the link over TLS (trusting `ca_pem` for the relay), optionally presenting
/// `identity`, sends LINK_INIT and returns the first packet back, or the error/EOF that
/// ended the link first.
async fn try_link(
    addr: std::net::SocketAddr,
    ca_pem: &str,
    identity: Option<(&str, &str)>,
) -> Result<Packet, String> {
    let mut roots = RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert_pem, key_pem)) => {
            let chain: Vec<CertificateDer<'static>> =
                rustls_pemfile::certs(&mut cert_pem.as_bytes())
                    .map(Result::unwrap)
                    .collect();
            let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut key_pem.as_bytes())
                .unwrap()
                .unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let attempt = async {
        let mut stream = connector
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let init = LinkInit {
            extension: None,
            server_name: SERVER.into(),
            secret: Bytes::from_static(SECRET),
            connections: vec![],
        };
        stream
            .write_all(&Packet::new(PacketType::LinkInit, 0, init.encode()).to_bytes())
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut decoder = Decoder::default();
        loop {
            if let Some(p) = decoder.next_packet().map_err(|e| e.to_string())? {
                return Ok(p);
            }
            decoder.buffer_mut().reserve(4096);
            let n = stream
                .read_buf(decoder.buffer_mut())
                .await
                .map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                return Err("link closed".to_string());
            }
        }
    };
    tokio::time::timeout(WAIT, attempt)
        .await
        .map_err(|_| "no answer within the wait".to_string())?
}

#[tokio::test]
async fn link_requires_a_client_certificate_from_the_configured_ca() {
    let dir = temp_dir("link");
    let trusted = ca("trusted test CA");
    let other = ca("other test CA");
    let (server_cert, server_key) = leaf(
        &trusted,
        &["localhost"],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let good = leaf(&trusted, &["broker"], ExtendedKeyUsagePurpose::ClientAuth);
    let foreign = leaf(&other, &["broker"], ExtendedKeyUsagePurpose::ClientAuth);
    let ca_pem = trusted.cert.pem();

    let mut cfg = config();
    cfg.link_tls = Some(TlsFiles {
        cert: write(&dir, "server.pem", &server_cert),
        key: write(&dir, "server.key", &server_key),
    });
    cfg.link_tls_client_ca = Some(write(&dir, "client-ca.pem", &ca_pem));
    let relay = start(cfg).await;

    let none = try_link(relay.link_addr(), &ca_pem, None).await;
    assert!(
        none.is_err(),
        "a broker without a certificate linked: {none:?}"
    );
    let wrong = try_link(relay.link_addr(), &ca_pem, Some((&foreign.0, &foreign.1))).await;
    assert!(
        wrong.is_err(),
        "a broker with a foreign certificate linked: {wrong:?}"
    );
    assert_eq!(relay.metrics().links_up, 0);

    let ack = try_link(relay.link_addr(), &ca_pem, Some((&good.0, &good.1)))
        .await
        .expect("a broker with a certificate from the trusted CA must link");
    assert_eq!(ack.kind, PacketType::LinkInitAck);
    let relay_ref = &relay;
    eventually(|| relay_ref.metrics().links_up == 1, "mutual-TLS link up").await;
    relay.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn client_ca_without_link_tls_is_a_config_error() {
    let mut cfg = config();
    cfg.link_tls_client_ca = Some(PathBuf::from("/nonexistent/ca.pem"));
    let err = cfg.validate().unwrap_err();
    assert!(err.contains("link_tls_client_ca needs link_tls"), "{err}");
}
