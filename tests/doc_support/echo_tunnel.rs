// An in-process relay, optionally with an echo broker behind it, for the doc examples of
// tunnel-client and tunnel-broker. They pull it in with `include!` in hidden lines, so that
// the examples run as doc tests against a real relay; it is no part of any public API.
// (Plain comments only: `include!` takes items, not inner doc comments.)

use std::io;
use std::sync::Arc;

use tunnel_broker::{BrokerConfig, TunnelListener};
use tunnel_servlet::{Relay, RelayConfig, RunningRelay};

/// The link secret of the example relay.
pub const LINK_SECRET: &[u8] = b"doc example link secret";

/// A relay on ephemeral loopback ports; it stops with the runtime.
pub struct DocRelay {
    relay: RunningRelay,
}

impl DocRelay {
    pub async fn start() -> io::Result<DocRelay> {
        let config = RelayConfig {
            http_listen: ([127, 0, 0, 1], 0).into(),
            link_listen: ([127, 0, 0, 1], 0).into(),
            link_secret: LINK_SECRET.to_vec(),
            // A fresh relay answers unknown names 503 (retry) during its name grace, since a
            // broker may not have re-linked yet; the examples show the 404 of a name that is
            // not served.
            name_grace: std::time::Duration::ZERO,
            ..RelayConfig::default()
        };
        Ok(DocRelay {
            relay: Relay::bind(config).await?.spawn(),
        })
    }

    /// What clients use: `http://127.0.0.1:PORT/tunnel`.
    pub fn relay_url(&self) -> String {
        self.relay.tunnel_url()
    }

    /// What brokers dial: `127.0.0.1:PORT`.
    pub fn link_addr(&self) -> String {
        self.relay.link_addr().to_string()
    }
}

/// A relay with a broker named `echo` that sends back what it receives.
pub struct EchoTunnel {
    relay: DocRelay,
    _listener: Arc<TunnelListener>,
}

impl EchoTunnel {
    pub async fn start() -> io::Result<EchoTunnel> {
        let relay = DocRelay::start().await?;
        let config = BrokerConfig::new(relay.link_addr(), "echo", LINK_SECRET);
        let listener = Arc::new(TunnelListener::bind(config).await?);
        let accepting = listener.clone();
        tokio::spawn(async move {
            while let Ok((stream, _client)) = accepting.accept().await {
                tokio::spawn(async move {
                    let (mut from, mut to) = tokio::io::split(stream);
                    if tokio::io::copy(&mut from, &mut to).await.is_ok() {
                        let _ = tokio::io::AsyncWriteExt::shutdown(&mut to).await;
                    }
                });
            }
        });
        Ok(EchoTunnel {
            relay,
            _listener: listener,
        })
    }

    pub fn relay_url(&self) -> String {
        self.relay.relay_url()
    }
}
