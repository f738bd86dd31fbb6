//! The tokio runtime of the tunnel's binaries (and of the bench's forwarders), built once at
//! the start of `main` from a `--worker-threads` option.
//!
//! - `0`: tokio's multi-thread scheduler with its default workers (`TOKIO_WORKER_THREADS`,
//!   else one per core).
//! - `1`: tokio's current-thread scheduler. Every task runs on the thread that calls
//!   `block_on`, with no queues and wake-ups between threads. On a 2-core machine running
//!   client, relay and broker side by side, it carried 15–17 % more request/response
//!   exchanges over HTTP/1.1 (0–10 % over h2c) than a multi-thread scheduler with one
//!   worker, and shortened the 1-byte round trip (BENCHMARKS.md, "One thread, one
//!   scheduler").
//! - `n` > 1: the multi-thread scheduler with `n` workers.

use std::io;

use tokio::runtime::{Builder, Runtime};

/// A runtime with I/O and timers enabled, as the module describes for `worker_threads`.
pub fn build(worker_threads: usize) -> io::Result<Runtime> {
    let mut builder = match worker_threads {
        1 => Builder::new_current_thread(),
        0 => Builder::new_multi_thread(),
        n => {
            let mut builder = Builder::new_multi_thread();
            builder.worker_threads(n);
            builder
        }
    };
    builder.enable_all().build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_worker_is_the_current_thread_scheduler_and_more_are_the_multi_thread_one() {
        use tokio::runtime::RuntimeFlavor;
        let flavour = |n| build(n).unwrap().handle().runtime_flavor();
        assert_eq!(flavour(1), RuntimeFlavor::CurrentThread);
        assert_eq!(flavour(0), RuntimeFlavor::MultiThread);
        assert_eq!(flavour(2), RuntimeFlavor::MultiThread);
        assert_eq!(build(3).unwrap().metrics().num_workers(), 3);
    }

    #[test]
    fn a_current_thread_runtime_runs_spawned_tasks_timers_and_sockets() {
        let runtime = build(1).unwrap();
        let echoed = runtime.block_on(async {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let server = tokio::spawn(async move {
                let (mut socket, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 4];
                socket.read_exact(&mut buf).await.unwrap();
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                socket.write_all(&buf).await.unwrap();
            });
            let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
            client.write_all(b"ping").await.unwrap();
            let mut buf = [0u8; 4];
            client.read_exact(&mut buf).await.unwrap();
            server.await.unwrap();
            buf
        });
        assert_eq!(&echoed, b"ping");
    }
}
