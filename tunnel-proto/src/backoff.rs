//! Exponential back-off with jitter between retries: the client's failed requests and the
//! broker's redials use the same one. Available with the `driver` feature.

use std::time::Duration;

/// Delays `initial`, `2 * initial`, … up to `max`, each with up to 25 % random jitter taken
/// off so that many clients failing together do not retry in lock-step.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// A back-off starting at `initial` (at least 1 ms) and doubling up to `max` (at least
    /// `initial`).
    pub fn new(initial: Duration, max: Duration) -> Backoff {
        let initial = initial.max(Duration::from_millis(1));
        let max = max.max(initial);
        Backoff {
            initial,
            max,
            next: initial,
        }
    }

    /// The delay before the next retry; the one after it is twice as long (up to `max`).
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        let jitter = rand::random_range(0.0..0.25);
        delay.mul_f64(1.0 - jitter)
    }

    /// After a success: start again from `initial`.
    pub fn reset(&mut self) {
        self.next = self.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_max_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
        let d: Vec<Duration> = (0..4).map(|_| b.next_delay()).collect();
        let bounds = [100, 200, 350, 350];
        for (delay, bound) in d.iter().zip(bounds) {
            let bound = Duration::from_millis(bound);
            assert!(
                *delay <= bound && *delay >= bound.mul_f64(0.75),
                "{delay:?} vs {bound:?}"
            );
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
