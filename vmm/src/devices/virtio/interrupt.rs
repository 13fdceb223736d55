//! The interrupt line of one virtio-mmio device.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use vmm_sys_util::eventfd::EventFd;

/// InterruptStatus bit: a used ring was updated.
pub const INT_VRING: u32 = 0x1;
/// InterruptStatus bit: the configuration space changed.
pub const INT_CONFIG: u32 = 0x2;

/// Shared between the transport (which serves InterruptStatus/InterruptACK) and the device
/// worker (which raises it). The irqfd is registered with KVM by the VM builder.
#[derive(Clone)]
pub struct Interrupt {
    status: Arc<AtomicU32>,
    irqfd: Arc<EventFd>,
}

impl Interrupt {
    pub fn new(irqfd: EventFd) -> Self {
        Self {
            status: Arc::new(AtomicU32::new(0)),
            irqfd: Arc::new(irqfd),
        }
    }

    /// Sets `bits` in InterruptStatus and injects the interrupt.
    pub fn trigger(&self, bits: u32) -> std::io::Result<()> {
        self.status.fetch_or(bits, Ordering::SeqCst);
        self.irqfd.write(1)
    }

    /// Current InterruptStatus.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// InterruptACK: clears the acknowledged bits.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// The eventfd KVM listens on (for registering it as an irqfd and in tests).
    pub fn irqfd(&self) -> &EventFd {
        &self.irqfd
    }
}
