//! What this host can run.

use std::fs::OpenOptions;

/// Why VMs cannot boot here, or `None` when `/dev/kvm` is usable.
pub fn kvm_unavailable_reason() -> Option<String> {
    match OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(_) => None,
        Err(e) => Some(format!("/dev/kvm cannot be opened read-write: {e}")),
    }
}

/// Skips the calling test, saying why, when this host cannot boot VMs.
/// Returns true when the test should return early.
pub fn skip_without_kvm(test: &str) -> bool {
    match kvm_unavailable_reason() {
        Some(reason) => {
            eprintln!("SKIPPED {test}: {reason}; this test boots a real micro-VM");
            true
        }
        None => false,
    }
}
