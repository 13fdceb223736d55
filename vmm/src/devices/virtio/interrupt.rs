//! The interrupt line of one virtio-mmio device, and the device's "needs reset" flag that
//! travels with it from the worker to the transport.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

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
    /// Set by a worker that found the driver's queue state impossible; the transport shows
    /// it as DEVICE_NEEDS_RESET until the driver resets the device.
    needs_reset: Arc<AtomicBool>,
}

impl Interrupt {
    pub fn new(irqfd: EventFd) -> Self {
        Self {
            status: Arc::new(AtomicU32::new(0)),
            irqfd: Arc::new(irqfd),
            needs_reset: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Marks the device as needing a reset and tells the driver with a configuration
    /// interrupt (virtio 1.2, 2.1.2). Returns false if it was already marked, so callers
    /// log a guest's broken queue once, not on every kick.
    pub fn set_needs_reset(&self) -> bool {
        if self.needs_reset.swap(true, Ordering::SeqCst) {
            return false;
        }
        let _ = self.trigger(INT_CONFIG);
        true
    }

    /// Whether a worker marked the device as needing a reset.
    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }

    /// Clears the mark once the driver has reset the device.
    pub fn clear_needs_reset(&self) {
        self.needs_reset.store(false, Ordering::SeqCst);
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
