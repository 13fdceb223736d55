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

/// Why processes exec'd into a running container (and the output of a long-lived init
/// across many later commands) are not tested in VMs on this host, or `None` when they
/// are. On nested-PVM hosts such processes, and sometimes the container's init next to
/// them, die of SIGSEGV right after execve or lose their output in a large share of runs:
/// an open bug, documented in `tests/tests/vm_exec.rs`. `HUSK_TEST_VM_EXEC=1` runs them
/// anyway.
pub fn vm_exec_skip_reason() -> Option<String> {
    if std::env::var_os("HUSK_TEST_VM_EXEC").is_some() {
        return None;
    }
    match husk_vmm::host::probe() {
        husk_vmm::host::HostKind::NestedPvm => Some(
            "nested-PVM host: processes exec'd into a container in the guest crash or lose \
             their output in most runs (open bug, see tests/tests/vm_exec.rs); set \
             HUSK_TEST_VM_EXEC=1 to run"
                .to_owned(),
        ),
        _ => None,
    }
}
