//! virtio-fs (virtio 1.2, section 5.11) as a vhost-user frontend: an external daemon
//! (virtiofsd) serves the FUSE requests on the queues; the VMM hands it guest RAM and the
//! rings, exposes the config space (tag and queue count) and relays notifications.
//!
//! - `config_space`: the tag and `num_request_queues`;
//! - `vhost_user`: connection, feature negotiation, ring start/stop;
//! - `relay`: backend "call" eventfds to the virtio-mmio interrupt, backend hang-ups;
//! - `device`: the [`VirtioDevice`](super::VirtioDevice) tying them together.
//!
//! Guest RAM must be a shared memfd so the backend can map it; the VM builder picks that
//! backing when an fs device is configured. Guest kicks reach the backend without the VMM:
//! the VM builder registers a KVM ioeventfd on QueueNotify per queue and the backend waits
//! on the same eventfds.

pub mod config_space;
pub mod device;
mod relay;
pub mod vhost_user;

pub use device::{Fs, FsConfig, FsError, NUM_QUEUES};

#[cfg(test)]
mod tests;
