//! husk's end-to-end harness: finds the guest image and the husk binaries, boots real micro-VMs
//! with `husk-vmm` and talks to their agent. Used by the integration tests in `tests/tests/`,
//! the benchmarks in `tests/benches/` and the `husk-demo` binary.

pub mod guest_image;
pub mod host;
pub mod proc_stats;
pub mod rootfs;
pub mod vm;
pub mod workspace;

pub use guest_image::GuestImage;
pub use rootfs::BusyboxImage;
pub use vm::{BlockDevice, VmOptions, VmProcess};
