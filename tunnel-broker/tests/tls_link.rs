//! The link over mutual TLS: the broker verifies the relay against a CA file, presents a
//! client certificate, and the handshake then runs as over TCP. Certificates come from rcgen.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tunnel_broker::{BrokerConfig, LinkTls, TunnelListener};
use tunnel_proto::payload::LinkInit;
use tunnel_proto::{Decoder, Packet, PacketType};

const WAIT: Duration = Duration::from_secs(10);

struct Pki {
    dir: PathBuf,
    ca_der: CertificateDer<'static>,
    server_chain: Vec<CertificateDer<'static>>,
    server_key: PrivateKeyDer<'static>,
}

/// A CA, a relay certificate for `relay.test` and a client certificate, the CA and the
/// client identity written as PEM files under a fresh directory.
fn make_pki(tag: &str) -> Pki {
    let dir = std::env::temp_dir().join(format!("tunnel-broker-tls-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();

    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();

    let server_key = KeyPair::generate().unwrap();
    let server = CertificateParams::new(vec!["relay.test".to_string()])
        .unwrap()
        .signed_by(&server_key, &ca, &ca_key)
        .unwrap();

    let client_key = KeyPair::generate().unwrap();
    let client = CertificateParams::new(vec!["broker.test".to_string()])
        .unwrap()
        .signed_by(&client_key, &ca, &ca_key)
        .unwrap();

    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    std::fs::write(dir.join("client.pem"), client.pem()).unwrap();
    std::fs::write(dir.join("client.key"), client_key.serialize_pem()).unwrap();
    Pki {
        dir,
        ca_der: ca.der().clone(),
        server_chain: vec![server.der().clone()],
        server_key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der())),
    }
}

fn relay_acceptor(pki: &Pki) -> tokio_rustls::TlsAcceptor {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca_der.clone()).unwrap();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .unwrap();
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(pki.server_chain.clone(), pki.server_key.clone_key())
        .unwrap();
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

#[tokio::test]
async fn link_over_mutual_tls_authenticates_both_ends() {
    let pki = make_pki("ok");
    let acceptor = relay_acceptor(&pki);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();

    let relay = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = acceptor.accept(tcp).await.expect("TLS handshake");
        let client_certs = tls.get_ref().1.peer_certificates().map(|c| c.len());
        let mut decoder = Decoder::default();
        let init = loop {
            if let Some(p) = decoder.next_packet().unwrap() {
                break p;
            }
            decoder.buffer_mut().reserve(4096);
            assert!(tls.read_buf(decoder.buffer_mut()).await.unwrap() > 0);
        };
        assert_eq!(init.kind, PacketType::LinkInit);
        let init = LinkInit::decode(init.payload).unwrap();
        tls.write_all(&Packet::new(PacketType::LinkInitAck, 0, Bytes::new()).to_bytes())
            .await
            .unwrap();
        tls.flush().await.unwrap();
        (client_certs, init, tls)
    });

    let mut config = BrokerConfig::new(addr, "tls-svc", Bytes::from_static(b"s"));
    config.handshake_timeout = Duration::from_secs(5);
    config.tls = Some(
        LinkTls::from_files(
            "relay.test",
            Some(&pki.dir.join("ca.pem")),
            Some((&pki.dir.join("client.pem"), &pki.dir.join("client.key"))),
        )
        .unwrap(),
    );
    let broker = tokio::time::timeout(WAIT, TunnelListener::bind(config))
        .await
        .expect("bind within the wait")
        .expect("bind over TLS succeeds");
    let (client_certs, init, _tls) = tokio::time::timeout(WAIT, relay).await.unwrap().unwrap();
    assert_eq!(
        client_certs,
        Some(1),
        "broker presented its client certificate"
    );
    assert_eq!(init.server_name, "tls-svc");
    assert!(broker.is_link_up());
    let _ = std::fs::remove_dir_all(&pki.dir);
}

#[tokio::test]
async fn relay_certificate_from_another_ca_is_refused() {
    let trusted = make_pki("trusted");
    let other = make_pki("other");
    let acceptor = relay_acceptor(&other);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let relay = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let _ = acceptor.accept(tcp).await;
        }
    });

    let mut config = BrokerConfig::new(addr, "tls-svc", Bytes::from_static(b"s"));
    config.handshake_timeout = Duration::from_millis(500);
    config.tls =
        Some(LinkTls::from_files("relay.test", Some(&trusted.dir.join("ca.pem")), None).unwrap());
    let err = tokio::time::timeout(WAIT, TunnelListener::bind(config))
        .await
        .expect("bind gives up within the wait")
        .unwrap_err();
    assert!(err.to_string().contains("TLS"), "{err}");
    relay.abort();
    let _ = std::fs::remove_dir_all(&trusted.dir);
    let _ = std::fs::remove_dir_all(&other.dir);
}
