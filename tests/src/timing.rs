//! Latency figures of a benchmark: p50, min and max of repeated runs, printed (never
//! asserted).

use std::time::Duration;

/// Summary of repeated timings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub p50: Duration,
    pub min: Duration,
    pub max: Duration,
    pub runs: usize,
}

impl Stats {
    /// The summary of `times`; `None` if there are none.
    pub fn of(mut times: Vec<Duration>) -> Option<Self> {
        times.sort();
        Some(Self {
            p50: *times.get(times.len() / 2)?,
            min: *times.first()?,
            max: *times.last()?,
            runs: times.len(),
        })
    }

    /// One line: `<what>: p50 … ms  min … ms  max … ms  (<runs> <unit>)`.
    pub fn line(&self, what: &str, unit: &str) -> String {
        format!(
            "{what}: p50 {:.1} ms  min {:.1} ms  max {:.1} ms  ({} {unit})",
            ms(self.p50),
            ms(self.min),
            ms(self.max),
            self.runs
        )
    }
}

/// A duration in milliseconds.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summarises_unsorted_times() {
        let s = Stats::of(vec![
            Duration::from_millis(30),
            Duration::from_millis(10),
            Duration::from_millis(20),
        ])
        .unwrap();
        assert_eq!(s.p50, Duration::from_millis(20));
        assert_eq!(s.min, Duration::from_millis(10));
        assert_eq!(s.max, Duration::from_millis(30));
        assert_eq!(
            s.line("x", "runs"),
            "x: p50 20.0 ms  min 10.0 ms  max 30.0 ms  (3 runs)"
        );
        assert!(Stats::of(Vec::new()).is_none());
    }
}
