//! The virtio-net device and its worker thread.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;

use tracing::{debug, warn};
use virtio_bindings::virtio_net::{VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP};
use virtio_queue::Queue;
use vmm_sys_util::epoll::{ControlOperation, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::backend::{NetBackend, NetCounters, NetStats};
use super::mac::MacAddr;
use super::tap::{Tap, TapError};
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
/// Config space: mac[6], status (le16). Later fields belong to features not offered.
const CONFIG_LEN: usize = 8;

/// How the VM builder describes a NIC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// An existing tap interface in the VMM's network namespace.
    pub tap: String,
    /// The guest's address.
    pub mac: MacAddr,
    /// The network namespace (file) the tap lives in; `None`: the VMM's own.
    pub netns: Option<PathBuf>,
}

/// A virtio-net NIC backed by a host tap.
pub struct Net {
    name: String,
    backend: Option<NetBackend>,
    worker: Option<Worker<NetWorker>>,
    counters: Arc<NetCounters>,
    acked_features: u64,
    config: [u8; CONFIG_LEN],
}

impl Net {
    /// Attaches the tap now, so a missing or busy interface is reported when the VM is
    /// built rather than when the guest driver starts.
    pub fn new(config: &NetConfig) -> Result<Net, TapError> {
        let tap = match &config.netns {
            Some(netns) => Tap::open_in_netns(&config.tap, netns)?,
            None => Tap::open(&config.tap)?,
        };
        Ok(Self::with_tap(tap, config.mac))
    }

    /// A NIC on a tap attached beforehand, e.g. by a thread that entered another network
    /// namespace (a pod's) to open it.
    pub fn with_tap(tap: Tap, mac: MacAddr) -> Net {
        Self::with_file(tap.name().to_string(), tap.into_file(), mac)
    }

    /// A NIC on any non-blocking fd that carries one header-prefixed frame per read and
    /// write (a tap, or a datagram socket in tests).
    pub(crate) fn with_file(name: String, file: File, mac: MacAddr) -> Net {
        let counters = Arc::new(NetCounters::default());
        let mut config = [0u8; CONFIG_LEN];
        config[..6].copy_from_slice(&mac.octets());
        config[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        Net {
            backend: Some(NetBackend::new(file, name.clone(), Arc::clone(&counters))),
            name,
            worker: None,
            counters,
            acked_features: 0,
            config,
        }
    }

    /// The host interface's name.
    pub fn tap_name(&self) -> &str {
        &self.name
    }

    /// Frames and bytes moved and refused so far.
    pub fn stats(&self) -> NetStats {
        self.counters.snapshot()
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        device_type::NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 2]
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_EVENT_IDX
            | (1 << VIRTIO_NET_F_MAC)
            | (1 << VIRTIO_NET_F_STATUS)
    }

    fn set_acked_features(&mut self, acked: u64) {
        self.acked_features = acked;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        // The MAC is writable only for legacy drivers, which the transport does not serve.
        debug!(
            "virtio-net {}: config write at {offset:#x} ignored",
            self.name
        );
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        queues: Vec<ActiveQueue>,
        interrupt: Interrupt,
    ) -> Result<(), ActivateError> {
        let got = queues.len();
        let Ok([rx, tx]) = <[ActiveQueue; 2]>::try_from(queues) else {
            return Err(ActivateError::QueueCount { expected: 2, got });
        };
        let backend = self
            .backend
            .take()
            .ok_or_else(|| ActivateError::Other("virtio-net already active".into()))?;
        let worker = Worker::spawn("virtio-net", move |kill| {
            NetWorker {
                backend,
                mem,
                queues: [rx.queue, tx.queue],
                interrupt,
            }
            .run([rx.notify, tx.notify], kill)
        })
        .map_err(ActivateError::Worker)?;
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) -> bool {
        if let Some(w) = self.worker.take() {
            self.backend = w.stop().map(|w| w.backend);
        }
        if let Some(b) = &mut self.backend {
            b.reset();
        }
        self.acked_features = 0;
        self.backend.is_some()
    }

    fn quiesce(&mut self) -> Result<Vec<Queue>, String> {
        let worker = self.worker.take().ok_or("virtio-net is not active")?;
        let stopped = worker.stop().ok_or("virtio-net worker did not stop")?;
        self.backend = Some(stopped.backend);
        Ok(stopped.queues.into())
    }
}

const TOKEN_TAP: u64 = 2;
const TOKEN_KILL: u64 = u64::MAX;

struct NetWorker {
    backend: NetBackend,
    mem: GuestMemory,
    queues: [Queue; 2],
    interrupt: Interrupt,
}

impl NetWorker {
    /// Runs until killed; hands itself back so a driver reset keeps the tap and a snapshot
    /// gets the queues.
    fn run(mut self, notify: [EventFd; 2], kill: EventFd) -> Self {
        let epoll = match setup_epoll(&[
            (notify[RXQ].as_raw_fd(), RXQ as u64),
            (notify[TXQ].as_raw_fd(), TXQ as u64),
            (kill.as_raw_fd(), TOKEN_KILL),
        ]) {
            Ok(e) => e,
            Err(e) => {
                warn!("virtio-net worker: epoll setup failed: {e}");
                return self;
            }
        };
        // Edge-triggered: the tap is read until it is empty or the guest has no buffers;
        // in the latter case the RX queue's kick, not the tap, says when to go on.
        if let Err(e) = epoll.ctl(
            ControlOperation::Add,
            self.backend.raw_fd(),
            EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, TOKEN_TAP),
        ) {
            warn!("virtio-net worker: cannot poll the tap: {e}");
            return self;
        }
        // The driver may have queued frames and buffers before DRIVER_OK.
        let mut tx_pending = self.process_tx();
        self.process_rx();
        let mut events = [EpollEvent::default(); 8];
        loop {
            let n = match epoll.wait(wait_timeout(tx_pending, -1), &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    warn!("virtio-net worker: epoll_wait failed: {e}");
                    return self;
                }
            };
            let mut rx = false;
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_KILL => return self,
                    TOKEN_TAP => rx = true,
                    t if t == RXQ as u64 => {
                        let _ = notify[RXQ].read();
                        rx = true;
                    }
                    t if t == TXQ as u64 => {
                        let _ = notify[TXQ].read();
                        tx_pending = true;
                    }
                    _ => {}
                }
            }
            if tx_pending {
                tx_pending = self.process_tx();
            }
            if rx {
                self.process_rx();
            }
        }
    }

    /// Sends what the driver queued; returns whether frames are left for another pass.
    fn process_tx(&mut self) -> bool {
        let backend = &mut self.backend;
        let txq = &mut self.queues[TXQ];
        drain_and_notify(&self.mem, txq, &self.interrupt, |m, q| {
            backend.process_tx(m, q)
        })
    }

    fn process_rx(&mut self) {
        loop {
            let rxq = &mut self.queues[RXQ];
            if self.backend.process_rx(&self.mem, rxq) {
                notify_guest(&self.mem, rxq, &self.interrupt);
            }
            if !self.backend.rx_starved() {
                return;
            }
            // A frame waits for a buffer: ask for a kick, unless buffers arrived meanwhile.
            if !rearm(&self.mem, rxq, &self.interrupt) {
                return;
            }
        }
    }
}
