//! In-process TCP peers that tests put behind the broker.

pub mod echo;
pub mod sink_source;

use std::future::Future;
use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// Runs `serve` for every connection accepted on `listener` until the returned task is
/// aborted; aborting it also aborts every connection task (they live in its `JoinSet`).
pub(crate) fn spawn_accept_loop<F, Fut>(
    listener: TcpListener,
    serve: F,
) -> tokio::task::JoinHandle<()>
where
    F: Fn(TcpStream, SocketAddr) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        let mut tasks = JoinSet::new();
        loop {
            // Reap finished connection tasks so the set stays as small as the live ones.
            while tasks.try_join_next().is_some() {}
            match listener.accept().await {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    tasks.spawn(serve(stream, peer));
                }
                Err(e) => {
                    // EMFILE and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "test server accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    })
}
