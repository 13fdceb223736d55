//! virtio devices and the virtio-mmio transport that exposes them to the guest.
//!
//! Contract between the transport and a device:
//! - The transport (`mmio`) owns the register file, feature negotiation, queue setup and
//!   the interrupt status register. It is driven by the vCPU thread through `BusDevice`.
//! - When the driver sets DRIVER_OK, the transport calls [`VirtioDevice::activate`] with the
//!   ready queues, one `EventFd` per queue (written by the transport on QueueNotify) and an
//!   [`Interrupt`]. The device then processes its queues on a worker thread of its own (or,
//!   for vhost-user devices, hands them to another process).
//! - Everything in a queue is written by the guest and is hostile: devices bounds-check every
//!   descriptor and turn malformed chains into a device error, never a panic.

pub mod interrupt;
pub mod mmio;
pub mod persist;

pub mod block;
pub mod fs;
pub mod net;
pub mod rng;
pub mod vsock;
// Taking chains off a queue (refusing indirect descriptors), for the devices above.
pub mod chain;
// Worker-thread plumbing shared by the devices above.
mod worker;
// Rate-limited warnings for what the guest can trigger.
mod guest_log;

pub use interrupt::Interrupt;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// Guest RAM as the devices see it.
pub type GuestMemory = GuestMemoryMmap<()>;

/// virtio device ids (virtio 1.2, section 5).
pub mod device_type {
    pub const NET: u32 = 1;
    pub const BLOCK: u32 = 2;
    pub const RNG: u32 = 4;
    pub const VSOCK: u32 = 19;
    pub const FS: u32 = 26;
}

/// Error raised by a device when it is activated.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("expected {expected} queues, the driver set up {got}")]
    QueueCount { expected: usize, got: usize },
    #[error("device worker could not start: {0}")]
    Worker(#[source] std::io::Error),
    #[error("{0}")]
    Other(String),
}

/// A queue the driver made ready, with the eventfd the transport kicks on QueueNotify.
pub struct ActiveQueue {
    pub queue: Queue,
    pub notify: EventFd,
}

/// A virtio device behind a transport.
pub trait VirtioDevice: Send {
    /// virtio device id ([`device_type`]).
    fn device_type(&self) -> u32;
    /// Maximum size of each of the device's queues; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits the device offers, VIRTIO_F_VERSION_1 included.
    fn avail_features(&self) -> u64;
    /// Records the features the driver accepted (a subset of `avail_features`).
    fn set_acked_features(&mut self, acked: u64);
    /// Reads the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// The configuration space as the driver reads it, for devices whose configuration can
    /// change under a running driver (a block slot filled by a restore): saved in a
    /// snapshot, and a restore that finds it changed tells the driver (a config-change
    /// interrupt, as for a disk resize). Empty for devices that never change it.
    fn config_space(&self) -> Vec<u8> {
        Vec::new()
    }
    /// Writes the device-specific configuration space (most devices ignore this).
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device on the driver's queues.
    fn activate(
        &mut self,
        mem: GuestMemory,
        queues: Vec<ActiveQueue>,
        interrupt: Interrupt,
    ) -> Result<(), ActivateError>;
    /// Stops the device's worker after a driver reset; returns false if the device cannot be
    /// reset (the transport then marks it as needing a reset).
    fn reset(&mut self) -> bool {
        false
    }
    /// What the driver learnt of the device's host side at probe time and cannot learn
    /// again (a virtio-fs tag): saved in a snapshot and compared on restore.
    fn identity(&self) -> Option<String> {
        None
    }
    /// Stops the active device's processing for a snapshot, keeping its host resources, and
    /// hands back its queues with their positions. Devices that cannot say so.
    fn quiesce(&mut self) -> Result<Vec<Queue>, String> {
        Err(format!(
            "virtio device type {} cannot be snapshotted",
            self.device_type()
        ))
    }
    /// Starts the device on queues restored from a snapshot (whose driver is already past
    /// DRIVER_OK). Devices with host-side connection state reset it here.
    fn activate_restored(
        &mut self,
        mem: GuestMemory,
        queues: Vec<ActiveQueue>,
        interrupt: Interrupt,
    ) -> Result<(), ActivateError> {
        self.activate(mem, queues, interrupt)
    }
}
