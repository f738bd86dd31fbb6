//! The relays a broker links to (docs/protocol.md §5.2): every address the configured names
//! resolve to is one relay, with a link and a supervisor of its own. The names are resolved
//! again every `relay_resolve_interval`: an address that appears is linked, one that is gone
//! from its name's answer is not redialed once its link is down.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use crate::shared::{stopped, LinkId, Shared};
use crate::supervisor::{supervise, DialReport};

/// Longest wait for one name's resolution.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// One relay address to keep a link to.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub id: LinkId,
    /// The configured `HOST:PORT` it came from.
    pub name: Arc<str>,
    pub addr: SocketAddr,
    retired: Arc<AtomicBool>,
}

impl Target {
    /// Its name no longer resolves to its address: not to be redialed.
    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::SeqCst)
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if *self.name == self.addr.to_string() {
            write!(f, "{}", self.addr)
        } else {
            write!(f, "{} ({})", self.name, self.addr)
        }
    }
}

/// What one configured name resolved to.
pub(crate) type Resolved = (Arc<str>, io::Result<Vec<SocketAddr>>);

/// The targets with a running supervisor, by address.
#[derive(Debug)]
pub(crate) struct Relays {
    next_id: AtomicU64,
    running: Mutex<HashMap<SocketAddr, Target>>,
    /// How many supervisors run; `shutdown` waits for 0.
    count_tx: watch::Sender<usize>,
}

impl Default for Relays {
    fn default() -> Self {
        Relays {
            next_id: AtomicU64::new(1),
            running: Mutex::new(HashMap::new()),
            count_tx: watch::channel(0).0,
        }
    }
}

impl Relays {
    fn running(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Target>> {
        // Every critical section is a plain map update, so poisoning cannot leave it torn.
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes in a resolution: returns the targets for addresses not linked yet (to
    /// supervise), retires the running ones whose name resolved without them, and keeps
    /// those whose name failed to resolve (a DNS hiccup is not a relay leaving).
    pub fn update(&self, resolved: &[Resolved]) -> Vec<Target> {
        let mut running = self.running();
        let mut new = Vec::new();
        for (name, addrs) in resolved {
            let Ok(addrs) = addrs else { continue };
            for target in running.values().filter(|t| t.name == *name) {
                let gone = !addrs.contains(&target.addr);
                if gone && !target.is_retired() {
                    tracing::info!(relay = %target, "relay no longer in its name's answer; not redialed once its link is down");
                }
                target.retired.store(gone, Ordering::SeqCst);
            }
            for &addr in addrs {
                if running.contains_key(&addr) {
                    continue;
                }
                let target = Target {
                    id: LinkId(self.next_id.fetch_add(1, Ordering::Relaxed)),
                    name: Arc::clone(name),
                    addr,
                    retired: Arc::new(AtomicBool::new(false)),
                };
                running.insert(addr, target.clone());
                new.push(target);
            }
        }
        self.count_tx.send_replace(running.len());
        new
    }

    /// `target`'s supervisor ended.
    pub fn forget(&self, target: &Target) {
        let mut running = self.running();
        if running.get(&target.addr).is_some_and(|t| t.id == target.id) {
            running.remove(&target.addr);
        }
        self.count_tx.send_replace(running.len());
    }

    /// Waits until no supervisor runs, at most `limit`; true if none does.
    pub async fn wait_all_ended(&self, limit: Duration) -> bool {
        let mut count = self.count_tx.subscribe();
        let ended = tokio::time::timeout(limit, count.wait_for(|n| *n == 0)).await;
        ended.is_ok()
    }
}

/// Resolves every configured `HOST:PORT`, each within [`RESOLVE_TIMEOUT`].
pub(crate) async fn resolve(names: &[String]) -> Vec<Resolved> {
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        let lookup = tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host(name.as_str()));
        let addrs = match lookup.await {
            Ok(Ok(found)) => {
                let mut addrs: Vec<SocketAddr> = found.collect();
                addrs.sort();
                addrs.dedup();
                if addrs.is_empty() {
                    Err(io::Error::new(io::ErrorKind::NotFound, "no address"))
                } else {
                    Ok(addrs)
                }
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no answer within {RESOLVE_TIMEOUT:?}"),
            )),
        };
        out.push((Arc::from(name.as_str()), addrs));
    }
    out
}

/// Starts a supervisor for each of `targets`; each reports its dials to `reports` while that
/// is open (`bind` waits for the first link that is up).
pub(crate) fn supervise_all(
    shared: &Arc<Shared>,
    targets: Vec<Target>,
    reports: Option<&mpsc::Sender<DialReport>>,
) {
    for target in targets {
        tokio::spawn(supervise(Arc::clone(shared), target, reports.cloned()));
    }
}

/// Resolves the relay names again every `relay_resolve_interval` and links to the addresses
/// that appeared, until the broker stops.
pub(crate) async fn keep_resolving(shared: Arc<Shared>) {
    let mut stop = shared.stop_signal();
    let interval = shared.config.relay_resolve_interval;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stopped(&mut stop) => return,
        }
        let resolved = tokio::select! {
            resolved = resolve(&shared.config.relays) => resolved,
            _ = stopped(&mut stop) => return,
        };
        for (name, result) in &resolved {
            if let Err(e) = result {
                tracing::debug!(relay = %name, error = %e, "relay name did not resolve; its links are kept");
            }
        }
        if shared.is_stopped() {
            return;
        }
        let new = shared.relays.update(&resolved);
        for target in &new {
            tracing::info!(relay = %target, "new relay address; linking");
        }
        supervise_all(&shared, new, None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn resolved(name: &str, addrs: &[&str]) -> Resolved {
        (Arc::from(name), Ok(addrs.iter().map(|a| addr(a)).collect()))
    }

    #[test]
    fn every_address_of_a_name_is_a_relay_and_vanished_ones_are_retired() {
        let relays = Relays::default();
        let first = relays.update(&[
            resolved("pool.example:8081", &["10.0.0.1:8081", "10.0.0.2:8081"]),
            resolved("10.0.0.9:8081", &["10.0.0.9:8081"]),
        ]);
        let addrs: Vec<SocketAddr> = first.iter().map(|t| t.addr).collect();
        assert_eq!(
            addrs,
            [
                addr("10.0.0.1:8081"),
                addr("10.0.0.2:8081"),
                addr("10.0.0.9:8081")
            ]
        );
        let mut ids: Vec<LinkId> = first.iter().map(|t| t.id).collect();
        ids.dedup();
        assert_eq!(ids.len(), 3, "one link id per address");
        assert_eq!(first[0].to_string(), "pool.example:8081 (10.0.0.1:8081)");
        assert_eq!(first[2].to_string(), "10.0.0.9:8081");
        assert_eq!(*relays.count_tx.borrow(), 3);

        // The name now answers .2 and .3: .3 is new, .1 is retired, .2 goes on.
        let second = relays.update(&[resolved(
            "pool.example:8081",
            &["10.0.0.2:8081", "10.0.0.3:8081"],
        )]);
        assert_eq!(second.len(), 1);
        assert_eq!(second[0].addr, addr("10.0.0.3:8081"));
        assert!(first[0].is_retired() && !first[1].is_retired() && !first[2].is_retired());

        // A failed resolution retires nothing; .1 coming back un-retires it.
        let failed: Resolved = (
            Arc::from("pool.example:8081"),
            Err(io::Error::new(io::ErrorKind::TimedOut, "dns")),
        );
        assert!(relays.update(&[failed]).is_empty());
        assert!(!first[1].is_retired() && !second[0].is_retired());
        assert!(relays
            .update(&[resolved(
                "pool.example:8081",
                &["10.0.0.1:8081", "10.0.0.2:8081"]
            )])
            .is_empty());
        assert!(!first[0].is_retired() && second[0].is_retired());

        // A supervisor that ended is forgotten; its address is linked anew if it resolves.
        relays.forget(&second[0]);
        assert_eq!(*relays.count_tx.borrow(), 3);
        let again = relays.update(&[resolved("pool.example:8081", &["10.0.0.3:8081"])]);
        assert_eq!(again.len(), 1);
        assert_ne!(again[0].id, second[0].id);
    }
}
