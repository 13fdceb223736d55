//! The worker thread every virtio device runs after activation.
//!
//! A worker owns the device's processing state while it runs and hands it back when it is
//! stopped, so a driver reset can restart the device without losing host-side resources (the
//! vsock listener, the block file).

use std::io;
use std::os::fd::AsRawFd;
use std::thread::JoinHandle;

use tracing::warn;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::{GuestMemory, Interrupt, interrupt::INT_VRING};

/// A running worker thread and the eventfd that stops it.
pub(crate) struct Worker<T: Send + 'static> {
    kill: EventFd,
    thread: Option<JoinHandle<T>>,
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
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || body(theirs))?;
        Ok(Self {
            kill,
            thread: Some(thread),
        })
    }

    /// Stops the thread and returns the state it handed back, or `None` if it panicked.
    pub(crate) fn stop(mut self) -> Option<T> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> Option<T> {
        let thread = self.thread.take()?;
        if let Err(e) = self.kill.write(1) {
            // Without the kick the join below would hang forever; better to leak the thread.
            warn!("cannot signal virtio worker to stop: {e}");
            return None;
        }
        thread.join().ok()
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

/// Drains `queue` with notifications suppressed, then re-enables them; repeats if the driver
/// added buffers in between (the classic race with VIRTIO_RING_F_EVENT_IDX).
pub(crate) fn drain_queue(
    mem: &GuestMemory,
    queue: &mut Queue,
    mut process: impl FnMut(&GuestMemory, &mut Queue) -> bool,
) -> bool {
    let mut used = false;
    loop {
        if let Err(e) = queue.disable_notification(mem) {
            warn!("virtio queue: cannot disable notifications: {e}");
        }
        used |= process(mem, queue);
        match queue.enable_notification(mem) {
            Ok(true) => continue,
            Ok(false) => break,
            Err(e) => {
                warn!("virtio queue: cannot enable notifications: {e}");
                break;
            }
        }
    }
    used
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
/// queued buffers before it set DRIVER_OK) and on each notification, until killed.
pub(crate) fn run_single_queue<H: QueueHandler>(
    mut handler: H,
    mem: GuestMemory,
    mut queue: Queue,
    notify: EventFd,
    interrupt: Interrupt,
    kill: EventFd,
) -> H {
    let epoll = match setup_epoll(&[(notify.as_raw_fd(), 0), (kill.as_raw_fd(), TOKEN_KILL)]) {
        Ok(e) => e,
        Err(e) => {
            warn!("virtio worker: epoll setup failed: {e}");
            return handler;
        }
    };
    if drain_queue(&mem, &mut queue, |m, q| handler.process(m, q)) {
        notify_guest(&mem, &mut queue, &interrupt);
    }
    let mut events = [EpollEvent::default(); 4];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                warn!("virtio worker: epoll_wait failed: {e}");
                return handler;
            }
        };
        for ev in &events[..n] {
            if ev.data() == TOKEN_KILL {
                return handler;
            }
            // Clearing the counter before processing means a kick that arrives during
            // processing wakes us again instead of being lost.
            let _ = notify.read();
            if drain_queue(&mem, &mut queue, |m, q| handler.process(m, q)) {
                notify_guest(&mem, &mut queue, &interrupt);
            }
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
