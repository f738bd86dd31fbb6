//! One measurement each: a throughput exchange, a ping-pong series, the idle-connection hold,
//! the many-connection aggregate. Each works on any path entered by a TCP connect.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Barrier, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::dataserver::{
    write_pattern, IO_CHUNK, READY, REQUEST_RESPONSE, THROUGHPUT, THROUGHPUT_COUNTED,
};

/// Bytes moved and the time it took.
#[derive(Debug, Clone, Copy)]
pub struct Transfer {
    pub up: u64,
    pub down: u64,
    pub elapsed: Duration,
}

impl Transfer {
    /// MiB/s of both directions together.
    pub fn mib_per_s(&self) -> f64 {
        (self.up + self.down) as f64 / (1024.0 * 1024.0) / self.elapsed.as_secs_f64()
    }
}

async fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let s = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("connect {addr}")))??;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Opens a throughput exchange and waits for the server's READY, so the path (for the tunnel:
/// the virtual connection) is open before any clock starts.
async fn open_throughput(addr: SocketAddr, down: u64) -> io::Result<TcpStream> {
    let mut header = vec![THROUGHPUT];
    header.extend_from_slice(&down.to_be_bytes());
    open_exchange(addr, &header).await
}

/// Connects, sends `header` (a data server command) and waits for the server's READY.
async fn open_exchange(addr: SocketAddr, header: &[u8]) -> io::Result<TcpStream> {
    let mut s = connect(addr).await?;
    s.write_all(header).await?;
    let mut ready = [0u8; 1];
    s.read_exact(&mut ready).await?;
    if ready[0] != READY {
        return Err(io::Error::other(format!(
            "server answered {:?}, not READY",
            ready[0]
        )));
    }
    Ok(s)
}

/// Sends `up` bytes (then half-closes) while receiving `down` bytes and the server's count of
/// what it received; fails unless the count is `up`.
async fn run_throughput(s: TcpStream, up: u64, down: u64) -> io::Result<()> {
    let (mut rd, mut wr) = s.into_split();
    let send = async {
        write_pattern(&mut wr, up).await?;
        wr.shutdown().await
    };
    let receive = async {
        let mut buf = vec![0u8; IO_CHUNK];
        let mut left = down;
        while left > 0 {
            let want = left.min(buf.len() as u64) as usize;
            let n = rd.read(&mut buf[..want]).await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("EOF with {left} of {down} down bytes missing"),
                ));
            }
            left -= n as u64;
        }
        rd.read_u64().await
    };
    let ((), received) = tokio::try_join!(send, receive)?;
    if received != up {
        return Err(io::Error::other(format!(
            "server received {received} of {up} bytes"
        )));
    }
    Ok(())
}

/// One connection: `up` bytes client→server and `down` bytes server→client, at once.
pub async fn throughput(
    addr: SocketAddr,
    up: u64,
    down: u64,
    timeout: Duration,
) -> io::Result<Transfer> {
    tokio::time::timeout(timeout, async {
        let s = open_throughput(addr, down).await?;
        let started = Instant::now();
        run_throughput(s, up, down).await?;
        Ok(Transfer {
            up,
            down,
            elapsed: started.elapsed(),
        })
    })
    .await
    .map_err(|_| {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("throughput {up}/{down} bytes over {timeout:?}"),
        )
    })?
}

/// [`throughput`] ended by byte counts instead of a half-close (the data server's `L`
/// exchange), for paths that carry no half-close (GNU httptunnel). The clock stops when the
/// server's count of the up bytes has arrived.
pub async fn throughput_counted(
    addr: SocketAddr,
    up: u64,
    down: u64,
    timeout: Duration,
) -> io::Result<Transfer> {
    tokio::time::timeout(timeout, async {
        let mut header = vec![THROUGHPUT_COUNTED];
        header.extend_from_slice(&up.to_be_bytes());
        header.extend_from_slice(&down.to_be_bytes());
        let s = open_exchange(addr, &header).await?;
        let started = Instant::now();
        let (mut rd, mut wr) = s.into_split();
        let send = write_pattern(&mut wr, up);
        let receive = async {
            let mut buf = vec![0u8; IO_CHUNK];
            let mut left = down;
            while left > 0 {
                let want = left.min(buf.len() as u64) as usize;
                let n = rd.read(&mut buf[..want]).await?;
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("EOF with {left} of {down} down bytes missing"),
                    ));
                }
                left -= n as u64;
            }
            rd.read_u64().await
        };
        let ((), received) = tokio::try_join!(send, receive)?;
        let elapsed = started.elapsed();
        if received != up {
            return Err(io::Error::other(format!(
                "server received {received} of {up} bytes"
            )));
        }
        Ok(Transfer { up, down, elapsed })
    })
    .await
    .map_err(|_| {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("counted throughput {up}/{down} bytes over {timeout:?}"),
        )
    })?
}

/// What a request/response measurement did: exchanges completed, the time from the start
/// signal to the last connection's last answer, and every exchange's time.
#[derive(Debug)]
pub struct Exchanges {
    pub count: u64,
    pub elapsed: Duration,
    pub latencies: Vec<Duration>,
}

impl Exchanges {
    pub fn per_second(&self) -> f64 {
        self.count as f64 / self.elapsed.as_secs_f64()
    }
}

/// `conns` connections opened first (the data server's `Q` exchange), then all started
/// together, each sending a `request`-byte request and reading the `answer`-byte answer in
/// turn, until `duration` has passed (the exchange in progress then completes).
pub async fn request_response(
    addr: SocketAddr,
    conns: usize,
    request: u32,
    answer: u32,
    duration: Duration,
    timeout: Duration,
) -> io::Result<Exchanges> {
    tokio::time::timeout(timeout, async {
        let mut header = vec![REQUEST_RESPONSE];
        header.extend_from_slice(&request.to_be_bytes());
        header.extend_from_slice(&answer.to_be_bytes());
        let mut streams = Vec::with_capacity(conns);
        for _ in 0..conns {
            streams.push(open_exchange(addr, &header).await?);
        }
        let barrier = Arc::new(Barrier::new(conns + 1));
        let mut tasks = JoinSet::new();
        for mut s in streams {
            let barrier = Arc::clone(&barrier);
            tasks.spawn(async move {
                let req = vec![b'q'; request as usize];
                let mut ans = vec![0u8; answer as usize];
                // At 100,000 exchanges a second over 10 s this is 16 MB: kept whole, so the
                // percentiles are exact.
                let mut latencies = Vec::with_capacity(1 << 14);
                barrier.wait().await;
                let end = Instant::now() + duration;
                loop {
                    let started = Instant::now();
                    if started >= end {
                        break;
                    }
                    s.write_all(&req).await?;
                    s.read_exact(&mut ans).await?;
                    latencies.push(started.elapsed());
                }
                Ok::<_, io::Error>(latencies)
            });
        }
        barrier.wait().await;
        let started = Instant::now();
        let mut latencies = Vec::new();
        while let Some(done) = tasks.join_next().await {
            latencies.extend(done.map_err(io::Error::other)??);
        }
        Ok(Exchanges {
            count: latencies.len() as u64,
            elapsed: started.elapsed(),
            latencies,
        })
    })
    .await
    .map_err(|_| {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("{conns} request/response connections over {timeout:?}"),
        )
    })?
}

/// `conns` connections opened first, then all started together, each moving `up` and `down`
/// bytes; the time runs from the start signal to the last one done.
pub async fn aggregate(
    addr: SocketAddr,
    conns: usize,
    up: u64,
    down: u64,
    timeout: Duration,
) -> io::Result<Transfer> {
    aggregate_over(&[addr], conns, up, down, timeout).await
}

/// [`aggregate`] with the connections spread over several entries (connection `i` through
/// `entries[i % len]`): several client processes, each with its own session.
pub async fn aggregate_over(
    entries: &[SocketAddr],
    conns: usize,
    up: u64,
    down: u64,
    timeout: Duration,
) -> io::Result<Transfer> {
    assert!(!entries.is_empty(), "aggregate needs an entry");
    tokio::time::timeout(timeout, async {
        let mut streams = Vec::with_capacity(conns);
        for i in 0..conns {
            streams.push(open_throughput(entries[i % entries.len()], down).await?);
        }
        let barrier = Arc::new(Barrier::new(conns + 1));
        let mut tasks = JoinSet::new();
        for s in streams {
            let barrier = Arc::clone(&barrier);
            tasks.spawn(async move {
                barrier.wait().await;
                run_throughput(s, up, down).await
            });
        }
        barrier.wait().await;
        let started = Instant::now();
        while let Some(done) = tasks.join_next().await {
            done.map_err(io::Error::other)??;
        }
        Ok(Transfer {
            up: up * conns as u64,
            down: down * conns as u64,
            elapsed: started.elapsed(),
        })
    })
    .await
    .map_err(|_| {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("{conns} connections over {timeout:?}"),
        )
    })?
}

/// Round-trip times of `count` ping-pongs of `size` bytes on one connection, after `warmup`
/// unrecorded ones.
pub async fn ping_pong(
    addr: SocketAddr,
    size: usize,
    count: usize,
    warmup: usize,
    timeout: Duration,
) -> io::Result<Vec<Duration>> {
    tokio::time::timeout(timeout, async {
        let mut s = connect(addr).await?;
        // Not THROUGHPUT as first byte: the server echoes.
        let ping = vec![b'E'; size];
        let mut pong = vec![0u8; size];
        let mut samples = Vec::with_capacity(count);
        for i in 0..warmup + count {
            let started = Instant::now();
            s.write_all(&ping).await?;
            s.read_exact(&mut pong).await?;
            if i >= warmup {
                samples.push(started.elapsed());
            }
        }
        Ok(samples)
    })
    .await
    .map_err(|_| {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("{count} pings of {size} bytes over {timeout:?}"),
        )
    })?
}

/// One byte there and back on an open connection.
async fn echo_byte(s: &mut TcpStream) -> io::Result<()> {
    s.write_all(b"i").await?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await?;
    Ok(())
}

/// `count` connections opened (each proven open by a 1-byte round trip), `parallel` at a time,
/// spread round-robin over `entries`.
/// Returns them and the time it took.
pub async fn open_idle(
    entries: &[SocketAddr],
    count: usize,
    parallel: usize,
    timeout: Duration,
    progress: impl Fn(usize),
) -> io::Result<(Vec<TcpStream>, Duration)> {
    let started = Instant::now();
    let deadline = started + timeout;
    let gate = Arc::new(Semaphore::new(parallel));
    let mut tasks = JoinSet::new();
    let mut streams = Vec::with_capacity(count);
    let mut launched = 0;
    while streams.len() < count {
        while launched < count && gate.available_permits() > 0 {
            let permit = Arc::clone(&gate)
                .acquire_owned()
                .await
                .map_err(io::Error::other)?;
            let addr = entries[launched % entries.len()];
            tasks.spawn(async move {
                let _permit = permit;
                let mut s = connect(addr).await?;
                echo_byte(&mut s).await?;
                Ok::<_, io::Error>(s)
            });
            launched += 1;
        }
        match tokio::time::timeout_at(deadline, tasks.join_next()).await {
            Ok(Some(done)) => {
                let s = done.map_err(io::Error::other)?.map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!("after {} connections open: {e}", streams.len()),
                    )
                })?;
                streams.push(s);
                if streams.len() % 1000 == 0 {
                    progress(streams.len());
                }
            }
            Ok(None) => break,
            Err(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "only {} of {count} connections open after {timeout:?}",
                        streams.len()
                    ),
                ))
            }
        }
    }
    Ok((streams, started.elapsed()))
}

/// One round trip on every connection at once. Returns the connections that made it, how
/// many failed (with the first error), and the time until the last finished.
pub async fn round_trip_all(
    streams: Vec<TcpStream>,
    timeout: Duration,
) -> (Vec<TcpStream>, usize, Option<String>, Duration) {
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for mut s in streams {
        tasks.spawn(async move {
            echo_byte(&mut s).await?;
            Ok::<_, io::Error>(s)
        });
    }
    let (back, failed, first_error) = join_counting(tasks, started + timeout).await;
    (back, failed, first_error, started.elapsed())
}

/// Joins every task of `tasks` until `deadline`: the values of those that succeeded, how many
/// failed (an error, a panic, or still running at the deadline: those are aborted), and the
/// first failure.
async fn join_counting<T: 'static>(
    mut tasks: JoinSet<io::Result<T>>,
    deadline: Instant,
) -> (Vec<T>, usize, Option<String>) {
    let mut done = Vec::with_capacity(tasks.len());
    let (mut failed, mut first_error) = (0, None);
    loop {
        match tokio::time::timeout_at(deadline, tasks.join_next()).await {
            Ok(Some(Ok(Ok(value)))) => done.push(value),
            Ok(Some(Ok(Err(e)))) => {
                failed += 1;
                first_error.get_or_insert_with(|| e.to_string());
            }
            Ok(Some(Err(e))) => {
                failed += 1;
                first_error.get_or_insert_with(|| e.to_string());
            }
            Ok(None) => break,
            Err(_) => {
                failed += tasks.len();
                first_error.get_or_insert_with(|| {
                    format!("{} still pending at the deadline", tasks.len())
                });
                tasks.abort_all();
                break;
            }
        }
    }
    (done, failed, first_error)
}
