//! Several [`sink_source_exchange`]s at once through a chain, with an accounting of what
//! arrived: the fault tests report bytes moved, bytes lost and time taken per case.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::servers::sink_source::{
    sink_source_exchange, ExchangeSpec, SinkSourceServer, SinkSourceStats,
};

/// What a batch of parallel exchanges achieved.
#[derive(Debug, Default)]
pub struct TransferOutcome {
    /// Exchanges started.
    pub connections: u64,
    /// Bytes both ways the batch should move (header and trailer not counted).
    pub expected: u64,
    /// Bytes of exchanges that completed with matching SHA-256 and length at both ends:
    /// only these count as arrived exactly once.
    pub verified: u64,
    /// Wall time from the first connect to the last exchange's end.
    pub elapsed: Duration,
    /// One line per failed exchange.
    pub failures: Vec<String>,
}

impl TransferOutcome {
    /// Bytes that did not arrive verified (`expected - verified`).
    pub fn lost(&self) -> u64 {
        self.expected - self.verified
    }

    /// MiB per second of verified bytes, both directions together.
    pub fn mib_per_sec(&self) -> f64 {
        self.verified as f64 / (1 << 20) as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Panics unless every exchange completed verified at both ends: no failure here, every
    /// byte counted, and the server saw exactly `connections` more completed exchanges and no
    /// new failure since `baseline`.
    pub fn assert_complete(&self, server: &SinkSourceServer, baseline: &SinkSourceStats) {
        let stats = server.stats();
        assert!(
            self.failures.is_empty(),
            "{} of {} exchanges failed (server: {stats:?}):\n{}",
            self.failures.len(),
            self.connections,
            self.failures.join("\n")
        );
        assert_eq!(self.lost(), 0, "bytes not verified: {self:?}");
        assert_eq!(
            stats.completed - baseline.completed,
            self.connections,
            "server-side completed exchanges: {stats:?}"
        );
        assert_eq!(
            stats.failed, baseline.failed,
            "server-side failures: {stats:?}"
        );
    }
}

/// Opens `connections` connections to `client_addr` (a tunnel client's listening port) and
/// runs an exchange of `bytes_each_way` both ways on each, all at once, within `timeout`
/// per exchange. Connection `i` uses seed `seed + i`.
pub async fn parallel_exchanges(
    client_addr: SocketAddr,
    connections: u64,
    bytes_each_way: u64,
    seed: u64,
    timeout: Duration,
) -> TransferOutcome {
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let mut failures = Vec::new();
    for i in 0..connections {
        let connect =
            tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(client_addr)).await;
        let stream = match connect {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                failures.push(format!("connection {i}: connect to the client port: {e}"));
                continue;
            }
            Err(_) => {
                failures.push(format!(
                    "connection {i}: connect to the client port timed out"
                ));
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        tasks.spawn(async move {
            let spec = ExchangeSpec::symmetric(bytes_each_way, seed + i);
            (i, sink_source_exchange(stream, &spec, timeout).await)
        });
    }
    let mut verified = 0;
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok((_, Ok(report))) => verified += report.sent + report.received,
            Ok((i, Err(e))) => failures.push(format!("connection {i}: {e}")),
            Err(e) => failures.push(format!("exchange task failed: {e}")),
        }
    }
    failures.sort();
    TransferOutcome {
        connections,
        expected: 2 * connections * bytes_each_way,
        verified,
        elapsed: started.elapsed(),
        failures,
    }
}

/// Sums the `retransmits=N` of the tunnel client's "tunnel connection closed/failed" log
/// lines: (connections logged, retransmits). The client logs them when a connection ends,
/// at `info`.
pub fn client_retransmits(client_log: &str) -> (u64, u64) {
    let mut connections = 0;
    let mut retransmits = 0;
    for line in client_log.lines() {
        if !line.contains("tunnel connection closed") && !line.contains("tunnel connection failed")
        {
            continue;
        }
        let Some(value) = field(line, "retransmits=") else {
            continue;
        };
        connections += 1;
        retransmits += value;
    }
    (connections, retransmits)
}

fn field(line: &str, key: &str) -> Option<u64> {
    let start = line.find(key)? + key.len();
    let digits: String = line[start..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// Waits for every task of `tasks` until `deadline` and returns the failures: each task's
/// error, a panicked task, and, at the deadline, one line counting the unfinished tasks
/// (which are aborted).
pub async fn join_all_until(
    tasks: &mut tokio::task::JoinSet<Result<(), String>>,
    deadline: Instant,
) -> Vec<String> {
    let total = tasks.len();
    let mut failures = Vec::new();
    loop {
        match tokio::time::timeout_at(deadline, tasks.join_next()).await {
            Ok(None) => break,
            Ok(Some(Ok(Ok(())))) => {}
            Ok(Some(Ok(Err(e)))) => failures.push(e),
            Ok(Some(Err(e))) => failures.push(format!("task: {e}")),
            Err(_) => {
                failures.push(format!(
                    "{} of {total} tasks unfinished at the deadline",
                    tasks.len()
                ));
                tasks.abort_all();
                break;
            }
        }
    }
    failures
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_retransmits_of_closed_and_failed_connections() {
        let log = "\
2026-01-01T00:00:00Z  INFO tunnel_client::connect: tunnel connection closed conn_id=1 bytes_sent=5 bytes_received=7 retransmits=12
2026-01-01T00:00:00Z  INFO tunnel_client::forward: accepted
2026-01-01T00:00:00Z  WARN tunnel_client::connect: tunnel connection failed: reset conn_id=2 bytes_sent=5 bytes_received=7 retransmits=3
";
        assert_eq!(client_retransmits(log), (2, 15));
        assert_eq!(client_retransmits(""), (0, 0));
    }

    #[test]
    fn lost_is_what_was_not_verified() {
        let outcome = TransferOutcome {
            expected: 100,
            verified: 60,
            ..TransferOutcome::default()
        };
        assert_eq!(outcome.lost(), 40);
    }
}
