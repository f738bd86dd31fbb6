//! Order statistics over measurement samples, and the order in which a run measures its
//! paths.

use std::time::Duration;

/// The median of `values` (mean of the two middle ones for an even count); NaN when empty.
pub fn median(values: &[f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let mid = sorted.len() / 2;
    if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    }
}

/// The `p`-th percentile (0..=100) of `samples` by the nearest-rank method; zero when empty.
pub fn percentile(samples: &[Duration], p: f64) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    let mut sorted = samples.to_vec();
    sorted.sort();
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// `a / b`, NaN when `b` is zero or either is not finite (shown as "-" in the table).
pub fn ratio(a: f64, b: f64) -> f64 {
    if b == 0.0 || !a.is_finite() || !b.is_finite() {
        f64::NAN
    } else {
        a / b
    }
}

/// The order in which run `run` (counted from 1) measures `paths` paths, as indexes: first to
/// last in odd runs, last to first in even ones. On the VMs this bench has run on, the paths
/// measured later in a run came out 3–8 % faster (BENCHMARKS.md, "The round trip, and the
/// bench's order of paths"); a fixed order would hand that to the same rows in every run,
/// and with it to their medians.
pub fn run_order(paths: usize, run: usize) -> Vec<usize> {
    if run % 2 == 1 {
        (0..paths).collect()
    } else {
        (0..paths).rev().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn nearest_rank_percentiles() {
        let samples: Vec<Duration> = (1..=100).map(Duration::from_micros).collect();
        assert_eq!(percentile(&samples, 50.0), Duration::from_micros(50));
        assert_eq!(percentile(&samples, 99.0), Duration::from_micros(99));
        assert_eq!(percentile(&samples, 100.0), Duration::from_micros(100));
        assert_eq!(percentile(&[], 50.0), Duration::ZERO);
    }

    #[test]
    fn every_other_run_measures_the_paths_backwards() {
        assert_eq!(run_order(3, 1), vec![0, 1, 2]);
        assert_eq!(run_order(3, 2), vec![2, 1, 0]);
        assert_eq!(run_order(3, 3), vec![0, 1, 2]);
        assert!(run_order(0, 2).is_empty());
    }
}
