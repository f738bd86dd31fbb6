//! The reliable connection: one end of a virtual connection as a sans-IO state machine.
//!
//! SKELETON: the public API is fixed; bodies are being written.

use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::packet::{Packet, DEFAULT_MAX_DATA_PAYLOAD};
use crate::payload::ConnOption;

/// Tunables of one connection end. Every bound and deadline of the state machine is here.
#[derive(Debug, Clone)]
pub struct ConnectionConfig {
    /// Receive window advertised to the peer, in packets (each up to `max_data_payload`).
    pub recv_window: u16,
    /// Largest DATA payload this end sends.
    pub max_data_payload: usize,
    /// Bytes the application may have written that are not yet acknowledged by the peer
    /// (queued plus in flight). `write` accepts no more until acks free room.
    pub send_buffer: usize,
    /// Retransmission timeout before any RTT sample (RFC 6298 says 1 s).
    pub rto_initial: Duration,
    /// Floor of the retransmission timeout.
    pub rto_min: Duration,
    /// Ceiling of the retransmission timeout, also after back-off.
    pub rto_max: Duration,
    /// Send an ACK as keepalive when nothing was sent for this long.
    pub keepalive_interval: Duration,
    /// Abort the connection when nothing was received from the peer for this long.
    pub idle_timeout: Duration,
}

impl Default for ConnectionConfig {
    fn default() -> Self {
        ConnectionConfig {
            recv_window: 64,
            max_data_payload: DEFAULT_MAX_DATA_PAYLOAD,
            send_buffer: 4 * 1024 * 1024,
            rto_initial: Duration::from_secs(1),
            rto_min: Duration::from_millis(200),
            rto_max: Duration::from_secs(30),
            keepalive_interval: Duration::from_secs(15),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// Why a read or write on the connection failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    /// The peer (or a part in between) aborted the connection.
    #[error("connection aborted by peer: {0}")]
    AbortedByPeer(String),
    /// This end aborted it (`abort` was called, or a protocol violation was seen).
    #[error("connection aborted locally: {0}")]
    AbortedLocally(String),
    /// Nothing was heard from the peer for the idle timeout.
    #[error("connection timed out: nothing received from the peer for {0:?}")]
    TimedOut(Duration),
    /// A write after `close`.
    #[error("write after close")]
    WriteAfterClose,
}

/// Something the driver should know about, taken with [`Connection::poll_event`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The peer sent a connection option (delivered in sequence order).
    Option(ConnOption),
    /// The peer's CONN_CLOSE arrived in order: reads will return end of stream.
    PeerClosed,
    /// The connection ended with an error (abort either way, or timeout).
    Failed(StreamError),
    /// Both directions are closed and acknowledged: nothing more will be sent.
    Finished,
}

/// Counters for logs and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub packets_sent: u64,
    pub packets_received: u64,
    pub retransmits: u64,
    pub duplicates_received: u64,
}

/// One end of a virtual connection.
#[derive(Debug)]
pub struct Connection {
    _private: (),
}

impl Connection {
    /// A new, open connection. `peer_window` is the window the peer announced (in CONN_INIT
    /// or CONN_INIT_ACK); use 0 if not known yet, and `set_peer_window` later.
    pub fn new(conn_id: u32, peer_window: u16, config: ConnectionConfig, now: Instant) -> Self {
        let _ = (conn_id, peer_window, config, now);
        todo!()
    }

    pub fn conn_id(&self) -> u32 {
        todo!()
    }

    pub fn set_conn_id(&mut self, conn_id: u32) {
        let _ = conn_id;
        todo!()
    }

    /// Sets the peer's window from a handshake packet.
    pub fn set_peer_window(&mut self, window: u16) {
        let _ = window;
        todo!()
    }

    /// The receive window this end advertises now.
    pub fn recv_window(&self) -> u16 {
        todo!()
    }

    // ---- application side ----

    /// Bytes `write` would accept now.
    pub fn send_capacity(&self) -> usize {
        todo!()
    }

    /// Queues up to `send_capacity()` bytes; `Ok(0)` means full (wait for writability).
    pub fn write(&mut self, data: &[u8]) -> Result<usize, StreamError> {
        let _ = data;
        todo!()
    }

    /// Half-close: CONN_CLOSE is queued after all data written so far. Idempotent.
    pub fn close(&mut self) -> Result<(), StreamError> {
        todo!()
    }

    /// Ends the connection at once: CONN_ABORT(reason) is sent, reads and writes fail.
    pub fn abort(&mut self, reason: &str) {
        let _ = reason;
        todo!()
    }

    /// Sends a connection option, sequenced like data.
    pub fn send_option(&mut self, option: ConnOption) -> Result<(), StreamError> {
        let _ = option;
        todo!()
    }

    /// Copies in-order received bytes into `buf`: `Ok(Some(n))` with n > 0, `Ok(Some(0))` at
    /// end of stream (peer closed), `Ok(None)` when nothing is available yet.
    pub fn read(&mut self, buf: &mut [u8]) -> Result<Option<usize>, StreamError> {
        let _ = buf;
        todo!()
    }

    /// Takes the next whole in-order chunk of received bytes without copying (same outcomes
    /// as `read`, with `Some(empty)` at end of stream).
    pub fn read_chunk(&mut self, max: usize) -> Result<Option<Bytes>, StreamError> {
        let _ = max;
        todo!()
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        todo!()
    }

    // ---- peer side ----

    /// Takes a packet addressed to this connection. Packets of types that are not part of
    /// the connection (link-level, handshake) are ignored; a malformed payload is logged and
    /// dropped; CONN_ABORT ends the connection.
    pub fn handle_packet(&mut self, packet: Packet, now: Instant) {
        let _ = (packet, now);
        todo!()
    }

    /// The next packet to send, if any: retransmissions first, then acks and window updates,
    /// then new data within the peer's window.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Packet> {
        let _ = now;
        todo!()
    }

    /// When `handle_timeout` must next be called (retransmission, probe, keepalive, idle).
    pub fn poll_timeout(&self) -> Option<Instant> {
        todo!()
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        let _ = now;
        todo!()
    }

    // ---- state ----

    /// True when `read` would return something other than `Ok(None)`.
    pub fn is_readable(&self) -> bool {
        todo!()
    }

    /// True when `write` would accept at least one byte or would fail.
    pub fn is_writable(&self) -> bool {
        todo!()
    }

    /// Both directions closed and acknowledged, or failed, and nothing left to send.
    pub fn is_finished(&self) -> bool {
        todo!()
    }

    pub fn stats(&self) -> Stats {
        todo!()
    }
}
