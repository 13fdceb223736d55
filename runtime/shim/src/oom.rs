//! Which of the guest's OOM reports become TaskOOM events. The container id comes from the
//! guest, which is hostile: only ids of this VM's own containers are published (a guest must
//! not raise OOM events for another pod's containers), and each container at most once per
//! [`MIN_INTERVAL`], so a guest cannot flood containerd's event stream.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// One TaskOOM per container per interval; more OOM kills within it are counted only.
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Publish,
    /// The id is none of this VM's containers.
    Unknown,
    /// Published for this id less than [`MIN_INTERVAL`] ago.
    TooSoon,
}

#[derive(Default)]
pub struct OomFilter {
    last: HashMap<String, Instant>,
    pub unknown: u64,
    pub suppressed: u64,
}

impl OomFilter {
    /// `known` says whether `id` is one of this VM's containers.
    pub fn admit(&mut self, id: &str, known: bool, now: Instant) -> Verdict {
        if !known {
            self.unknown += 1;
            return Verdict::Unknown;
        }
        if let Some(t) = self.last.get(id)
            && now.saturating_duration_since(*t) < MIN_INTERVAL
        {
            self.suppressed += 1;
            return Verdict::TooSoon;
        }
        // Only known ids are stored, so the map is bounded by the VM's containers.
        self.last.insert(id.to_owned(), now);
        Verdict::Publish
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_known_ids_once_per_interval() {
        let mut f = OomFilter::default();
        let t0 = Instant::now();
        assert_eq!(f.admit("other-pods-ctr", false, t0), Verdict::Unknown);
        assert_eq!(f.admit("c1", true, t0), Verdict::Publish);
        assert_eq!(
            f.admit("c1", true, t0 + Duration::from_millis(10)),
            Verdict::TooSoon
        );
        assert_eq!(
            f.admit("c2", true, t0 + Duration::from_millis(10)),
            Verdict::Publish
        );
        assert_eq!(f.admit("c1", true, t0 + MIN_INTERVAL), Verdict::Publish);
        assert_eq!((f.unknown, f.suppressed), (1, 1));
        // A flood of made-up ids stores nothing.
        for i in 0..10_000 {
            f.admit(&format!("x{i}"), false, t0);
        }
        assert_eq!(f.last.len(), 2);
    }
}
