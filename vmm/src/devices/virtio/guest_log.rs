//! Warnings a guest can trigger at will (a malformed chain, a bad register access) go to a
//! log file on the host's disk, so each call site logs its 1st, 2nd, 4th, 8th, … occurrence
//! only: a guest repeating a fault a million times writes 20 lines, and the count in each
//! line still tells the operator how often it happened.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counts one occurrence; `Some(n)` when this n-th one is to be logged.
pub(crate) fn occurrence_to_log(seen: &AtomicU64) -> Option<u64> {
    let n = seen.fetch_add(1, Ordering::Relaxed).saturating_add(1);
    n.is_power_of_two().then_some(n)
}

/// `tracing::warn!` for guest-triggerable events, limited per call site (a static counter
/// each: one process runs one VM, or one pod's VM).
macro_rules! guest_warn {
    ($($arg:tt)+) => {{
        static SEEN: ::std::sync::atomic::AtomicU64 = ::std::sync::atomic::AtomicU64::new(0);
        if let Some(n) = $crate::devices::virtio::guest_log::occurrence_to_log(&SEEN) {
            ::tracing::warn!(occurrence = n, $($arg)+);
        }
    }};
}
pub(crate) use guest_warn;

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_repeated_fault_logs_a_line_per_power_of_two() {
        let out = Capture::default();
        let writer = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            for i in 0..100_000 {
                guest_warn!("bad descriptor {i}");
            }
        });
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 17, "{text}");
        assert!(
            lines[0].contains("bad descriptor 0") && lines[0].contains("occurrence=1"),
            "{}",
            lines[0]
        );
        assert!(
            lines[16].contains("bad descriptor 65535") && lines[16].contains("occurrence=65536"),
            "{}",
            lines[16]
        );
    }

    #[test]
    fn the_counter_saturates() {
        let seen = AtomicU64::new(u64::MAX - 1);
        assert_eq!(occurrence_to_log(&seen), None);
        assert_eq!(occurrence_to_log(&seen), None);
    }
}
