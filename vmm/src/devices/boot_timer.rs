//! The boot-timer page: the guest agent writes to it once it runs (the page address is
//! on the kernel command line as `husk.boot_timer=`). The first write records how long
//! the boot took, measured from the start of the VMM; later writes are ignored.

use std::sync::Arc;

use serde_json::json;

use super::bus::BusDevice;
use crate::metrics::Metrics;

pub struct BootTimer {
    metrics: Arc<Metrics>,
    fired_us: Option<u64>,
}

impl BootTimer {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            metrics,
            fired_us: None,
        }
    }

    /// Microseconds from VMM start to the first write, once it happened.
    pub fn fired_us(&self) -> Option<u64> {
        self.fired_us
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, _data: &mut [u8]) {}

    fn write(&mut self, _offset: u64, _data: &[u8]) {
        if self.fired_us.is_some() {
            return;
        }
        let us = self.metrics.wall_us();
        self.fired_us = Some(us);
        tracing::info!("guest agent started after {} ms", us / 1000);
        self.metrics
            .write(json!({"event": "boot_timer", "wall_us": us}));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn first_write_is_recorded_once() {
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/husk-bt").unwrap();
        let path = dir.as_path().join("m.jsonl");
        let start = Instant::now() - Duration::from_millis(5);
        let m = Arc::new(Metrics::new(start, Some(&path)).unwrap());
        let mut t = BootTimer::new(m);
        let mut buf = [0xaau8; 4];
        t.read(0, &mut buf);
        assert_eq!(t.fired_us(), None, "reads do not count");
        t.write(0, &[1]);
        let first = t.fired_us().unwrap();
        assert!(first >= 5000);
        t.write(0, &[1]);
        assert_eq!(t.fired_us(), Some(first));
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 1);
        assert!(text.contains("\"event\":\"boot_timer\""));
    }
}
