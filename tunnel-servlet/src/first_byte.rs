//! The header deadline for connections that send nothing at all. hyper's
//! `header_read_timeout` starts with the first request bytes, and the HTTP/1-or-2 detection of
//! the auto builder waits for them without a deadline, so a client that connects and stays
//! silent would hold a connection slot for ever (measured: tests/tests/overload.rs). TLS
//! connections are covered by the handshake deadline; plain ones wait here first.

use std::time::Duration;

use tokio::net::TcpStream;

/// Whether at least one byte is readable on `tcp` within `limit` (peeked, not consumed).
/// False on time-out, on end of stream and on a socket error.
pub(crate) async fn arrives_within(tcp: &TcpStream, limit: Duration) -> bool {
    let mut probe = [0u8; 1];
    matches!(
        tokio::time::timeout(limit, tcp.peek(&mut probe)).await,
        Ok(Ok(n)) if n > 0
    )
}
