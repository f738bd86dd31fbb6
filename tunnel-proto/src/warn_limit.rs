//! Rate-limited warnings: at most one warning of a kind per interval, per process; the others
//! go to debug and are counted in the next warning. For events that repeat per request or per
//! connection while one cause lasts (a relay that is down, a proxy refusing credentials, a
//! forward target that is gone), so that an outage logs a few lines and not one per retry.
//!
//! ```
//! use std::time::Duration;
//! use tunnel_proto::warn_limit::WarningLimit;
//!
//! static REFUSED: WarningLimit = WarningLimit::new(Duration::from_secs(10));
//!
//! for attempt in 0..100 {
//!     // One WARN line (with `suppressed = 0`), then 99 debug lines.
//!     tunnel_proto::warn_limited!(REFUSED, attempt, "connect refused; retrying");
//! }
//! ```

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The limit for one kind of warning; a `static` of it is shared by the whole process.
#[derive(Debug)]
pub struct WarningLimit {
    interval: Duration,
    /// When the last warning was let through, and how many were held back since.
    state: Mutex<(Option<Instant>, u64)>,
}

impl WarningLimit {
    /// At most one warning per `interval`.
    pub const fn new(interval: Duration) -> WarningLimit {
        WarningLimit {
            interval,
            state: Mutex::new((None, 0)),
        }
    }

    /// `Some(number held back since the last one)` if a warning may be logged at `now`;
    /// `None` (and the event is counted) otherwise.
    pub fn due(&self, now: Instant) -> Option<u64> {
        // The critical section only updates two fields: a poisoned lock is still consistent.
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (last, held) = &mut *state;
        if last.is_some_and(|t| now.saturating_duration_since(t) < self.interval) {
            *held += 1;
            return None;
        }
        *last = Some(now);
        Some(std::mem::take(held))
    }
}

/// `warn_limited!(LIMIT, fields…, "message")`: a `tracing::warn!` with a `suppressed` field
/// (how many were held back since the last one) when [`WarningLimit::due`], otherwise the
/// same event at debug. The calling crate must depend on `tracing`.
#[macro_export]
macro_rules! warn_limited {
    ($limit:expr, $($arg:tt)+) => {
        match $limit.due(::std::time::Instant::now()) {
            Some(suppressed) => ::tracing::warn!(suppressed, $($arg)+),
            None => ::tracing::debug!($($arg)+),
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_warning_per_interval_counts_the_rest() {
        let limit = WarningLimit::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(limit.due(t0), Some(0));
        assert_eq!(limit.due(t0 + Duration::from_secs(1)), None);
        assert_eq!(limit.due(t0 + Duration::from_secs(9)), None);
        assert_eq!(limit.due(t0 + Duration::from_secs(10)), Some(2));
        assert_eq!(limit.due(t0 + Duration::from_secs(11)), None);
    }
}
