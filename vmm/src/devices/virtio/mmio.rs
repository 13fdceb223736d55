//! virtio-mmio transport, version 2 ("modern") only (virtio 1.2, section 4.2.2).
//!
//! The transport keeps the register file and the queue configuration the driver writes;
//! on DRIVER_OK it builds and validates the [`Queue`]s and hands them to the device.

use tracing::debug;

use super::guest_log::guest_warn;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::interrupt::INT_CONFIG;
use super::persist::{QueueState, TransportRestoreError, TransportState};
use super::{ActiveQueue, GuestMemory, Interrupt, VirtioDevice};
use crate::devices::bus::BusDevice;

/// Size of one device's MMIO window.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;

/// "virt" in little endian.
const MAGIC_VALUE: u32 = 0x7472_6976;
const MMIO_VERSION: u32 = 2;
/// Vendor ID reported to the guest ("HUSK" in little endian); drivers do not look at it.
const VENDOR_ID: u32 = 0x4b53_5548;

/// Device status bits (virtio 1.2, section 2.1).
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    pub const FAILED: u32 = 128;
}

/// VIRTIO_F_VERSION_1: the transport only speaks the modern interface.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// VIRTIO_RING_F_EVENT_IDX.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

// Register offsets (virtio 1.2, table 4.1).
const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
const REG_QUEUE_NOTIFY: u64 = 0x050;
/// Offset of QueueNotify in the window, for KVM ioeventfds.
pub const QUEUE_NOTIFY_OFFSET: u64 = REG_QUEUE_NOTIFY;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const REG_SHM_SEL: u64 = 0x0ac;
const REG_SHM_LEN_LOW: u64 = 0x0b0;
const REG_SHM_LEN_HIGH: u64 = 0x0b4;
const REG_SHM_BASE_LOW: u64 = 0x0b8;
const REG_SHM_BASE_HIGH: u64 = 0x0bc;
const REG_QUEUE_RESET: u64 = 0x0c0;
const REG_CONFIG_GENERATION: u64 = 0x0fc;
const CONFIG_SPACE: u64 = 0x100;

/// What the driver wrote for one queue; turned into a [`Queue`] at activation.
#[derive(Clone, Copy, Debug, Default)]
struct QueueRegs {
    max_size: u16,
    size: u16,
    ready: bool,
    desc: u64,
    driver: u64,
    device: u64,
}

impl QueueRegs {
    fn new(max_size: u16) -> Self {
        Self {
            max_size,
            size: max_size,
            ..Default::default()
        }
    }

    /// Builds the queue and checks it against the spec and guest memory.
    fn build(&self, mem: &GuestMemory, event_idx: bool) -> Result<Queue, String> {
        // virtio-queue treats a ring at guest address 0 as not ready: it pops nothing from
        // it while notifications keep reporting work, so a worker would spin (found by the
        // mmio fuzz target). No real driver puts a ring there.
        if self.desc == 0 || self.driver == 0 || self.device == 0 {
            return Err("a ring at guest address 0 is not supported".into());
        }
        let mut q = Queue::new(self.max_size).map_err(|e| format!("max size: {e}"))?;
        q.try_set_size(self.size)
            .map_err(|e| format!("size {}: {e}", self.size))?;
        q.try_set_desc_table_address(vm_memory::GuestAddress(self.desc))
            .map_err(|e| format!("descriptor table {:#x}: {e}", self.desc))?;
        q.try_set_avail_ring_address(vm_memory::GuestAddress(self.driver))
            .map_err(|e| format!("driver area {:#x}: {e}", self.driver))?;
        q.try_set_used_ring_address(vm_memory::GuestAddress(self.device))
            .map_err(|e| format!("device area {:#x}: {e}", self.device))?;
        q.set_event_idx(event_idx);
        q.set_ready(self.ready);
        if !q.is_valid(mem) {
            return Err("not ready or rings outside guest memory".into());
        }
        Ok(q)
    }
}

/// One virtio device behind a virtio-mmio register window.
pub struct MmioTransport {
    mem: GuestMemory,
    device: Box<dyn VirtioDevice>,
    interrupt: Interrupt,
    queues: Vec<QueueRegs>,
    /// The transport's ends of the queue notify eventfds, present while the device is active.
    notify: Vec<EventFd>,
    /// Notify eventfds fixed for the device's lifetime (one per queue), when the VM builder
    /// registered them with KVM as ioeventfds on QueueNotify; otherwise fresh ones are made
    /// at each activation.
    fixed_notify: Option<Vec<EventFd>>,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    status: u32,
    config_generation: u32,
    activated: bool,
    /// Queue positions of a restored, not yet started device.
    restored: Option<Vec<(u16, u16)>>,
    /// InterruptStatus of a restored device, raised again when it starts.
    restored_interrupt: u32,
}

impl MmioTransport {
    pub fn new(mem: GuestMemory, device: Box<dyn VirtioDevice>, interrupt: Interrupt) -> Self {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&m| QueueRegs::new(m))
            .collect();
        Self {
            mem,
            device,
            interrupt,
            queues,
            notify: Vec::new(),
            fixed_notify: None,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            status: 0,
            config_generation: 0,
            activated: false,
            restored: None,
            restored_interrupt: 0,
        }
    }

    /// Like [`new`](Self::new), with one notify eventfd per queue that the caller has
    /// registered as a KVM ioeventfd (QueueNotify address, queue index as datamatch): the
    /// guest's kicks then reach the device without an exit to the VMM.
    pub fn with_notify_eventfds(
        mem: GuestMemory,
        device: Box<dyn VirtioDevice>,
        interrupt: Interrupt,
        notify: Vec<EventFd>,
    ) -> Self {
        let mut t = Self::new(mem, device, interrupt);
        t.fixed_notify = Some(notify);
        t
    }

    /// The device status register as the driver sees it.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Whether the device was activated (DRIVER_OK accepted).
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// The interrupt shared with the device.
    pub fn interrupt(&self) -> &Interrupt {
        &self.interrupt
    }

    fn has_status(&self, set: u32, clear: u32) -> bool {
        self.status & set == set && self.status & clear == 0
    }

    fn selected_queue(&mut self) -> Option<&mut QueueRegs> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn read_reg(&self, offset: u64) -> u32 {
        let q = self.queues.get(self.queue_sel as usize);
        match offset {
            REG_MAGIC => MAGIC_VALUE,
            REG_VERSION => MMIO_VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => {
                let features = self.device.avail_features();
                match self.device_features_sel {
                    0 => features as u32,
                    1 => (features >> 32) as u32,
                    _ => 0,
                }
            }
            // Zero tells the driver the selected queue does not exist.
            REG_QUEUE_NUM_MAX => q.map_or(0, |q| u32::from(q.max_size)),
            REG_QUEUE_READY => q.map_or(0, |q| u32::from(q.ready)),
            REG_INTERRUPT_STATUS => self.interrupt.status(),
            REG_STATUS => {
                if self.interrupt.needs_reset() {
                    self.status | status::DEVICE_NEEDS_RESET
                } else {
                    self.status
                }
            }
            REG_QUEUE_DESC_LOW => q.map_or(0, |q| q.desc as u32),
            REG_QUEUE_DESC_HIGH => q.map_or(0, |q| (q.desc >> 32) as u32),
            REG_QUEUE_DRIVER_LOW => q.map_or(0, |q| q.driver as u32),
            REG_QUEUE_DRIVER_HIGH => q.map_or(0, |q| (q.driver >> 32) as u32),
            REG_QUEUE_DEVICE_LOW => q.map_or(0, |q| q.device as u32),
            REG_QUEUE_DEVICE_HIGH => q.map_or(0, |q| (q.device >> 32) as u32),
            // No shared memory regions: length all-ones means "does not exist".
            REG_SHM_LEN_LOW | REG_SHM_LEN_HIGH | REG_SHM_BASE_LOW | REG_SHM_BASE_HIGH => u32::MAX,
            REG_QUEUE_RESET => 0,
            REG_CONFIG_GENERATION => self.config_generation,
            _ => {
                debug!("virtio-mmio: read of unknown register {offset:#x}");
                0
            }
        }
    }

    fn write_reg(&mut self, offset: u64, value: u32) {
        // Feature and queue registers are only meaningful in the matching setup phase; a
        // driver writing them at other times is buggy or hostile and is ignored.
        let features_phase = self.has_status(status::DRIVER, status::FEATURES_OK | status::FAILED);
        let queue_phase = self.has_status(status::FEATURES_OK, status::DRIVER_OK | status::FAILED);
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            REG_DRIVER_FEATURES if features_phase => {
                let v = u64::from(value);
                match self.driver_features_sel {
                    0 => self.acked_features = (self.acked_features & !0xffff_ffff) | v,
                    1 => self.acked_features = (self.acked_features & 0xffff_ffff) | (v << 32),
                    _ => debug!("virtio-mmio: driver features word {} ignored", value),
                }
            }
            REG_QUEUE_SEL => self.queue_sel = value,
            REG_QUEUE_NUM if queue_phase => {
                if let Some(q) = self.selected_queue() {
                    // Out-of-range sizes are kept as written and refused at activation.
                    q.size = u16::try_from(value).unwrap_or(0);
                }
            }
            REG_QUEUE_READY if queue_phase => {
                if let Some(q) = self.selected_queue() {
                    q.ready = value == 1;
                }
            }
            REG_QUEUE_DESC_LOW
            | REG_QUEUE_DESC_HIGH
            | REG_QUEUE_DRIVER_LOW
            | REG_QUEUE_DRIVER_HIGH
            | REG_QUEUE_DEVICE_LOW
            | REG_QUEUE_DEVICE_HIGH
                if queue_phase =>
            {
                if let Some(q) = self.selected_queue() {
                    let field = match offset {
                        REG_QUEUE_DESC_LOW | REG_QUEUE_DESC_HIGH => &mut q.desc,
                        REG_QUEUE_DRIVER_LOW | REG_QUEUE_DRIVER_HIGH => &mut q.driver,
                        _ => &mut q.device,
                    };
                    let v = u64::from(value);
                    *field = if offset & 0x4 == 0 {
                        (*field & !0xffff_ffff) | v
                    } else {
                        (*field & 0xffff_ffff) | (v << 32)
                    };
                }
            }
            REG_QUEUE_NOTIFY => {
                if self.activated {
                    if let Some(evt) = self.notify.get(value as usize)
                        && let Err(e) = evt.write(1)
                    {
                        guest_warn!("virtio-mmio: queue {value} notify failed: {e}");
                    }
                } else {
                    debug!("virtio-mmio: notify of queue {value} before DRIVER_OK ignored");
                }
            }
            REG_INTERRUPT_ACK => self.interrupt.ack(value),
            REG_STATUS => self.write_status(value),
            REG_SHM_SEL => {}
            _ => debug!("virtio-mmio: write {value:#x} to register {offset:#x} ignored"),
        }
    }

    fn write_status(&mut self, value: u32) {
        use status::*;
        if value == 0 {
            self.reset();
            return;
        }
        // The driver may only add bits (virtio 1.2, 2.1.2), except through a reset.
        if value & self.status != self.status {
            guest_warn!(
                "virtio-mmio: status {:#x} -> {value:#x} clears bits without a reset; ignored",
                self.status
            );
            return;
        }
        let added = value & !self.status;
        if added & FAILED != 0 {
            self.status |= FAILED;
            return;
        }
        match added {
            ACKNOWLEDGE if self.status == 0 => self.status = value,
            DRIVER if self.status == ACKNOWLEDGE => self.status = value,
            FEATURES_OK if self.status == ACKNOWLEDGE | DRIVER => {
                let avail = self.device.avail_features();
                let acked = self.acked_features;
                if acked & !avail != 0 || acked & VIRTIO_F_VERSION_1 == 0 {
                    // Leaving FEATURES_OK clear is how the device refuses (virtio 1.2, 3.1.1).
                    guest_warn!("virtio-mmio: refusing features {acked:#x} (offered {avail:#x})");
                    return;
                }
                self.device.set_acked_features(acked);
                self.status = value;
            }
            DRIVER_OK if self.status == ACKNOWLEDGE | DRIVER | FEATURES_OK => {
                self.status = value;
                if let Err(e) = self.activate() {
                    guest_warn!(
                        "virtio-mmio: cannot activate device type {}: {e}",
                        self.device.device_type()
                    );
                    self.status |= DEVICE_NEEDS_RESET;
                    if let Err(e) = self.interrupt.trigger(INT_CONFIG) {
                        guest_warn!("virtio-mmio: cannot raise config interrupt: {e}");
                    }
                }
            }
            0 => {}
            _ => guest_warn!(
                "virtio-mmio: invalid status transition {:#x} -> {value:#x}",
                self.status
            ),
        }
    }

    fn activate(&mut self) -> Result<(), String> {
        self.activate_with(None)
    }

    /// Activates the device; `restored`: the queues' saved (next_avail, next_used).
    fn activate_with(&mut self, restored: Option<&[(u16, u16)]>) -> Result<(), String> {
        let event_idx = self.acked_features & VIRTIO_RING_F_EVENT_IDX != 0;
        let mut active = Vec::with_capacity(self.queues.len());
        let mut ours = Vec::with_capacity(self.queues.len());
        for (i, regs) in self.queues.iter().enumerate() {
            let mut queue = regs
                .build(&self.mem, event_idx)
                .map_err(|e| format!("queue {i}: {e}"))?;
            if let Some(&(next_avail, next_used)) = restored.and_then(|r| r.get(i)) {
                queue.set_next_avail(next_avail);
                queue.set_next_used(next_used);
            }
            let notify = match &self.fixed_notify {
                Some(fixed) => fixed
                    .get(i)
                    .ok_or_else(|| format!("queue {i}: no notify eventfd"))?
                    .try_clone(),
                None => EventFd::new(EFD_NONBLOCK),
            }
            .map_err(|e| format!("eventfd: {e}"))?;
            ours.push(notify.try_clone().map_err(|e| format!("eventfd: {e}"))?);
            active.push(ActiveQueue { queue, notify });
        }
        let mem = self.mem.clone();
        let interrupt = self.interrupt.clone();
        match restored {
            None => self.device.activate(mem, active, interrupt),
            Some(_) => self.device.activate_restored(mem, active, interrupt),
        }
        .map_err(|e| e.to_string())?;
        self.notify = ours;
        self.activated = true;
        Ok(())
    }

    /// Stops the device's processing and returns the transport's state for a snapshot. The
    /// device stays stopped: the VM is not resumed after a snapshot.
    pub fn snapshot(&mut self) -> Result<TransportState, String> {
        let mut positions = vec![(0u16, 0u16); self.queues.len()];
        let was_active = self.activated;
        if was_active {
            let queues = self.device.quiesce()?;
            if queues.len() != self.queues.len() {
                return Err(format!(
                    "device type {} handed back {} queues of {}",
                    self.device.device_type(),
                    queues.len(),
                    self.queues.len()
                ));
            }
            self.activated = false;
            self.notify.clear();
            positions = queues
                .iter()
                .map(|q| (q.next_avail(), q.next_used()))
                .collect();
        }
        Ok(TransportState {
            device_type: self.device.device_type(),
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            acked_features: self.acked_features,
            queue_sel: self.queue_sel,
            status: self.status,
            config_generation: self.config_generation,
            activated: was_active,
            interrupt_status: self.interrupt.status(),
            needs_reset: self.interrupt.needs_reset(),
            queues: self
                .queues
                .iter()
                .zip(positions)
                .map(|(q, (next_avail, next_used))| QueueState {
                    max_size: q.max_size,
                    size: q.size,
                    ready: q.ready,
                    desc: q.desc,
                    driver: q.driver,
                    device: q.device,
                    next_avail,
                    next_used,
                })
                .collect(),
            identity: self.device.identity(),
            config: self.device.config_space(),
        })
    }

    /// Builds a transport for `device` from a snapshot's `state`; [`start_restored`]
    /// then starts the device if the driver had. Everything in `state` came from a file and
    /// is checked as if the guest had written it.
    ///
    /// [`start_restored`]: Self::start_restored
    pub fn restore(
        mem: GuestMemory,
        device: Box<dyn VirtioDevice>,
        interrupt: Interrupt,
        fixed_notify: Option<Vec<EventFd>>,
        state: &TransportState,
    ) -> Result<Self, TransportRestoreError> {
        let configured = device.device_type();
        if state.device_type != configured {
            return Err(TransportRestoreError::DeviceType {
                saved: state.device_type,
                configured,
            });
        }
        let identity = device.identity();
        if state.identity != identity {
            return Err(TransportRestoreError::Identity {
                saved: state.identity.clone(),
                configured: identity,
            });
        }
        let max_sizes = device.queue_max_sizes().to_vec();
        if state.queues.len() != max_sizes.len() {
            return Err(TransportRestoreError::QueueCount {
                device_type: configured,
                saved: state.queues.len(),
                configured: max_sizes.len(),
            });
        }
        let offered = device.avail_features();
        if state.acked_features & !offered != 0 {
            return Err(TransportRestoreError::Features {
                saved: state.acked_features,
                offered,
            });
        }
        let mut t = Self::new(mem, device, interrupt);
        t.fixed_notify = fixed_notify;
        for (index, (regs, saved)) in t.queues.iter_mut().zip(&state.queues).enumerate() {
            if saved.max_size != max_sizes[index] {
                return Err(TransportRestoreError::Queue {
                    index,
                    message: format!(
                        "saved maximum size {} differs from the device's {}",
                        saved.max_size, max_sizes[index]
                    ),
                });
            }
            *regs = QueueRegs {
                max_size: saved.max_size,
                size: saved.size,
                ready: saved.ready,
                desc: saved.desc,
                driver: saved.driver,
                device: saved.device,
            };
        }
        t.device_features_sel = state.device_features_sel;
        t.driver_features_sel = state.driver_features_sel;
        t.acked_features = state.acked_features;
        t.queue_sel = state.queue_sel;
        t.status = state.status;
        t.config_generation = state.config_generation;
        if state.status & status::FEATURES_OK != 0 {
            t.device.set_acked_features(state.acked_features);
        }
        if state.needs_reset {
            t.interrupt.set_needs_reset();
        }
        if state.activated && !state.needs_reset {
            t.restored = Some(
                state
                    .queues
                    .iter()
                    .map(|q| (q.next_avail, q.next_used))
                    .collect(),
            );
        }
        t.restored_interrupt = state.interrupt_status;
        // The driver read the saved configuration; a device built differently now (a block
        // slot the template had empty, now this VM's image) must say so, or the driver
        // keeps the old capacity.
        let config = t.device.config_space();
        if state.config != config && state.status & status::DRIVER_OK != 0 {
            t.config_generation = t.config_generation.wrapping_add(1);
            t.restored_interrupt |= INT_CONFIG;
            debug!(
                "virtio-mmio: device type {configured}'s configuration changed across the restore"
            );
        }
        Ok(t)
    }

    /// Starts a restored device on its saved queues (once the vCPUs and the interrupt
    /// controllers hold their restored state, so no interrupt it raises is lost).
    pub fn start_restored(&mut self) -> Result<(), TransportRestoreError> {
        if let Some(positions) = self.restored.take() {
            self.activate_with(Some(&positions))
                .map_err(TransportRestoreError::Activate)?;
        }
        let pending = std::mem::take(&mut self.restored_interrupt);
        if pending != 0 {
            // A pending interrupt at snapshot time is raised again: a spurious one is
            // harmless, a lost one stalls the driver.
            if let Err(e) = self.interrupt.trigger(pending) {
                debug!("virtio-mmio: raising the restored interrupt: {e}");
            }
        }
        Ok(())
    }

    fn reset(&mut self) {
        if self.activated && !self.device.reset() {
            guest_warn!(
                "virtio-mmio: device type {} cannot be reset",
                self.device.device_type()
            );
            self.status = status::DEVICE_NEEDS_RESET;
            return;
        }
        self.activated = false;
        self.notify.clear();
        self.status = 0;
        self.acked_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        for q in &mut self.queues {
            *q = QueueRegs::new(q.max_size);
        }
        self.interrupt.ack(u32::MAX);
        self.interrupt.clear_needs_reset();
        self.config_generation = self.config_generation.wrapping_add(1);
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset >= CONFIG_SPACE {
            let end = offset.checked_add(data.len() as u64);
            if matches!(data.len(), 1 | 2 | 4 | 8) && end.is_some_and(|e| e <= MMIO_WINDOW_SIZE) {
                self.device.read_config(offset - CONFIG_SPACE, data);
            } else {
                guest_warn!(
                    "virtio-mmio: bad config read at {offset:#x} len {}",
                    data.len()
                );
            }
            return;
        }
        if data.len() != 4 || offset & 3 != 0 {
            guest_warn!(
                "virtio-mmio: bad register read at {offset:#x} len {}",
                data.len()
            );
            return;
        }
        data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            let end = offset.checked_add(data.len() as u64);
            if matches!(data.len(), 1 | 2 | 4 | 8) && end.is_some_and(|e| e <= MMIO_WINDOW_SIZE) {
                self.device.write_config(offset - CONFIG_SPACE, data);
            } else {
                guest_warn!(
                    "virtio-mmio: bad config write at {offset:#x} len {}",
                    data.len()
                );
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            guest_warn!(
                "virtio-mmio: bad register write at {offset:#x} len {}",
                data.len()
            );
            return;
        };
        if offset & 3 != 0 {
            guest_warn!("virtio-mmio: unaligned register write at {offset:#x}");
            return;
        }
        self.write_reg(offset, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::rng::Rng;
    use crate::devices::virtio::{ActivateError, device_type};
    use std::sync::{Arc, Mutex};
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{RawDescriptor, split::Descriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    #[derive(Default)]
    struct Record {
        acked: u64,
        activations: Vec<(usize, Vec<u16>, bool)>,
        resets: usize,
        config_writes: Vec<(u64, Vec<u8>)>,
    }

    struct Fake(Arc<Mutex<Record>>);

    impl VirtioDevice for Fake {
        fn device_type(&self) -> u32 {
            device_type::RNG
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 8]
        }
        fn avail_features(&self) -> u64 {
            VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | 0b101
        }
        fn set_acked_features(&mut self, acked: u64) {
            self.0.lock().unwrap().acked = acked;
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            let cfg = 0x1122_3344_5566_7788u64.to_le_bytes();
            crate::devices::virtio::block::read_config_bytes(&cfg, offset, data);
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            self.0
                .lock()
                .unwrap()
                .config_writes
                .push((offset, data.to_vec()));
        }
        fn activate(
            &mut self,
            _mem: GuestMemory,
            queues: Vec<ActiveQueue>,
            _interrupt: Interrupt,
        ) -> Result<(), ActivateError> {
            let sizes = queues.iter().map(|q| q.queue.size()).collect();
            let eidx = queues.iter().all(|q| q.queue.event_idx_enabled());
            self.0
                .lock()
                .unwrap()
                .activations
                .push((queues.len(), sizes, eidx));
            Ok(())
        }
        fn reset(&mut self) -> bool {
            self.0.lock().unwrap().resets += 1;
            true
        }
    }

    fn mem() -> GuestMemory {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn rd(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0xffu8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn wr(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    fn fake() -> (MmioTransport, Arc<Mutex<Record>>) {
        let rec = Arc::new(Mutex::new(Record::default()));
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let t = MmioTransport::new(mem(), Box::new(Fake(rec.clone())), Interrupt::new(irq));
        (t, rec)
    }

    /// Negotiates `features` and sets up both queues at sane addresses.
    fn setup(t: &mut MmioTransport, features: u64) {
        wr(t, REG_STATUS, status::ACKNOWLEDGE);
        wr(t, REG_STATUS, status::ACKNOWLEDGE | status::DRIVER);
        wr(t, REG_DRIVER_FEATURES_SEL, 0);
        wr(t, REG_DRIVER_FEATURES, features as u32);
        wr(t, REG_DRIVER_FEATURES_SEL, 1);
        wr(t, REG_DRIVER_FEATURES, (features >> 32) as u32);
        wr(
            t,
            REG_STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        for (i, base) in [(0u32, 0x1000u64), (1, 0x4000)] {
            wr(t, REG_QUEUE_SEL, i);
            wr(t, REG_QUEUE_NUM, 8);
            wr(t, REG_QUEUE_DESC_LOW, base as u32);
            wr(t, REG_QUEUE_DESC_HIGH, 0);
            wr(t, REG_QUEUE_DRIVER_LOW, base as u32 + 0x800);
            wr(t, REG_QUEUE_DEVICE_LOW, base as u32 + 0x1000);
            wr(t, REG_QUEUE_READY, 1);
        }
    }

    const ALL_OK: u32 = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;

    #[test]
    fn identification_registers() {
        let (mut t, _) = fake();
        assert_eq!(rd(&mut t, REG_MAGIC), 0x7472_6976);
        assert_eq!(rd(&mut t, REG_VERSION), 2);
        assert_eq!(rd(&mut t, REG_DEVICE_ID), device_type::RNG);
        assert_eq!(rd(&mut t, REG_VENDOR_ID), VENDOR_ID);
        wr(&mut t, REG_DEVICE_FEATURES_SEL, 0);
        assert_eq!(rd(&mut t, REG_DEVICE_FEATURES), (1 << 29) | 0b101);
        wr(&mut t, REG_DEVICE_FEATURES_SEL, 1);
        assert_eq!(rd(&mut t, REG_DEVICE_FEATURES), 1);
        wr(&mut t, REG_DEVICE_FEATURES_SEL, 2);
        assert_eq!(rd(&mut t, REG_DEVICE_FEATURES), 0);
        wr(&mut t, REG_QUEUE_SEL, 1);
        assert_eq!(rd(&mut t, REG_QUEUE_NUM_MAX), 8);
        wr(&mut t, REG_QUEUE_SEL, 2);
        assert_eq!(rd(&mut t, REG_QUEUE_NUM_MAX), 0, "no third queue");
        assert_eq!(rd(&mut t, REG_SHM_LEN_LOW), u32::MAX);
    }

    #[test]
    fn invalid_accesses_are_ignored() {
        let (mut t, _) = fake();
        let mut b2 = [0xffu8; 2];
        t.read(REG_MAGIC, &mut b2);
        assert_eq!(b2, [0, 0], "2-byte register read yields zeros");
        let mut b4 = [0xffu8; 4];
        t.read(REG_MAGIC + 1, &mut b4);
        assert_eq!(b4, [0; 4], "unaligned read yields zeros");
        t.write(REG_STATUS, &[1, 0]);
        assert_eq!(t.status(), 0, "2-byte status write ignored");
        t.write(REG_STATUS + 2, &1u32.to_le_bytes());
        assert_eq!(t.status(), 0);
        let mut big = [0xffu8; 16];
        t.read(0x100, &mut big);
        assert_eq!(big, [0; 16], "16-byte config read rejected");
        let mut edge = [0xffu8; 8];
        t.read(0xffc, &mut edge);
        assert_eq!(edge, [0; 8], "config read past the window rejected");
        t.read(u64::MAX - 2, &mut b4);
        assert_eq!(b4, [0; 4]);
        t.write(u64::MAX - 2, &[1, 2, 3, 4]);
        // Unknown register.
        assert_eq!(rd(&mut t, 0x0e0), 0);
    }

    #[test]
    fn config_space_reads_and_writes() {
        let (mut t, rec) = fake();
        let mut b8 = [0u8; 8];
        t.read(0x100, &mut b8);
        assert_eq!(u64::from_le_bytes(b8), 0x1122_3344_5566_7788);
        assert_eq!(rd(&mut t, 0x104), 0x1122_3344);
        let mut b1 = [0u8; 1];
        t.read(0x101, &mut b1);
        assert_eq!(b1, [0x77]);
        t.write(0x102, &[9, 9]);
        assert_eq!(rec.lock().unwrap().config_writes, vec![(2, vec![9, 9])]);
    }

    #[test]
    fn status_state_machine_activation_and_reset() {
        let (mut t, rec) = fake();
        // Skipping ACKNOWLEDGE is refused.
        wr(&mut t, REG_STATUS, status::DRIVER);
        assert_eq!(t.status(), 0);
        setup(&mut t, VIRTIO_F_VERSION_1 | 0b100);
        assert_eq!(t.status(), ALL_OK);
        assert_eq!(rec.lock().unwrap().acked, VIRTIO_F_VERSION_1 | 0b100);
        // Feature writes after FEATURES_OK are ignored.
        wr(&mut t, REG_DRIVER_FEATURES_SEL, 0);
        wr(&mut t, REG_DRIVER_FEATURES, 0b1);
        // Clearing bits without a reset is refused.
        wr(&mut t, REG_STATUS, status::ACKNOWLEDGE);
        assert_eq!(t.status(), ALL_OK);
        wr(&mut t, REG_QUEUE_SEL, 0);
        assert_eq!(rd(&mut t, REG_QUEUE_READY), 1);
        assert_eq!(rd(&mut t, REG_QUEUE_DRIVER_LOW), 0x1800);
        // Notify before DRIVER_OK is harmless.
        wr(&mut t, REG_QUEUE_NOTIFY, 0);
        wr(&mut t, REG_STATUS, ALL_OK | status::DRIVER_OK);
        assert_eq!(t.status(), ALL_OK | status::DRIVER_OK);
        assert!(t.is_activated());
        assert_eq!(
            rec.lock().unwrap().activations,
            vec![(2, vec![8, 8], false)],
            "event idx not negotiated"
        );
        // Queue registers are frozen once the device runs.
        wr(&mut t, REG_QUEUE_NUM, 4);
        wr(&mut t, REG_QUEUE_NOTIFY, 1);
        wr(&mut t, REG_QUEUE_NOTIFY, 77);
        assert!(t.interrupt().irqfd().read().is_err(), "no interrupt raised");

        t.interrupt().trigger(INT_CONFIG).unwrap();
        assert_eq!(rd(&mut t, REG_INTERRUPT_STATUS), INT_CONFIG);
        wr(&mut t, REG_INTERRUPT_ACK, INT_CONFIG);
        assert_eq!(rd(&mut t, REG_INTERRUPT_STATUS), 0);

        let generation = rd(&mut t, REG_CONFIG_GENERATION);
        wr(&mut t, REG_STATUS, 0);
        assert_eq!(t.status(), 0);
        assert!(!t.is_activated());
        assert_eq!(rec.lock().unwrap().resets, 1);
        assert_eq!(rd(&mut t, REG_QUEUE_READY), 0);
        assert_eq!(rd(&mut t, REG_QUEUE_DESC_LOW), 0);
        assert_ne!(rd(&mut t, REG_CONFIG_GENERATION), generation);

        // The device can be brought up again, now with event idx.
        setup(&mut t, VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX);
        wr(&mut t, REG_STATUS, ALL_OK | status::DRIVER_OK);
        assert!(t.is_activated());
        assert_eq!(rec.lock().unwrap().activations[1], (2, vec![8, 8], true));
    }

    #[test]
    fn fixed_notify_eventfds_are_handed_to_the_device() {
        let rec = Arc::new(Mutex::new(Record::default()));
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let fixed: Vec<EventFd> = (0..2)
            .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
            .collect();
        let ours: Vec<EventFd> = fixed.iter().map(|e| e.try_clone().unwrap()).collect();
        let mut t = MmioTransport::with_notify_eventfds(
            mem(),
            Box::new(Fake(rec.clone())),
            Interrupt::new(irq),
            fixed,
        );
        setup(&mut t, VIRTIO_F_VERSION_1);
        wr(&mut t, REG_STATUS, ALL_OK | status::DRIVER_OK);
        assert!(t.is_activated());
        // A QueueNotify that reaches the VMM (no ioeventfd caught it) kicks the same fd.
        wr(&mut t, REG_QUEUE_NOTIFY, 1);
        assert_eq!(ours[1].read().unwrap(), 1);
        assert!(ours[0].read().is_err(), "queue 0 not kicked");
        // They survive a reset and serve the next activation.
        wr(&mut t, REG_STATUS, 0);
        setup(&mut t, VIRTIO_F_VERSION_1);
        wr(&mut t, REG_STATUS, ALL_OK | status::DRIVER_OK);
        wr(&mut t, REG_QUEUE_NOTIFY, 0);
        assert_eq!(ours[0].read().unwrap(), 1);
    }

    #[test]
    fn feature_negotiation_refuses_bad_sets() {
        let (mut t, _) = fake();
        // Without VERSION_1.
        setup(&mut t, 0b1);
        assert_eq!(t.status(), status::ACKNOWLEDGE | status::DRIVER);
        wr(&mut t, REG_STATUS, 0);
        // A feature the device never offered.
        setup(&mut t, VIRTIO_F_VERSION_1 | 0b10);
        assert_eq!(t.status(), status::ACKNOWLEDGE | status::DRIVER);
        // DRIVER_OK without FEATURES_OK does nothing.
        wr(
            &mut t,
            REG_STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK,
        );
        assert!(!t.is_activated());
        // FAILED sticks.
        wr(
            &mut t,
            REG_STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FAILED,
        );
        assert_ne!(t.status() & status::FAILED, 0);
    }

    #[test]
    fn invalid_queues_prevent_activation() {
        let bad: [(&str, u64, u32); 4] = [
            ("size not a power of two", REG_QUEUE_NUM, 6),
            ("size above max", REG_QUEUE_NUM, 32),
            ("ring outside memory", REG_QUEUE_DEVICE_HIGH, 1),
            ("misaligned descriptor table", REG_QUEUE_DESC_LOW, 0x1001),
        ];
        for (name, reg, value) in bad {
            let (mut t, rec) = fake();
            setup(&mut t, VIRTIO_F_VERSION_1);
            wr(&mut t, REG_QUEUE_SEL, 1);
            wr(&mut t, reg, value);
            wr(&mut t, REG_STATUS, ALL_OK | status::DRIVER_OK);
            assert!(!t.is_activated(), "{name}");
            assert_ne!(t.status() & status::DEVICE_NEEDS_RESET, 0, "{name}");
            assert!(rec.lock().unwrap().activations.is_empty(), "{name}");
        }
        // A queue the driver never made ready.
        let (mut t, _) = fake();
        setup(&mut t, VIRTIO_F_VERSION_1);
        wr(&mut t, REG_QUEUE_SEL, 0);
        wr(&mut t, REG_QUEUE_READY, 0);
        wr(&mut t, REG_STATUS, ALL_OK | status::DRIVER_OK);
        assert!(!t.is_activated());
        assert_eq!(
            t.interrupt().status() & INT_CONFIG,
            INT_CONFIG,
            "driver told through a config interrupt"
        );
    }

    /// The whole path with a real device and its worker thread: registers, notify,
    /// processing, interrupt.
    #[test]
    fn rng_end_to_end_through_worker() {
        let mem = mem();
        // A blocking irqfd: the read below waits for the worker's interrupt.
        let (mut t, vq) = rng_up(&mem);
        assert!(t.is_activated());

        let w = VRING_DESC_F_WRITE as u16;
        vq.add_desc_chains(
            &[RawDescriptor::from(Descriptor::new(0x8_0000, 256, w, 0))],
            0,
        )
        .unwrap();
        wr(&mut t, REG_QUEUE_NOTIFY, 0);
        t.interrupt().irqfd().read().unwrap();
        assert_eq!(rd(&mut t, REG_INTERRUPT_STATUS) & 1, 1);
        assert_eq!(vq.used().idx().load(), 1);
        assert_eq!(vq.used().ring().ref_at(0).unwrap().load().len(), 256);
        let mut buf = [0u8; 256];
        mem.read_slice(&mut buf, GuestAddress(0x8_0000)).unwrap();
        assert!(buf.iter().any(|&b| b != 0));
        // Reset stops the worker.
        wr(&mut t, REG_STATUS, 0);
        assert!(!t.is_activated());
        assert_eq!(rd(&mut t, REG_INTERRUPT_STATUS), 0);
    }

    /// Brings up the rng device on one 16-entry queue at 0x1000.
    fn rng_up(mem: &GuestMemory) -> (MmioTransport, MockSplitQueue<'_, GuestMemory>) {
        device_up(mem, Box::new(Rng::new()))
    }

    /// A one-queue device the driver has set up and started.
    fn device_up(
        mem: &GuestMemory,
        device: Box<dyn VirtioDevice>,
    ) -> (MmioTransport, MockSplitQueue<'_, GuestMemory>) {
        let irq = EventFd::new(0).unwrap();
        let mut t = MmioTransport::new(mem.clone(), device, Interrupt::new(irq));
        let vq = MockSplitQueue::create(mem, GuestAddress(0x1000), 16);
        wr(&mut t, REG_STATUS, status::ACKNOWLEDGE);
        wr(&mut t, REG_STATUS, status::ACKNOWLEDGE | status::DRIVER);
        wr(&mut t, REG_DRIVER_FEATURES_SEL, 1);
        wr(&mut t, REG_DRIVER_FEATURES, 1);
        wr(&mut t, REG_STATUS, ALL_OK);
        wr(&mut t, REG_QUEUE_SEL, 0);
        wr(&mut t, REG_QUEUE_NUM, 16);
        wr(&mut t, REG_QUEUE_DESC_LOW, vq.desc_table_addr().0 as u32);
        wr(&mut t, REG_QUEUE_DRIVER_LOW, vq.avail_addr().0 as u32);
        wr(&mut t, REG_QUEUE_DEVICE_LOW, vq.used_addr().0 as u32);
        wr(&mut t, REG_QUEUE_READY, 1);
        wr(&mut t, REG_STATUS, ALL_OK | status::DRIVER_OK);
        (t, vq)
    }

    #[test]
    fn a_snapshot_keeps_the_queue_positions_and_a_restore_goes_on_from_them() {
        let mem = mem();
        let (mut t, vq) = rng_up(&mem);
        let w = VRING_DESC_F_WRITE as u16;
        let chains: Vec<RawDescriptor> = (0..3u64)
            .map(|i| RawDescriptor::from(Descriptor::new(0x8_0000 + i * 0x100, 64, w, 0)))
            .collect();
        vq.add_desc_chains(&chains[..1], 0).unwrap();
        wr(&mut t, REG_QUEUE_NOTIFY, 0);
        t.interrupt().irqfd().read().unwrap();
        assert_eq!(vq.used().idx().load(), 1);

        let saved = t.snapshot().unwrap();
        assert!(!t.is_activated(), "the snapshot stops the device");
        assert!(saved.activated);
        assert_eq!(
            (saved.queues[0].next_avail, saved.queues[0].next_used),
            (1, 1)
        );
        // Through the file format's encoding, as a restore reads it.
        let saved: TransportState =
            serde_json::from_str(&serde_json::to_string(&saved).unwrap()).unwrap();

        let irq = EventFd::new(0).unwrap();
        let mut r = MmioTransport::restore(
            mem.clone(),
            Box::new(Rng::new()),
            Interrupt::new(irq),
            None,
            &saved,
        )
        .unwrap();
        assert_eq!(r.status(), ALL_OK | status::DRIVER_OK);
        r.start_restored().unwrap();
        assert!(r.is_activated());
        // The driver's next buffer goes into the next used slot, not over the first.
        vq.add_desc_chains(&chains[1..2], 1).unwrap();
        wr(&mut r, REG_QUEUE_NOTIFY, 0);
        // The restored pending interrupt may wake us first; wait for the used entry.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while vq.used().idx().load() < 2 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(vq.used().idx().load(), 2);
        assert_eq!(vq.used().ring().ref_at(1).unwrap().load().id(), 1);
    }

    #[test]
    fn a_block_slot_filled_by_a_restore_tells_the_driver_its_new_capacity() {
        use crate::devices::virtio::block::{Block, BlockConfig};
        let block = |path: Option<std::path::PathBuf>| -> Box<dyn VirtioDevice> {
            Box::new(
                Block::new(BlockConfig {
                    path,
                    read_only: true,
                    serial: Some("rootfs".into()),
                })
                .unwrap(),
            )
        };
        let capacity = |t: &mut MmioTransport| {
            let mut b = [0u8; 8];
            t.read(CONFIG_SPACE, &mut b);
            u64::from_le_bytes(b)
        };
        let mem = mem();
        let (mut t, _vq) = device_up(&mem, block(None));
        assert_eq!(capacity(&mut t), 0, "a template's slot has no medium");
        let saved = t.snapshot().unwrap();
        let saved: TransportState =
            serde_json::from_str(&serde_json::to_string(&saved).unwrap()).unwrap();

        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/husk-slot").unwrap();
        let image = dir.as_path().join("rootfs.img");
        std::fs::write(&image, vec![7u8; 8 * 512]).unwrap();
        let restore = |dev| {
            let irq = EventFd::new(EFD_NONBLOCK).unwrap();
            let mut r = MmioTransport::restore(mem.clone(), dev, Interrupt::new(irq), None, &saved)
                .unwrap();
            r.start_restored().unwrap();
            r
        };
        let mut filled = restore(block(Some(image)));
        assert_eq!(capacity(&mut filled), 8);
        assert_eq!(
            rd(&mut filled, REG_INTERRUPT_STATUS) & INT_CONFIG,
            INT_CONFIG,
            "the driver hears of the change"
        );
        assert_ne!(
            rd(&mut filled, REG_CONFIG_GENERATION),
            saved.config_generation
        );
        // Restored as it was: nothing to tell.
        let mut same = restore(block(None));
        assert_eq!(rd(&mut same, REG_INTERRUPT_STATUS) & INT_CONFIG, 0);
        assert_eq!(
            rd(&mut same, REG_CONFIG_GENERATION),
            saved.config_generation
        );
    }

    #[test]
    fn a_saved_transport_that_does_not_fit_the_device_is_refused() {
        let mem = mem();
        let (mut t, _vq) = rng_up(&mem);
        let saved = t.snapshot().unwrap();
        let restore = |state: &TransportState, dev: Box<dyn VirtioDevice>| {
            let irq = EventFd::new(EFD_NONBLOCK).unwrap();
            MmioTransport::restore(mem.clone(), dev, Interrupt::new(irq), None, state).err()
        };
        let mut other = saved.clone();
        other.device_type = device_type::BLOCK;
        assert!(matches!(
            restore(&other, Box::<Rng>::default()),
            Some(TransportRestoreError::DeviceType {
                saved: 2,
                configured: 4
            })
        ));
        let (fake, _) = fake();
        assert!(matches!(
            restore(&saved, fake.device),
            Some(TransportRestoreError::QueueCount {
                saved: 1,
                configured: 2,
                ..
            })
        ));
        let mut features = saved.clone();
        features.acked_features |= 1 << 40;
        assert!(matches!(
            restore(&features, Box::<Rng>::default()),
            Some(TransportRestoreError::Features { .. })
        ));
        // A queue outside guest memory fails when the device starts, naming the queue.
        let mut far = saved;
        far.queues[0].desc = 1 << 40;
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut r = MmioTransport::restore(
            mem.clone(),
            Box::new(Rng::new()),
            Interrupt::new(irq),
            None,
            &far,
        )
        .unwrap();
        let e = r.start_restored().unwrap_err().to_string();
        assert!(e.contains("queue 0"), "{e}");
    }
}
