//! The tunnel relay (`tunnel-servlet`): answers clients' HTTP requests (connect, push, pull)
//! and multiplexes them onto one TCP link per broker (docs/protocol.md §2–§6). It does not run the
//! sliding window: it moves packets and keeps bounds.
//!
//! - [`config`]: every bound and deadline, with defaults.
//! - `relay`: [`Relay`] (bind, run, spawn) and its handles.
//! - `http`: the HTTP interface; `query`: its parameters.
//! - `link`: the broker link listener and reader; `sender`: the link writer.
//! - `table`: connections, brokers, queues; `state`: shared state and the sweeper.
//! - [`auth`]: optional client authentication (bearer tokens, basic credentials).
//! - [`metrics`]: counters and the Prometheus rendering. `tls`: rustls acceptors.

pub mod auth;
pub mod config;
mod first_byte;
mod http;
mod link;
pub mod metrics;
mod query;
mod relay;
mod sender;
mod state;
mod table;
pub mod tls;

pub use auth::ClientAuth;
pub use config::{RelayConfig, TlsFiles};
pub use metrics::MetricsSnapshot;
pub use query::TOKEN_HEADER;
pub use relay::{Relay, RunningRelay, ShutdownHandle};
