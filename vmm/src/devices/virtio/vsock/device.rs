//! The virtio-vsock device and its worker thread.

use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use tracing::{debug, warn};
use virtio_queue::Queue;
use vmm_sys_util::epoll::EpollEvent;
use vmm_sys_util::eventfd::EventFd;

use super::VsockError;
use super::muxer::Muxer;
use crate::devices::virtio::block::read_config_bytes;
use crate::devices::virtio::mmio::{VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};
use crate::devices::virtio::worker::{Worker, drain_queue, notify_guest, rearm, setup_epoll};
use crate::devices::virtio::{
    ActivateError, ActiveQueue, GuestMemory, Interrupt, VirtioDevice, device_type,
};

const QUEUE_SIZE: u16 = 256;
const RXQ: usize = 0;
const TXQ: usize = 1;
const EVQ: usize = 2;

/// The vsock device: guest CID plus the host Unix socket it bridges to.
pub struct Vsock {
    guest_cid: u64,
    muxer: Option<Muxer>,
    worker: Option<Worker<Option<Muxer>>>,
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
            }
            .run([rx.notify, tx.notify, ev.notify], kill)
        })
        .map_err(ActivateError::Worker)?;
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) -> bool {
        if let Some(w) = self.worker.take() {
            self.muxer = w.stop().flatten();
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
}

impl VsockWorker {
    /// Returns the muxer when stopped, `None` if the event loop could not be set up or failed.
    fn run(mut self, notify: [EventFd; 3], kill: EventFd) -> Option<Muxer> {
        let epoll = match setup_epoll(&[
            (notify[RXQ].as_raw_fd(), RXQ as u64),
            (notify[TXQ].as_raw_fd(), TXQ as u64),
            (notify[EVQ].as_raw_fd(), EVQ as u64),
            (self.muxer.epoll_fd(), TOKEN_MUXER),
            (kill.as_raw_fd(), TOKEN_KILL),
        ]) {
            Ok(e) => e,
            Err(e) => {
                warn!("vsock worker: epoll setup failed: {e}");
                return Some(self.muxer);
            }
        };
        // The driver fills the RX queue right after DRIVER_OK, possibly before we listen.
        self.process_tx();
        self.process_rx();
        let mut events = [EpollEvent::default(); 8];
        loop {
            let timeout = if self.muxer.has_pending_connects() {
                Duration::from_millis(250).as_millis() as i32
            } else {
                -1
            };
            let n = match epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    warn!("vsock worker: epoll_wait failed: {e}");
                    return Some(self.muxer);
                }
            };
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_KILL => return Some(self.muxer),
                    TOKEN_MUXER => self.muxer.process_host_events(),
                    t @ (0..=2) => {
                        let _ = notify[t as usize].read();
                        if t as usize == TXQ {
                            self.process_tx();
                        }
                        // RX kicks mean fresh buffers; event-queue buffers are only used
                        // for transport resets, which we never send.
                    }
                    _ => {}
                }
            }
            self.muxer.expire_connects(Instant::now());
            self.process_rx();
        }
    }

    fn process_tx(&mut self) {
        let muxer = &mut self.muxer;
        let txq = &mut self.queues[TXQ];
        if drain_queue(&self.mem, txq, &self.interrupt, |m, q| {
            muxer.process_tx(m, q)
        }) {
            notify_guest(&self.mem, txq, &self.interrupt);
        }
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
