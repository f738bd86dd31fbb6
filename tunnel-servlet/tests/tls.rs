//! TLS on both listeners: HTTPS with ALPN (HTTP/2 and HTTP/1.1) and a TLS broker link, with a
//! self-signed certificate generated for the test.

mod common;

use std::sync::Arc;

use bytes::Bytes;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};
use tunnel_proto::payload::LinkInit;
use tunnel_proto::{Decoder, Packet, PacketType};
use tunnel_servlet::TlsFiles;

/// Writes a fresh self-signed certificate for "localhost"; returns the files and the PEM.
fn self_signed(tag: &str) -> (TlsFiles, String) {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let dir = std::env::temp_dir().join(format!("tunnel-servlet-tls-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    let pem = certified.cert.pem();
    std::fs::write(&cert, &pem).unwrap();
    std::fs::write(&key, certified.key_pair.serialize_pem()).unwrap();
    (TlsFiles { cert, key }, pem)
}

#[tokio::test]
async fn https_with_alpn_and_a_tls_link() {
    let (files, pem) = self_signed("both");
    let mut cfg = config();
    cfg.http_tls = Some(files.clone());
    cfg.link_tls = Some(files);
    let relay = start(cfg).await;

    // HTTPS, HTTP/2 chosen by ALPN.
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(pem.as_bytes()).unwrap())
        .resolve("localhost", relay.http_addr())
        .no_proxy()
        .timeout(WAIT)
        .build()
        .unwrap();
    let url = format!("https://localhost:{}/healthz", relay.http_addr().port());
    let resp = client.get(&url).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    // HTTPS, HTTP/1.1 only.
    let h1 = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(pem.as_bytes()).unwrap())
        .resolve("localhost", relay.http_addr())
        .http1_only()
        .no_proxy()
        .timeout(WAIT)
        .build()
        .unwrap();
    let resp = h1.get(&url).send().await.unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_11);

    // A broker link over TLS.
    let mut roots = RootCertStore::empty();
    let der: CertificateDer<'static> = rustls_pemfile_cert(&pem);
    roots.add(der).unwrap();
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let tls = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let tcp = tokio::net::TcpStream::connect(relay.link_addr())
        .await
        .unwrap();
    let mut stream = tokio::time::timeout(
        WAIT,
        connector.connect(ServerName::try_from("localhost").unwrap(), tcp),
    )
    .await
    .unwrap()
    .unwrap();
    let init = LinkInit {
        extension: None,
        server_name: SERVER.into(),
        secret: Bytes::from_static(SECRET),
        connections: vec![],
    };
    stream
        .write_all(&Packet::new(PacketType::LinkInit, 0, init.encode()).to_bytes())
        .await
        .unwrap();
    let mut decoder = Decoder::default();
    let ack = loop {
        if let Some(p) = decoder.next_packet().unwrap() {
            break p;
        }
        decoder.buffer_mut().reserve(4096);
        let n = tokio::time::timeout(WAIT, stream.read_buf(decoder.buffer_mut()))
            .await
            .unwrap()
            .unwrap();
        assert_ne!(n, 0, "link closed before LINK_INIT_ACK");
    };
    assert_eq!(ack.kind, PacketType::LinkInitAck);
    let relay_ref = &relay;
    eventually(|| relay_ref.metrics().links_up == 1, "TLS link up").await;
    relay.shutdown().await;
}

/// The DER of the first certificate in `pem`.
fn rustls_pemfile_cert(pem: &str) -> CertificateDer<'static> {
    rustls_pemfile::certs(&mut pem.as_bytes())
        .next()
        .expect("a certificate")
        .expect("valid PEM")
}
