//! vsock tests: a simulated guest driver on real split queues in guest memory, and real
//! Unix sockets on the host side. Everything runs on the test thread.

use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::tempdir::TempDir;

use super::muxer::{MAX_TX_PAYLOAD, Muxer, parse_connect_line};
use super::packet::*;
use super::{CONN_BUF_SIZE, Vsock, VsockError};
use crate::devices::virtio::GuestMemory;
use crate::devices::virtio::VirtioDevice;

const GUEST_CID: u64 = 3;
const QSIZE: u16 = 256;
/// Chains per queue in flight at most; each owns 4 descriptor slots.
const SLOTS: u16 = QSIZE / 4;
const RX_DATA: u32 = 4096;

/// The driver side of one split queue, with wrapping ring indices.
struct DriverQueue {
    desc: u64,
    avail: u64,
    used: u64,
    next_avail: u16,
    next_used: u16,
    in_flight: u16,
}

impl DriverQueue {
    fn new(base: u64) -> (Self, Queue) {
        let desc = base;
        let avail = desc + 16 * u64::from(QSIZE);
        let used = (avail + 6 + 2 * u64::from(QSIZE) + 3) & !3;
        let mut q = Queue::new(QSIZE).unwrap();
        q.try_set_desc_table_address(GuestAddress(desc)).unwrap();
        q.try_set_avail_ring_address(GuestAddress(avail)).unwrap();
        q.try_set_used_ring_address(GuestAddress(used)).unwrap();
        q.set_ready(true);
        let dq = DriverQueue {
            desc,
            avail,
            used,
            next_avail: 0,
            next_used: 0,
            in_flight: 0,
        };
        (dq, q)
    }

    /// Slot the next chain will use.
    fn slot(&self) -> u16 {
        self.next_avail % SLOTS
    }

    /// Publishes a chain of (addr, len, device-writable) buffers.
    fn push(&mut self, mem: &GuestMemory, bufs: &[(u64, u32, bool)]) {
        assert!(self.in_flight < SLOTS && bufs.len() <= 4);
        let head = self.slot() * 4;
        for (i, &(addr, len, write)) in bufs.iter().enumerate() {
            let idx = head + i as u16;
            let mut flags = if write { 2u16 } else { 0 };
            if i + 1 < bufs.len() {
                flags |= 1;
            }
            let d = self.desc + 16 * u64::from(idx);
            mem.write_obj(addr, GuestAddress(d)).unwrap();
            mem.write_obj(len, GuestAddress(d + 8)).unwrap();
            mem.write_obj(flags, GuestAddress(d + 12)).unwrap();
            mem.write_obj(idx + 1, GuestAddress(d + 14)).unwrap();
        }
        let ring = self.avail + 4 + 2 * u64::from(self.next_avail % QSIZE);
        mem.write_obj(head, GuestAddress(ring)).unwrap();
        self.next_avail = self.next_avail.wrapping_add(1);
        mem.write_obj(self.next_avail, GuestAddress(self.avail + 2))
            .unwrap();
        self.in_flight += 1;
    }

    /// Next used element: (head descriptor index, length).
    fn pop_used(&mut self, mem: &GuestMemory) -> Option<(u16, u32)> {
        let idx: u16 = mem.read_obj(GuestAddress(self.used + 2)).unwrap();
        if idx == self.next_used {
            return None;
        }
        let e = self.used + 4 + 8 * u64::from(self.next_used % QSIZE);
        let id: u32 = mem.read_obj(GuestAddress(e)).unwrap();
        let len: u32 = mem.read_obj(GuestAddress(e + 4)).unwrap();
        self.next_used = self.next_used.wrapping_add(1);
        self.in_flight -= 1;
        Some((id as u16, len))
    }
}

const RXQ_BASE: u64 = 0x1_0000;
const TXQ_BASE: u64 = 0x2_0000;
const RX_BUFS: u64 = 0x10_0000;
const TX_BUFS: u64 = 0x20_0000;
const TX_SLOT: u64 = 0x1_1000;

/// A guest driver: RX buffers, TX packets, and its own credit bookkeeping.
struct Guest {
    mem: GuestMemory,
    rx: DriverQueue,
    rxq: Queue,
    tx: DriverQueue,
    txq: Queue,
}

impl Guest {
    fn new() -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x200_0000)]).unwrap();
        let (rx, rxq) = DriverQueue::new(RXQ_BASE);
        let (tx, txq) = DriverQueue::new(TXQ_BASE);
        Guest {
            mem,
            rx,
            rxq,
            tx,
            txq,
        }
    }

    fn rx_buf(slot: u16) -> u64 {
        RX_BUFS + u64::from(slot) * 0x2000
    }

    /// Keeps `n` RX buffers posted.
    fn post_rx(&mut self, n: u16) {
        while self.rx.in_flight < n {
            let a = Self::rx_buf(self.rx.slot());
            self.rx
                .push(&self.mem, &[(a, 44, true), (a + 0x100, RX_DATA, true)]);
        }
    }

    /// Queues a TX packet; waits for room by having the muxer consume TX first.
    fn send(&mut self, mux: &mut Muxer, h: Header, data: &[u8]) {
        if self.tx.in_flight == SLOTS {
            self.pump_tx(mux);
        }
        self.send_raw(h, data);
    }

    fn pump_tx(&mut self, mux: &mut Muxer) {
        mux.process_tx(&self.mem, &mut self.txq);
        while self.tx.pop_used(&self.mem).is_some() {}
    }

    /// One round of device work: host sockets, TX, RX.
    fn pump(&mut self, mux: &mut Muxer) {
        mux.process_host_events();
        self.pump_tx(mux);
        mux.fill_rx(&self.mem, &mut self.rxq);
    }

    /// Packets the device put into RX buffers.
    fn recv(&mut self) -> Vec<(Header, Vec<u8>)> {
        let mut out = Vec::new();
        while let Some((head, len)) = self.rx.pop_used(&self.mem) {
            let a = Self::rx_buf(head / 4);
            let mut hb = [0u8; HEADER_LEN];
            self.mem.read_slice(&mut hb, GuestAddress(a)).unwrap();
            let h = Header::from_bytes(&hb);
            assert_eq!(len, 44 + h.len, "used length covers header and data");
            let mut data = vec![0u8; h.len as usize];
            self.mem
                .read_slice(&mut data, GuestAddress(a + 0x100))
                .unwrap();
            out.push((h, data));
        }
        out
    }

    fn pump_recv(&mut self, mux: &mut Muxer) -> Vec<(Header, Vec<u8>)> {
        self.post_rx(32);
        self.pump(mux);
        self.recv()
    }
}

fn hdr(op: u16, src_port: u32, dst_port: u32) -> Header {
    Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        type_: TYPE_STREAM,
        op,
        buf_alloc: 1 << 20,
        ..Default::default()
    }
}

struct Env {
    _dir: TempDir,
    path: PathBuf,
    mux: Muxer,
    guest: Guest,
}

fn env() -> Env {
    let dir = TempDir::new_with_prefix("/tmp/husk-vsock").unwrap();
    let path = dir.as_path().join("v.sock");
    let mux = Muxer::new(GUEST_CID, &path).unwrap();
    Env {
        _dir: dir,
        path,
        mux,
        guest: Guest::new(),
    }
}

/// Host connects with `CONNECT port`; returns the stream and the guest-visible request.
fn host_connect(e: &mut Env, port: u32) -> (UnixStream, Header) {
    let mut s = UnixStream::connect(&e.path).unwrap();
    s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
    let pkts = e.guest.pump_recv(&mut e.mux);
    assert_eq!(pkts.len(), 1, "{pkts:?}");
    let req = pkts[0].0;
    assert_eq!(req.op, OP_REQUEST);
    assert_eq!((req.src_cid, req.dst_cid), (HOST_CID, GUEST_CID));
    assert_eq!(req.dst_port, port);
    assert_eq!(req.type_, TYPE_STREAM);
    assert_eq!(req.buf_alloc, CONN_BUF_SIZE);
    (s, req)
}

/// Completes a host-initiated connection; the host has read `OK <port>`.
fn establish(e: &mut Env, port: u32) -> (UnixStream, Header) {
    let (mut s, req) = host_connect(e, port);
    e.guest.send(
        &mut e.mux,
        hdr(OP_RESPONSE, req.dst_port, req.src_port),
        &[],
    );
    assert!(e.guest.pump_recv(&mut e.mux).is_empty());
    let want = format!("OK {}\n", req.src_port);
    let mut got = vec![0u8; want.len()];
    s.read_exact(&mut got).unwrap();
    assert_eq!(String::from_utf8(got).unwrap(), want);
    (s, req)
}

fn read_nonblocking(s: &mut UnixStream) -> Result<Vec<u8>, ErrorKind> {
    s.set_nonblocking(true).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let r = match s.read(&mut buf) {
        Ok(n) => Ok(buf[..n].to_vec()),
        Err(e) => Err(e.kind()),
    };
    s.set_nonblocking(false).unwrap();
    r
}

/// The socket gives the agent's API: owner-only even when the caller's umask is 000.
#[test]
fn the_socket_is_owner_only_under_any_umask() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new_with_prefix("/tmp/husk-vsock").unwrap();
    let path = dir.as_path().join("v.sock");
    // SAFETY: umask only swaps the process's file mode mask.
    let old = unsafe { libc::umask(0) };
    let mux = Muxer::new(GUEST_CID, &path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let _mux = mux.unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{mode:o}");
}

#[test]
fn connect_line_parsing() {
    assert_eq!(parse_connect_line(b"CONNECT 1024"), Some(1024));
    assert_eq!(parse_connect_line(b"CONNECT 4294967295"), Some(u32::MAX));
    for bad in [
        &b"CONNECT 4294967296"[..],
        b"CONNECT ",
        b"CONNECT -1",
        b"CONNECT  1",
        b"CONNECT 1 ",
        b"CONNECT 0x10",
        b"connect 1",
        b"CONNECT 00000000001",
        b"LISTEN 1",
        b"",
    ] {
        assert_eq!(
            parse_connect_line(bad),
            None,
            "{:?}",
            String::from_utf8_lossy(bad)
        );
    }
}

#[test]
fn host_initiated_full_lifecycle() {
    let mut e = env();
    let (mut s, req) = establish(&mut e, 1024);
    assert_eq!(req.src_port, 1 << 30, "local ports start at 2^30");
    let (local, peer) = (req.src_port, req.dst_port);

    s.write_all(b"hello guest").unwrap();
    let pkts = e.guest.pump_recv(&mut e.mux);
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].0.op, OP_RW);
    assert_eq!((pkts[0].0.src_port, pkts[0].0.dst_port), (local, peer));
    assert_eq!(pkts[0].1, b"hello guest");

    e.guest.send(
        &mut e.mux,
        hdr(OP_RW, peer, local).with_len(11),
        b"hello host!",
    );
    e.guest.pump(&mut e.mux);
    let mut buf = [0u8; 11];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello host!");

    // Host half-closes: the guest sees SHUTDOWN(SEND) and can still send.
    s.shutdown(Shutdown::Write).unwrap();
    let pkts = e.guest.pump_recv(&mut e.mux);
    assert_eq!(pkts.len(), 1, "{pkts:?}");
    assert_eq!(
        (pkts[0].0.op, pkts[0].0.flags),
        (OP_SHUTDOWN, SHUTDOWN_SEND)
    );
    e.guest
        .send(&mut e.mux, hdr(OP_RW, peer, local).with_len(3), b"bye");
    e.guest.pump(&mut e.mux);
    s.read_exact(&mut buf[..3]).unwrap();
    assert_eq!(&buf[..3], b"bye");

    // The guest closes: it gets the RST it waits for and the host sees EOF.
    let mut sh = hdr(OP_SHUTDOWN, peer, local);
    sh.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    e.guest.send(&mut e.mux, sh, &[]);
    let pkts = e.guest.pump_recv(&mut e.mux);
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].0.op, OP_RST);
    assert_eq!(read_nonblocking(&mut s), Ok(vec![]));
    assert_eq!(e.mux.connection_count(), 0);
}

#[test]
fn bytes_after_connect_line_belong_to_the_stream() {
    let mut e = env();
    let mut s = UnixStream::connect(&e.path).unwrap();
    s.write_all(b"CONNECT 52\nearly bytes").unwrap();
    let pkts = e.guest.pump_recv(&mut e.mux);
    assert_eq!(pkts.len(), 1);
    let req = pkts[0].0;
    e.guest
        .send(&mut e.mux, hdr(OP_RESPONSE, 52, req.src_port), &[]);
    let pkts = e.guest.pump_recv(&mut e.mux);
    // The host socket became readable only after establishment: next round.
    let pkts = if pkts.is_empty() {
        e.guest.pump_recv(&mut e.mux)
    } else {
        pkts
    };
    assert_eq!(pkts.len(), 1, "{pkts:?}");
    assert_eq!(pkts[0].1, b"early bytes");
    let mut ok = [0u8; 14];
    s.read_exact(&mut ok).unwrap();
    assert_eq!(&ok, b"OK 1073741824\n");
}

#[test]
fn malformed_handshakes_close_the_stream() {
    let mut e = env();
    let long = vec![b'A'; 100];
    for line in [
        &b"CONNECT abc\n"[..],
        b"connect 1024\n",
        b"CONNECT 99999999999\n",
        b"CONNECT  1\n",
        b"CONNECT 1\r\n",
        &long,
    ] {
        let mut s = UnixStream::connect(&e.path).unwrap();
        s.write_all(line).unwrap();
        let pkts = e.guest.pump_recv(&mut e.mux);
        assert!(pkts.is_empty(), "{pkts:?}");
        // Closing with unread bytes makes the peer see a reset instead of EOF.
        let r = read_nonblocking(&mut s);
        assert!(
            matches!(&r, Ok(v) if v.is_empty()) || r == Err(ErrorKind::ConnectionReset),
            "{:?} must be closed: {r:?}",
            String::from_utf8_lossy(line)
        );
    }
    // An incomplete line keeps waiting; EOF before the newline closes.
    let mut s = UnixStream::connect(&e.path).unwrap();
    s.write_all(b"CONNECT 10").unwrap();
    e.guest.pump_recv(&mut e.mux);
    assert_eq!(read_nonblocking(&mut s), Err(ErrorKind::WouldBlock));
    s.shutdown(Shutdown::Write).unwrap();
    assert!(e.guest.pump_recv(&mut e.mux).is_empty());
    assert_eq!(read_nonblocking(&mut s), Ok(vec![]));
    assert_eq!(e.mux.connection_count(), 0);
}

#[test]
fn guest_refuses_host_connection() {
    let mut e = env();
    let (mut s, req) = host_connect(&mut e, 9999);
    e.guest
        .send(&mut e.mux, hdr(OP_RST, 9999, req.src_port), &[]);
    assert!(
        e.guest.pump_recv(&mut e.mux).is_empty(),
        "no reply to an RST"
    );
    assert_eq!(read_nonblocking(&mut s), Ok(vec![]));
    assert_eq!(e.mux.connection_count(), 0);
    // The port is free again: the next connection reuses nothing stale.
    let (_s2, req2) = host_connect(&mut e, 9999);
    assert_ne!(req2.src_port, 0);
}

#[test]
fn host_hangup_before_response_resets() {
    let mut e = env();
    let (s, req) = host_connect(&mut e, 7);
    drop(s);
    let pkts = e.guest.pump_recv(&mut e.mux);
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].0.op, OP_RST);
    assert_eq!(pkts[0].0.src_port, req.src_port);
    assert_eq!(e.mux.connection_count(), 0);
}

#[test]
fn pending_connect_times_out() {
    let mut e = env();
    let (mut s, _) = host_connect(&mut e, 7);
    assert!(e.mux.has_pending_connects());
    e.mux
        .expire_connects(std::time::Instant::now() + super::muxer::CONNECT_TIMEOUT);
    let pkts = e.guest.pump_recv(&mut e.mux);
    assert_eq!(pkts[0].0.op, OP_RST);
    assert_eq!(read_nonblocking(&mut s), Ok(vec![]));
}

#[test]
fn guest_initiated_connections() {
    let mut e = env();
    let listener = UnixListener::bind(format!("{}_5000", e.path.display())).unwrap();
    e.guest.send(&mut e.mux, hdr(OP_REQUEST, 777, 5000), &[]);
    let pkts = e.guest.pump_recv(&mut e.mux);
    assert_eq!(pkts.len(), 1);
    let resp = pkts[0].0;
    assert_eq!(resp.op, OP_RESPONSE);
    assert_eq!((resp.src_port, resp.dst_port), (5000, 777));
    assert_eq!((resp.src_cid, resp.dst_cid), (HOST_CID, GUEST_CID));
    let (mut host, _) = listener.accept().unwrap();

    e.guest
        .send(&mut e.mux, hdr(OP_RW, 777, 5000).with_len(4), b"ping");
    e.guest.pump(&mut e.mux);
    let mut b = [0u8; 4];
    host.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"ping");
    host.write_all(b"pong").unwrap();
    let pkts = e.guest.pump_recv(&mut e.mux);
    assert_eq!(pkts[0].1, b"pong");

    // Nobody listens on port 5001.
    e.guest.send(&mut e.mux, hdr(OP_REQUEST, 778, 5001), &[]);
    let pkts = e.guest.pump_recv(&mut e.mux);
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].0.op, OP_RST);
    assert_eq!((pkts[0].0.src_port, pkts[0].0.dst_port), (5001, 778));

    // The host side fails hard: the guest gets an RST.
    drop(host);
    e.guest
        .send(&mut e.mux, hdr(OP_RW, 777, 5000).with_len(4), b"more");
    let pkts = e.guest.pump_recv(&mut e.mux);
    assert!(pkts.iter().any(|(h, _)| h.op == OP_RST), "{pkts:?}");
    assert_eq!(e.mux.connection_count(), 0);
}

#[test]
fn invalid_guest_packets() {
    let mut e = env();
    let (_s, req) = establish(&mut e, 1024);
    let local = req.src_port;

    let mut wrong_src = hdr(OP_RW, 1024, local).with_len(1);
    wrong_src.src_cid = 4;
    e.guest.send(&mut e.mux, wrong_src, b"x");
    let mut wrong_dst = hdr(OP_REQUEST, 1, 2);
    wrong_dst.dst_cid = 7;
    e.guest.send(&mut e.mux, wrong_dst, &[]);
    assert!(
        e.guest.pump_recv(&mut e.mux).is_empty(),
        "wrong CIDs dropped"
    );
    assert_eq!(e.mux.connection_count(), 1);

    let mut seqpacket = hdr(OP_REQUEST, 1, 2);
    seqpacket.type_ = 2;
    e.guest.send(&mut e.mux, seqpacket, &[]);
    e.guest.send(&mut e.mux, hdr(99, 5, 6), &[]);
    e.guest
        .send(&mut e.mux, hdr(OP_RW, 5, 6).with_len(2), b"zz");
    let pkts = e.guest.pump_recv(&mut e.mux);
    let ops: Vec<u16> = pkts.iter().map(|p| p.0.op).collect();
    assert_eq!(ops, vec![OP_RST; 3]);

    // Header descriptor too short, payload larger than its buffer, payload too big,
    // header outside memory: dropped, queue keeps going.
    let a = TX_BUFS;
    e.guest
        .mem
        .write_slice(&hdr(OP_REQUEST, 1, 2).to_bytes(), GuestAddress(a))
        .unwrap();
    e.guest.tx.push(&e.guest.mem, &[(a, 20, false)]);
    let big = hdr(OP_RW, 1024, local).with_len(1000);
    e.guest
        .mem
        .write_slice(&big.to_bytes(), GuestAddress(a + 0x1000))
        .unwrap();
    e.guest.tx.push(
        &e.guest.mem,
        &[(a + 0x1000, 44, false), (a + 0x2000, 10, false)],
    );
    let huge = hdr(OP_RW, 1024, local).with_len(MAX_TX_PAYLOAD + 1);
    e.guest
        .mem
        .write_slice(&huge.to_bytes(), GuestAddress(a + 0x3000))
        .unwrap();
    e.guest.tx.push(
        &e.guest.mem,
        &[
            (a + 0x3000, 44, false),
            (a + 0x4000, MAX_TX_PAYLOAD + 1, false),
        ],
    );
    e.guest.tx.push(&e.guest.mem, &[(u64::MAX - 10, 44, false)]);
    e.guest.tx.push(&e.guest.mem, &[(a, 44, true)]);
    let pkts = e.guest.pump_recv(&mut e.mux);
    assert!(pkts.is_empty(), "{pkts:?}");
    assert_eq!(e.guest.tx.in_flight, 0, "every chain was returned");
    assert_eq!(e.mux.connection_count(), 1, "the live connection survives");
}

#[test]
fn credit_is_honoured_both_ways() {
    let mut e = env();
    let (mut s, req) = host_connect(&mut e, 1024);
    let (local, peer) = (req.src_port, 1024);
    // The guest has only 8 KiB of receive buffer.
    let mut resp = hdr(OP_RESPONSE, peer, local);
    resp.buf_alloc = 8192;
    e.guest.send(&mut e.mux, resp, &[]);
    e.guest.pump_recv(&mut e.mux);
    let mut ok = [0u8; 14];
    s.read_exact(&mut ok).unwrap();

    // OP_CREDIT_REQUEST from the guest gets our counters back.
    let mut creq = hdr(OP_CREDIT_REQUEST, peer, local);
    creq.buf_alloc = 8192;
    e.guest.send(&mut e.mux, creq, &[]);
    let pkts = e.guest.pump_recv(&mut e.mux);
    assert_eq!(pkts.len(), 1);
    let upd = pkts[0].0;
    assert_eq!(upd.op, OP_CREDIT_UPDATE);
    assert_eq!((upd.buf_alloc, upd.fwd_cnt), (CONN_BUF_SIZE, 0));

    s.write_all(&[7u8; 20000]).unwrap();
    let mut got = 0;
    let mut credit_requests = 0;
    for _ in 0..4 {
        for (h, d) in e.guest.pump_recv(&mut e.mux) {
            match h.op {
                OP_RW => got += d.len(),
                OP_CREDIT_REQUEST => credit_requests += 1,
                op => panic!("unexpected op {op}"),
            }
        }
    }
    assert_eq!(got, 8192, "never more than the guest's buffer");
    assert_eq!(credit_requests, 1, "asked once for credit");

    // The guest consumed it all.
    let mut upd = hdr(OP_CREDIT_UPDATE, peer, local);
    upd.buf_alloc = 8192;
    upd.fwd_cnt = 8192;
    e.guest.send(&mut e.mux, upd, &[]);
    let more: usize = e
        .guest
        .pump_recv(&mut e.mux)
        .iter()
        .filter(|p| p.0.op == OP_RW)
        .map(|p| p.1.len())
        .sum();
    assert_eq!(more, 8192);
}

#[test]
fn guest_overrunning_credit_is_reset_and_memory_bounded() {
    let mut e = env();
    let (s, req) = establish(&mut e, 1024);
    let (local, peer) = (req.src_port, 1024);
    // The host never reads: its socket buffer fills, then ours, then the guest is over.
    let chunk = vec![1u8; MAX_TX_PAYLOAD as usize];
    let mut sent = 0usize;
    let mut reset = false;
    for _ in 0..256 {
        e.guest.send(
            &mut e.mux,
            hdr(OP_RW, peer, local).with_len(chunk.len() as u32),
            &chunk,
        );
        sent += chunk.len();
        let pkts = e.guest.pump_recv(&mut e.mux);
        if pkts.iter().any(|p| p.0.op == OP_RST) {
            reset = true;
            break;
        }
    }
    assert!(reset, "overrun detected after {sent} bytes");
    assert_eq!(e.mux.connection_count(), 0);
    drop(s);
}

#[test]
fn socket_path_conflicts() {
    let dir = TempDir::new_with_prefix("/tmp/husk-vsock").unwrap();
    let path = dir.as_path().join("busy.sock");
    let live = UnixListener::bind(&path).unwrap();
    let err = Vsock::new(GUEST_CID, &path).err().unwrap();
    assert!(matches!(err, VsockError::PathInUse(_)));
    assert!(err.to_string().contains(&*path.to_string_lossy()), "{err}");
    // Stale socket (nobody listening): replaced.
    drop(live);
    let v = Vsock::new(GUEST_CID, &path).unwrap();
    let mut cid = [0u8; 8];
    v.read_config(0, &mut cid);
    assert_eq!(u64::from_le_bytes(cid), GUEST_CID);
    assert_eq!(v.queue_max_sizes().len(), 3);
    // A regular file is never deleted.
    let file = dir.as_path().join("file");
    std::fs::write(&file, b"keep").unwrap();
    assert!(matches!(
        Vsock::new(GUEST_CID, &file),
        Err(VsockError::PathInUse(_))
    ));
    assert_eq!(std::fs::read(&file).unwrap(), b"keep");
    assert!(matches!(
        Vsock::new(2, Path::new("/tmp/x")),
        Err(VsockError::InvalidCid(2))
    ));
}

/// Deterministic pseudo-random bytes.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn eight_mib_both_ways() {
    const TOTAL: usize = 8 << 20;
    let mut e = env();
    let (mut s, req) = establish(&mut e, 1024);
    let (local, peer) = (req.src_port, 1024);
    s.set_nonblocking(true).unwrap();
    let to_guest = pattern(1, TOTAL);
    let to_host = pattern(2, TOTAL);
    let (mut host_sent, mut host_got) = (0usize, Vec::with_capacity(TOTAL));
    let (mut guest_sent, mut guest_got) = (0usize, Vec::with_capacity(TOTAL));
    // Guest-side credit state: what the device told us, and what we consumed.
    let (mut dev_buf_alloc, mut dev_fwd_cnt) = (CONN_BUF_SIZE, 0u32);
    let guest_buf: u32 = 1 << 20;
    let mut guest_fwd: u32 = 0;
    let mut last_update: u32 = 0;
    let mut rounds = 0;
    while host_got.len() < TOTAL || guest_got.len() < TOTAL {
        rounds += 1;
        assert!(rounds < 200_000, "no progress");
        if host_sent < TOTAL {
            match s.write(&to_guest[host_sent..(host_sent + 65536).min(TOTAL)]) {
                Ok(n) => host_sent += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
        }
        let mut buf = vec![0u8; 256 * 1024];
        match s.read(&mut buf) {
            Ok(n) => host_got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => panic!("{e}"),
        }
        // The guest sends what the device's credit allows, 64 KiB at a time.
        let in_flight = guest_sent as u32 - dev_fwd_cnt;
        let credit = dev_buf_alloc - in_flight;
        if guest_sent < TOTAL && credit > 0 {
            let n = (credit as usize)
                .min(MAX_TX_PAYLOAD as usize)
                .min(TOTAL - guest_sent);
            let mut h = hdr(OP_RW, peer, local).with_len(n as u32);
            h.buf_alloc = guest_buf;
            h.fwd_cnt = guest_fwd;
            e.guest
                .send(&mut e.mux, h, &to_host[guest_sent..guest_sent + n]);
            guest_sent += n;
        }
        for (h, d) in e.guest.pump_recv(&mut e.mux) {
            dev_buf_alloc = h.buf_alloc;
            dev_fwd_cnt = h.fwd_cnt;
            match h.op {
                OP_RW => {
                    guest_got.extend_from_slice(&d);
                    guest_fwd += d.len() as u32;
                }
                OP_CREDIT_UPDATE | OP_CREDIT_REQUEST => {}
                op => panic!("unexpected op {op}"),
            }
        }
        // Like Linux, tell the device about consumed data now and then.
        if guest_fwd - last_update >= guest_buf / 2 {
            let mut h = hdr(OP_CREDIT_UPDATE, peer, local);
            h.buf_alloc = guest_buf;
            h.fwd_cnt = guest_fwd;
            e.guest.send(&mut e.mux, h, &[]);
            last_update = guest_fwd;
        }
    }
    assert!(guest_got == to_guest, "host-to-guest bytes differ");
    assert!(host_got == to_host, "guest-to-host bytes differ");
}

impl Header {
    fn with_len(mut self, len: u32) -> Self {
        self.len = len;
        self
    }
}

/// The device's worker thread: nested epoll, queue kicks, interrupts, reset.
#[test]
fn worker_thread_end_to_end() {
    use crate::devices::virtio::{ActiveQueue, Interrupt};
    use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

    let dir = TempDir::new_with_prefix("/tmp/husk-vsock").unwrap();
    let path = dir.as_path().join("w.sock");
    let mut dev = Vsock::new(GUEST_CID, &path).unwrap();
    let mut g = Guest::new();
    g.post_rx(8);
    let (_ev, evq) = DriverQueue::new(0x3_0000);
    let notify: Vec<EventFd> = (0..3)
        .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
        .collect();
    let kicks: Vec<EventFd> = notify.iter().map(|e| e.try_clone().unwrap()).collect();
    // Blocking irqfd: reads wait for the worker's interrupt.
    let interrupt = Interrupt::new(EventFd::new(0).unwrap());
    let rxq = std::mem::replace(&mut g.rxq, Queue::new(QSIZE).unwrap());
    let txq = std::mem::replace(&mut g.txq, Queue::new(QSIZE).unwrap());
    let queues = [rxq, txq, evq]
        .into_iter()
        .zip(notify)
        .map(|(queue, notify)| ActiveQueue { queue, notify })
        .collect();
    dev.activate(g.mem.clone(), queues, interrupt.clone())
        .unwrap();

    let mut s = UnixStream::connect(&path).unwrap();
    s.write_all(b"CONNECT 1024\n").unwrap();
    interrupt.irqfd().read().unwrap();
    let pkts = g.recv();
    assert_eq!(pkts.len(), 1);
    let req = pkts[0].0;
    assert_eq!((req.op, req.dst_port), (OP_REQUEST, 1024));

    g.send_raw(hdr(OP_RESPONSE, 1024, req.src_port), &[]);
    kicks[1].write(1).unwrap();
    let mut ok = [0u8; 14];
    s.read_exact(&mut ok).unwrap();
    assert_eq!(&ok, b"OK 1073741824\n");

    s.write_all(b"through the worker").unwrap();
    let mut got = Vec::new();
    while got.is_empty() {
        interrupt.irqfd().read().unwrap();
        got.extend(g.recv().into_iter().filter(|p| p.0.op == OP_RW));
    }
    assert_eq!(got[0].1, b"through the worker");

    // Reset drops the connection but keeps the listener.
    assert!(dev.reset());
    assert_eq!(read_nonblocking(&mut s), Ok(vec![]));
    assert!(UnixStream::connect(&path).is_ok());
}

impl Guest {
    /// Queues a TX packet without running the muxer (the worker owns it).
    fn send_raw(&mut self, h: Header, data: &[u8]) {
        let a = TX_BUFS + u64::from(self.tx.slot()) * TX_SLOT;
        self.mem
            .write_slice(&h.to_bytes(), GuestAddress(a))
            .unwrap();
        self.mem.write_slice(data, GuestAddress(a + 0x100)).unwrap();
        if data.is_empty() {
            self.tx.push(&self.mem, &[(a, 44, false)]);
        } else {
            self.tx.push(
                &self.mem,
                &[(a, 44, false), (a + 0x100, data.len() as u32, false)],
            );
        }
    }
}

/// After a restore: the transport reset goes out in the first event buffer, and a host
/// connection is held until the driver has refilled the event queue (which it does only
/// after handling the reset, and without a kick under EVENT_IDX), however long that takes.
#[test]
fn a_restored_worker_resets_the_transport_and_holds_host_connections_until_the_refill() {
    use std::time::{Duration, Instant};

    use crate::devices::virtio::{ActiveQueue, Interrupt};
    use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

    const EV_BUFS: u64 = 0x30_0000;
    let dir = TempDir::new_with_prefix("/tmp/husk-vsock").unwrap();
    let path = dir.as_path().join("r.sock");
    let mut dev = Vsock::new(GUEST_CID, &path).unwrap();
    let mut g = Guest::new();
    g.post_rx(8);
    // The driver keeps several event buffers posted, as Linux does.
    let (mut ev, evq) = DriverQueue::new(0x3_0000);
    for i in 0..4u64 {
        ev.push(&g.mem, &[(EV_BUFS + i * 0x100, 4, true)]);
        g.mem
            .write_obj(0xffff_ffff_u32, GuestAddress(EV_BUFS + i * 0x100))
            .unwrap();
    }
    let notify: Vec<EventFd> = (0..3)
        .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
        .collect();
    let interrupt = Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap());
    let rxq = std::mem::replace(&mut g.rxq, Queue::new(QSIZE).unwrap());
    let txq = std::mem::replace(&mut g.txq, Queue::new(QSIZE).unwrap());
    let queues = [rxq, txq, evq]
        .into_iter()
        .zip(notify)
        .map(|(queue, notify)| ActiveQueue { queue, notify })
        .collect();
    let started = Instant::now();
    dev.activate_restored(g.mem.clone(), queues, interrupt.clone())
        .unwrap();

    let deadline = Instant::now() + Duration::from_secs(10);
    let (head, len) = loop {
        if let Some(u) = ev.pop_used(&g.mem) {
            break u;
        }
        assert!(Instant::now() < deadline, "no transport reset event");
        std::thread::sleep(Duration::from_millis(1));
    };
    assert_eq!((head, len), (0, 4));
    let id: u32 = g.mem.read_obj(GuestAddress(EV_BUFS)).unwrap();
    assert_eq!(id, 0, "VIRTIO_VSOCK_EVENT_TRANSPORT_RESET");

    let mut s = UnixStream::connect(&path).unwrap();
    s.write_all(b"CONNECT 1024\n").unwrap();
    // Longer than the 1 s the device once waited: a guest restored on a loaded host took
    // longer, and the connections let through were reset by the late reset.
    std::thread::sleep(Duration::from_millis(1300));
    assert!(
        g.recv().is_empty(),
        "the host connection waits while the driver has not taken the reset"
    );
    // The driver handles the reset and reposts the buffer: no kick.
    ev.push(&g.mem, &[(EV_BUFS, 4, true)]);
    let request = loop {
        if let Some(p) = g.recv().into_iter().find(|p| p.0.op == OP_REQUEST) {
            break p;
        }
        assert!(
            Instant::now() < deadline,
            "the held connection never reached the guest"
        );
        std::thread::sleep(Duration::from_millis(1));
    };
    assert_eq!(request.0.dst_port, 1024);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "released by the refill, not by the deadline: {:?}",
        started.elapsed()
    );
    assert!(dev.reset());
}
