//! The virtio-vsock device and its worker thread.

use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tracing::{debug, warn};
use virtio_queue::{Queue, QueueT};
use vm_memory::Bytes;
use vmm_sys_util::epoll::{ControlOperation, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::VsockError;
use super::muxer::Muxer;
use crate::devices::virtio::block::read_config_bytes;
use crate::devices::virtio::mmio::{VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};
use crate::devices::virtio::worker::{
    Worker, drain_and_notify, notify_guest, rearm, setup_epoll, wait_timeout,
};
use crate::devices::virtio::{
    ActivateError, ActiveQueue, GuestMemory, Interrupt, VirtioDevice, device_type,
};

const QUEUE_SIZE: u16 = 256;
const RXQ: usize = 0;
const TXQ: usize = 1;
const EVQ: usize = 2;
/// How often a restored device looks for the driver's event-queue refill: at first, then
/// at most (doubling in between), so a slow guest costs few wake-ups.
const RESET_POLL_FIRST: Duration = Duration::from_millis(2);
const RESET_POLL_MAX: Duration = Duration::from_millis(50);
/// How long host connections wait for the driver to take the transport reset. A guest
/// kernel run by an instruction emulator, restored beside seven others on two cores, took
/// over a second (CI: 3 of 8 first RPCs reset); a guest that never takes it only delays
/// its own connections.
const RESET_WAIT: Duration = Duration::from_secs(60);
/// virtio_vsock_event.id of a transport reset.
const VIRTIO_VSOCK_EVENT_TRANSPORT_RESET: u32 = 0;

/// The vsock device: guest CID plus the host Unix socket it bridges to.
pub struct Vsock {
    guest_cid: u64,
    muxer: Option<Muxer>,
    worker: Option<Worker<VsockWorker>>,
    acked_features: u64,
}

impl Vsock {
    /// Binds the host-side listener at `uds_path` right away, so a path conflict is
    /// reported at VM construction (see [`Muxer::new`] for stale sockets).
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Vsock, VsockError> {
        // 0-2 are reserved, and Linux keeps CIDs in 32 bits with u32::MAX meaning "any".
        if !(3..u64::from(u32::MAX)).contains(&guest_cid) {
            return Err(VsockError::InvalidCid(guest_cid));
        }
        Ok(Vsock {
            guest_cid,
            muxer: Some(Muxer::new(guest_cid, uds_path)?),
            worker: None,
            acked_features: 0,
        })
    }

    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// Starts the worker; `transport_reset`: first tell the driver that every connection
    /// is gone (after a restore, the host side of them no longer exists).
    fn start(
        &mut self,
        mem: GuestMemory,
        queues: Vec<ActiveQueue>,
        interrupt: Interrupt,
        transport_reset: bool,
    ) -> Result<(), ActivateError> {
        let got = queues.len();
        let Ok([rx, tx, ev]) = <[ActiveQueue; 3]>::try_from(queues) else {
            return Err(ActivateError::QueueCount { expected: 3, got });
        };
        let muxer = self
            .muxer
            .take()
            .ok_or_else(|| ActivateError::Other("vsock already active".into()))?;
        let worker = Worker::spawn("virtio-vsock", move |kill| {
            VsockWorker {
                muxer,
                mem,
                queues: [rx.queue, tx.queue, ev.queue],
                interrupt,
                transport_reset,
                reset_sent: false,
                evq_avail_at_reset: None,
            }
            .run([rx.notify, tx.notify, ev.notify], kill)
        })
        .map_err(ActivateError::Worker)?;
        self.worker = Some(worker);
        Ok(())
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        device_type::VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 3]
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX
    }

    fn set_acked_features(&mut self, acked: u64) {
        self.acked_features = acked;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.guest_cid.to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        debug!("vsock: config write at {offset:#x} ignored");
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        queues: Vec<ActiveQueue>,
        interrupt: Interrupt,
    ) -> Result<(), ActivateError> {
        self.start(mem, queues, interrupt, false)
    }

    fn activate_restored(
        &mut self,
        mem: GuestMemory,
        queues: Vec<ActiveQueue>,
        interrupt: Interrupt,
    ) -> Result<(), ActivateError> {
        self.start(mem, queues, interrupt, true)
    }

    fn quiesce(&mut self) -> Result<Vec<Queue>, String> {
        let worker = self.worker.take().ok_or("virtio-vsock is not active")?;
        let stopped = worker.stop().ok_or("virtio-vsock worker did not stop")?;
        self.muxer = Some(stopped.muxer);
        Ok(stopped.queues.into())
    }

    fn reset(&mut self) -> bool {
        if let Some(w) = self.worker.take() {
            self.muxer = w.stop().map(|w| w.muxer);
        }
        if let Some(m) = &mut self.muxer {
            m.reset();
        }
        self.acked_features = 0;
        self.muxer.is_some()
    }
}

const TOKEN_MUXER: u64 = 3;
const TOKEN_KILL: u64 = u64::MAX;

struct VsockWorker {
    muxer: Muxer,
    mem: GuestMemory,
    queues: [Queue; 3],
    interrupt: Interrupt,
    /// Send VIRTIO_VSOCK_EVENT_TRANSPORT_RESET before anything else.
    transport_reset: bool,
    /// The reset went out and the driver has not refilled the event queue yet.
    reset_sent: bool,
    /// The event queue's available index when the reset went out.
    evq_avail_at_reset: Option<u16>,
}

impl VsockWorker {
    /// Runs until killed or the event loop fails; hands itself back (muxer and queues).
    fn run(mut self, notify: [EventFd; 3], kill: EventFd) -> Self {
        // After a restore, host connections wait (in the listener's backlog) until the
        // driver has taken the transport reset, which would otherwise also reset them: the
        // driver refills and kicks the event queue once it has, or a deadline passes.
        let mut muxer_waits = self.transport_reset;
        let reset_deadline = Instant::now() + RESET_WAIT;
        let mut poll = RESET_POLL_FIRST;
        let mut fds = vec![
            (notify[RXQ].as_raw_fd(), RXQ as u64),
            (notify[TXQ].as_raw_fd(), TXQ as u64),
            (notify[EVQ].as_raw_fd(), EVQ as u64),
            (kill.as_raw_fd(), TOKEN_KILL),
        ];
        if !muxer_waits {
            fds.push((self.muxer.epoll_fd(), TOKEN_MUXER));
        }
        let epoll = match setup_epoll(&fds) {
            Ok(e) => e,
            Err(e) => {
                warn!("vsock worker: epoll setup failed: {e}");
                return self;
            }
        };
        if self.transport_reset {
            self.send_transport_reset();
        }
        // The driver fills the RX queue right after DRIVER_OK, possibly before we listen.
        let mut tx_pending = self.process_tx();
        self.process_rx();
        let mut events = [EpollEvent::default(); 8];
        loop {
            if muxer_waits && (!self.transport_reset_sent() || Instant::now() >= reset_deadline) {
                muxer_waits = false;
                if self.transport_reset_sent() {
                    warn!(
                        "vsock: the guest did not take the transport reset in {}s; host \
                         connections go ahead and may be reset by it",
                        RESET_WAIT.as_secs()
                    );
                }
                if let Err(e) = epoll.ctl(
                    ControlOperation::Add,
                    self.muxer.epoll_fd(),
                    EpollEvent::new(EventSet::IN, TOKEN_MUXER),
                ) {
                    warn!("vsock worker: cannot poll the host side: {e}");
                    return self;
                }
            }
            let timeout = if muxer_waits {
                // The refill is seen by polling the event queue's available index: with
                // EVENT_IDX the driver does not kick for it (its other event buffers are
                // still posted, so it is past the index we asked to hear about).
                let wait = reset_deadline
                    .saturating_duration_since(Instant::now())
                    .min(poll);
                poll = (poll * 2).min(RESET_POLL_MAX);
                wait.as_millis() as i32
            } else if self.muxer.has_pending_connects() {
                Duration::from_millis(250).as_millis() as i32
            } else {
                -1
            };
            let n = match epoll.wait(wait_timeout(tx_pending, timeout), &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    warn!("vsock worker: epoll_wait failed: {e}");
                    return self;
                }
            };
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_KILL => return self,
                    TOKEN_MUXER => self.muxer.process_host_events(),
                    t @ (0..=2) => {
                        let _ = notify[t as usize].read();
                        if t as usize == TXQ {
                            tx_pending = true;
                        }
                        // RX kicks mean fresh buffers; event-queue buffers are only used
                        // for the transport reset after a restore.
                        if t as usize == EVQ {
                            if self.transport_reset {
                                self.send_transport_reset();
                            } else if self.reset_sent {
                                // The driver took the reset and refilled the queue.
                                self.reset_sent = false;
                            }
                        }
                    }
                    _ => {}
                }
            }
            if tx_pending {
                tx_pending = self.process_tx();
            }
            if self.reset_sent && self.event_queue_refilled() {
                self.reset_sent = false;
                debug!("vsock: the driver took the transport reset");
            }
            self.muxer.expire_connects(Instant::now());
            self.process_rx();
        }
    }

    /// Whether the driver posted event buffers since the transport reset went out: it
    /// refills only after handling the reset.
    fn event_queue_refilled(&self) -> bool {
        let Some(at_reset) = self.evq_avail_at_reset else {
            return false;
        };
        self.queues[EVQ]
            .avail_idx(&self.mem, Ordering::Acquire)
            .is_ok_and(|idx| idx.0 != at_reset)
    }

    /// Tells the driver every connection was reset (virtio 1.2, 5.10.6.5); waits for an
    /// event buffer if the driver has none posted yet.
    fn send_transport_reset(&mut self) {
        let evq = &mut self.queues[EVQ];
        let Some(chain) = crate::devices::virtio::chain::pop(evq, &self.mem) else {
            debug!("vsock: no event buffer for the transport reset yet");
            return;
        };
        let head = chain.head_index();
        let event = VIRTIO_VSOCK_EVENT_TRANSPORT_RESET.to_le_bytes();
        let mut len = 0;
        if let Some(d) = chain
            .clone()
            .find(|d| d.is_write_only() && d.len() as usize >= event.len())
        {
            match self.mem.write_slice(&event, d.addr()) {
                Ok(()) => len = event.len() as u32,
                Err(e) => debug!("vsock: event buffer outside guest memory: {e}"),
            }
        }
        if let Err(e) = evq.add_used(&self.mem, head, len) {
            debug!("vsock: cannot return the event buffer: {e}");
        }
        notify_guest(&self.mem, evq, &self.interrupt);
        if len > 0 {
            self.transport_reset = false;
            self.reset_sent = true;
            self.evq_avail_at_reset = evq
                .avail_idx(&self.mem, Ordering::Acquire)
                .ok()
                .map(|w| w.0);
            // So that the driver's refill of the event queue kicks us.
            if let Err(e) = evq.enable_notification(&self.mem) {
                debug!("vsock: event queue notifications: {e}");
            }
            tracing::info!("vsock: told the guest its connections were reset");
        }
    }

    /// Whether the driver still has a transport reset to take.
    fn transport_reset_sent(&self) -> bool {
        self.transport_reset || self.reset_sent
    }

    /// Takes the packets the driver queued; returns whether some are left for another pass.
    fn process_tx(&mut self) -> bool {
        let muxer = &mut self.muxer;
        let txq = &mut self.queues[TXQ];
        drain_and_notify(&self.mem, txq, &self.interrupt, |m, q| {
            muxer.process_tx(m, q)
        })
    }

    fn process_rx(&mut self) {
        loop {
            let used = self.muxer.fill_rx(&self.mem, &mut self.queues[RXQ]);
            if used {
                notify_guest(&self.mem, &mut self.queues[RXQ], &self.interrupt);
            }
            if !self.muxer.rx_starved() {
                return;
            }
            // Out of buffers with work left: ask for a kick, unless buffers arrived meanwhile.
            if !rearm(&self.mem, &mut self.queues[RXQ], &self.interrupt) {
                return;
            }
        }
    }
}
