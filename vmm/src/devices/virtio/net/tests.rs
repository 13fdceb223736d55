//! virtio-net tests: guest queues built with virtio-queue's `MockSplitQueue` in real guest
//! memory; on the host side a Unix datagram socket pair stands in for the tap (one frame
//! per datagram, like a tap), and one test attaches a real tap in a throwaway network
//! namespace.

use std::fs::File;
use std::io::ErrorKind;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;
use std::sync::Arc;

use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::Queue;
use virtio_queue::desc::{RawDescriptor, split::Descriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::backend::{NetBackend, NetCounters};
use super::*;
use crate::devices::virtio::GuestMemory;
use crate::devices::virtio::VirtioDevice;

const MEM_SIZE: usize = 0x40_0000;
const W: u32 = VRING_DESC_F_WRITE;

fn mem() -> GuestMemory {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

/// A backend on one end of a datagram socket pair; the other end plays the host network.
fn backend() -> (NetBackend, UnixDatagram, Arc<NetCounters>) {
    let (ours, theirs) = UnixDatagram::pair().unwrap();
    ours.set_nonblocking(true).unwrap();
    theirs.set_nonblocking(true).unwrap();
    let counters = Arc::new(NetCounters::default());
    let file = File::from(OwnedFd::from(ours));
    (
        NetBackend::new(file, "fake0".into(), Arc::clone(&counters)),
        theirs,
        counters,
    )
}

fn desc(addr: u64, len: u32, flags: u32) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, flags as u16, 0))
}

/// An Ethernet frame of `len` bytes with a recognisable pattern.
fn frame(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// `hdr` followed by `frame`, as the tap carries it.
fn on_wire(hdr: [u8; VNET_HDR_LEN], frame: &[u8]) -> Vec<u8> {
    let mut v = hdr.to_vec();
    v.extend_from_slice(frame);
    v
}

fn recv(sock: &UnixDatagram) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 128 * 1024];
    match sock.recv(&mut buf) {
        Ok(n) => Some(buf[..n].to_vec()),
        Err(e) if e.kind() == ErrorKind::WouldBlock => None,
        Err(e) => panic!("recv: {e}"),
    }
}

/// The header the device writes in front of every frame for the guest.
const GUEST_HDR: [u8; VNET_HDR_LEN] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0];

/// Publishes RX chains of writable buffers at the mock queue's avail index (several chains
/// can be added over time, unlike `build_multiple_desc_chains` which restarts at slot 0).
struct RxDriver<'a> {
    vq: MockSplitQueue<'a, GuestMemory>,
    next_desc: u16,
    next_avail: u16,
}

impl<'a> RxDriver<'a> {
    fn new(mem: &'a GuestMemory) -> Self {
        RxDriver {
            vq: MockSplitQueue::new(mem, 256),
            next_desc: 0,
            next_avail: 0,
        }
    }

    /// Adds one chain of (addr, len, flags) buffers, NEXT links filled in.
    fn post(&mut self, bufs: &[(u64, u32, u32)]) {
        let head = self.next_desc;
        for (i, &(addr, len, flags)) in bufs.iter().enumerate() {
            let idx = head + i as u16;
            let last = i + 1 == bufs.len();
            let flags = if last {
                flags
            } else {
                flags | VRING_DESC_F_NEXT
            };
            let next = if last { 0 } else { idx + 1 };
            self.vq
                .desc_table()
                .store(
                    idx,
                    RawDescriptor::from(Descriptor::new(addr, len, flags as u16, next)),
                )
                .unwrap();
        }
        self.next_desc += bufs.len() as u16;
        self.vq
            .avail()
            .ring()
            .ref_at(usize::from(self.next_avail))
            .unwrap()
            .store(head);
        self.next_avail += 1;
        self.vq.avail().idx().store(self.next_avail);
    }

    fn used_idx(&self) -> u16 {
        self.vq.used().idx().load()
    }

    /// (head, len) of used entry `i`.
    fn used(&self, i: u16) -> (u32, u32) {
        let e = self.vq.used().ring().ref_at(usize::from(i)).unwrap().load();
        (e.id(), e.len())
    }

    fn queue(&self) -> Queue {
        self.vq.create_queue().unwrap()
    }
}

fn read_guest(mem: &GuestMemory, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}

// ---- TX ------------------------------------------------------------------------------

#[test]
fn tx_frame_reaches_the_tap_with_a_zeroed_header() {
    let mem = mem();
    let (mut b, peer, counters) = backend();
    let eth = frame(98, 7);
    // The guest's header asks for checksum offload and GSO, which were not negotiated.
    let hdr = [1u8, 1, 54, 0, 0xdc, 5, 34, 0, 16, 0, 0, 0];
    mem.write_slice(&hdr, GuestAddress(0x10_0000)).unwrap();
    mem.write_slice(&eth[..40], GuestAddress(0x11_0000))
        .unwrap();
    mem.write_slice(&eth[40..], GuestAddress(0x12_0000))
        .unwrap();
    let vq = MockSplitQueue::new(&mem, 16);
    vq.build_desc_chain(&[
        desc(0x10_0000, 12, 0),
        desc(0x11_0000, 40, 0),
        desc(0x12_0000, 58, 0),
    ])
    .unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    assert!(b.process_tx(&mem, &mut q));
    assert_eq!(vq.used().idx().load(), 1);
    assert_eq!(vq.used().ring().ref_at(0).unwrap().load().len(), 0);
    assert_eq!(recv(&peer).unwrap(), on_wire([0; 12], &eth));
    assert_eq!(recv(&peer), None, "exactly one frame");
    let s = counters.snapshot();
    assert_eq!((s.tx_frames, s.tx_bytes, s.tx_dropped), (1, 98, 0));
}

#[test]
fn malformed_tx_chains_are_dropped_without_reaching_the_tap() {
    let mem = mem();
    let (mut b, peer, counters) = backend();
    mem.write_slice(&frame(2000, 1), GuestAddress(0x10_0000))
        .unwrap();
    let cases: Vec<(&str, Vec<RawDescriptor>)> = vec![
        ("writable descriptor", vec![desc(0x10_0000, 60, W)]),
        (
            "writable after readable",
            vec![desc(0x10_0000, 12, 0), desc(0x11_0000, 60, W)],
        ),
        ("runt", vec![desc(0x10_0000, 12 + 13, 0)]),
        ("header only", vec![desc(0x10_0000, 12, 0)]),
        ("empty", vec![desc(0x10_0000, 0, 0)]),
        ("outside memory", vec![desc(MEM_SIZE as u64 - 30, 60, 0)]),
        ("address overflow", vec![desc(u64::MAX - 8, 60, 0)]),
        (
            "larger than any frame",
            vec![desc(
                0x10_0000,
                (VNET_HDR_LEN + MAX_FRAME_LEN + 1) as u32,
                0,
            )],
        ),
        (
            "larger in total",
            vec![
                desc(0x10_0000, 0x8000, 0),
                desc(0x10_0000, 0x8000, 0),
                desc(0x10_0000, 0x8000, 0),
            ],
        ),
    ];
    for (i, (name, chain)) in cases.iter().enumerate() {
        let vq = MockSplitQueue::new(&mem, 16);
        vq.build_desc_chain(chain).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        assert!(b.process_tx(&mem, &mut q), "{name}");
        assert_eq!(vq.used().idx().load(), 1, "{name}: chain returned");
        assert_eq!(recv(&peer), None, "{name}: nothing sent");
        assert_eq!(counters.snapshot().tx_dropped, i as u64 + 1, "{name}");
    }
    // A chain looping back on itself is cut by the iterator after `queue size` hops.
    let vq = MockSplitQueue::new(&mem, 4);
    let next = VRING_DESC_F_NEXT as u16;
    vq.desc_table()
        .store(
            0,
            RawDescriptor::from(Descriptor::new(0x10_0000, 20, next, 1)),
        )
        .unwrap();
    vq.desc_table()
        .store(
            1,
            RawDescriptor::from(Descriptor::new(0x10_0000, 20, next, 0)),
        )
        .unwrap();
    vq.avail().ring().ref_at(0).unwrap().store(0);
    vq.avail().idx().store(1);
    let mut q: Queue = vq.create_queue().unwrap();
    assert!(b.process_tx(&mem, &mut q));
    assert_eq!(vq.used().idx().load(), 1);
    assert_eq!(recv(&peer), None, "looping chain not sent");
    assert_eq!(counters.snapshot().tx_frames, 0);
}

#[test]
fn tap_write_failure_is_counted() {
    let mem = mem();
    let (mut b, peer, counters) = backend();
    drop(peer);
    mem.write_slice(&frame(72, 3), GuestAddress(0x10_0000))
        .unwrap();
    let vq = MockSplitQueue::new(&mem, 16);
    vq.build_desc_chain(&[desc(0x10_0000, 72, 0)]).unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    assert!(b.process_tx(&mem, &mut q));
    let s = counters.snapshot();
    assert_eq!((s.tx_frames, s.tx_errors), (0, 1));
}

// ---- RX ------------------------------------------------------------------------------

#[test]
fn rx_frame_lands_in_guest_buffers_after_the_header() {
    let mem = mem();
    let (mut b, peer, counters) = backend();
    let eth = frame(1514, 9);
    // Whatever header the tap produced, the guest gets a clean one.
    peer.send(&on_wire([2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xaa, 0xbb], &eth))
        .unwrap();
    let mut rx = RxDriver::new(&mem);
    // Header and frame split over three buffers, the first smaller than the header.
    rx.post(&[
        (0x10_0000, 8, W),
        (0x11_0000, 1000, W),
        (0x12_0000, 2048, W),
    ]);
    let mut q = rx.queue();
    assert!(b.process_rx(&mem, &mut q));
    assert!(!b.rx_starved());
    assert_eq!(rx.used_idx(), 1);
    assert_eq!(rx.used(0), (0, 12 + 1514));
    let mut got = read_guest(&mem, 0x10_0000, 8);
    got.extend(read_guest(&mem, 0x11_0000, 1000));
    got.extend(read_guest(&mem, 0x12_0000, 12 + 1514 - 1008));
    assert_eq!(got, on_wire(GUEST_HDR, &eth));
    assert_eq!(
        read_guest(&mem, 0x12_0000 + 518, 4),
        [0; 4],
        "nothing written past the frame"
    );
    let s = counters.snapshot();
    assert_eq!((s.rx_frames, s.rx_bytes), (1, 1514));
}

#[test]
fn frames_wait_for_guest_buffers_instead_of_being_lost() {
    let mem = mem();
    let (mut b, peer, counters) = backend();
    for seed in 0..3u8 {
        peer.send(&on_wire([0; 12], &frame(60 + usize::from(seed), seed)))
            .unwrap();
    }
    let mut rx = RxDriver::new(&mem);
    let mut q = rx.queue();
    // No buffers: one frame is taken off the tap and held, the rest stay in the tap.
    assert!(!b.process_rx(&mem, &mut q));
    assert!(b.rx_starved());
    assert!(!b.process_rx(&mem, &mut q), "still nothing to fill");
    for i in 0..3u16 {
        rx.post(&[(0x10_0000 + u64::from(i) * 0x1000, 2048, W)]);
        assert!(b.process_rx(&mem, &mut q));
        assert_eq!(rx.used_idx(), i + 1);
        // The next frame waits for the next buffer; after the last one the tap is empty.
        assert_eq!(b.rx_starved(), i < 2, "after buffer {i}");
        assert_eq!(rx.used(i), (u32::from(i), 12 + 60 + u32::from(i)));
    }
    for (i, seed) in (0..3u8).enumerate() {
        let got = read_guest(&mem, 0x10_0000 + i as u64 * 0x1000, 12 + 60 + i);
        assert_eq!(got, on_wire(GUEST_HDR, &frame(60 + i, seed)), "frame {i}");
    }
    // The tap is empty now: a spare buffer stays posted, and nothing is starving.
    rx.post(&[(0x20_0000, 2048, W)]);
    assert!(!b.process_rx(&mem, &mut q));
    assert!(!b.rx_starved());
    let s = counters.snapshot();
    assert_eq!((s.rx_frames, s.rx_dropped), (3, 0));
}

#[test]
fn bad_rx_chains_are_returned_empty_and_the_frame_goes_to_the_next() {
    let mem = mem();
    let (mut b, peer, counters) = backend();
    let eth = frame(200, 4);
    peer.send(&on_wire([0; 12], &eth)).unwrap();
    let mut rx = RxDriver::new(&mem);
    rx.post(&[(0x10_0000, 2048, 0)]); // device-readable
    rx.post(&[(0x10_0000, 8, W), (0x11_0000, 2048, 0)]); // readable after writable
    rx.post(&[(MEM_SIZE as u64 - 100, 2048, W)]); // outside guest memory
    rx.post(&[(u64::MAX - 10, 2048, W)]); // address overflow
    rx.post(&[(0x10_0000, 0, W)]); // empty
    rx.post(&[(0x10_0000, 10, W)]); // smaller than the header
    rx.post(&[(0x12_0000, 2048, W)]); // good
    let mut q = rx.queue();
    assert!(b.process_rx(&mem, &mut q));
    assert_eq!(rx.used_idx(), 7);
    for i in 0..6 {
        assert_eq!(rx.used(i).1, 0, "bad chain {i} returned empty");
    }
    assert_eq!(rx.used(6).1, 12 + 200);
    assert_eq!(read_guest(&mem, 0x12_0000, 212), on_wire(GUEST_HDR, &eth));
    let s = counters.snapshot();
    assert_eq!((s.rx_bad_chains, s.rx_frames, s.rx_dropped), (6, 1, 0));
}

#[test]
fn rx_frame_too_big_for_the_buffers_is_dropped_and_the_buffer_kept() {
    let mem = mem();
    let (mut b, peer, counters) = backend();
    // A jumbo frame the guest's 1526-byte buffers cannot hold, then a normal one.
    peer.send(&on_wire([0; 12], &frame(9000, 1))).unwrap();
    let small = frame(1514, 2);
    peer.send(&on_wire([0; 12], &small)).unwrap();
    let mut rx = RxDriver::new(&mem);
    rx.post(&[(0x10_0000, 1526, W)]);
    let mut q = rx.queue();
    assert!(b.process_rx(&mem, &mut q));
    assert_eq!(rx.used_idx(), 1);
    assert_eq!(rx.used(0), (0, 1526));
    assert_eq!(
        read_guest(&mem, 0x10_0000, 1526),
        on_wire(GUEST_HDR, &small)
    );
    let s = counters.snapshot();
    assert_eq!((s.rx_dropped, s.rx_frames, s.rx_bad_chains), (1, 1, 0));
}

#[test]
fn runt_and_gso_frames_from_the_tap_are_dropped() {
    let mem = mem();
    let (mut b, peer, counters) = backend();
    peer.send(&[0u8; 12]).unwrap(); // header only
    peer.send(&on_wire([0; 12], &frame(13, 0))).unwrap(); // shorter than Ethernet
    peer.send(&on_wire(
        [0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        &frame(3000, 0),
    ))
    .unwrap(); // GSO TCPv4
    peer.send(&[1u8; 5]).unwrap(); // shorter than the header
    let good = frame(64, 5);
    peer.send(&on_wire([0; 12], &good)).unwrap();
    let mut rx = RxDriver::new(&mem);
    rx.post(&[(0x10_0000, 4096, W)]);
    let mut q = rx.queue();
    assert!(b.process_rx(&mem, &mut q));
    assert_eq!(rx.used_idx(), 1);
    assert_eq!(read_guest(&mem, 0x10_0000, 76), on_wire(GUEST_HDR, &good));
    let s = counters.snapshot();
    assert_eq!((s.rx_dropped, s.rx_frames), (4, 1));
}

#[test]
fn reset_forgets_the_held_frame() {
    let mem = mem();
    let (mut b, peer, _) = backend();
    peer.send(&on_wire([0; 12], &frame(60, 1))).unwrap();
    let mut rx = RxDriver::new(&mem);
    let mut q = rx.queue();
    b.process_rx(&mem, &mut q);
    assert!(b.rx_starved());
    b.reset();
    assert!(!b.rx_starved());
    rx.post(&[(0x10_0000, 2048, W)]);
    assert!(!b.process_rx(&mem, &mut q), "held frame was dropped");
}

// ---- device ----------------------------------------------------------------------------

fn test_mac() -> MacAddr {
    "02:00:00:aa:bb:cc".parse().unwrap()
}

#[test]
fn config_space_features_and_queues() {
    let (ours, _peer) = UnixDatagram::pair().unwrap();
    let net = Net::with_file("t0".into(), File::from(OwnedFd::from(ours)), test_mac());
    assert_eq!(net.device_type(), 1);
    assert_eq!(net.queue_max_sizes(), &[256, 256]);
    let f = net.avail_features();
    assert_eq!(f, (1 << 32) | (1 << 29) | (1 << 5) | (1 << 16));
    let mut cfg = [0u8; 8];
    net.read_config(0, &mut cfg);
    assert_eq!(
        cfg,
        [0x02, 0, 0, 0xaa, 0xbb, 0xcc, 1, 0],
        "MAC, then link up"
    );
    let mut b1 = [0u8; 1];
    net.read_config(5, &mut b1);
    assert_eq!(b1, [0xcc]);
    let mut past = [0xffu8; 4];
    net.read_config(8, &mut past);
    assert_eq!(past, [0; 4], "no fields past status");
}

/// Drives the transport through feature negotiation (`features_low` in word 0, VERSION_1
/// in word 1) and queue set-up for the RX and TX mock queues, to DRIVER_OK.
fn bring_up(
    t: &mut crate::devices::virtio::mmio::MmioTransport,
    features_low: u32,
    queues: [&MockSplitQueue<'_, GuestMemory>; 2],
) {
    use crate::devices::bus::BusDevice;
    use crate::devices::virtio::mmio::status;
    let mut wr = |off: u64, v: u32| t.write(off, &v.to_le_bytes());
    wr(0x70, status::ACKNOWLEDGE);
    wr(0x70, status::ACKNOWLEDGE | status::DRIVER);
    if features_low != 0 {
        wr(0x24, 0);
        wr(0x20, features_low);
    }
    wr(0x24, 1);
    wr(0x20, 1);
    let ok = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
    wr(0x70, ok);
    for (i, vq) in queues.iter().enumerate() {
        wr(0x30, i as u32);
        wr(0x38, 16);
        wr(0x80, vq.desc_table_addr().0 as u32);
        wr(0x90, vq.avail_addr().0 as u32);
        wr(0xa0, vq.used_addr().0 as u32);
        wr(0x44, 1);
    }
    wr(0x70, ok | status::DRIVER_OK);
    assert!(t.is_activated());
}

/// Through the MMIO transport and the worker thread: a frame each way, the RX frame held
/// while the guest has no buffers and delivered on the queue kick, and a driver reset
/// that keeps the tap for the next activation.
#[test]
fn worker_moves_frames_both_ways_through_the_transport() {
    use crate::devices::bus::BusDevice;
    use crate::devices::virtio::Interrupt;
    use crate::devices::virtio::mmio::MmioTransport;
    use std::time::Duration;

    let mem = mem();
    let (ours, peer) = UnixDatagram::pair().unwrap();
    ours.set_nonblocking(true).unwrap();
    let net = Net::with_file("t0".into(), File::from(OwnedFd::from(ours)), test_mac());
    // A blocking irqfd: reading it waits for the worker's interrupt.
    let irq = EventFd::new(0).unwrap();
    let mut t = MmioTransport::new(mem.clone(), Box::new(net), Interrupt::new(irq));
    let wr = |t: &mut MmioTransport, off: u64, v: u32| t.write(off, &v.to_le_bytes());
    let rxq = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 16);
    let txq = MockSplitQueue::create(&mem, GuestAddress(0x2_0000), 16);
    let bring_up = |t: &mut MmioTransport| bring_up(t, (1 << 5) | (1 << 16), [&rxq, &txq]);
    bring_up(&mut t);

    // Host to guest, before the guest posted any buffer: held, then delivered on the kick.
    let eth_in = frame(300, 8);
    peer.send(&on_wire([0; 12], &eth_in)).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(rxq.used().idx().load(), 0);
    rxq.add_desc_chains(&[desc(0x10_0000, 2048, W)], 0).unwrap();
    wr(&mut t, 0x50, 0);
    t.interrupt().irqfd().read().unwrap();
    assert_eq!(rxq.used().idx().load(), 1);
    assert_eq!(
        read_guest(&mem, 0x10_0000, 312),
        on_wire(GUEST_HDR, &eth_in)
    );

    // Guest to host.
    let eth_out = frame(90, 9);
    mem.write_slice(&on_wire([0; 12], &eth_out), GuestAddress(0x20_0000))
        .unwrap();
    txq.add_desc_chains(&[desc(0x20_0000, 102, 0)], 0).unwrap();
    wr(&mut t, 0x50, 1);
    t.interrupt().irqfd().read().unwrap();
    assert_eq!(txq.used().idx().load(), 1);
    peer.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = peer.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], &on_wire([0; 12], &eth_out)[..]);

    // A second host frame while a buffer is posted: the tap's readiness alone delivers it.
    rxq.add_desc_chains(&[desc(0x11_0000, 2048, W)], 1).unwrap();
    wr(&mut t, 0x50, 0);
    let eth_in2 = frame(64, 10);
    peer.send(&on_wire([0; 12], &eth_in2)).unwrap();
    while rxq.used().idx().load() < 2 {
        t.interrupt().irqfd().read().unwrap();
    }
    assert_eq!(
        read_guest(&mem, 0x11_0000, 76),
        on_wire(GUEST_HDR, &eth_in2)
    );

    // Reset, then the same tap serves a fresh activation.
    wr(&mut t, 0x70, 0);
    assert!(!t.is_activated());
    bring_up(&mut t);
}

/// A guest that claims more RX buffers than its queue holds while a frame waits: the
/// worker marks the device DEVICE_NEEDS_RESET instead of spinning in its RX loop, the
/// driver's reset returns promptly and clears the mark, and the device works again.
#[test]
fn an_impossible_rx_avail_index_needs_reset_and_a_reset_recovers() {
    use crate::devices::bus::BusDevice;
    use crate::devices::virtio::Interrupt;
    use crate::devices::virtio::interrupt::INT_CONFIG;
    use crate::devices::virtio::mmio::{MmioTransport, status};
    use std::time::{Duration, Instant};

    let mem = mem();
    let (ours, peer) = UnixDatagram::pair().unwrap();
    ours.set_nonblocking(true).unwrap();
    let net = Net::with_file("t0".into(), File::from(OwnedFd::from(ours)), test_mac());
    let irq = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
    let mut t = MmioTransport::new(mem.clone(), Box::new(net), Interrupt::new(irq));
    let wr = |t: &mut MmioTransport, off: u64, v: u32| t.write(off, &v.to_le_bytes());
    let rd = |t: &mut MmioTransport, off: u64| {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    };
    let rxq = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 16);
    let txq = MockSplitQueue::create(&mem, GuestAddress(0x2_0000), 16);
    let ok = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
    let bring_up = |t: &mut MmioTransport| bring_up(t, 0, [&rxq, &txq]);
    bring_up(&mut t);

    // A frame waits for a buffer; then the guest's avail index jumps 40 ahead of 16.
    peer.send(&on_wire([0; 12], &frame(300, 8))).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    rxq.avail().idx().store(40);
    wr(&mut t, 0x50, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while rd(&mut t, 0x70) & status::DEVICE_NEEDS_RESET == 0 {
        assert!(
            Instant::now() < deadline,
            "the device never asked for a reset"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        rd(&mut t, 0x70),
        ok | status::DRIVER_OK | status::DEVICE_NEEDS_RESET
    );
    assert_ne!(rd(&mut t, 0x60) & INT_CONFIG, 0, "config interrupt raised");
    assert_eq!(
        rxq.used().idx().load(),
        0,
        "nothing was written to the guest"
    );

    // The same on TX: the worker is still responsive and does not spin there either.
    txq.avail().idx().store(1000);
    wr(&mut t, 0x50, 1);

    // The driver resets: the worker stops, the mark is gone, and a fresh start works.
    let started = Instant::now();
    wr(&mut t, 0x70, 0);
    assert!(!t.is_activated(), "reset took {:?}", started.elapsed());
    assert_eq!(rd(&mut t, 0x70), 0);
    rxq.avail().idx().store(0);
    txq.avail().idx().store(0);
    bring_up(&mut t);
    assert_eq!(rd(&mut t, 0x70) & status::DEVICE_NEEDS_RESET, 0);
    rxq.add_desc_chains(&[desc(0x10_0000, 2048, W)], 0).unwrap();
    peer.send(&on_wire([0; 12], &frame(64, 9))).unwrap();
    wr(&mut t, 0x50, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while rxq.used().idx().load() == 0 {
        assert!(Instant::now() < deadline, "no frame after the reset");
        std::thread::sleep(Duration::from_millis(10));
    }
}

// ---- real tap ----------------------------------------------------------------------------

/// Runs `f` on a thread in a fresh network namespace (namespaces are per thread), so taps
/// and addresses it creates vanish with the thread. `None` when this host cannot (not
/// root, no /dev/net/tun, no `ip`).
fn in_throwaway_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    std::thread::spawn(move || {
        // SAFETY: plain syscall on the calling thread only.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            eprintln!(
                "skipping: cannot create a network namespace: {}",
                std::io::Error::last_os_error()
            );
            return None;
        }
        if !std::path::Path::new("/dev/net/tun").exists() {
            eprintln!("skipping: no /dev/net/tun");
            return None;
        }
        Some(f())
    })
    .join()
    .unwrap()
}

fn ip(args: &[&str]) {
    let out = std::process::Command::new("ip").args(args).output();
    match out {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!("ip {args:?}: {}", String::from_utf8_lossy(&o.stderr)),
        Err(e) => panic!("running ip {args:?}: {e}"),
    }
}

/// An IPv4/UDP frame from 10.200.0.2:5000 (02:00:00:00:00:02) to 10.200.0.1:6000
/// (02:00:00:00:00:01) carrying `payload`, with a valid IP header checksum and no UDP
/// checksum (allowed over IPv4).
fn udp_frame(payload: &[u8]) -> Vec<u8> {
    let mut f = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x08, 0x00];
    let total = (20 + 8 + payload.len()) as u16;
    let mut ip = vec![
        0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0, 10, 200, 0, 2, 10, 200, 0, 1,
    ];
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    let mut sum: u32 = ip
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    ip[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    f.extend(ip);
    f.extend(5000u16.to_be_bytes());
    f.extend(6000u16.to_be_bytes());
    f.extend(((8 + payload.len()) as u16).to_be_bytes());
    f.extend([0, 0]);
    f.extend_from_slice(payload);
    f
}

#[test]
fn real_tap_in_a_throwaway_netns() {
    let outcome = in_throwaway_netns(|| {
        use std::net::UdpSocket;
        use std::time::{Duration, Instant};

        ip(&["tuntap", "add", "dev", "husk-t0", "mode", "tap"]);
        ip(&[
            "link",
            "set",
            "husk-t0",
            "address",
            "02:00:00:00:00:01",
            "up",
        ]);
        ip(&["addr", "add", "10.200.0.1/24", "dev", "husk-t0"]);
        // The guest's address is known, so the host sends no ARP request first.
        ip(&[
            "neigh",
            "add",
            "10.200.0.2",
            "lladdr",
            "02:00:00:00:00:02",
            "dev",
            "husk-t0",
        ]);

        // Bad names are refused before the tap is touched.
        assert!(matches!(Tap::open("nope0"), Err(TapError::NotFound(_))));
        assert!(matches!(Tap::open("lo"), Err(TapError::NotATap { .. })));
        assert!(matches!(
            Tap::open("a/b"),
            Err(TapError::InvalidName { .. })
        ));

        let tap = Tap::open("husk-t0").expect("attach the tap");
        let err = Tap::open("husk-t0").unwrap_err();
        assert!(matches!(err, TapError::Busy { .. }), "{err}");
        assert!(err.to_string().contains("husk-t0"), "{err}");

        let counters = Arc::new(NetCounters::default());
        let mut b = NetBackend::new(tap.into_file(), "husk-t0".into(), Arc::clone(&counters));
        let mem = mem();

        // Guest to host: a UDP datagram reaches a host socket.
        let host = UdpSocket::bind("10.200.0.1:6000").unwrap();
        host.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut wire = vec![0u8; 12];
        wire.extend(udp_frame(b"from the guest"));
        mem.write_slice(&wire, GuestAddress(0x10_0000)).unwrap();
        let vq = MockSplitQueue::new(&mem, 16);
        vq.build_desc_chain(&[desc(0x10_0000, wire.len() as u32, 0)])
            .unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        assert!(b.process_tx(&mem, &mut q));
        assert_eq!(counters.snapshot().tx_errors, 0);
        let mut buf = [0u8; 64];
        let (n, from) = host.recv_from(&mut buf).expect("datagram from the guest");
        assert_eq!(&buf[..n], b"from the guest");
        assert_eq!(from.to_string(), "10.200.0.2:5000");

        // Host to guest: the reply arrives in a guest buffer as an Ethernet frame, among
        // whatever else the host sends on a fresh link (IPv6 neighbour discovery...). It is
        // sent again until seen: the link's carrier came up when the tap was attached, and
        // until the kernel's link watcher activates the queue (up to a second) the host
        // drops what it sends.
        let mut rx = RxDriver::new(&mem);
        let mut q = rx.queue();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut slot = 0u16;
        loop {
            assert!(Instant::now() < deadline, "no UDP frame reached the guest");
            // One buffer outstanding at a time, so used entry `slot` is in buffer `slot`.
            if rx.next_avail == slot {
                rx.post(&[(0x20_0000 + u64::from(slot) * 0x1000, 2048, W)]);
            }
            b.process_rx(&mem, &mut q);
            if rx.used_idx() == slot {
                host.send_to(b"from the host", "10.200.0.2:5000").unwrap();
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            let (_, len) = rx.used(slot);
            let got = read_guest(&mem, 0x20_0000 + u64::from(slot) * 0x1000, len as usize);
            slot += 1;
            assert_eq!(&got[..12], &GUEST_HDR);
            let eth = &got[12..];
            if eth[12..14] == [0x08, 0x00] && eth.ends_with(b"from the host") {
                assert_eq!(&eth[..6], &[2, 0, 0, 0, 0, 2], "to the guest's MAC");
                assert_eq!(&eth[6..12], &[2, 0, 0, 0, 0, 1], "from the tap's MAC");
                break;
            }
        }
        counters.snapshot()
    });
    if let Some(stats) = outcome {
        assert_eq!(stats.tx_frames, 1);
        assert!(stats.rx_frames >= 1);
        assert_eq!((stats.rx_dropped, stats.tx_dropped), (0, 0));
    }
}

#[test]
fn tap_opened_in_another_network_namespace() {
    use std::sync::mpsc;

    if !std::path::Path::new("/dev/net/tun").exists() {
        eprintln!("skipping: no /dev/net/tun");
        return;
    }
    // A thread in a fresh namespace holds a tap there until told to end; the test's
    // own thread, in the original namespace, opens it through the thread's ns file.
    let (ready_tx, ready_rx) = mpsc::channel::<Option<String>>();
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let holder = std::thread::spawn(move || {
        // SAFETY: plain syscalls on the calling thread only.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            eprintln!(
                "skipping: cannot create a network namespace: {}",
                std::io::Error::last_os_error()
            );
            let _ = ready_tx.send(None);
            return;
        }
        // SAFETY: as above.
        let tid = unsafe { libc::gettid() };
        ip(&["tuntap", "add", "dev", "husk-ns-t0", "mode", "tap"]);
        let path = format!("/proc/{}/task/{tid}/ns/net", std::process::id());
        ready_tx.send(Some(path)).unwrap();
        let _ = done_rx.recv();
    });
    let Some(netns) = ready_rx.recv().unwrap() else {
        holder.join().unwrap();
        return;
    };
    let netns = std::path::PathBuf::from(netns);

    assert!(
        matches!(Tap::open("husk-ns-t0"), Err(TapError::NotFound(_))),
        "the tap is not in the test's namespace"
    );
    let tap = Tap::open_in_netns("husk-ns-t0", &netns).expect("open in the namespace");
    assert_eq!(tap.name(), "husk-ns-t0");
    // The attachment outlived the thread that made it: a second one is refused as busy.
    let busy = Tap::open_in_netns("husk-ns-t0", &netns).unwrap_err();
    assert!(
        matches!(&busy, TapError::InNetns { source, .. } if matches!(**source, TapError::Busy { .. })),
        "{busy}"
    );
    assert!(
        busy.to_string().contains(&netns.display().to_string()),
        "{busy}"
    );
    // The calling thread stayed where it was.
    assert!(matches!(
        Tap::open("husk-ns-t0"),
        Err(TapError::NotFound(_))
    ));

    let missing = Tap::open_in_netns("nope0", &netns).unwrap_err();
    assert!(
        matches!(missing, TapError::NotFoundInNetns { .. }),
        "{missing}"
    );
    assert!(
        missing.to_string().contains(&netns.display().to_string()),
        "{missing}"
    );
    let bad =
        Tap::open_in_netns("husk-ns-t0", std::path::Path::new("/nonexistent/ns")).unwrap_err();
    assert!(matches!(bad, TapError::EnterNetns { .. }), "{bad}");
    assert!(bad.to_string().contains("/nonexistent/ns"), "{bad}");

    drop(tap);
    done_tx.send(()).unwrap();
    holder.join().unwrap();
}
