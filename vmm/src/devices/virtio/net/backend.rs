//! Moves frames between the device's queues and the tap file.
//!
//! Everything in a chain is guest-controlled: each chain is checked (direction of every
//! descriptor, bounds in guest memory, a chain cut short, total size) before a byte moves,
//! and a bad chain costs the guest that chain, never the device.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tracing::warn;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestMemoryBackend};

use super::{ETH_HLEN, MAX_FRAME_LEN, VNET_HDR_LEN};
use crate::devices::virtio::GuestMemory;

/// Offset of `gso_type` in `virtio_net_hdr_v1`.
const HDR_GSO_TYPE: usize = 1;
/// Offset of `num_buffers` (le16) in `virtio_net_hdr_v1`.
const HDR_NUM_BUFFERS: usize = 10;
/// VIRTIO_NET_HDR_GSO_NONE.
const GSO_NONE: u8 = 0;
/// Largest header + frame either way.
const BUF_LEN: usize = VNET_HDR_LEN + MAX_FRAME_LEN;

/// What the device moved and refused since it was created.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Frames delivered to the guest, and their bytes (headers excluded).
    pub rx_frames: u64,
    pub rx_bytes: u64,
    /// Frames from the tap the guest could not take: larger than the guest's buffer
    /// chain, shorter than an Ethernet header, or offloaded (GSO) despite offloads off.
    pub rx_dropped: u64,
    /// RX chains the guest posted that were unusable (device-readable descriptors,
    /// outside guest memory, cut short); each is returned to the guest empty.
    pub rx_bad_chains: u64,
    /// Failed reads of the tap (e.g. the interface was deleted under the VMM).
    pub rx_errors: u64,
    /// Frames the guest sent that reached the tap, and their bytes (headers excluded).
    pub tx_frames: u64,
    pub tx_bytes: u64,
    /// TX chains refused: malformed, larger than [`MAX_FRAME_LEN`], or shorter than the
    /// headers.
    pub tx_dropped: u64,
    /// Frames the tap refused to take (write error).
    pub tx_errors: u64,
}

/// Shared between the worker (which counts) and the device (which reports).
#[derive(Debug, Default)]
pub(crate) struct NetCounters {
    rx_frames: AtomicU64,
    rx_bytes: AtomicU64,
    rx_dropped: AtomicU64,
    rx_bad_chains: AtomicU64,
    rx_errors: AtomicU64,
    tx_frames: AtomicU64,
    tx_bytes: AtomicU64,
    tx_dropped: AtomicU64,
    tx_errors: AtomicU64,
}

impl NetCounters {
    pub(crate) fn snapshot(&self) -> NetStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        NetStats {
            rx_frames: get(&self.rx_frames),
            rx_bytes: get(&self.rx_bytes),
            rx_dropped: get(&self.rx_dropped),
            rx_bad_chains: get(&self.rx_bad_chains),
            rx_errors: get(&self.rx_errors),
            tx_frames: get(&self.tx_frames),
            tx_bytes: get(&self.tx_bytes),
            tx_dropped: get(&self.tx_dropped),
            tx_errors: get(&self.tx_errors),
        }
    }
}

/// Adds one to `counter`; true when the new value is a power of two, so that a guest
/// (or a flood on the tap) repeating the same fault logs a handful of lines, not millions.
fn bump(counter: &AtomicU64) -> bool {
    (counter.fetch_add(1, Ordering::Relaxed) + 1).is_power_of_two()
}

fn add(counter: &AtomicU64, n: usize) {
    counter.fetch_add(n as u64, Ordering::Relaxed);
}

/// Why an RX chain did not receive the pending frame.
enum RxRefusal {
    /// The chain itself is unusable; it goes back to the guest empty.
    BadChain(&'static str),
    /// A valid chain too small for this frame: the frame is dropped, the chain kept.
    TooSmall(u64),
}

/// The tap (or, in tests, any fd with one frame per read/write) and the frame buffers.
pub(crate) struct NetBackend {
    file: File,
    /// Interface name, for logs.
    name: String,
    counters: Arc<NetCounters>,
    /// A frame read from the tap, header first; `rx_len` bytes of it are valid.
    rx_buf: Box<[u8]>,
    /// Length of the frame in `rx_buf` that waits for a guest buffer, if any.
    rx_pending: Option<usize>,
    /// The last `process_rx` stopped because the guest had no RX buffer for a frame.
    rx_starved: bool,
    tx_buf: Box<[u8]>,
    /// Descriptors of the chain being filled (reused to avoid an allocation per frame).
    descs: Vec<Descriptor>,
}

impl NetBackend {
    pub(crate) fn new(file: File, name: String, counters: Arc<NetCounters>) -> Self {
        NetBackend {
            file,
            name,
            counters,
            rx_buf: vec![0u8; BUF_LEN].into_boxed_slice(),
            rx_pending: None,
            rx_starved: false,
            tx_buf: vec![0u8; BUF_LEN].into_boxed_slice(),
            descs: Vec::new(),
        }
    }

    /// The fd to poll for frames from the host.
    pub(crate) fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Whether the last [`process_rx`](Self::process_rx) kept a frame for lack of guest
    /// buffers; the tap is not read again until the guest posts some.
    pub(crate) fn rx_starved(&self) -> bool {
        self.rx_starved
    }

    /// Forgets a frame held for the guest (after a driver reset).
    pub(crate) fn reset(&mut self) {
        self.rx_pending = None;
        self.rx_starved = false;
    }

    // ---- guest to host -----------------------------------------------------------------

    /// Sends every frame the guest queued; returns whether used entries were added.
    pub(crate) fn process_tx(&mut self, mem: &GuestMemory, queue: &mut Queue) -> bool {
        let mut used = false;
        let mut pass = crate::devices::virtio::chain::Pass::new(queue);
        while let Some(chain) = pass.pop(queue, mem) {
            let head = chain.head_index();
            match self.read_tx_chain(mem, chain) {
                Ok(len) => self.send(len),
                Err(why) => {
                    if bump(&self.counters.tx_dropped) {
                        warn!("virtio-net {}: TX chain dropped: {why}", self.name);
                    }
                }
            }
            // TX buffers are only read: the used length is zero.
            if let Err(e) = queue.add_used(mem, head, 0) {
                warn!("virtio-net {}: cannot add used TX entry: {e}", self.name);
            }
            used = true;
        }
        used
    }

    /// Copies a TX chain (header + frame) into `tx_buf`; returns its length.
    fn read_tx_chain(
        &mut self,
        mem: &GuestMemory,
        chain: impl Iterator<Item = Descriptor>,
    ) -> Result<usize, &'static str> {
        let mut len = 0usize;
        let mut cut_short = false;
        for d in chain {
            if d.is_write_only() {
                return Err("device-writable descriptor in a TX chain");
            }
            let end = len
                .checked_add(d.len() as usize)
                .filter(|&end| end <= self.tx_buf.len())
                .ok_or("frame larger than the largest Ethernet frame")?;
            mem.read_slice(&mut self.tx_buf[len..end], d.addr())
                .map_err(|_| "buffer outside guest memory")?;
            len = end;
            cut_short = d.has_next();
        }
        // The chain iterator stops at a descriptor it cannot follow (index out of the
        // table, a loop longer than the queue): the frame would be incomplete.
        if cut_short {
            return Err("chain cut short (loop or bad descriptor index)");
        }
        if len < VNET_HDR_LEN + ETH_HLEN {
            return Err("shorter than the virtio-net and Ethernet headers");
        }
        Ok(len)
    }

    /// Writes `tx_buf[..len]` to the tap with a zeroed header: no offload was negotiated,
    /// so whatever checksum or GSO request the guest put there is not passed on.
    fn send(&mut self, len: usize) {
        self.tx_buf[..VNET_HDR_LEN].fill(0);
        // A tap takes a frame whole or not at all; a short count would be a bug elsewhere.
        let result = match (&self.file).write(&self.tx_buf[..len]) {
            Ok(n) if n == len => Ok(()),
            Ok(n) => Err(io::Error::other(format!("short write: {n} of {len} bytes"))),
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => {
                self.counters.tx_frames.fetch_add(1, Ordering::Relaxed);
                add(&self.counters.tx_bytes, len - VNET_HDR_LEN);
            }
            Err(e) => {
                if bump(&self.counters.tx_errors) {
                    warn!("virtio-net {}: tap write failed: {e}", self.name);
                }
            }
        }
    }

    // ---- host to guest -----------------------------------------------------------------

    /// Moves frames from the tap into guest RX buffers until the tap is empty or the guest
    /// runs out of buffers (then the frame in hand is kept, and [`rx_starved`] is set).
    /// Returns whether used entries were added.
    ///
    /// [`rx_starved`]: Self::rx_starved
    pub(crate) fn process_rx(&mut self, mem: &GuestMemory, queue: &mut Queue) -> bool {
        let mut used = false;
        self.rx_starved = false;
        loop {
            let len = match self.rx_pending {
                Some(len) => len,
                None => match self.read_frame() {
                    Some(len) => len,
                    None => break,
                },
            };
            self.rx_pending = Some(len);
            let Some(chain) = crate::devices::virtio::chain::pop(queue, mem) else {
                self.rx_starved = true;
                break;
            };
            let head = chain.head_index();
            match self.write_rx_chain(mem, chain, len) {
                Ok(()) => {
                    self.rx_pending = None;
                    self.counters.rx_frames.fetch_add(1, Ordering::Relaxed);
                    add(&self.counters.rx_bytes, len - VNET_HDR_LEN);
                    // `len` <= BUF_LEN, far below u32::MAX.
                    if let Err(e) = queue.add_used(mem, head, len as u32) {
                        warn!("virtio-net {}: cannot add used RX entry: {e}", self.name);
                    }
                    used = true;
                }
                Err(RxRefusal::BadChain(why)) => {
                    if bump(&self.counters.rx_bad_chains) {
                        warn!("virtio-net {}: RX chain returned unused: {why}", self.name);
                    }
                    if let Err(e) = queue.add_used(mem, head, 0) {
                        warn!("virtio-net {}: cannot add used RX entry: {e}", self.name);
                    }
                    used = true;
                }
                Err(RxRefusal::TooSmall(room)) => {
                    // Without mergeable buffers a frame must fit one chain; this one never
                    // will, and holding it would stall the queue. The chain serves the next.
                    queue.go_to_previous_position();
                    self.rx_pending = None;
                    if bump(&self.counters.rx_dropped) {
                        warn!(
                            "virtio-net {}: {}-byte frame dropped: the guest's RX buffers hold {room} bytes",
                            self.name,
                            len - VNET_HDR_LEN,
                        );
                    }
                }
            }
        }
        used
    }

    /// Reads the next acceptable frame from the tap into `rx_buf`, with the header
    /// rewritten for the guest; `None` when there is none right now.
    fn read_frame(&mut self) -> Option<usize> {
        loop {
            let len = match (&self.file).read(&mut self.rx_buf) {
                // A tap never reads empty; a socket standing in for one does at EOF.
                Ok(0) => return None,
                Ok(len) => len,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    if bump(&self.counters.rx_errors) {
                        warn!("virtio-net {}: tap read failed: {e}", self.name);
                    }
                    return None;
                }
            };
            if len < VNET_HDR_LEN + ETH_HLEN {
                if bump(&self.counters.rx_dropped) {
                    warn!(
                        "virtio-net {}: runt frame of {len} bytes dropped",
                        self.name
                    );
                }
                continue;
            }
            if self.rx_buf[HDR_GSO_TYPE] != GSO_NONE {
                // Offloads are off on the tap; a GSO frame would exceed the guest's MTU.
                if bump(&self.counters.rx_dropped) {
                    warn!(
                        "virtio-net {}: GSO frame (type {}) dropped",
                        self.name, self.rx_buf[HDR_GSO_TYPE]
                    );
                }
                continue;
            }
            // The guest negotiated no offloads: no flags, no GSO; one buffer per frame.
            let hdr = &mut self.rx_buf[..VNET_HDR_LEN];
            hdr.fill(0);
            hdr[HDR_NUM_BUFFERS..HDR_NUM_BUFFERS + 2].copy_from_slice(&1u16.to_le_bytes());
            return Some(len);
        }
    }

    /// Writes `rx_buf[..len]` across the chain's buffers after checking the whole chain.
    fn write_rx_chain(
        &mut self,
        mem: &GuestMemory,
        chain: impl Iterator<Item = Descriptor>,
        len: usize,
    ) -> Result<(), RxRefusal> {
        self.descs.clear();
        self.descs.extend(chain);
        let mut room = 0u64;
        for d in &self.descs {
            if !d.is_write_only() {
                return Err(RxRefusal::BadChain("device-readable descriptor"));
            }
            if !mem.check_range(d.addr(), d.len() as usize) {
                return Err(RxRefusal::BadChain("buffer outside guest memory"));
            }
            room += u64::from(d.len());
        }
        match self.descs.last() {
            None => return Err(RxRefusal::BadChain("empty chain")),
            Some(d) if d.has_next() => {
                return Err(RxRefusal::BadChain(
                    "chain cut short (loop or bad descriptor index)",
                ));
            }
            Some(_) => {}
        }
        if room < VNET_HDR_LEN as u64 {
            return Err(RxRefusal::BadChain("smaller than the virtio-net header"));
        }
        if room < len as u64 {
            return Err(RxRefusal::TooSmall(room));
        }
        let mut off = 0usize;
        for d in &self.descs {
            if off == len {
                break;
            }
            let take = (d.len() as usize).min(len - off);
            mem.write_slice(&self.rx_buf[off..off + take], d.addr())
                .map_err(|_| RxRefusal::BadChain("buffer outside guest memory"))?;
            off += take;
        }
        Ok(())
    }
}
