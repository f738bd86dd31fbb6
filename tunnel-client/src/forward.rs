//! Copies one local byte stream (a TCP connection) to a tunnel connection and back, passing
//! half-close through: when one side's read ends, the other side's write is shut down and the
//! other direction goes on.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

/// Size of each direction's copy buffer: one full DATA packet's worth.
pub const COPY_BUFFER: usize = 64 * 1024;

/// Bytes moved by [`forward`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Copied {
    /// From the local side into the tunnel.
    pub up: u64,
    /// From the tunnel to the local side.
    pub down: u64,
}

/// Copies `local` ⇄ `tunnel` until both directions have ended, or one fails (then the other
/// is dropped at once, which aborts the tunnel connection / resets the local one).
///
/// When `stop` turns `true` (graceful shutdown), the local → tunnel direction ends as if the
/// local side had closed: the tunnel gets a half-close and the answer still flows back.
pub async fn forward<L, T>(
    local: L,
    tunnel: T,
    stop: watch::Receiver<bool>,
) -> (Copied, io::Result<()>)
where
    L: AsyncRead + AsyncWrite + Unpin,
    T: AsyncRead + AsyncWrite + Unpin,
{
    let (mut local_r, mut local_w) = tokio::io::split(local);
    let (mut tunnel_r, mut tunnel_w) = tokio::io::split(tunnel);
    let mut copied = Copied::default();
    let up = pump(&mut local_r, &mut tunnel_w, &mut copied.up, Some(stop));
    let down = pump(&mut tunnel_r, &mut local_w, &mut copied.down, None);
    let result = tokio::try_join!(up, down).map(|_| ());
    (copied, result)
}

/// Copies `from` to `to` until `from` ends (or `stop` turns true), then shuts `to` down.
async fn pump<R, W>(
    from: &mut R,
    to: &mut W,
    count: &mut u64,
    mut stop: Option<watch::Receiver<bool>>,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; COPY_BUFFER];
    loop {
        let n = match &mut stop {
            Some(stop) => tokio::select! {
                n = from.read(&mut buf) => n?,
                // A dropped sender counts as a stop too.
                _ = stop.wait_for(|s| *s) => 0,
            },
            None => from.read(&mut buf).await?,
        };
        if n == 0 {
            break;
        }
        to.write_all(&buf[..n]).await?;
        *count += n as u64;
    }
    to.shutdown().await
}
