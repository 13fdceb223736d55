//! Snapshot state of a virtio-mmio transport and its queues.
//!
//! Devices keep their host resources (sockets, files, taps) outside the snapshot: a restore
//! builds each device from the configuration again and hands it the saved queues.

use serde::{Deserialize, Serialize};

/// One queue as the driver configured it, plus the device's positions in its rings.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueState {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc: u64,
    pub driver: u64,
    pub device: u64,
    pub next_avail: u16,
    pub next_used: u16,
}

/// The register file of one transport.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportState {
    /// virtio device id, checked against the device the restore builds.
    pub device_type: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub acked_features: u64,
    pub queue_sel: u32,
    pub status: u32,
    pub config_generation: u32,
    pub activated: bool,
    pub interrupt_status: u32,
    pub needs_reset: bool,
    pub queues: Vec<QueueState>,
    /// [`VirtioDevice::identity`](super::VirtioDevice::identity) at snapshot time.
    #[serde(default)]
    pub identity: Option<String>,
    /// [`VirtioDevice::config_space`](super::VirtioDevice::config_space) at snapshot time.
    #[serde(default)]
    pub config: Vec<u8>,
}

/// Why a saved transport does not fit the device the configuration describes.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TransportRestoreError {
    #[error(
        "the snapshot has virtio device type {saved} here, the configuration type {configured}"
    )]
    DeviceType { saved: u32, configured: u32 },
    #[error(
        "the snapshot has {saved} queues for virtio device type {device_type}, the device {configured}"
    )]
    QueueCount {
        device_type: u32,
        saved: usize,
        configured: usize,
    },
    #[error("queue {index}: {message}")]
    Queue { index: usize, message: String },
    #[error("the snapshot's features {saved:#x} are not all offered by the device ({offered:#x})")]
    Features { saved: u64, offered: u64 },
    #[error(
        "the snapshot's device is {}, the configuration's {}",
        saved.as_deref().unwrap_or("unnamed"),
        configured.as_deref().unwrap_or("unnamed")
    )]
    Identity {
        saved: Option<String>,
        configured: Option<String>,
    },
    #[error("activating the restored device: {0}")]
    Activate(String),
}
