//! Fuzzing harnesses for the guest-facing parsers (virtio-mmio registers, virtio-blk
//! requests, vsock packets, virtio-net frames, virtio-rng requests) and for what a restore
//! reads from a snapshot ([`snapshot`]).
//!
//! Each harness takes the fuzzer's bytes, lays out what a hostile guest driver controls
//! (descriptor tables, rings, buffers, register writes) in a small guest memory, and runs
//! the real device code on it. The cargo-fuzz targets in `vmm/fuzz/` are one-line calls to
//! these functions, and `vmm/tests/fuzz_corpus.rs` replays the committed seed corpus and
//! regression inputs through them on the stable toolchain.
//!
//! A harness accepts every input: short input reads as zeros, and whatever the device
//! refuses is simply refused. A harness panics only for a device bug: a panic in device
//! code, a worker thread that does not come back after a reset (hung or panicked), or a
//! broken device guarantee checked after the run (e.g. a guest-chosen virtio-net header
//! reaching the tap).
//!
//! # Input format
//!
//! Shared by the queue harnesses ([`Encoder`] writes it; [`seeds`] has examples):
//!
//! - `flags: u8` — bit 0: VIRTIO_RING_F_EVENT_IDX;
//! - per queue of the device (see [`QueueSpec`]): `size_log2: u8` (size = 1 << (v % 7),
//!   so 1..=64), `start: u16` (the device's next avail/used index, to reach wrap-around),
//!   `avail_flags: u16`, `avail_count: u16` (the driver's avail idx is `start + count`),
//!   `used_event: u16`, `ndesc: u8` descriptors of 16 bytes (raw `addr: u64, len: u32,
//!   flags: u16, next: u16`, stored at table indices 0..), `nring: u8` avail ring entries
//!   (`u16` each, stored from ring position `start % size` on);
//! - `data_len: u16` and that many bytes, copied to [`DATA_BASE`];
//! - then what the harness adds (host frames, a host/guest operation list).
//!
//! Queue `i`'s descriptor table is at `(i + 1) * 0x1000` (nothing at guest address 0, which
//! the transport refuses for rings), its avail ring at `+0x400` and its used ring at
//! `+0x800`; guest memory is [`MEM_SIZE`] bytes from address 0.

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};
use vmm_sys_util::tempdir::TempDir;

use crate::devices::bus::BusDevice;
use crate::devices::virtio::block::{Block, BlockConfig, SECTOR_SIZE};
use crate::devices::virtio::mmio::{MmioTransport, status};
use crate::devices::virtio::net::{MacAddr, Net, VNET_HDR_LEN};
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::vsock::Vsock;
use crate::devices::virtio::vsock::muxer::{CONNECT_TIMEOUT, Muxer};
use crate::devices::virtio::{ActiveQueue, GuestMemory, Interrupt, VirtioDevice};

/// Size of the guest memory every harness runs in.
pub const MEM_SIZE: usize = 0x1_0000;
/// Where the input's data bytes are copied; descriptors usually point here.
pub const DATA_BASE: u64 = 0x4000;
/// Distance between the ring areas of two queues.
pub const RING_STRIDE: u64 = 0x1000;
/// Offsets of the avail and used rings in a queue's ring area.
pub const AVAIL_OFFSET: u64 = 0x400;
pub const USED_OFFSET: u64 = 0x800;
/// Largest queue the input format can ask for (it fits the ring area).
pub const MAX_QUEUE_SIZE: u16 = 64;
/// Guest CID of the vsock harnesses.
pub const GUEST_CID: u64 = 3;
/// Guest-initiated vsock connections reach a host listener on these ports.
pub const VSOCK_HOST_PORTS: [u32; 2] = [1024, 1025];
/// Operations a harness with an operation list runs at most.
pub const MAX_OPS: usize = 128;

/// Every harness, by the name of its fuzz target and corpus directory.
/// A harness: runs one input.
pub type Harness = fn(&[u8]);

pub const TARGETS: &[(&str, Harness)] = &[
    ("mmio", mmio),
    ("block", block),
    ("vsock", vsock),
    ("net", net),
    ("rng", rng),
    ("snapshot", snapshot),
];

// ---- input decoding ------------------------------------------------------------------

/// Reads little-endian values off the fuzzer's bytes; past the end everything is zero.
struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        head
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut a = [0u8; N];
        let b = self.bytes(N);
        a[..b.len()].copy_from_slice(b);
        a
    }

    fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }

    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }

    fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

fn guest_memory() -> GuestMemory {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("guest memory")
}

fn interrupt() -> Interrupt {
    Interrupt::new(EventFd::new(EFD_NONBLOCK).expect("irq eventfd"))
}

fn eventfd() -> EventFd {
    EventFd::new(EFD_NONBLOCK).expect("eventfd")
}

/// Guest addresses of queue `index`'s rings.
pub fn ring_addresses(index: usize) -> (u64, u64, u64) {
    let base = (index as u64 + 1) * RING_STRIDE;
    (base, base + AVAIL_OFFSET, base + USED_OFFSET)
}

/// Writes one queue's driver side into `mem` from the input and returns the device's
/// [`Queue`] on it. Writes inside the fixed layout cannot fail, so their results are ignored.
fn read_queue(input: &mut Input<'_>, mem: &GuestMemory, index: usize, event_idx: bool) -> Queue {
    let size = 1u16 << (input.u8() % 7);
    let start = input.u16();
    let avail_flags = input.u16();
    let avail_count = input.u16();
    let used_event = input.u16();
    let (desc, avail, used) = ring_addresses(index);
    let ndesc = u16::from(input.u8()).min(size);
    for i in 0..u64::from(ndesc) {
        let raw = input.array::<16>();
        let _ = mem.write_slice(&raw, GuestAddress(desc + 16 * i));
    }
    let nring = u16::from(input.u8()).min(size);
    for k in 0..nring {
        let head = input.u16();
        let pos = u64::from(start.wrapping_add(k) % size);
        let _ = mem.write_obj(head.to_le(), GuestAddress(avail + 4 + 2 * pos));
    }
    let _ = mem.write_obj(avail_flags.to_le(), GuestAddress(avail));
    let _ = mem.write_obj(
        start.wrapping_add(avail_count).to_le(),
        GuestAddress(avail + 2),
    );
    let _ = mem.write_obj(
        used_event.to_le(),
        GuestAddress(avail + 4 + 2 * u64::from(size)),
    );
    let _ = mem.write_obj(start.to_le(), GuestAddress(used + 2));

    let mut q = Queue::new(MAX_QUEUE_SIZE).expect("queue");
    q.try_set_size(size).expect("queue size is a power of two");
    q.try_set_desc_table_address(GuestAddress(desc))
        .expect("aligned descriptor table");
    q.try_set_avail_ring_address(GuestAddress(avail))
        .expect("aligned avail ring");
    q.try_set_used_ring_address(GuestAddress(used))
        .expect("aligned used ring");
    q.set_event_idx(event_idx);
    q.set_next_avail(start);
    q.set_next_used(start);
    q.set_ready(true);
    debug_assert!(q.is_valid(mem));
    q
}

/// Reads the data block into guest memory at [`DATA_BASE`].
fn read_data(input: &mut Input<'_>, mem: &GuestMemory) {
    let len = usize::from(input.u16());
    let data = input.bytes(len.min(MEM_SIZE - DATA_BASE as usize));
    let _ = mem.write_slice(data, GuestAddress(DATA_BASE));
}

/// The guest side shared by the queue harnesses: memory and `nqueues` ready queues.
fn read_guest(input: &mut Input<'_>, nqueues: usize) -> (GuestMemory, Vec<Queue>) {
    let mem = guest_memory();
    let event_idx = input.u8() & 1 != 0;
    let queues = (0..nqueues)
        .map(|i| read_queue(input, &mem, i, event_idx))
        .collect();
    read_data(input, &mem);
    (mem, queues)
}

/// How long a reset (or any register access) may take before the harness calls it a hang.
/// A device reset waits up to 2 s (the worker's stop timeout) for its worker and then gives
/// up on it, leaving the thread running; a healthy worker stops in microseconds.
pub const HANG: Duration = Duration::from_secs(1);

/// Activates `dev` on `queues`, lets its worker make its first pass over them (every
/// device worker processes its queues once when it starts, as the driver may have queued
/// buffers before DRIVER_OK), then resets it, which waits for the worker to hand its state
/// back. Panics if the reset took [`HANG`] or longer (the worker is stuck); returns what
/// the reset returned.
fn run_device(dev: &mut dyn VirtioDevice, mem: &GuestMemory, queues: Vec<Queue>) -> bool {
    let active = queues
        .into_iter()
        .map(|queue| ActiveQueue {
            queue,
            notify: eventfd(),
        })
        .collect();
    dev.activate(mem.clone(), active, interrupt())
        .expect("device activation");
    let start = Instant::now();
    let ok = dev.reset();
    let took = start.elapsed();
    assert!(
        took < HANG,
        "device type {} took {took:?} to reset: its worker did not stop (hung or spinning)",
        dev.device_type()
    );
    ok
}

// ---- virtio-rng ----------------------------------------------------------------------

/// virtio-rng requests: one queue; the worker fills the writable buffers.
pub fn rng(data: &[u8]) {
    let mut input = Input::new(data);
    let (mem, queues) = read_guest(&mut input, 1);
    let mut dev = Rng::new();
    assert!(
        run_device(&mut dev, &mem, queues),
        "virtio-rng reset failed"
    );
}

// ---- virtio-blk ----------------------------------------------------------------------

/// An in-memory disk image of `sectors` sectors with a recognisable pattern, and the path
/// that opens it again (as `Block::new` wants a path).
fn memfd_image(sectors: u64) -> (File, String) {
    // SAFETY: memfd_create takes a NUL-terminated name and flags; the fd it returns is ours.
    let fd = unsafe { libc::memfd_create(c"husk-fuzz-disk".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let mut file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let content: Vec<u8> = (0..sectors * SECTOR_SIZE)
        .map(|i| (i % 251) as u8)
        .collect();
    file.write_all(&content).expect("disk image");
    let path = format!("/proc/self/fd/{}", file.as_raw_fd());
    (file, path)
}

/// virtio-blk request chains against an in-memory image. Extra leading byte: bit 0
/// read-only, bits 1..=4 the capacity in sectors (0..=15).
pub fn block(data: &[u8]) {
    let mut input = Input::new(data);
    let disk = input.u8();
    let read_only = disk & 1 != 0;
    let sectors = u64::from((disk >> 1) & 0xf);
    let (mem, queues) = read_guest(&mut input, 1);
    let (image, path) = memfd_image(sectors);
    let mut dev = Block::new(BlockConfig {
        path: Some(path.into()),
        read_only,
        serial: Some("husk-fuzz".into()),
    })
    .expect("virtio-blk on a memfd");
    drop(image);
    assert!(
        run_device(&mut dev, &mem, queues),
        "virtio-blk worker did not hand the disk back (it panicked or hung)"
    );
}

// ---- virtio-net ----------------------------------------------------------------------

/// Largest frame the net harness sends from the host side.
const MAX_HOST_FRAME: usize = 4096;

/// virtio-net: queue 0 is RX, queue 1 TX. After the guest part, `nframes: u8` (at most 8)
/// frames of `len: u16` bytes (at most 4096) that the host side sends before the device
/// starts (they reach the guest's RX buffers). Checks that every frame reaching the tap
/// carries a zeroed virtio-net header and at least an Ethernet header.
pub fn net(data: &[u8]) {
    let mut input = Input::new(data);
    let (mem, queues) = read_guest(&mut input, 2);
    let (ours, host) = UnixDatagram::pair().expect("socket pair");
    ours.set_nonblocking(true).expect("non-blocking");
    host.set_nonblocking(true).expect("non-blocking");
    let nframes = input.u8() % 9;
    for _ in 0..nframes {
        let len = usize::from(input.u16()).min(MAX_HOST_FRAME);
        let frame = input.bytes(len);
        // A full socket buffer just drops the frame, as a tap would.
        let _ = host.send(frame);
    }
    let mut dev = Net::with_file(
        "fuzz0".into(),
        File::from(OwnedFd::from(ours)),
        MacAddr::derived("fuzz0"),
    );
    assert!(
        run_device(&mut dev, &mem, queues),
        "virtio-net worker did not hand the backend back (it panicked or hung)"
    );
    let mut buf = vec![0u8; VNET_HDR_LEN + crate::devices::virtio::net::MAX_FRAME_LEN + 1];
    let mut sent = 0u64;
    // At most one frame per TX chain went out: a queue's worth.
    for _ in 0..=MAX_QUEUE_SIZE {
        let n = match host.recv(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) => panic!("recv from the device: {e}"),
        };
        assert!(
            n >= VNET_HDR_LEN + crate::devices::virtio::net::ETH_HLEN,
            "runt frame of {n} bytes reached the tap"
        );
        assert!(
            buf[..VNET_HDR_LEN].iter().all(|&b| b == 0),
            "guest-chosen virtio-net header reached the tap: {:?}",
            &buf[..VNET_HDR_LEN]
        );
        sent += 1;
    }
    let stats = dev.stats();
    assert_eq!(stats.tx_frames, sent, "TX frame count vs frames on the tap");
}

// ---- vsock ---------------------------------------------------------------------------

/// Host side of the vsock harness: the peer listeners guest connections reach, and the
/// host streams (connected to the muxer, or accepted from a peer listener).
struct VsockHost {
    uds: std::path::PathBuf,
    listeners: Vec<UnixListener>,
    streams: Vec<UnixStream>,
}

/// Host streams the vsock harness holds at most.
const MAX_HOST_STREAMS: usize = 16;

impl VsockHost {
    fn new(uds: &Path) -> Self {
        let listeners = VSOCK_HOST_PORTS
            .iter()
            .map(|p| {
                let mut path = uds.as_os_str().to_owned();
                path.push(format!("_{p}"));
                let l = UnixListener::bind(&path).expect("peer listener");
                l.set_nonblocking(true).expect("non-blocking");
                l
            })
            .collect();
        Self {
            uds: uds.to_path_buf(),
            listeners,
            streams: Vec::new(),
        }
    }

    fn add(&mut self, s: UnixStream) {
        if self.streams.len() < MAX_HOST_STREAMS && s.set_nonblocking(true).is_ok() {
            self.streams.push(s);
        }
    }

    fn stream(&mut self, arg: u8) -> Option<&mut UnixStream> {
        let n = self.streams.len();
        (n > 0).then(|| &mut self.streams[usize::from(arg) % n])
    }
}

/// Publishes `n` more entries of the avail ring of queue `index` (the ring entries the
/// input wrote beyond the first avail index).
fn publish(mem: &GuestMemory, index: usize, n: u16) {
    let (_, avail, _) = ring_addresses(index);
    let addr = GuestAddress(avail + 2);
    if let Ok(idx) = mem.read_obj::<u16>(addr) {
        let _ = mem.write_obj(u16::from_le(idx).wrapping_add(n).to_le(), addr);
    }
}

/// The VMM runs in Rust binaries (husk, the shim, husk-vmm), whose runtime sets SIGPIPE to
/// ignored before `main`: a write to a host socket whose peer left fails with EPIPE, which
/// the muxer handles. libFuzzer's own `main` leaves the default (terminate), so without
/// this the harness died of a signal the VMM never gets (found by the 120 s run of
/// 2026-12-07: "vsock: killed by signal 13", no crash input).
fn ignore_sigpipe_as_rust_binaries_do() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: installs SIG_IGN, no handler code runs.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    });
}

/// vsock through the muxer, on the calling thread: queue 0 is RX, queue 1 TX. After the
/// guest part, `nops: u8` operations (at most [`MAX_OPS`]) of `kind: u8, arg: u8`:
///
/// | kind % 12 | operation |
/// |---|---|
/// | 0 | the device consumes the TX queue (guest packets) |
/// | 1 | the device fills RX buffers |
/// | 2 | the device handles ready host sockets |
/// | 3 / 4 | the guest publishes `arg % 4 + 1` more TX / RX avail entries |
/// | 5 | the host accepts a guest connection on listener `arg % 2` |
/// | 6 | the host connects to the device socket and sends `len: u8` bytes (`CONNECT 1024\n`) |
/// | 7 | a host stream sends `len: u8` bytes |
/// | 8 | a host stream reads what is there |
/// | 9 | a host stream is closed (arg bit 7: only shut down for writing) |
/// | 10 | host-initiated connections time out |
/// | 11 | driver reset |
pub fn vsock(data: &[u8]) {
    ignore_sigpipe_as_rust_binaries_do();
    let mut input = Input::new(data);
    let (mem, queues) = read_guest(&mut input, 2);
    let Ok([mut rxq, mut txq]) = <[Queue; 2]>::try_from(queues) else {
        unreachable!("two queues were read");
    };
    let dir = TempDir::new_with_prefix("/tmp/husk-fuzz-vsock").expect("temp dir");
    let uds = dir.as_path().join("v.sock");
    let mut muxer = Muxer::new(GUEST_CID, &uds).expect("muxer");
    let mut host = VsockHost::new(&uds);
    let nops = usize::from(input.u8()).min(MAX_OPS);
    for _ in 0..nops {
        if input.is_empty() {
            break;
        }
        let kind = input.u8() % 12;
        let arg = input.u8();
        match kind {
            0 => {
                muxer.process_tx(&mem, &mut txq);
            }
            1 => {
                muxer.fill_rx(&mem, &mut rxq);
            }
            2 => muxer.process_host_events(),
            3 => publish(&mem, 1, u16::from(arg % 4) + 1),
            4 => publish(&mem, 0, u16::from(arg % 4) + 1),
            5 => {
                let l = &host.listeners[usize::from(arg) % host.listeners.len()];
                if let Ok((s, _)) = l.accept() {
                    host.add(s);
                }
            }
            6 => {
                let len = usize::from(input.u8());
                let line = input.bytes(len);
                if host.streams.len() < MAX_HOST_STREAMS
                    && let Ok(mut s) = UnixStream::connect(&host.uds)
                {
                    let _ = s.write_all(line);
                    host.add(s);
                }
            }
            7 => {
                let len = usize::from(input.u8());
                let bytes = input.bytes(len);
                if let Some(s) = host.stream(arg) {
                    let _ = s.write(bytes);
                }
            }
            8 => {
                if let Some(s) = host.stream(arg) {
                    let mut buf = [0u8; 4096];
                    for _ in 0..64 {
                        match s.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(_) => {}
                        }
                    }
                }
            }
            9 => {
                if arg & 0x80 != 0 {
                    if let Some(s) = host.stream(arg) {
                        let _ = s.shutdown(std::net::Shutdown::Write);
                    }
                } else if !host.streams.is_empty() {
                    let n = host.streams.len();
                    host.streams.swap_remove(usize::from(arg) % n);
                }
            }
            10 => muxer.expire_connects(Instant::now() + CONNECT_TIMEOUT + Duration::from_secs(1)),
            _ => muxer.reset(),
        }
    }
    assert!(
        muxer.connection_count() <= crate::devices::virtio::vsock::muxer::MAX_CONNECTIONS,
        "connection limit exceeded"
    );
}

// ---- virtio-mmio ---------------------------------------------------------------------

/// What must outlive the device behind the transport in the mmio harness.
#[derive(Default)]
struct Backing {
    _net_peer: Option<UnixDatagram>,
    _dir: Option<TempDir>,
}

fn mmio_device(kind: u8) -> (Box<dyn VirtioDevice>, Backing) {
    match kind % 4 {
        0 => (Box::new(Rng::new()), Backing::default()),
        1 => {
            let (image, path) = memfd_image(8);
            let dev = Block::new(BlockConfig {
                path: Some(path.into()),
                read_only: false,
                serial: None,
            })
            .expect("virtio-blk on a memfd");
            drop(image);
            (Box::new(dev), Backing::default())
        }
        2 => {
            let (ours, host) = UnixDatagram::pair().expect("socket pair");
            ours.set_nonblocking(true).expect("non-blocking");
            host.set_nonblocking(true).expect("non-blocking");
            let dev = Net::with_file(
                "fuzz0".into(),
                File::from(OwnedFd::from(ours)),
                MacAddr::derived("fuzz0"),
            );
            (
                Box::new(dev),
                Backing {
                    _net_peer: Some(host),
                    _dir: None,
                },
            )
        }
        _ => {
            let dir = TempDir::new_with_prefix("/tmp/husk-fuzz-mmio").expect("temp dir");
            let dev = Vsock::new(GUEST_CID, &dir.as_path().join("v.sock")).expect("vsock");
            (
                Box::new(dev),
                Backing {
                    _net_peer: None,
                    _dir: Some(dir),
                },
            )
        }
    }
}

/// The virtio-mmio register window with a real device behind it (`device: u8` % 4: rng,
/// block on an 8-sector image, net on a socket pair, vsock), then `nops: u8` register
/// accesses (at most [`MAX_OPS`]) of `kind: u8, offset: u16, value: u32` (kind bit 0:
/// write; bits 1-2: access size 1, 2, 4 or 8; an 8-byte write repeats `value`). Whatever
/// follows is the guest memory from address 0, where the driver's rings and buffers are
/// wherever its register writes say. A QueueNotify after DRIVER_OK wakes the device's
/// worker thread, which runs alongside the next accesses; a final reset stops it.
pub fn mmio(data: &[u8]) {
    let mut input = Input::new(data);
    let (dev, backing) = mmio_device(input.u8());
    let ops = read_ops(&mut input);
    let mem = guest_memory();
    let image = input.bytes(MEM_SIZE);
    let _ = mem.write_slice(image, GuestAddress(0));

    let mut t = MmioTransport::new(mem, dev, interrupt());
    run_accesses(&mut t, ops);
    drop(t);
    drop(backing);
}

/// A register access: `(kind, offset, value)` as [`mmio`] describes them.
type Access = (u8, u16, u32);

/// `nops: u8` register accesses (at most [`MAX_OPS`]).
fn read_ops(input: &mut Input<'_>) -> Vec<Access> {
    let nops = usize::from(input.u8()).min(MAX_OPS);
    (0..nops)
        .map(|_| (input.u8(), input.u16(), input.u32()))
        .collect()
}

/// Runs `ops` on `t`, then a reset, which must stop the device's worker. Panics if an
/// access blocks the (simulated) vCPU for [`HANG`] or the final reset of an active device
/// fails.
fn run_accesses(t: &mut MmioTransport, ops: Vec<Access>) {
    // The final access resets the device, which stops its worker.
    let reset = (1 | (2 << 1), 0x70, 0);
    let mut was_active = false;
    for (i, (kind, offset, value)) in ops.into_iter().chain([reset]).enumerate() {
        let size = 1usize << ((kind >> 1) & 3);
        let offset = u64::from(offset);
        let mut buf = [0u8; 8];
        buf[..4].copy_from_slice(&value.to_le_bytes());
        buf[4..].copy_from_slice(&value.to_le_bytes());
        was_active = t.is_activated();
        let start = Instant::now();
        if kind & 1 != 0 {
            t.write(offset, &buf[..size]);
        } else {
            t.read(offset, &mut buf[..size]);
        }
        // The vCPU that made the access waits this long: a reset whose worker hangs costs
        // it the worker's whole stop timeout.
        let took = start.elapsed();
        assert!(
            took < HANG,
            "access {i} ({kind:#x} at {offset:#x}) blocked the vCPU for {took:?}: a device worker did not stop"
        );
    }
    assert!(
        !was_active || t.status() == 0,
        "reset of an active device failed (worker panicked or hung): status {:#x}",
        t.status()
    );
}

// ---- snapshot ------------------------------------------------------------------------

mod snapshot;
pub use snapshot::{MEMORY_FILE_PAGES, snapshot};

pub mod corpus;

// ---- writing inputs ------------------------------------------------------------------

/// A guest buffer: `(addr, len, device-writable)`.
pub type Buf = (u64, u32, bool);

/// One queue's driver side, as [`read_queue`] decodes it.
#[derive(Clone, Debug, Default)]
pub struct QueueSpec {
    /// log2 of the queue size (0..=6).
    pub size_log2: u8,
    pub start: u16,
    pub avail_flags: u16,
    /// How many ring entries the driver publishes at first.
    pub avail_count: u16,
    pub used_event: u16,
    /// `(addr, len, flags, next)`, stored at descriptor indices 0, 1, ...
    pub descs: Vec<(u64, u32, u16, u16)>,
    /// Avail ring entries (descriptor heads) from position `start % size` on.
    pub ring: Vec<u16>,
}

/// VRING_DESC_F_NEXT and VRING_DESC_F_WRITE.
pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;

impl QueueSpec {
    /// A queue of `1 << size_log2` entries holding `chains`, each a list of `(addr, len,
    /// device-writable)` buffers, all published.
    pub fn with_chains(size_log2: u8, chains: &[&[Buf]]) -> Self {
        let mut q = QueueSpec {
            size_log2,
            ..Default::default()
        };
        for chain in chains {
            q.push_chain(chain);
        }
        q.avail_count = q.ring.len() as u16;
        q
    }

    /// Adds a chain's descriptors and its ring entry (not yet counted in `avail_count`).
    pub fn push_chain(&mut self, bufs: &[Buf]) {
        let head = self.descs.len() as u16;
        for (i, &(addr, len, write)) in bufs.iter().enumerate() {
            let idx = head + i as u16;
            let last = i + 1 == bufs.len();
            let mut flags = if write { F_WRITE } else { 0 };
            if !last {
                flags |= F_NEXT;
            }
            self.descs
                .push((addr, len, flags, if last { 0 } else { idx + 1 }));
        }
        self.ring.push(head);
    }
}

/// Writes inputs in the harnesses' format.
#[derive(Clone, Debug, Default)]
pub struct Encoder {
    pub bytes: Vec<u8>,
}

impl Encoder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.bytes.push(v);
        self
    }

    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.bytes.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.bytes.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.bytes.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn raw(&mut self, b: &[u8]) -> &mut Self {
        self.bytes.extend_from_slice(b);
        self
    }

    /// `len: u8` then the bytes (at most 255).
    pub fn short_bytes(&mut self, b: &[u8]) -> &mut Self {
        let b = &b[..b.len().min(255)];
        self.u8(b.len() as u8).raw(b)
    }

    /// `len: u16` then the bytes.
    pub fn long_bytes(&mut self, b: &[u8]) -> &mut Self {
        let b = &b[..b.len().min(usize::from(u16::MAX))];
        self.u16(b.len() as u16).raw(b)
    }

    pub fn queue(&mut self, q: &QueueSpec) -> &mut Self {
        self.u8(q.size_log2)
            .u16(q.start)
            .u16(q.avail_flags)
            .u16(q.avail_count)
            .u16(q.used_event);
        self.u8(q.descs.len() as u8);
        for &(addr, len, flags, next) in &q.descs {
            self.u64(addr).u32(len).u16(flags).u16(next);
        }
        self.u8(q.ring.len() as u8);
        for &h in &q.ring {
            self.u16(h);
        }
        self
    }

    /// The shared guest part: flags, the queues, the data block.
    pub fn guest(&mut self, event_idx: bool, queues: &[QueueSpec], data: &[u8]) -> &mut Self {
        self.u8(u8::from(event_idx));
        for q in queues {
            self.queue(q);
        }
        self.long_bytes(data)
    }

    pub fn finish(&self) -> Vec<u8> {
        self.bytes.clone()
    }
}

const D: u64 = DATA_BASE;

/// The seed corpus: `(target, file name, input)`, a few small valid inputs per target
/// that reach the interesting paths. `vmm/tests/fuzz_corpus.rs` writes them to
/// `vmm/fuzz/corpus/<target>/` (an ignored test) and replays them.
pub fn seeds() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let mut out = Vec::new();
    rng_seeds(&mut out);
    block_seeds(&mut out);
    net_seeds(&mut out);
    vsock_seeds(&mut out);
    mmio_seeds(&mut out);
    snapshot::seeds(&mut out);
    out
}

type Seeds = Vec<(&'static str, &'static str, Vec<u8>)>;

fn rng_seeds(out: &mut Seeds) {
    let one = QueueSpec::with_chains(4, &[&[(D, 256, true)]]);
    out.push((
        "rng",
        "one-buffer",
        Encoder::new().guest(false, &[one], &[]).finish(),
    ));
    let mixed = QueueSpec::with_chains(
        4,
        &[
            &[
                (D, 16, false),
                (D + 0x100, 512, true),
                (D + 0x400, 64, true),
            ],
            &[(D + 0x1000, 4096, true)],
        ],
    );
    out.push((
        "rng",
        "two-chains-event-idx",
        Encoder::new().guest(true, &[mixed], &[]).finish(),
    ));
    // Ring indices about to wrap.
    let mut wrap = QueueSpec::with_chains(2, &[&[(D, 8, true)], &[(D + 8, 8, true)]]);
    wrap.start = u16::MAX;
    out.push((
        "rng",
        "index-wrap",
        Encoder::new().guest(false, &[wrap], &[]).finish(),
    ));
}

/// A virtio-blk request header: type, reserved, sector.
fn blk_header(kind: u32, sector: u64) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(&kind.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes());
    h.extend_from_slice(&sector.to_le_bytes());
    h
}

fn block_seeds(out: &mut Seeds) {
    // Data block: header at D, payload at D + 0x100, status at D + 0x1000.
    let status = D + 0x1000;
    let disk = 8 << 1; // 8 sectors, writable
    let cases: [(&str, u8, u32, u64, Vec<Buf>); 5] = [
        ("read", disk, 0, 2, vec![(D + 0x100, 1024, true)]),
        ("write", disk, 1, 7, vec![(D + 0x100, 512, false)]),
        ("flush", disk, 4, 0, vec![]),
        ("get-id", disk, 8, 0, vec![(D + 0x100, 20, true)]),
        (
            "write-read-only",
            disk | 1,
            1,
            0,
            vec![(D + 0x100, 512, false)],
        ),
    ];
    for (name, disk, kind, sector, payload) in cases {
        let mut chain = vec![(D, 16, false)];
        chain.extend(payload);
        chain.push((status, 1, true));
        let q = QueueSpec::with_chains(3, &[&chain]);
        let mut data = blk_header(kind, sector);
        data.resize(0x100, 0);
        data.extend((0..512).map(|i| i as u8));
        out.push((
            "block",
            name,
            Encoder::new().u8(disk).guest(false, &[q], &data).finish(),
        ));
    }
    // Two requests in one pass, split data buffers, event idx.
    let q = QueueSpec::with_chains(
        3,
        &[
            &[
                (D, 16, false),
                (D + 0x100, 512, true),
                (D + 0x300, 512, true),
                (status, 1, true),
            ],
            &[
                (D + 0x20, 16, false),
                (D + 0x100, 512, false),
                (status + 1, 1, true),
            ],
        ],
    );
    let mut data = blk_header(0, 1);
    data.resize(0x20, 0);
    data.extend(blk_header(1, 3));
    out.push((
        "block",
        "read-then-write",
        Encoder::new().u8(disk).guest(true, &[q], &data).finish(),
    ));
}

/// A 12-byte virtio-net header (with a checksum request the device must strip) and a
/// minimal Ethernet frame.
fn net_frame() -> Vec<u8> {
    let mut f = vec![1u8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 1]);
    f.extend_from_slice(&[0x08, 0x06]);
    f.extend((0..46).map(|i| i as u8));
    f
}

fn net_seeds(out: &mut Seeds) {
    let frame = net_frame();
    let len = frame.len() as u32;
    let rx_empty = QueueSpec::with_chains(3, &[]);
    let tx = QueueSpec::with_chains(3, &[&[(D, len, false)]]);
    out.push((
        "net",
        "tx-one-frame",
        Encoder::new()
            .guest(false, &[rx_empty.clone(), tx], &frame)
            .u8(0)
            .finish(),
    ));
    let tx_split = QueueSpec::with_chains(3, &[&[(D, 12, false), (D + 12, len - 12, false)]]);
    out.push((
        "net",
        "tx-split-header",
        Encoder::new()
            .guest(true, &[rx_empty, tx_split], &frame)
            .u8(0)
            .finish(),
    ));
    // The host sends two frames; the guest has one RX chain of two buffers for each.
    let rx = QueueSpec::with_chains(
        3,
        &[
            &[(D + 0x1000, 12, true), (D + 0x1100, 1514, true)],
            &[(D + 0x2000, 2048, true)],
        ],
    );
    let tx_empty = QueueSpec::with_chains(3, &[]);
    let mut e = Encoder::new();
    e.guest(false, &[rx, tx_empty], &[]).u8(2);
    e.long_bytes(&frame).long_bytes(&frame[..40]);
    out.push(("net", "rx-two-frames", e.finish()));
}

/// A vsock header from the guest (CID 3) to the host (CID 2).
fn vsock_hdr(op: u16, src_port: u32, dst_port: u32, len: u32, flags: u32) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(&GUEST_CID.to_le_bytes());
    h.extend_from_slice(&2u64.to_le_bytes());
    h.extend_from_slice(&src_port.to_le_bytes());
    h.extend_from_slice(&dst_port.to_le_bytes());
    h.extend_from_slice(&len.to_le_bytes());
    h.extend_from_slice(&1u16.to_le_bytes()); // stream
    h.extend_from_slice(&op.to_le_bytes());
    h.extend_from_slice(&flags.to_le_bytes());
    h.extend_from_slice(&(256 * 1024u32).to_le_bytes()); // buf_alloc
    h.extend_from_slice(&0u32.to_le_bytes()); // fwd_cnt
    h
}

/// Puts TX packet `i` (header, then payload if any) at `D + 0x100 * i` in `data` and a
/// chain for it (a header descriptor and a payload descriptor) into `tx`.
fn push_packet(tx: &mut QueueSpec, data: &mut Vec<u8>, i: usize, p: &[u8]) {
    let at = D + 0x100 * i as u64;
    data.resize(0x100 * i, 0);
    data.extend_from_slice(p);
    if p.len() > 44 {
        tx.push_chain(&[(at, 44, false), (at + 44, (p.len() - 44) as u32, false)]);
    } else {
        tx.push_chain(&[(at, 44, false)]);
    }
}

fn vsock_seeds(out: &mut Seeds) {
    const REQUEST: u16 = 1;
    const RESPONSE: u16 = 2;
    const RW: u16 = 5;
    const CREDIT_REQUEST: u16 = 7;
    const SHUTDOWN: u16 = 4;
    // Data block: TX packets at D + 0x100 * i (header, payload right after), RX buffers
    // at D + 0x2000 + 0x1000 * i (a header descriptor and a data descriptor).
    let rx_chain = |i: u64| {
        [
            (D + 0x2000 + 0x1000 * i, 44, true),
            (D + 0x2000 + 0x1000 * i + 0x40, 0xf00, true),
        ]
    };
    let rx = {
        let mut q = QueueSpec::with_chains(4, &[&rx_chain(0), &rx_chain(1)]);
        q.push_chain(&rx_chain(2));
        q.push_chain(&rx_chain(3));
        q
    };

    // Guest connects to host port 1024, sends data, asks for credit, shuts down.
    let payload = b"hello from the guest";
    let mut data = Vec::new();
    let packets = [
        vsock_hdr(REQUEST, 5000, 1024, 0, 0),
        {
            let mut p = vsock_hdr(RW, 5000, 1024, payload.len() as u32, 0);
            p.extend_from_slice(payload);
            p
        },
        vsock_hdr(CREDIT_REQUEST, 5000, 1024, 0, 0),
        vsock_hdr(SHUTDOWN, 5000, 1024, 0, 3),
    ];
    let mut tx = QueueSpec {
        size_log2: 4,
        ..Default::default()
    };
    for (i, p) in packets.iter().enumerate() {
        push_packet(&mut tx, &mut data, i, p);
    }
    tx.avail_count = 1; // REQUEST first; the rest is published by operations
    let mut e = Encoder::new();
    e.guest(false, &[rx.clone(), tx.clone()], &data);
    let ops: &[(u8, u8)] = &[
        (0, 0), // TX: REQUEST -> connect to <uds>_1024
        (5, 0), // host accepts
        (1, 0), // RX: RESPONSE to the guest
        (3, 0), // guest publishes RW
        (0, 0),
        (2, 0), // host side writable
        (8, 0), // host reads the payload
        (7, 0), // host answers (bytes below)
        (2, 0),
        (1, 0), // RX: data to the guest
        (3, 1), // CREDIT_REQUEST + SHUTDOWN
        (0, 0),
        (1, 0),
        (2, 0),
    ];
    e.u8(ops.len() as u8);
    for &(k, a) in ops {
        e.u8(k).u8(a);
        if k == 7 {
            e.short_bytes(b"hello from the host");
        }
    }
    out.push(("vsock", "guest-connects", e.finish()));

    // Host connects with CONNECT 1024; the guest answers RESPONSE, then data flows.
    let mut data = Vec::new();
    let local = 1u32 << 30; // the muxer's first host port
    let packets = [vsock_hdr(RESPONSE, 1024, local, 0, 0), {
        let mut p = vsock_hdr(RW, 1024, local, 4, 0);
        p.extend_from_slice(b"pong");
        p
    }];
    let mut tx = QueueSpec {
        size_log2: 4,
        ..Default::default()
    };
    for (i, p) in packets.iter().enumerate() {
        push_packet(&mut tx, &mut data, i, p);
    }
    tx.avail_count = 0;
    let mut e = Encoder::new();
    e.guest(true, &[rx, tx], &data);
    let ops: &[(u8, u8)] = &[
        (6, 0), // host connects and sends CONNECT 1024
        (2, 0), // accept + handshake
        (2, 0),
        (1, 0), // RX: REQUEST to the guest
        (3, 0), // guest answers RESPONSE
        (0, 0),
        (8, 0), // host reads "OK <port>"
        (7, 0), // host sends data
        (2, 0),
        (1, 0),
        (3, 0), // guest sends RW
        (0, 0),
        (2, 0),
        (8, 0),
        (9, 0x80), // host shuts down writing
        (2, 0),
        (1, 0),
        (10, 0),
        (11, 0),
    ];
    e.u8(ops.len() as u8);
    for &(k, a) in ops {
        e.u8(k).u8(a);
        if k == 6 {
            e.short_bytes(b"CONNECT 1024\n");
        } else if k == 7 {
            e.short_bytes(b"ping");
        }
    }
    out.push(("vsock", "host-connects", e.finish()));
}

/// Ring layout of the mmio seeds (queues of 8 entries): queue `i` at `(i + 1) * 0x200`
/// (the transport refuses rings at guest address 0), avail ring at `+0x80`, used ring at
/// `+0x100`; buffers from [`MMIO_DATA`] on. Kept compact so the seeds (which carry guest
/// memory from address 0) stay small.
fn mmio_rings(index: usize) -> (u64, u64, u64) {
    let base = (index as u64 + 1) * 0x200;
    (base, base + 0x80, base + 0x100)
}

const MMIO_DATA: u64 = 0x800;

/// The register accesses of a driver bringing up a device with `queues` queues (rings at
/// `mmio_rings(i)`, `size` entries each) and accepting `features`, then kicking each
/// queue.
fn mmio_bring_up(e: &mut Encoder, nqueues: usize, size: u32, features: u64, kick: bool) -> u8 {
    const WRITE4: u8 = 1 | (2 << 1);
    const READ4: u8 = 2 << 1;
    let mut ops: Vec<(u8, u16, u32)> = vec![
        (READ4, 0x000, 0), // magic
        (READ4, 0x008, 0), // device id
        (WRITE4, 0x070, status::ACKNOWLEDGE),
        (WRITE4, 0x070, status::ACKNOWLEDGE | status::DRIVER),
        (WRITE4, 0x014, 1),
        (READ4, 0x010, 0),
        (WRITE4, 0x024, 0),
        (WRITE4, 0x020, features as u32),
        (WRITE4, 0x024, 1),
        (WRITE4, 0x020, (features >> 32) as u32),
        (
            WRITE4,
            0x070,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        ),
        (READ4, 0x070, 0),
    ];
    for i in 0..nqueues {
        let (desc, avail, used) = mmio_rings(i);
        ops.extend_from_slice(&[
            (WRITE4, 0x030, i as u32),
            (READ4, 0x034, 0),
            (WRITE4, 0x038, size),
            (WRITE4, 0x080, desc as u32),
            (WRITE4, 0x084, 0),
            (WRITE4, 0x090, avail as u32),
            (WRITE4, 0x094, 0),
            (WRITE4, 0x0a0, used as u32),
            (WRITE4, 0x0a4, 0),
            (WRITE4, 0x044, 1),
        ]);
    }
    ops.push((
        WRITE4,
        0x070,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
    ));
    ops.push((1 << 1, 0x100, 0)); // 2-byte config read
    ops.push((3 << 1, 0x100, 0)); // 8-byte config read
    if kick {
        for i in 0..nqueues {
            ops.push((WRITE4, 0x050, i as u32));
        }
    }
    ops.push((READ4, 0x060, 0));
    ops.push((WRITE4, 0x064, 1));
    for &(k, off, v) in &ops {
        e.u8(k).u16(off).u32(v);
    }
    ops.len() as u8
}

/// Guest memory (from address 0) holding `chains` on queue `index`, for the mmio seeds.
fn mmio_memory(queues: &[(usize, Vec<Vec<Buf>>)], data: &[u8]) -> Vec<u8> {
    let mut mem = vec![0u8; MMIO_DATA as usize];
    for (index, chains) in queues {
        let chains: Vec<&[Buf]> = chains.iter().map(|c| c.as_slice()).collect();
        let spec = QueueSpec::with_chains(3, &chains);
        let (desc, avail, _) = mmio_rings(*index);
        for (i, &(addr, len, flags, next)) in spec.descs.iter().enumerate() {
            let o = desc as usize + 16 * i;
            mem[o..o + 8].copy_from_slice(&addr.to_le_bytes());
            mem[o + 8..o + 12].copy_from_slice(&len.to_le_bytes());
            mem[o + 12..o + 14].copy_from_slice(&flags.to_le_bytes());
            mem[o + 14..o + 16].copy_from_slice(&next.to_le_bytes());
        }
        let a = avail as usize;
        mem[a + 2..a + 4].copy_from_slice(&spec.avail_count.to_le_bytes());
        for (k, &h) in spec.ring.iter().enumerate() {
            mem[a + 4 + 2 * k..a + 6 + 2 * k].copy_from_slice(&h.to_le_bytes());
        }
    }
    mem.extend_from_slice(data);
    mem
}

fn mmio_seeds(out: &mut Seeds) {
    const M: u64 = MMIO_DATA;
    const VERSION_1: u64 = 1 << 32;
    const EVENT_IDX: u64 = 1 << 29;
    // rng: one request, event idx.
    let mut e = Encoder::new();
    e.u8(0);
    let n_at = e.bytes.len();
    e.u8(0);
    let n = mmio_bring_up(&mut e, 1, 8, VERSION_1 | EVENT_IDX, true);
    e.bytes[n_at] = n;
    e.raw(&mmio_memory(&[(0, vec![vec![(M, 64, true)]])], &[]));
    out.push(("mmio", "rng", e.finish()));

    // block: a read request.
    let mut e = Encoder::new();
    e.u8(1);
    let n_at = e.bytes.len();
    e.u8(0);
    let n = mmio_bring_up(&mut e, 1, 8, VERSION_1 | (1 << 9), true);
    e.bytes[n_at] = n;
    let chain = vec![(M, 16, false), (M + 0x100, 512, true), (M + 0x400, 1, true)];
    e.raw(&mmio_memory(&[(0, vec![chain])], &blk_header(0, 1)));
    out.push(("mmio", "block-read", e.finish()));

    // net: one TX frame, one RX buffer.
    let frame = net_frame();
    let mut e = Encoder::new();
    e.u8(2);
    let n_at = e.bytes.len();
    e.u8(0);
    let n = mmio_bring_up(&mut e, 2, 8, VERSION_1 | (1 << 5), true);
    e.bytes[n_at] = n;
    e.raw(&mmio_memory(
        &[
            (0, vec![vec![(M + 0x1000, 2048, true)]]),
            (1, vec![vec![(M, frame.len() as u32, false)]]),
        ],
        &frame,
    ));
    out.push(("mmio", "net-tx", e.finish()));

    // vsock: RX buffers and a REQUEST to a port nobody listens on (answered with RST).
    let mut e = Encoder::new();
    e.u8(3);
    let n_at = e.bytes.len();
    e.u8(0);
    let n = mmio_bring_up(&mut e, 3, 8, VERSION_1, true);
    e.bytes[n_at] = n;
    e.raw(&mmio_memory(
        &[
            (
                0,
                vec![vec![(M + 0x1000, 44, true), (M + 0x1040, 1024, true)]],
            ),
            (1, vec![vec![(M, 44, false)]]),
        ],
        &vsock_hdr(1, 5000, 7, 0, 0),
    ));
    out.push(("mmio", "vsock-request", e.finish()));

    // Refused features, then a reset and a bad queue size.
    let mut e = Encoder::new();
    e.u8(0);
    let n_at = e.bytes.len();
    e.u8(0);
    let n1 = mmio_bring_up(&mut e, 1, 8, 1, false);
    // Reset, a queue size that is no power of two, an 8-byte write across the end of the
    // registers, a 1-byte config read.
    let tail: &[(u8, u16, u32)] = &[(5, 0x070, 0), (5, 0x038, 6), (7, 0x0fc, 0), (0, 0x101, 0)];
    for &(k, off, v) in tail {
        e.u8(k).u16(off).u32(v);
    }
    e.bytes[n_at] = n1 + tail.len() as u8;
    out.push(("mmio", "refused-features", e.finish()));
}
