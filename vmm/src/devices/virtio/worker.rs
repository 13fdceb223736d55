//! The worker thread every virtio device runs after activation.
//!
//! A worker owns the device's processing state while it runs and hands it back when it is
//! stopped, so a driver reset can restart the device without losing host-side resources (the
//! vsock listener, the block file).

use std::io;
use std::num::Wrapping;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use tracing::warn;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::guest_log::guest_warn;
use super::{GuestMemory, Interrupt, interrupt::INT_VRING};

/// How long a reset waits for a worker to hand its state back. The vCPU that wrote the
/// reset waits with it, so this must stay short; a worker still busy after it is left to
/// finish on its own and the device stays in DEVICE_NEEDS_RESET.
const STOP_TIMEOUT: Duration = Duration::from_secs(2);

/// A running worker thread and the eventfd that stops it.
pub(crate) struct Worker<T: Send + 'static> {
    name: String,
    kill: EventFd,
    thread: Option<JoinHandle<()>>,
    /// The state `body` returns; closed without a value if it panicked.
    done: mpsc::Receiver<T>,
}

impl<T: Send + 'static> Worker<T> {
    /// Spawns `body` on a named thread; `body` must return once the kill eventfd it is given
    /// becomes readable.
    pub(crate) fn spawn<F>(name: &str, body: F) -> io::Result<Self>
    where
        F: FnOnce(EventFd) -> T + Send + 'static,
    {
        let kill = EventFd::new(EFD_NONBLOCK)?;
        let theirs = kill.try_clone()?;
        let (tx, done) = mpsc::sync_channel(1);
        // Confined as a device worker when the VM runs under seccomp (crate::seccomp).
        let thread = crate::seccomp::spawn_worker(name, move || {
            let _ = tx.send(body(theirs));
        })?;
        Ok(Self {
            name: name.to_string(),
            kill,
            thread: Some(thread),
            done,
        })
    }

    /// Stops the thread and returns the state it handed back, or `None` if it panicked or
    /// did not stop within [`STOP_TIMEOUT`].
    pub(crate) fn stop(mut self) -> Option<T> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> Option<T> {
        let thread = self.thread.take()?;
        if let Err(e) = self.kill.write(1) {
            // Without the kick the thread would never return; better to leak it.
            warn!("cannot signal virtio worker {} to stop: {e}", self.name);
            return None;
        }
        match self.done.recv_timeout(STOP_TIMEOUT) {
            Ok(state) => {
                // It has returned its state, so the join is immediate.
                let _ = thread.join();
                Some(state)
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let _ = thread.join();
                warn!("virtio worker {} panicked", self.name);
                None
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                warn!(
                    "virtio worker {} did not stop within {STOP_TIMEOUT:?}; left running",
                    self.name
                );
                None
            }
        }
    }
}

impl<T: Send + 'static> Drop for Worker<T> {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

/// Processes one queue. Returns whether used entries were added (so the driver may need an
/// interrupt).
pub(crate) trait QueueHandler: Send + 'static {
    fn process(&mut self, mem: &GuestMemory, queue: &mut Queue) -> bool;
}

/// How far the driver's available index is ahead of the device's, if that is more than
/// the queue holds: a driver can never have more buffers outstanding than the queue size,
/// so such an index is hostile or corrupt. virtio-queue then pops nothing while
/// `enable_notification` keeps reporting work, and a drain loop would spin forever.
pub(crate) fn avail_overrun(mem: &GuestMemory, queue: &Queue) -> Option<u16> {
    let avail = queue.avail_idx(mem, Ordering::Acquire).ok()?;
    let ahead = (avail - Wrapping(queue.next_avail())).0;
    (ahead > queue.size()).then_some(ahead)
}

/// Re-enables notifications for `queue` and says whether the driver added buffers
/// meanwhile (so the caller processes again). A queue whose available index is impossible
/// marks the device as needing a reset and reports no work, so no loop spins on it; the
/// driver's reset brings it back.
pub(crate) fn rearm(mem: &GuestMemory, queue: &mut Queue, interrupt: &Interrupt) -> bool {
    match queue.enable_notification(mem) {
        Ok(true) => match avail_overrun(mem, queue) {
            None => true,
            Some(ahead) => {
                if interrupt.set_needs_reset() {
                    warn!(
                        "virtio queue: the driver's available index is {ahead} entries ahead of a queue of {}; device needs a reset",
                        queue.size()
                    );
                }
                false
            }
        },
        Ok(false) => false,
        Err(e) => {
            guest_warn!("virtio queue: cannot enable notifications: {e}");
            false
        }
    }
}

/// Process-and-re-arm rounds one [`drain_queue`] call makes before it returns with work
/// left, so that a worker checks for a stop at least this often.
const MAX_DRAIN_ROUNDS: usize = 8;

/// What [`drain_queue`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Drained {
    /// Used entries were added (the driver may need an interrupt).
    pub used: bool,
    /// The queue still has work: the caller comes back to it after checking for a stop.
    pub pending: bool,
}

/// Drains `queue` with notifications suppressed, then re-enables them; repeats if the driver
/// added buffers in between (the classic race with VIRTIO_RING_F_EVENT_IDX), at most
/// [`MAX_DRAIN_ROUNDS`] times.
pub(crate) fn drain_queue(
    mem: &GuestMemory,
    queue: &mut Queue,
    interrupt: &Interrupt,
    mut process: impl FnMut(&GuestMemory, &mut Queue) -> bool,
) -> Drained {
    let mut used = false;
    for _ in 0..MAX_DRAIN_ROUNDS {
        if let Err(e) = queue.disable_notification(mem) {
            guest_warn!("virtio queue: cannot disable notifications: {e}");
        }
        used |= process(mem, queue);
        if !rearm(mem, queue, interrupt) {
            return Drained {
                used,
                pending: false,
            };
        }
    }
    Drained {
        used,
        pending: true,
    }
}

/// [`drain_queue`], then the interrupt if entries were used; returns whether work is left.
pub(crate) fn drain_and_notify(
    mem: &GuestMemory,
    queue: &mut Queue,
    interrupt: &Interrupt,
    process: impl FnMut(&GuestMemory, &mut Queue) -> bool,
) -> bool {
    let drained = drain_queue(mem, queue, interrupt, process);
    if drained.used {
        notify_guest(mem, queue, interrupt);
    }
    drained.pending
}

/// The epoll timeout of a worker loop: none while a queue has work left, so that the loop
/// only checks for events (a stop) before it goes on with it.
pub(crate) fn wait_timeout(pending: bool, otherwise: i32) -> i32 {
    if pending { 0 } else { otherwise }
}

/// Raises the used-buffer interrupt if the driver wants one for `queue`.
pub(crate) fn notify_guest(mem: &GuestMemory, queue: &mut Queue, interrupt: &Interrupt) {
    // On a ring error, interrupt anyway: a spurious interrupt is harmless, a lost one hangs
    // the driver.
    let needed = queue.needs_notification(mem).unwrap_or(true);
    if needed && let Err(e) = interrupt.trigger(INT_VRING) {
        warn!("virtio: cannot raise interrupt: {e}");
    }
}

const TOKEN_KILL: u64 = u64::MAX;

/// Runs a single-queue device: processes the queue once at start (the driver may have
/// queued buffers before it set DRIVER_OK) and on each notification, until killed. Hands
/// back the handler and the queue (whose positions a snapshot saves).
pub(crate) fn run_single_queue<H: QueueHandler>(
    mut handler: H,
    mem: GuestMemory,
    mut queue: Queue,
    notify: EventFd,
    interrupt: Interrupt,
    kill: EventFd,
) -> (H, Queue) {
    let epoll = match setup_epoll(&[(notify.as_raw_fd(), 0), (kill.as_raw_fd(), TOKEN_KILL)]) {
        Ok(e) => e,
        Err(e) => {
            warn!("virtio worker: epoll setup failed: {e}");
            return (handler, queue);
        }
    };
    let mut pending = drain_and_notify(&mem, &mut queue, &interrupt, |m, q| handler.process(m, q));
    let mut events = [EpollEvent::default(); 4];
    loop {
        let n = match epoll.wait(wait_timeout(pending, -1), &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                warn!("virtio worker: epoll_wait failed: {e}");
                return (handler, queue);
            }
        };
        let mut kicked = false;
        for ev in &events[..n] {
            if ev.data() == TOKEN_KILL {
                return (handler, queue);
            }
            // Clearing the counter before processing means a kick that arrives during
            // processing wakes us again instead of being lost.
            let _ = notify.read();
            kicked = true;
        }
        if kicked || pending {
            pending = drain_and_notify(&mem, &mut queue, &interrupt, |m, q| handler.process(m, q));
        }
    }
}

/// Creates an epoll instance watching each fd for input, tagged with its token.
pub(crate) fn setup_epoll(fds: &[(i32, u64)]) -> io::Result<Epoll> {
    let epoll = Epoll::new()?;
    for &(fd, token) in fds {
        epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, token),
        )?;
    }
    Ok(epoll)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    use virtio_queue::desc::{RawDescriptor, split::Descriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    use super::*;
    use crate::devices::virtio::interrupt::INT_CONFIG;

    fn mem() -> GuestMemory {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn interrupt() -> Interrupt {
        Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap())
    }

    /// Pops and uses every chain; panics instead of spinning forever.
    fn counting_process(calls: &mut u32) -> impl FnMut(&GuestMemory, &mut Queue) -> bool + '_ {
        move |m, q| {
            *calls += 1;
            assert!(*calls < 100, "the drain loop spins");
            let mut used = false;
            while let Some(chain) = q.pop_descriptor_chain(m) {
                q.add_used(m, chain.head_index(), 0).unwrap();
                used = true;
            }
            used
        }
    }

    #[test]
    fn an_avail_index_beyond_the_queue_size_needs_reset_instead_of_spinning() {
        let mem = mem();
        let vq = MockSplitQueue::new(&mem, 16);
        // The driver claims 21 new buffers in a queue of 16.
        vq.avail().idx().store(21);
        let mut q: Queue = vq.create_queue().unwrap();
        let irq = interrupt();
        let mut calls = 0;
        let drained = drain_queue(&mem, &mut q, &irq, counting_process(&mut calls));
        assert!(!drained.used && !drained.pending);
        assert_eq!(calls, 1);
        assert!(irq.needs_reset());
        assert_ne!(irq.status() & INT_CONFIG, 0, "the driver is told");
        assert_eq!(avail_overrun(&mem, &q), Some(21));
        // Further kicks cost one pass each and mark nothing new.
        assert!(!irq.set_needs_reset(), "already marked");
        let mut calls = 0;
        drain_queue(&mem, &mut q, &irq, counting_process(&mut calls));
        assert_eq!(calls, 1);
        // The index wraps: 65535 ahead is as impossible as 21.
        vq.avail().idx().store(u16::MAX);
        assert_eq!(avail_overrun(&mem, &q), Some(u16::MAX));
        assert!(!rearm(&mem, &mut q, &irq));
    }

    /// Found by the snapshot fuzz target (a restored block device whose used ring lay over
    /// its available ring; any driver can set that up): every used entry made a new
    /// available one, the drain never ended, and the worker never saw its stop request (the
    /// reset gave up after the 2 s stop timeout, holding the vCPU, and left it spinning).
    #[test]
    fn a_queue_that_refills_itself_is_drained_in_bounded_rounds() {
        let mem = mem();
        let vq = MockSplitQueue::new(&mem, 16);
        let d = RawDescriptor::from(Descriptor::new(0x8_0000, 0x100, 0, 0));
        vq.add_desc_chains(std::slice::from_ref(&d), 0).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let irq = interrupt();
        let mut calls = 0;
        let drained = {
            let mut process = counting_process(&mut calls);
            // As with overlapping rings: each pass's used entry is also a new available one.
            drain_queue(&mem, &mut q, &irq, |m, q| {
                let used = process(m, q);
                let avail = vq.avail().idx().load();
                vq.avail().idx().store(avail.wrapping_add(1));
                used
            })
        };
        assert_eq!(
            drained,
            Drained {
                used: true,
                pending: true
            }
        );
        assert_eq!(calls, MAX_DRAIN_ROUNDS as u32);
        assert!(!irq.needs_reset(), "a fast driver looks the same: no reset");
    }

    #[test]
    fn a_sane_queue_drains_and_needs_no_reset() {
        let mem = mem();
        let vq = MockSplitQueue::new(&mem, 16);
        let chains: Vec<RawDescriptor> = (0..16u16)
            .map(|i| {
                RawDescriptor::from(Descriptor::new(
                    0x8_0000 + u64::from(i) * 0x100,
                    0x100,
                    0,
                    0,
                ))
            })
            .collect();
        for (i, d) in chains.iter().enumerate() {
            vq.add_desc_chains(std::slice::from_ref(d), i as u16)
                .unwrap();
        }
        let mut q: Queue = vq.create_queue().unwrap();
        assert_eq!(avail_overrun(&mem, &q), None, "a full queue is legal");
        let irq = interrupt();
        let mut calls = 0;
        let drained = drain_queue(&mem, &mut q, &irq, counting_process(&mut calls));
        assert!(drained.used && !drained.pending);
        assert_eq!(vq.used().idx().load(), 16);
        assert!(!irq.needs_reset());
        assert!(!rearm(&mem, &mut q, &irq), "nothing left");
    }

    #[test]
    fn stop_returns_the_workers_state() {
        let w = Worker::spawn("test-worker", |kill: EventFd| {
            while kill.read().is_err() {
                std::thread::sleep(Duration::from_millis(1));
            }
            7u32
        })
        .unwrap();
        assert_eq!(w.stop(), Some(7));
        let w = Worker::<u32>::spawn("test-panic", |_| panic!("worker bug")).unwrap();
        assert_eq!(w.stop(), None);
    }

    /// A worker stuck in a device (a hostile guest's doing or our bug) must not hold the
    /// vCPU that resets the device forever.
    #[test]
    fn stop_gives_up_on_a_worker_that_does_not_return() {
        let release = Arc::new(AtomicBool::new(false));
        let r = release.clone();
        let w = Worker::spawn("test-stuck", move |_kill| {
            while !r.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(5));
            }
        })
        .unwrap();
        assert_eq!(w.stop(), None);
        release.store(true, Ordering::SeqCst);
    }
}
