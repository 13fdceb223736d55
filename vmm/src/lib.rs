//! husk-vmm: a small virtual machine monitor that boots a Linux kernel directly (no
//! firmware) on KVM, with a serial console, an i8042 for reboots, a boot-timer page and
//! virtio-mmio devices (vsock, block, rng, tap-backed net, and virtio-fs served by a
//! vhost-user backend).
//!
//! Process exit status of `husk-vmm`:
//!
//! | status | meaning |
//! |---|---|
//! | 0 | the guest shut down or rebooted (i8042 reset with `reboot=k`, KVM system event) |
//! | 1 | bad configuration or the VM could not be set up (message on stderr) |
//! | 2 | the guest crashed: triple fault, KVM internal/emulation error, failed entry |
//! | 3 | a device's host backend went away while the guest ran (virtiofsd exited) |
//! | 128+N | stopped by signal N (SIGINT 130, SIGTERM 143) |

pub mod api;

/// Identifies the VMM's build (its sources and locked dependencies, see build.rs):
/// snapshots and the runtime's VM templates are only restored by the same build.
pub const BUILD_ID: &str = env!("HUSK_VMM_BUILD_ID");

/// An error and its sources as one line, each source once (many errors already include
/// their source's text).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let text = s.to_string();
        if !msg.contains(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
        src = s.source();
    }
    msg
}

pub mod arch;
pub mod config;
pub mod cpu_template;
pub mod devices;
#[doc(hidden)]
pub mod fuzzing;
pub mod host;
pub mod loader;
pub mod memory;
pub mod metrics;
pub mod persist;
pub mod profile;
pub mod seccomp;
pub mod stop;
pub mod vcpu;
pub mod vm;
