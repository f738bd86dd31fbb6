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
//! - [`forwarded`] and [`cidr`]: the client's address behind trusted proxies.
//! - `admin`: the admin listener; [`status`]: the snapshot it shows, rendered by
//!   `status_html` (`/status`) and `status_json` (`/status.json`).

#![warn(missing_docs)]

mod admin;
pub mod auth;
pub mod cidr;
pub mod config;
mod first_byte;
pub mod forwarded;
mod http;
mod link;
pub mod metrics;
mod moves;
mod query;
mod relay;
mod sender;
mod session;
mod session_http;
mod session_stream;
mod session_upstream;
mod state;
pub mod status;
mod status_html;
mod status_json;
mod table;
pub mod tls;

pub use auth::{ClientAuth, LinkSecrets};
pub use cidr::Cidr;
pub use config::{RelayConfig, TlsFiles};
pub use metrics::MetricsSnapshot;
pub use query::{QUEUE_LIMIT_HEADER, SESSION_TOKEN_HEADER, TOKEN_HEADER};
pub use relay::{Relay, RunningRelay, ShutdownHandle};
pub use status::StatusSnapshot;
