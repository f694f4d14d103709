//! Percentiles of measured durations.

use std::time::Duration;

/// Sorted samples of one series.
pub struct Summary {
    sorted: Vec<Duration>,
}

impl Summary {
    /// Summarises `samples` (must not be empty).
    pub fn of(samples: &[Duration]) -> Summary {
        let mut sorted = samples.to_vec();
        sorted.sort_unstable();
        Summary { sorted }
    }

    /// The `p`th percentile (nearest rank), in milliseconds.
    pub fn percentile_ms(&self, p: f64) -> f64 {
        if self.sorted.is_empty() {
            return f64::NAN;
        }
        let rank = ((p / 100.0) * self.sorted.len() as f64).ceil() as usize;
        let index = rank.clamp(1, self.sorted.len()) - 1;
        self.sorted[index].as_secs_f64() * 1000.0
    }

    /// Median in milliseconds.
    pub fn p50_ms(&self) -> f64 {
        self.percentile_ms(50.0)
    }

    /// 99th percentile in milliseconds.
    pub fn p99_ms(&self) -> f64 {
        self.percentile_ms(99.0)
    }

    /// Largest sample in milliseconds.
    pub fn max_ms(&self) -> f64 {
        self.percentile_ms(100.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let samples: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        let s = Summary::of(&samples);
        assert_eq!(s.p50_ms(), 50.0);
        assert_eq!(s.p99_ms(), 99.0);
        assert_eq!(s.max_ms(), 100.0);
        assert_eq!(Summary::of(&[Duration::from_millis(7)]).p99_ms(), 7.0);
    }
}
