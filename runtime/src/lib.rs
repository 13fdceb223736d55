//! Host side of husk: the library behind the runc-compatible `husk` CLI (see
//! `docs/cli.md`), and later the containerd shim.
//!
//! The modules here hold host-side logic that can be tested without a VM: container ids,
//! the state store, the configuration file, VM sizing, signals, hooks, the console socket,
//! the default spec, the features document and the rootfs image. The binary (`src/main.rs`,
//! `src/cli/`) drives them and the per-container monitor.

pub mod bundle;
pub mod config;
pub mod console;
pub mod exit;
pub mod features;
#[doc(hidden)]
pub mod fuzzing;
pub mod hooks;
pub mod host_cgroup;
pub mod id;
pub mod process;
pub mod rootfs_image;
pub mod signal;
pub mod sizing;
pub mod spec_default;
pub mod state;
pub mod template;
pub mod time;
pub mod vm_config;
pub mod volumes;
