//! virtio-rng (entropy device, virtio 1.2 section 5.4): fills guest buffers from the host's
//! getrandom(2).

use tracing::{debug, warn};

use super::guest_log::guest_warn;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes};

use super::mmio::{VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};
use super::worker::{QueueHandler, Worker, run_single_queue};
use super::{ActivateError, ActiveQueue, GuestMemory, Interrupt, VirtioDevice, device_type};

const QUEUE_SIZE: u16 = 64;
/// Bytes served per request at most, so one request cannot keep the worker busy for long.
pub const MAX_BYTES_PER_REQUEST: usize = 64 * 1024;

pub(crate) struct RngBackend;

fn getrandom(buf: &mut [u8]) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: the pointer and length describe `rest`, which is valid for writes.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        filled += n as usize;
    }
    Ok(())
}

impl RngBackend {
    /// Fills the chain's device-writable buffers; returns the bytes written.
    fn fill<I: Iterator<Item = virtio_queue::desc::split::Descriptor>>(
        mem: &GuestMemory,
        descs: I,
    ) -> u32 {
        let mut buf = [0u8; 4096];
        let mut written = 0usize;
        for d in descs.filter(|d| d.is_write_only()) {
            let mut off = 0usize;
            let len = (d.len() as usize).min(MAX_BYTES_PER_REQUEST - written);
            while off < len {
                let n = (len - off).min(buf.len());
                if let Err(e) = getrandom(&mut buf[..n]) {
                    warn!("virtio-rng: getrandom failed: {e}");
                    return written as u32;
                }
                let Some(addr) = d.addr().checked_add(off as u64) else {
                    return written as u32;
                };
                if mem.write_slice(&buf[..n], addr).is_err() {
                    debug!("virtio-rng: buffer outside guest memory");
                    return written as u32;
                }
                off += n;
                written += n;
            }
            if written >= MAX_BYTES_PER_REQUEST {
                break;
            }
        }
        written as u32
    }
}

impl QueueHandler for RngBackend {
    fn process(&mut self, mem: &GuestMemory, queue: &mut Queue) -> bool {
        let mut used = false;
        let mut pass = crate::devices::virtio::chain::Pass::new(queue);
        while let Some(chain) = pass.pop(queue, mem) {
            let head = chain.head_index();
            let len = Self::fill(mem, chain);
            if let Err(e) = queue.add_used(mem, head, len) {
                guest_warn!("virtio-rng: cannot add used entry: {e}");
            }
            used = true;
        }
        used
    }
}

/// The entropy device.
pub struct Rng {
    worker: Option<Worker<(RngBackend, Queue)>>,
    acked_features: u64,
}

impl Rng {
    pub fn new() -> Rng {
        Rng {
            worker: None,
            acked_features: 0,
        }
    }
}

impl Default for Rng {
    fn default() -> Self {
        Self::new()
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        device_type::RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX
    }

    fn set_acked_features(&mut self, acked: u64) {
        self.acked_features = acked;
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        // No configuration space.
        data.fill(0);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(
        &mut self,
        mem: GuestMemory,
        queues: Vec<ActiveQueue>,
        interrupt: Interrupt,
    ) -> Result<(), ActivateError> {
        let got = queues.len();
        let Ok([q]) = <[ActiveQueue; 1]>::try_from(queues) else {
            return Err(ActivateError::QueueCount { expected: 1, got });
        };
        if self.worker.is_some() {
            return Err(ActivateError::Other("virtio-rng already active".into()));
        }
        let worker = Worker::spawn("virtio-rng", move |kill| {
            run_single_queue(RngBackend, mem, q.queue, q.notify, interrupt, kill)
        })
        .map_err(ActivateError::Worker)?;
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) -> bool {
        self.acked_features = 0;
        // A worker that did not stop is still running on the old queue: the device must
        // stay in DEVICE_NEEDS_RESET rather than report a clean reset.
        match self.worker.take() {
            Some(w) => w.stop().is_some(),
            None => true,
        }
    }

    fn quiesce(&mut self) -> Result<Vec<Queue>, String> {
        let worker = self.worker.take().ok_or("virtio-rng is not active")?;
        let (_, queue) = worker.stop().ok_or("virtio-rng worker did not stop")?;
        Ok(vec![queue])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{RawDescriptor, split::Descriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    #[test]
    fn fills_writable_buffers_up_to_cap() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        let vq = MockSplitQueue::new(&mem, 16);
        let w = VRING_DESC_F_WRITE as u16;
        // A readable descriptor (ignored), then 48 + 40 KiB writable: capped at 64 KiB.
        vq.build_desc_chain(&[
            RawDescriptor::from(Descriptor::new(0x10_0000, 16, 0, 0)),
            RawDescriptor::from(Descriptor::new(0x20_0000, 48 * 1024, w, 0)),
            RawDescriptor::from(Descriptor::new(0x30_0000, 40 * 1024, w, 0)),
        ])
        .unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        assert!(RngBackend.process(&mem, &mut q));
        let used = vq.used().ring().ref_at(0).unwrap().load();
        assert_eq!(used.len() as usize, MAX_BYTES_PER_REQUEST);
        let mut first = vec![0u8; 48 * 1024];
        mem.read_slice(&mut first, GuestAddress(0x20_0000)).unwrap();
        assert!(first.iter().filter(|&&b| b != 0).count() > 40 * 1024);
        let mut second = vec![0u8; 40 * 1024];
        mem.read_slice(&mut second, GuestAddress(0x30_0000))
            .unwrap();
        let filled = 16 * 1024;
        assert!(second[..filled].iter().any(|&b| b != 0));
        assert!(second[filled..].iter().all(|&b| b == 0), "cap respected");
        let mut ro = [0u8; 16];
        mem.read_slice(&mut ro, GuestAddress(0x10_0000)).unwrap();
        assert_eq!(ro, [0; 16], "readable descriptor untouched");
    }

    #[test]
    fn buffer_outside_memory_is_not_fatal() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap();
        let vq = MockSplitQueue::new(&mem, 16);
        let w = VRING_DESC_F_WRITE as u16;
        vq.build_desc_chain(&[RawDescriptor::from(Descriptor::new(
            0x1f_f000, 0x2000, w, 0,
        ))])
        .unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        assert!(RngBackend.process(&mem, &mut q));
        let used = vq.used().ring().ref_at(0).unwrap().load();
        assert_eq!(used.len(), 0x1000, "only the in-memory part was filled");
    }
}
