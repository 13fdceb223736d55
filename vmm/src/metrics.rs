//! JSON-lines metrics for the boot benchmark (`--metrics-file`).
//!
//! Events: `vcpu_first_entry` (wall time and the VMM's CPU time just before vCPU 0's first
//! KVM_RUN), `boot_timer` (the guest agent's first write to the boot-timer page) and
//! `exit` (why and when the VMM stopped). Wall times count from the start of `main`.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

use serde_json::{Value, json};

/// Where events go; without a file only the start time is kept.
pub struct Metrics {
    start: Instant,
    file: Option<Mutex<File>>,
}

impl Metrics {
    /// Opens (appending) `path` if given.
    pub fn new(start: Instant, path: Option<&Path>) -> std::io::Result<Self> {
        let file = match path {
            Some(p) => Some(Mutex::new(
                OpenOptions::new().create(true).append(true).open(p)?,
            )),
            None => None,
        };
        Ok(Self { start, file })
    }

    /// Microseconds since the VMM started.
    pub fn wall_us(&self) -> u64 {
        self.start.elapsed().as_micros() as u64
    }

    /// Appends one event line; metrics are best effort, so failures are only logged.
    pub fn write(&self, event: Value) {
        let Some(file) = &self.file else { return };
        let mut line = event.to_string();
        line.push('\n');
        let mut f = file.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = f.write_all(line.as_bytes()) {
            tracing::warn!("writing metrics: {e}");
        }
    }

    /// The `vcpu_first_entry` event, with this process's CPU time so far.
    pub fn vcpu_first_entry(&self) {
        let (user, sys) = cpu_times_us();
        self.write(json!({
            "event": "vcpu_first_entry",
            "wall_us": self.wall_us(),
            "cpu_user_us": user,
            "cpu_sys_us": sys,
        }));
    }
}

/// (user, system) CPU time of the whole process in microseconds.
pub fn cpu_times_us() -> (u64, u64) {
    // SAFETY: getrusage fills the zeroed struct; the return value is checked.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return (0, 0);
    }
    let us = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    (us(ru.ru_utime), us(ru.ru_stime))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_json_lines() {
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/husk-metrics").unwrap();
        let path = dir.as_path().join("m.jsonl");
        let m = Metrics::new(Instant::now(), Some(&path)).unwrap();
        m.vcpu_first_entry();
        m.write(json!({"event": "exit", "reason": "x", "wall_us": 1}));
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["event"], "vcpu_first_entry");
        assert!(lines[0]["cpu_user_us"].is_u64());
        assert!(lines[0]["wall_us"].is_u64());
        assert_eq!(lines[1]["reason"], "x");
    }
}
