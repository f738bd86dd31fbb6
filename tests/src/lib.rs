//! End-to-end test harness for the HTTP tunnel: real processes (relay, broker, client
//! binaries), real peers (echo and sink/source TCP servers), and a fault-injecting HTTP proxy.
//!
//! A typical test:
//!
//! ```no_run
//! # async fn demo() {
//! use std::time::Duration;
//! use tunnel_tests::{Chain, ChainOptions, SinkSourceServer, ExchangeSpec, sink_source_exchange};
//! let server = SinkSourceServer::start().await.unwrap();
//! let chain = Chain::start(ChainOptions::forward_to_sink_source(server.addr())).await;
//! let stream = chain.connect().await.unwrap();
//! let spec = ExchangeSpec::symmetric(1 << 20, 7);
//! sink_source_exchange(stream, &spec, Duration::from_secs(30)).await.unwrap();
//! # }
//! ```
//!
//! Binaries are looked up, never built, by [`bin_path`]: run `cargo build --workspace --bins`
//! before the tests.

pub mod bins;
pub mod certs;
pub mod chain;
pub mod data;
pub mod fault_proxy;
pub mod fdlimit;
pub mod haproxy;
pub mod inproc;
pub mod kerberos;
pub mod mosquitto;
pub mod net;
pub mod observers;
pub mod pool;
pub mod process;
pub mod procfs;
pub mod redis;
pub mod servers;
pub mod services;
pub mod soak;
pub mod tcp_cutter;
pub mod tempdir;
pub mod transfer;

pub use bins::bin_path;
pub use chain::{Chain, ChainOptions, ReadyProbe, Target};
pub use data::{sha256, SeededBytes};
pub use fault_proxy::{DropStyle, FaultConfig, FaultProxy, FaultStats};
pub use net::{free_addr, free_port, wait_for_http_ok, wait_for_tcp};
pub use process::ChildProcess;
pub use servers::echo::{EchoServer, EchoStats};
pub use servers::sink_source::{
    sink_source_exchange, ExchangeError, ExchangeReport, ExchangeSpec, SinkSourceServer,
    SinkSourceStats,
};
pub use tempdir::TestDir;

/// Installs a `tracing` subscriber for the test process itself (harness and in-process
/// servers), filtered by `RUST_LOG` (default `info`). Safe to call from every test.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_test_writer()
        .try_init();
}
