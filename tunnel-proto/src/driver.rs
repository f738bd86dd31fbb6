//! The one async driver of a [`Connection`]: a tokio `AsyncRead` + `AsyncWrite` byte stream
//! ([`TunnelStream`]) over any packet transport. The HTTP client (`tunnel-client`) and the
//! broker's link (`tunnel-broker`) both drive their connections with it, the way `quinn`
//! drives `quinn-proto`. Available with the `driver` feature.
//!
//! Applications only meet [`TunnelStream`]. The rest of this module is for transports:
//! [`spawn`] starts a connection's driver task and returns the stream with a [`ConnHandle`],
//! through which the transport delivers the peer's packets; the driver hands packets to send
//! to the transport's [`PacketSink`].
//!
//! The connection itself is a sans-IO state machine. This module puts it behind a
//! `std::sync::Mutex` shared by three parties:
//! - the application, through [`TunnelStream`];
//! - the transport's receive side, through [`ConnHandle::deliver`];
//! - one driver task that owns the clock: it runs timeouts, drains packets to send into
//!   bounded batches and hands them to the [`PacketSink`], and ends the connection.
//!
//! The lock is never held across an `.await`; the driver is woken by a `tokio::sync::Notify`.
//! Time is read from tokio's clock ([`now`]), so tests with a paused tokio clock drive the
//! connection's timers deterministically.
//!
//! # Example: two connections back to back in memory
//!
//! ```
//! use std::future::Future;
//! use std::pin::Pin;
//! use std::sync::{Arc, OnceLock};
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//! use tunnel_proto::driver::{self, ConnHandle, PacketSink};
//! use tunnel_proto::{Connection, ConnectionConfig, Packet};
//!
//! /// A transport that hands every packet straight to the other end.
//! struct Wire(OnceLock<ConnHandle>);
//!
//! impl PacketSink for Wire {
//!     fn send(&self, packets: Vec<Packet>) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
//!         Box::pin(async move {
//!             if let Some(peer) = self.0.get() {
//!                 peer.deliver_all(packets);
//!             }
//!         })
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> std::io::Result<()> {
//! let config = ConnectionConfig::default();
//! let (to_b, to_a) = (Arc::new(Wire(OnceLock::new())), Arc::new(Wire(OnceLock::new())));
//! let a = Connection::new(1, config.recv_window, config.clone(), driver::now());
//! let b = Connection::new(1, config.recv_window, config, driver::now());
//! let (mut a, a_handle) = driver::spawn(a, to_b.clone());
//! let (mut b, b_handle) = driver::spawn(b, to_a.clone());
//! let _ = to_b.0.set(b_handle);
//! let _ = to_a.0.set(a_handle);
//!
//! a.write_all(b"hello").await?;
//! a.shutdown().await?; // half-close: b reads end of stream after the bytes
//! let mut got = Vec::new();
//! b.read_to_end(&mut got).await?;
//! assert_eq!(got, b"hello");
//! # Ok(())
//! # }
//! ```

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{watch, Notify};

use crate::connection::{Event, Stats, StreamError};
use crate::payload::ConnOption;
use crate::{Connection, Packet};

/// Where the driver sends packets: the transport toward the peer.
pub trait PacketSink: Send + Sync + 'static {
    /// Hands packets to the transport toward the peer. May wait for transport capacity (that
    /// is back-pressure) but must not wait for the peer. Losing packets is allowed: the
    /// connection retransmits.
    fn send(&self, packets: Vec<Packet>) -> Pin<Box<dyn Future<Output = ()> + Send + '_>>;
}

/// Tunables of the driver (the connection's own tunables are in `ConnectionConfig`).
#[derive(Debug, Clone)]
pub struct StreamConfig {
    /// Most bytes (packets on the wire, headers included) handed to the sink in one call.
    /// A single packet larger than this still goes alone. Default: 1 MiB.
    pub max_batch_bytes: usize,
    /// After the application shut down its write side and dropped the stream, how long the
    /// driver keeps the connection alive to get its close acknowledged and the peer's close;
    /// then it aborts. Default: 30 s.
    pub linger: Duration,
    /// After a clean finish, how long the driver stays to answer the peer's retransmitted
    /// CONN_CLOSE, in case our last ACK was lost (TCP's TIME-WAIT); without it the peer
    /// would wait for its idle timeout. Default: 5 s.
    pub time_wait: Duration,
}

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig {
            max_batch_bytes: 1024 * 1024,
            linger: Duration::from_secs(30),
            time_wait: Duration::from_secs(5),
        }
    }
}

/// The latest connection options the peer sent (CONN_OPTION), as the transport needs them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeerOptions {
    /// Option 1: the client sleeps this long after an empty pull; `None` or 0: continuous.
    pub pull_period_ms: Option<u32>,
    /// Option 2: the relay's inactivity timeout for this connection.
    pub inactivity_timeout_ms: Option<u32>,
}

/// The driver's clock: tokio's (pausable in tests) as a `std::time::Instant`. Give it to
/// [`Connection::new`] for connections that [`spawn`] will drive.
pub fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

struct Inner {
    conn: Connection,
    read_waker: Option<Waker>,
    write_waker: Option<Waker>,
    /// Set by `ConnHandle::fail` (transport gave up) or by an `Event::Failed`: every read
    /// and write fails with it.
    error: Option<StreamError>,
    /// The transport failed: nothing more may be sent.
    transport_failed: bool,
    /// The application called `poll_shutdown`.
    shutdown: bool,
    /// The `TunnelStream` is gone; `Some(deadline)` of the linger when it was shut down first.
    dropped: bool,
    linger_deadline: Option<Instant>,
    /// Set at a clean finish: the driver ends at this time (see `StreamConfig::time_wait`).
    time_wait_deadline: Option<Instant>,
    /// The driver has ended.
    ended: bool,
    peer_options: PeerOptions,
}

impl Inner {
    /// Wakes the application's reader and writer if the connection lets them progress (or
    /// fail) now.
    fn wake_app(&mut self) {
        let failed = self.error.is_some() || self.ended;
        if failed || self.conn.is_readable() {
            if let Some(w) = self.read_waker.take() {
                w.wake();
            }
        }
        if failed || self.conn.is_writable() {
            if let Some(w) = self.write_waker.take() {
                w.wake();
            }
        }
    }
}

struct Shared {
    conn_id: u32,
    inner: Mutex<Inner>,
    /// Wakes the driver: new data written, packets delivered, shutdown, drop, failure.
    driver_wake: Notify,
    /// `true` once the driver has ended.
    closed: watch::Sender<bool>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock would be a bug in this module or in the connection;
        // the state is still the best we have, so keep going rather than poison every user.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One virtual connection as a byte stream: tokio `AsyncRead` + `AsyncWrite`, with the
/// contract of a TCP socket (including half-close through `shutdown`).
///
/// Dropping it without `shutdown` aborts the connection (the peer sees a reset); dropping it
/// after `shutdown` lets the driver finish the close in the background.
pub struct TunnelStream {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for TunnelStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelStream")
            .field("conn_id", &self.shared.conn_id)
            .finish()
    }
}

/// The transport's and the owner's handle on a connection driven by [`spawn`].
#[derive(Clone)]
pub struct ConnHandle {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ConnHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnHandle")
            .field("conn_id", &self.shared.conn_id)
            .field("closed", &self.is_closed())
            .finish()
    }
}

/// Starts the driver task for `conn` on the current tokio runtime, with the default
/// [`StreamConfig`]. Panics if called outside a tokio runtime.
pub fn spawn(conn: Connection, sink: Arc<dyn PacketSink>) -> (TunnelStream, ConnHandle) {
    spawn_with_config(conn, sink, StreamConfig::default())
}

/// [`spawn`] with explicit driver tunables.
pub fn spawn_with_config(
    conn: Connection,
    sink: Arc<dyn PacketSink>,
    config: StreamConfig,
) -> (TunnelStream, ConnHandle) {
    let (closed, _) = watch::channel(false);
    let shared = Arc::new(Shared {
        conn_id: conn.conn_id(),
        inner: Mutex::new(Inner {
            conn,
            read_waker: None,
            write_waker: None,
            error: None,
            transport_failed: false,
            shutdown: false,
            dropped: false,
            linger_deadline: None,
            time_wait_deadline: None,
            ended: false,
            peer_options: PeerOptions::default(),
        }),
        driver_wake: Notify::new(),
        closed,
    });
    tokio::spawn(drive(shared.clone(), sink, config));
    (
        TunnelStream {
            shared: shared.clone(),
        },
        ConnHandle { shared },
    )
}

impl TunnelStream {
    /// The connection's id: the relay's number for it, also in the logs of the client, the
    /// relay and the broker.
    pub fn conn_id(&self) -> u32 {
        self.shared.conn_id
    }

    /// Counters of the connection: bytes and packets each way, retransmissions, RTT.
    pub fn stats(&self) -> Stats {
        self.shared.lock().conn.stats()
    }

    /// Ends the connection at once, like a TCP reset: the peer's reads and writes fail with
    /// `ConnectionReset` and see `reason`; ours fail from now on. Data not yet delivered is
    /// lost. (Dropping the stream without `shutdown` aborts too, with a generic reason.)
    pub fn abort(&self, reason: &str) {
        self.handle().abort(reason);
    }

    /// Resolves once the connection is over: closed both ways and acknowledged (after the
    /// TIME-WAIT of [`StreamConfig::time_wait`]), or failed. The future does not borrow the
    /// stream, so it can be awaited after the stream was shut down and dropped, to let the
    /// close finish before the runtime stops.
    pub fn closed(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut ended = self.shared.closed.subscribe();
        async move {
            // `wait_for` checks the current value first, so an ended driver resolves at once;
            // the sender lives as long as the driver's shared state, which outlives the end.
            let _ = ended.wait_for(|ended| *ended).await;
        }
    }

    /// A transport-side handle on the same connection. Hidden because applications need
    /// only [`abort`](Self::abort) and [`closed`](Self::closed); the broker crate's tests use
    /// it to look at the options a peer sent.
    #[doc(hidden)]
    pub fn handle(&self) -> ConnHandle {
        ConnHandle {
            shared: self.shared.clone(),
        }
    }
}

impl ConnHandle {
    /// The connection's id.
    pub fn conn_id(&self) -> u32 {
        self.shared.conn_id
    }

    /// A packet from the peer for this connection (called by the pull loop / link reader).
    pub fn deliver(&self, packet: Packet) {
        self.deliver_all(std::iter::once(packet));
    }

    /// Several packets from the peer, under one lock.
    pub fn deliver_all(&self, packets: impl IntoIterator<Item = Packet>) {
        {
            let mut inner = self.shared.lock();
            if inner.ended || inner.transport_failed {
                return;
            }
            let now = now();
            for packet in packets {
                inner.conn.handle_packet(packet, now);
            }
            inner.wake_app();
        }
        // Acks and window updates are due; events may be pending.
        self.shared.driver_wake.notify_one();
    }

    /// The transport lost the connection for good (e.g. the relay answered 404): reads and
    /// writes fail with this error, nothing more is sent.
    pub fn fail(&self, error: StreamError) {
        {
            let mut inner = self.shared.lock();
            if inner.ended {
                return;
            }
            inner.transport_failed = true;
            // After both closes, the relay forgetting the connection (its broker side has
            // finished) is the normal end, not an error: the application still reads what it
            // holds, then end of stream.
            let clean_end = inner.conn.both_directions_closed();
            if inner.error.is_none() && !clean_end {
                inner.error = Some(error);
            }
            inner.wake_app();
        }
        self.shared.driver_wake.notify_one();
    }

    /// Sends a connection option to the peer (sequenced like data).
    pub fn send_option(&self, option: ConnOption) -> Result<(), StreamError> {
        let result = {
            let mut inner = self.shared.lock();
            match &inner.error {
                Some(e) => Err(e.clone()),
                None => inner.conn.send_option(option),
            }
        };
        self.shared.driver_wake.notify_one();
        result
    }

    /// Aborts the connection: the peer gets CONN_ABORT(reason), reads and writes fail.
    pub fn abort(&self, reason: &str) {
        {
            let mut inner = self.shared.lock();
            if inner.ended || inner.transport_failed {
                return;
            }
            inner.conn.abort(reason);
            inner.wake_app();
        }
        self.shared.driver_wake.notify_one();
    }

    /// The path to the peer works again after an outage (a new broker link, a request that
    /// succeeded after failures): resend what is in flight now instead of waiting out a
    /// retransmission timeout that backed off during the outage.
    pub fn path_restored(&self) {
        {
            let mut inner = self.shared.lock();
            if inner.ended || inner.transport_failed {
                return;
            }
            inner.conn.on_path_restored(now());
        }
        self.shared.driver_wake.notify_one();
    }

    /// The latest options the peer sent.
    pub fn peer_options(&self) -> PeerOptions {
        self.shared.lock().peer_options
    }

    /// Counters of the connection (see [`TunnelStream::stats`]).
    pub fn stats(&self) -> Stats {
        self.shared.lock().conn.stats()
    }

    /// The error the connection failed with, if it failed.
    pub fn error(&self) -> Option<StreamError> {
        self.shared.lock().error.clone()
    }

    /// The receive window this end advertises now (the broker announces it on re-link).
    pub fn recv_window(&self) -> u16 {
        self.shared.lock().conn.recv_window()
    }

    /// Changes the receive window the connection announces from now on
    /// ([`Connection::set_recv_window`]): a client whose connection moved to a relay that
    /// holds more or less.
    pub fn set_recv_window(&self, window: u16) {
        {
            let mut inner = self.shared.lock();
            if inner.ended || inner.transport_failed {
                return;
            }
            inner.conn.set_recv_window(window);
        }
        // A larger window is announced at once.
        self.shared.driver_wake.notify_one();
    }

    /// Resolves when the driver has ended (finished or failed).
    pub async fn closed(&self) {
        let mut rx = self.shared.closed.subscribe();
        // `wait_for` checks the current value first, so an already-ended driver resolves
        // at once. The sender lives in `shared`, which we hold, so it cannot be dropped.
        let _ = rx.wait_for(|ended| *ended).await;
    }

    /// Whether the driver has ended (finished or failed).
    pub fn is_closed(&self) -> bool {
        *self.shared.closed.borrow()
    }
}

impl TunnelStream {
    /// Takes received bytes without copying them: at most `max` bytes of the next in-order
    /// payload, as the `Bytes` the packet arrived in. An empty chunk means end of stream.
    /// [`AsyncRead::poll_read`] is this plus a copy; a forwarder that writes the chunk to a
    /// socket saves the copy (see [`crate::splice`]). Takes `&self`, so one task may read
    /// while another writes.
    pub fn poll_read_chunk(&self, cx: &mut Context<'_>, max: usize) -> Poll<io::Result<Bytes>> {
        let mut inner = self.shared.lock();
        if let Some(e) = &inner.error {
            return Poll::Ready(Err(io::Error::from(e.clone())));
        }
        match inner.conn.read_chunk(max) {
            Ok(Some(chunk)) => {
                drop(inner);
                if !chunk.is_empty() {
                    // Reading frees receive window: the driver may owe a window update.
                    self.shared.driver_wake.notify_one();
                }
                Poll::Ready(Ok(chunk))
            }
            Ok(None) => {
                if inner.ended {
                    // The driver is gone without a failure or end of stream; nothing more
                    // will ever arrive.
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::ConnectionReset,
                        "tunnel connection ended",
                    )));
                }
                inner.read_waker = Some(cx.waker().clone());
                Poll::Pending
            }
            Err(e) => Poll::Ready(Err(io::Error::from(e))),
        }
    }

    /// Queues bytes to send without copying a bulk write: takes as much of the front of
    /// `data` as the send buffer has room for (`data` keeps the rest) and returns how much
    /// (see [`Connection::write_bytes`]). Pending while the send buffer is full. Takes
    /// `&self`, so one task may write while another reads.
    pub fn poll_write_bytes(
        &self,
        cx: &mut Context<'_>,
        data: &mut Bytes,
    ) -> Poll<io::Result<usize>> {
        self.poll_write_with(cx, |conn| conn.write_bytes(data))
    }

    /// Half-closes the sending direction, as `shutdown` does (see [`AsyncWrite`]).
    pub fn shutdown_write(&self) -> io::Result<()> {
        let result = {
            let mut inner = self.shared.lock();
            if let Some(e) = &inner.error {
                return Err(io::Error::from(e.clone()));
            }
            inner.shutdown = true;
            inner.conn.close()
        };
        self.shared.driver_wake.notify_one();
        result.map_err(io::Error::from)
    }

    fn poll_write_with(
        &self,
        cx: &mut Context<'_>,
        write: impl FnOnce(&mut Connection) -> Result<usize, StreamError>,
    ) -> Poll<io::Result<usize>> {
        let mut inner = self.shared.lock();
        if let Some(e) = &inner.error {
            return Poll::Ready(Err(io::Error::from(e.clone())));
        }
        match write(&mut inner.conn) {
            Ok(0) => {
                if inner.ended {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "tunnel connection ended",
                    )));
                }
                inner.write_waker = Some(cx.waker().clone());
                Poll::Pending
            }
            Ok(n) => {
                drop(inner);
                self.shared.driver_wake.notify_one();
                Poll::Ready(Ok(n))
            }
            Err(e) => Poll::Ready(Err(io::Error::from(e))),
        }
    }
}

impl AsyncRead for TunnelStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        let chunk = std::task::ready!(self.poll_read_chunk(cx, buf.remaining()))?;
        buf.put_slice(&chunk);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for TunnelStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        self.poll_write_with(cx, |conn| conn.write(buf))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Written bytes are already queued in the connection, which delivers them reliably;
        // the driver was notified on write. Like a TCP socket, flush does not wait for acks.
        let inner = self.shared.lock();
        match &inner.error {
            Some(e) => Poll::Ready(Err(io::Error::from(e.clone()))),
            None => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.shutdown_write())
    }
}

impl Drop for TunnelStream {
    fn drop(&mut self) {
        {
            let mut inner = self.shared.lock();
            inner.dropped = true;
            if !inner.ended && inner.error.is_none() && !inner.transport_failed {
                if inner.shutdown {
                    // The driver finishes the close in the background (see `drive`).
                } else {
                    inner.conn.abort("stream dropped");
                }
            }
        }
        self.shared.driver_wake.notify_one();
    }
}

/// What one locked step of the driver decided.
struct Step {
    batch: Vec<Packet>,
    /// The batch was cut at the size bound: more packets are ready right away.
    more: bool,
    /// Nothing more will be sent after this batch.
    done: bool,
    /// When to run the next step if nobody wakes the driver.
    deadline: Option<Instant>,
}

/// Where the driver's timer rests before the first step with a deadline.
const IDLE_TIMER: std::time::Duration = std::time::Duration::from_secs(3600);

/// The driver task: see the module documentation.
async fn drive(shared: Arc<Shared>, sink: Arc<dyn PacketSink>, config: StreamConfig) {
    // A packet taken from the connection that did not fit the previous batch.
    let mut carry: Option<Packet> = None;
    // One timer for the task's life, moved to each step's deadline. A new timer per step
    // made the runtime wake its own I/O driver (an eventfd write) nearly every time one was
    // armed; moving a timer later costs nothing until it would fire.
    let timer = tokio::time::sleep_until(tokio::time::Instant::now() + IDLE_TIMER);
    tokio::pin!(timer);
    loop {
        let step = {
            let mut inner = shared.lock();
            step(&mut inner, &mut carry, &config)
        };
        if !step.batch.is_empty() {
            sink.send(step.batch).await;
        }
        if step.done {
            break;
        }
        if step.more {
            continue;
        }
        let notified = shared.driver_wake.notified();
        match step.deadline {
            Some(deadline) => {
                let deadline = tokio::time::Instant::from_std(deadline);
                if timer.deadline() != deadline {
                    timer.as_mut().reset(deadline);
                }
                tokio::select! {
                    _ = notified => {}
                    _ = &mut timer => {}
                }
            }
            None => notified.await,
        }
    }
    {
        let mut inner = shared.lock();
        inner.ended = true;
        inner.wake_app();
    }
    shared.closed.send_replace(true);
}

fn step(inner: &mut Inner, carry: &mut Option<Packet>, config: &StreamConfig) -> Step {
    let now = now();
    if inner.transport_failed {
        return Step {
            batch: Vec::new(),
            more: false,
            done: true,
            deadline: None,
        };
    }
    if inner.conn.poll_timeout().is_some_and(|t| t <= now) {
        inner.conn.handle_timeout(now);
    }
    if inner.dropped {
        // Nobody will read any more: discard what arrives so the window stays open and the
        // peer can finish its side of the close.
        while let Ok(Some(chunk)) = inner.conn.read_chunk(usize::MAX) {
            if chunk.is_empty() {
                break;
            }
        }
        if inner.shutdown && inner.error.is_none() {
            match inner.linger_deadline {
                None => inner.linger_deadline = Some(now + config.linger),
                Some(deadline) if deadline <= now => {
                    tracing::debug!(
                        conn_id = inner.conn.conn_id(),
                        "close not completed within the linger time; aborting"
                    );
                    inner
                        .conn
                        .abort("close not completed within the linger time");
                }
                Some(_) => {}
            }
        }
    }
    let mut finished = false;
    while let Some(event) = inner.conn.poll_event() {
        match event {
            Event::Option(option) => match option {
                ConnOption::PullPeriodMs(ms) => inner.peer_options.pull_period_ms = Some(ms),
                ConnOption::InactivityTimeoutMs(ms) => {
                    inner.peer_options.inactivity_timeout_ms = Some(ms)
                }
                ConnOption::Unknown { option, value } => {
                    tracing::debug!(
                        conn_id = inner.conn.conn_id(),
                        option,
                        value,
                        "ignoring unknown connection option"
                    );
                }
            },
            Event::PeerClosed => {}
            Event::Failed(error) => {
                if inner.error.is_none() {
                    inner.error = Some(error);
                }
            }
            Event::Finished => finished = true,
        }
    }

    let mut batch = Vec::new();
    let mut bytes = 0usize;
    let mut more = false;
    if let Some(packet) = carry.take() {
        bytes += packet.wire_len();
        batch.push(packet);
    }
    while let Some(packet) = inner.conn.poll_transmit(now) {
        if !batch.is_empty() && bytes + packet.wire_len() > config.max_batch_bytes {
            *carry = Some(packet);
            more = true;
            break;
        }
        bytes += packet.wire_len();
        batch.push(packet);
    }
    inner.wake_app();

    let clean_finish = inner.error.is_none() && (finished || inner.conn.is_finished());
    if clean_finish && inner.time_wait_deadline.is_none() {
        inner.time_wait_deadline = Some(now + config.time_wait);
    }
    let time_waited = inner.time_wait_deadline.is_some_and(|t| now >= t);
    let done = !more && (inner.error.is_some() || (clean_finish && time_waited));
    let deadline = [
        inner.conn.poll_timeout(),
        inner.linger_deadline,
        inner.time_wait_deadline,
    ]
    .into_iter()
    .flatten()
    .min();
    Step {
        batch,
        more,
        done,
        deadline,
    }
}
