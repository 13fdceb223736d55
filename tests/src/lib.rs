//! husk's end-to-end harness: finds the guest image and the husk binaries, boots real micro-VMs
//! with `husk-vmm` and talks to their agent. Used by the integration tests in `tests/tests/`,
//! the benchmarks in `tests/benches/` and the `husk-demo` binary.

pub mod containerd;
pub mod containerd_events;
pub mod cri;
pub mod fault;
pub mod guest_image;
pub mod host;
pub mod husk_cli;
pub mod jail;
pub mod podman;
pub mod proc_stats;
pub mod rootfs;
pub mod stdio;
pub mod timing;
pub mod vm;
pub mod workspace;

pub use guest_image::GuestImage;
pub use rootfs::BusyboxImage;
pub use vm::{BlockDevice, FsShare, VmOptions, VmProcess};

/// The single-threaded tokio runtime the harness's async agent calls run on.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}
