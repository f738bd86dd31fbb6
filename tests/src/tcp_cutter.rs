//! A TCP forwarder that can be cut and restored, to put between the broker and the relay's
//! link port.
//!
//! ```text
//! broker ──TCP──▶ TcpCutter ──TCP──▶ relay --link-listen
//! ```
//!
//! [`TcpCutter::cut`] closes both sides of every forwarded connection at once (the broker and
//! the relay each see their link end) and, until [`TcpCutter::restore`], accepts new
//! connections only to close them at once, so a redialing broker fails its handshake the way
//! it would against a network that drops the path. The listening port stays the same across
//! cuts, so the broker needs no new address.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::servers::spawn_accept_loop;

/// Longest wait for the upstream (relay) to accept a forwarded connection; beyond it the
/// client side is closed as if the upstream refused.
pub const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Counters of a [`TcpCutter`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CutterStats {
    /// Connections accepted and forwarded to the upstream.
    pub forwarded: u64,
    /// Connections accepted while cut and closed at once.
    pub refused_while_cut: u64,
    /// Forwarded connections closed by a cut.
    pub severed: u64,
    /// Calls to [`TcpCutter::cut`].
    pub cuts: u64,
    /// Bytes copied towards the upstream / back from it.
    pub bytes_up: u64,
    pub bytes_down: u64,
}

#[derive(Debug, Default)]
struct Counters {
    forwarded: AtomicU64,
    refused_while_cut: AtomicU64,
    severed: AtomicU64,
    cuts: AtomicU64,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
}

/// Cut state broadcast to every forwarded connection: `(generation, cut)`. Each cut bumps
/// the generation, so a connection accepted just before a cut still sees it change.
type CutState = (u64, bool);

struct Shared {
    upstream: SocketAddr,
    state: watch::Sender<CutState>,
    counters: Counters,
}

/// A running forwarder; stops (closing its connections) when dropped.
pub struct TcpCutter {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for TcpCutter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpCutter")
            .field("addr", &self.addr)
            .field("upstream", &self.shared.upstream)
            .field("cut", &self.is_cut())
            .field("stats", &self.stats())
            .finish()
    }
}

impl TcpCutter {
    /// Listens on 127.0.0.1 (ephemeral port) and forwards every connection to `upstream`.
    pub async fn start(upstream: SocketAddr) -> io::Result<TcpCutter> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (state, _) = watch::channel((0u64, false));
        let shared = Arc::new(Shared {
            upstream,
            state,
            counters: Counters::default(),
        });
        let for_loop = Arc::clone(&shared);
        let task = spawn_accept_loop(listener, move |stream, peer| {
            let shared = Arc::clone(&for_loop);
            async move { serve(shared, stream, peer).await }
        });
        Ok(TcpCutter { addr, shared, task })
    }

    /// Where the broker should dial.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Closes both sides of every forwarded connection and refuses new ones until
    /// [`TcpCutter::restore`].
    pub fn cut(&self) {
        self.shared.counters.cuts.fetch_add(1, Ordering::Relaxed);
        self.shared.state.send_modify(|(generation, cut)| {
            *generation += 1;
            *cut = true;
        });
    }

    /// Forwards new connections again.
    pub fn restore(&self) {
        self.shared.state.send_modify(|(_, cut)| *cut = false);
    }

    pub fn is_cut(&self) -> bool {
        self.shared.state.borrow().1
    }

    pub fn stats(&self) -> CutterStats {
        let c = &self.shared.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        CutterStats {
            forwarded: get(&c.forwarded),
            refused_while_cut: get(&c.refused_while_cut),
            severed: get(&c.severed),
            cuts: get(&c.cuts),
            bytes_up: get(&c.bytes_up),
            bytes_down: get(&c.bytes_down),
        }
    }
}

impl Drop for TcpCutter {
    fn drop(&mut self) {
        self.task.abort();
        // Sever live connections too: they run in their own tasks.
        self.shared.state.send_modify(|(generation, cut)| {
            *generation += 1;
            *cut = true;
        });
    }
}

async fn serve(shared: Arc<Shared>, mut client: TcpStream, peer: SocketAddr) {
    let mut state = shared.state.subscribe();
    let (generation, cut) = *state.borrow_and_update();
    if cut {
        shared
            .counters
            .refused_while_cut
            .fetch_add(1, Ordering::Relaxed);
        tracing::debug!(%peer, "tcp cutter: connection refused while cut");
        return; // Dropping the stream closes it.
    }
    let upstream = match tokio::time::timeout(
        UPSTREAM_CONNECT_TIMEOUT,
        TcpStream::connect(shared.upstream),
    )
    .await
    {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "tcp cutter: upstream refused");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "tcp cutter: upstream connect timed out");
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    let _ = client.set_nodelay(true);
    shared.counters.forwarded.fetch_add(1, Ordering::Relaxed);
    let mut upstream = upstream;
    let severed = async {
        // Ends when a cut happened after this connection was accepted (or the cutter is gone).
        loop {
            if state.borrow_and_update().0 != generation {
                return;
            }
            if state.changed().await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        copied = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {
            match copied {
                Ok((up, down)) => {
                    shared.counters.bytes_up.fetch_add(up, Ordering::Relaxed);
                    shared.counters.bytes_down.fetch_add(down, Ordering::Relaxed);
                    tracing::debug!(%peer, up, down, "tcp cutter: connection ended");
                }
                Err(e) => tracing::debug!(%peer, error = %e, "tcp cutter: connection broke"),
            }
        }
        () = severed => {
            shared.counters.severed.fetch_add(1, Ordering::Relaxed);
            tracing::info!(%peer, "tcp cutter: connection severed");
        }
    }
    // Both streams drop here: each side sees its connection close.
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const T: Duration = Duration::from_secs(5);

    /// An upstream that echoes every connection.
    async fn echo_upstream() -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = spawn_accept_loop(listener, |mut stream, _| async move {
            let (mut rd, mut wr) = stream.split();
            let _ = tokio::io::copy(&mut rd, &mut wr).await;
        });
        (addr, task)
    }

    async fn echo_once(stream: &mut TcpStream, msg: &[u8]) -> io::Result<Vec<u8>> {
        stream.write_all(msg).await?;
        let mut back = vec![0u8; msg.len()];
        stream.read_exact(&mut back).await?;
        Ok(back)
    }

    /// Reads until EOF or error; true when the connection ended.
    async fn ends(stream: &mut TcpStream) -> bool {
        let mut buf = [0u8; 16];
        matches!(
            tokio::time::timeout(T, stream.read(&mut buf)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }

    #[tokio::test]
    async fn forwards_cuts_refuses_and_restores() {
        let (upstream, _task) = echo_upstream().await;
        let cutter = TcpCutter::start(upstream).await.unwrap();

        let mut a = TcpStream::connect(cutter.addr()).await.unwrap();
        let back = tokio::time::timeout(T, echo_once(&mut a, b"hello"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(back, b"hello");

        cutter.cut();
        assert!(
            ends(&mut a).await,
            "a live connection must be closed by a cut"
        );
        let mut refused = TcpStream::connect(cutter.addr()).await.unwrap();
        assert!(
            ends(&mut refused).await,
            "a connection made while cut must be closed"
        );

        cutter.restore();
        let mut b = TcpStream::connect(cutter.addr()).await.unwrap();
        let back = tokio::time::timeout(T, echo_once(&mut b, b"again"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(back, b"again");

        let stats = cutter.stats();
        assert_eq!(stats.cuts, 1, "{stats:?}");
        assert_eq!(stats.severed, 1, "{stats:?}");
        assert_eq!(stats.refused_while_cut, 1, "{stats:?}");
        assert_eq!(stats.forwarded, 2, "{stats:?}");
    }
}
