//! Taking descriptor chains off a queue. husk's devices do not offer
//! VIRTIO_RING_F_INDIRECT_DESC, yet virtio-queue's chain iterator follows an indirect
//! descriptor wherever it finds one, into a table of up to 65,535 entries: a driver could
//! make each request cost 4,096 times a queue's worth of descriptors without ever having
//! negotiated the feature. A chain that uses one is refused here: returned to the driver
//! unused (length 0) with a rate-limited warning, never seen by the device.

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::GuestMemory;
use super::guest_log::guest_warn;

/// One pass over a queue: chains taken off it, refused ones included, at most the queue's
/// size. A driver never has more buffers outstanding than that; more in one pass means the
/// device's own writes make new available entries (a used ring laid over the available
/// ring, a device-written buffer over its index), which would feed the device forever. When
/// a pass ends, the worker checks for a stop before the next (`worker::drain_queue`).
pub struct Pass {
    left: u16,
}

impl Pass {
    pub fn new(queue: &Queue) -> Self {
        Self {
            left: queue.size().max(1),
        }
    }

    /// The next chain of `queue` that uses no indirect descriptor (see the module doc), or
    /// `None` when the queue is empty or the pass is over.
    pub fn pop<'m>(
        &mut self,
        queue: &mut Queue,
        mem: &'m GuestMemory,
    ) -> Option<DescriptorChain<&'m GuestMemory>> {
        while self.left > 0 {
            self.left -= 1;
            let chain = queue.pop_descriptor_chain(mem)?;
            let head = chain.head_index();
            if !uses_indirect(mem, queue.desc_table(), queue.size(), head) {
                return Some(chain);
            }
            guest_warn!(
                "virtio: a descriptor chain (head {head}) uses an indirect descriptor, which was not negotiated: returned unused"
            );
            if let Err(e) = queue.add_used(mem, head, 0) {
                guest_warn!("virtio: cannot return a refused chain: {e}");
            }
        }
        None
    }
}

/// The next chain of `queue` that uses no indirect descriptor, in a pass of its own.
pub fn pop<'m>(
    queue: &mut Queue,
    mem: &'m GuestMemory,
) -> Option<DescriptorChain<&'m GuestMemory>> {
    Pass::new(queue).pop(queue, mem)
}

/// Whether the chain at `head` of the descriptor table at `table` (of `size` entries) has a
/// descriptor flagged VIRTQ_DESC_F_INDIRECT. Walks at most `size` descriptors (a chain with a
/// loop ends there, as the chain iterator does); an unreadable descriptor ends the walk (the
/// iterator stops there as well).
pub fn uses_indirect<G: vm_memory::GuestMemory + ?Sized>(
    mem: &G,
    table: u64,
    size: u16,
    head: u16,
) -> bool {
    let mut index = head;
    for _ in 0..size {
        if index >= size {
            return false;
        }
        let Some(addr) = table.checked_add(u64::from(index) * 16) else {
            return false;
        };
        let Ok(desc) = mem.read_obj::<Descriptor>(GuestAddress(addr)) else {
            return false;
        };
        if desc.refers_to_indirect_table() {
            return true;
        }
        if !desc.has_next() {
            return false;
        }
        index = desc.next();
    }
    false
}

#[cfg(test)]
mod tests {
    use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT};
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    use super::*;

    fn mem() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn desc(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags as u16, next))
    }

    #[test]
    fn chains_with_an_indirect_descriptor_are_returned_unused_and_others_pass() {
        let mem = mem();
        let vq = MockSplitQueue::new(&mem, 16);
        // Chain 0: two plain descriptors. Chain 1: a plain one, then an indirect one whose
        // table (4,096 entries) the device must never walk. Chain 2: plain again.
        vq.desc_table()
            .store(0, desc(0x8000, 16, VRING_DESC_F_NEXT, 1))
            .unwrap();
        vq.desc_table().store(1, desc(0x9000, 16, 0, 0)).unwrap();
        vq.desc_table()
            .store(2, desc(0xa000, 16, VRING_DESC_F_NEXT, 3))
            .unwrap();
        vq.desc_table()
            .store(3, desc(0x2_0000, 4096 * 16, VRING_DESC_F_INDIRECT, 0))
            .unwrap();
        vq.desc_table().store(4, desc(0xb000, 16, 0, 0)).unwrap();
        for (i, head) in [0u16, 2, 4].into_iter().enumerate() {
            vq.avail().ring().ref_at(i).unwrap().store(head.to_le());
        }
        vq.avail().idx().store(3);
        let mut q: Queue = vq.create_queue().unwrap();

        assert!(!uses_indirect(&mem, q.desc_table(), q.size(), 0));
        assert!(uses_indirect(&mem, q.desc_table(), q.size(), 2));
        let heads: Vec<u16> = std::iter::from_fn(|| pop(&mut q, &mem))
            .map(|c| c.head_index())
            .collect();
        assert_eq!(heads, [0, 4], "the indirect chain is skipped");
        // It went back to the driver as used, with nothing written.
        assert_eq!(vq.used().idx().load(), 1);
        let used = vq.used().ring().ref_at(0).unwrap().load();
        assert_eq!((used.id(), used.len()), (2, 0));
    }

    #[test]
    fn a_looping_chain_ends_the_walk() {
        let mem = mem();
        let vq = MockSplitQueue::new(&mem, 4);
        for i in 0..4u16 {
            vq.desc_table()
                .store(i, desc(0x8000, 16, VRING_DESC_F_NEXT, (i + 1) % 4))
                .unwrap();
        }
        let q: Queue = vq.create_queue().unwrap();
        assert!(!uses_indirect(&mem, q.desc_table(), q.size(), 0));
        // A next index outside the table ends it too.
        vq.desc_table()
            .store(0, desc(0x8000, 16, VRING_DESC_F_NEXT, 9))
            .unwrap();
        assert!(!uses_indirect(&mem, q.desc_table(), q.size(), 0));
    }
}
