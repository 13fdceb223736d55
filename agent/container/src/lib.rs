//! Builds OCI containers from a runtime spec, as the guest agent does inside a husk VM (and as
//! its host test mode does on the host).
//!
//! Entry points: [`spec::load`] / [`spec::parse`] for config.json, [`Container::create`]
//! (held init), [`Container::start`], [`Container::exec`], [`Container::signal`],
//! [`Container::state`], [`Container::delete`]. The caller supplies stdio fds, a
//! [`Spawner`] (the agent's reaper: this library never waits for children) and,
//! optionally, a [`CgroupHandle`]. See `init.rs` for the process model.
//!
//! All of it must run as root (or with the matching capabilities) on Linux ≥ 5.9
//! (pidfd_open, close_range).

pub mod cgroup;
pub mod container;
pub mod error;
pub mod exec;
pub mod init;
pub mod namespaces;
pub mod process;
pub mod rootfs;
pub mod safe_path;
pub mod seccomp;
pub mod spec;
mod sync;
pub mod timing;

pub use container::{
    CgroupHandle, Container, CreateOptions, ProcessHandle, Spawner, State, Status, validate_id,
};
pub use error::{Error, Result};
pub use init::Stdio;
pub use timing::{Step, Timeline};
