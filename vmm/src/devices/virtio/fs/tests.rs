//! The device against a scripted vhost-user backend on a Unix socket: the handshake, ring
//! start through the virtio-mmio state machine, the call-to-interrupt relay, and ring stop
//! on a driver reset. No virtiofsd needed.

use std::fs::File;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::vhost_user::{VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_RING_F_INDIRECT_DESC};
use super::{Fs, FsConfig};
use crate::devices::bus::BusDevice;
use crate::devices::virtio::Interrupt;
use crate::devices::virtio::interrupt::INT_VRING;
use crate::devices::virtio::mmio::{
    MmioTransport, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, status,
};
use crate::memory::{RamBacking, create_guest_memory};

// vhost-user request codes.
const GET_FEATURES: u32 = 1;
const SET_FEATURES: u32 = 2;
const SET_OWNER: u32 = 3;
const SET_MEM_TABLE: u32 = 5;
const SET_VRING_NUM: u32 = 8;
const SET_VRING_ADDR: u32 = 9;
const SET_VRING_BASE: u32 = 10;
const GET_VRING_BASE: u32 = 11;
const SET_VRING_KICK: u32 = 12;
const SET_VRING_CALL: u32 = 13;
const GET_PROTOCOL_FEATURES: u32 = 15;
const SET_PROTOCOL_FEATURES: u32 = 16;
const GET_QUEUE_NUM: u32 = 17;
const SET_VRING_ENABLE: u32 = 18;

const FLAG_VERSION: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;
const PROTOCOL_MQ: u64 = 0x1;
const PROTOCOL_REPLY_ACK: u64 = 0x8;
const PROTOCOL_CONFIG: u64 = 0x200;
const RING_PACKED: u64 = 1 << 34;

const BACKEND_FEATURES: u64 = VIRTIO_F_VERSION_1
    | VIRTIO_RING_F_EVENT_IDX
    | VIRTIO_RING_F_INDIRECT_DESC
    | VHOST_USER_F_PROTOCOL_FEATURES
    | RING_PACKED;

/// One request the fake backend received.
#[derive(Debug)]
struct Received {
    request: u32,
    body: Vec<u8>,
    fd: Option<File>,
}

impl Received {
    fn u64(&self) -> u64 {
        u64::from_le_bytes(self.body[..8].try_into().unwrap())
    }
    /// (index, num) of a vring state body.
    fn state(&self) -> (u32, u32) {
        let w = |i: usize| u32::from_le_bytes(self.body[i..i + 4].try_into().unwrap());
        (w(0), w(4))
    }
}

type Log = Arc<Mutex<Vec<Received>>>;

fn reply(sock: &mut UnixStream, request: u32, body: &[u8]) {
    let mut msg = Vec::new();
    msg.extend_from_slice(&request.to_le_bytes());
    msg.extend_from_slice(&(FLAG_VERSION | FLAG_REPLY).to_le_bytes());
    msg.extend_from_slice(&(body.len() as u32).to_le_bytes());
    msg.extend_from_slice(body);
    sock.write_all(&msg).unwrap();
}

/// Serves one frontend until it hangs up, answering like a virtio-fs backend would.
fn serve(sock: UnixStream, log: Log) {
    serve_with_base(sock, log, 7)
}

/// [`serve`], answering GET_VRING_BASE with `base`.
fn serve_with_base(mut sock: UnixStream, log: Log, base: u32) {
    loop {
        let mut hdr = [0u8; 12];
        let (n, fd) = match sock.recv_with_fd(&mut hdr) {
            Ok((0, _)) | Err(_) => return,
            Ok(r) => r,
        };
        assert_eq!(n, 12, "short header");
        let word = |i: usize| u32::from_le_bytes(hdr[i..i + 4].try_into().unwrap());
        let (request, flags, size) = (word(0), word(4), word(8));
        let mut body = vec![0u8; size as usize];
        sock.read_exact(&mut body).unwrap();
        let rec = Received { request, body, fd };
        let answer: Option<Vec<u8>> = match request {
            GET_FEATURES => Some(BACKEND_FEATURES.to_le_bytes().to_vec()),
            GET_PROTOCOL_FEATURES => Some(
                (PROTOCOL_MQ | PROTOCOL_REPLY_ACK | PROTOCOL_CONFIG)
                    .to_le_bytes()
                    .to_vec(),
            ),
            GET_QUEUE_NUM => Some(2u64.to_le_bytes().to_vec()),
            GET_VRING_BASE => {
                let (index, _) = rec.state();
                let mut b = index.to_le_bytes().to_vec();
                b.extend_from_slice(&base.to_le_bytes());
                Some(b)
            }
            _ => None,
        };
        log.lock().unwrap().push(rec);
        match answer {
            Some(body) => reply(&mut sock, request, &body),
            None if flags & FLAG_NEED_REPLY != 0 => reply(&mut sock, request, &0u64.to_le_bytes()),
            None => {}
        }
    }
}

fn requests(log: &Log) -> Vec<u32> {
    log.lock().unwrap().iter().map(|r| r.request).collect()
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn rd(t: &mut MmioTransport, off: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(off, &mut b);
    u32::from_le_bytes(b)
}

fn wr(t: &mut MmioTransport, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

#[test]
fn handshake_rings_interrupts_and_reset_against_a_scripted_backend() {
    let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/husk-fs-test").unwrap();
    let socket = dir.as_path().join("backend.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let log: Log = Arc::default();
    let backend_log = log.clone();
    // Hands the test a handle on the connection (to kill it later), then serves it.
    let backend = std::thread::spawn(move || {
        let (sock, _) = listener.accept().unwrap();
        let handle = sock.try_clone().unwrap();
        std::thread::spawn(move || serve(sock, backend_log));
        handle
    });

    let dev = Fs::new(&FsConfig {
        socket: socket.clone(),
        tag: "share".into(),
    })
    .unwrap();
    let handshake = requests(&log);
    // Only MQ and REPLY_ACK are taken, not CONFIG (the VMM serves the config space).
    assert_eq!(
        log.lock().unwrap()[2].u64(),
        PROTOCOL_MQ | PROTOCOL_REPLY_ACK
    );
    log.lock().unwrap().clear();
    assert_eq!(
        handshake,
        vec![
            GET_FEATURES,
            GET_PROTOCOL_FEATURES,
            SET_PROTOCOL_FEATURES,
            GET_QUEUE_NUM,
            SET_OWNER
        ]
    );

    let mem = create_guest_memory(64 << 20, RamBacking::SharedMemfd).unwrap();
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let mut t = MmioTransport::new(mem, Box::new(dev), Interrupt::new(irq));
    // Identification and config space as the guest driver reads them.
    assert_eq!(rd(&mut t, 0x008), 26, "device id virtio-fs");
    wr(&mut t, 0x014, 0);
    assert_eq!(
        rd(&mut t, 0x010),
        (VIRTIO_RING_F_EVENT_IDX | VIRTIO_RING_F_INDIRECT_DESC) as u32,
        "no vhost-user protocol bit offered to the guest"
    );
    wr(&mut t, 0x014, 1);
    assert_eq!(rd(&mut t, 0x010), 1, "VERSION_1, not RING_PACKED");
    let mut tag = [0u8; 8];
    t.read(0x100, &mut tag);
    assert_eq!(&tag, b"share\0\0\0");
    assert_eq!(rd(&mut t, 0x100 + 36), 1, "num_request_queues");

    bring_up(&mut t);
    assert!(t.is_activated(), "status {:#x}", t.status());

    {
        let log = log.lock().unwrap();
        let reqs: Vec<u32> = log.iter().map(|r| r.request).collect();
        let ring = [
            SET_VRING_NUM,
            SET_VRING_ADDR,
            SET_VRING_BASE,
            SET_VRING_CALL,
            SET_VRING_KICK,
        ];
        let mut expected = vec![SET_FEATURES, SET_MEM_TABLE];
        expected.extend(ring);
        expected.extend(ring);
        expected.extend([SET_VRING_ENABLE, SET_VRING_ENABLE]);
        assert_eq!(reqs, expected);
        // The guest's features plus the vhost-user protocol bit.
        assert_eq!(
            log[0].u64(),
            VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | VHOST_USER_F_PROTOCOL_FEATURES
        );
        assert!(log[1].fd.is_some(), "the guest RAM memfd was sent");
        assert_eq!(log[2].state(), (0, 256), "queue 0 size");
        assert!(
            log[5].fd.is_some() && log[6].fd.is_some(),
            "call and kick fds"
        );
        assert_eq!(log[12].state(), (0, 1), "queue 0 enabled");
        assert_eq!(log[13].state(), (1, 1), "queue 1 enabled");
    }

    // The backend signals queue 1: the guest gets the used-buffer bit and an interrupt.
    wait_until("start-up interrupt", || {
        t.interrupt().irqfd().read().is_ok()
    });
    wr(&mut t, 0x064, INT_VRING);
    assert_eq!(rd(&mut t, 0x060), 0);
    let call1 = log.lock().unwrap()[10].fd.take().expect("queue 1 call fd");
    let call1 = eventfd(call1);
    call1.write(1).unwrap();
    wait_until("interrupt after a call", || {
        t.interrupt().irqfd().read().is_ok()
    });
    assert_eq!(rd(&mut t, 0x060) & INT_VRING, INT_VRING);

    // A guest kick on queue 0 reaches the backend's kick eventfd.
    let kick0 = log.lock().unwrap()[6].fd.take().expect("queue 0 kick fd");
    let kick0 = eventfd(kick0);
    wr(&mut t, 0x050, 0);
    assert_eq!(kick0.read().unwrap(), 1);

    // Driver reset: both rings are disabled and stopped.
    log.lock().unwrap().clear();
    wr(&mut t, 0x070, 0);
    assert!(!t.is_activated());
    assert_eq!(t.status(), 0);
    let stops: Vec<(u32, (u32, u32))> = log
        .lock()
        .unwrap()
        .iter()
        .map(|r| (r.request, r.state()))
        .collect();
    assert_eq!(
        stops,
        vec![
            (SET_VRING_ENABLE, (0, 0)),
            (GET_VRING_BASE, (0, 0)),
            (SET_VRING_ENABLE, (1, 0)),
            (GET_VRING_BASE, (1, 0)),
        ]
    );

    // The device comes up again after the reset, with the memory table sent again.
    bring_up(&mut t);
    assert!(t.is_activated(), "status {:#x}", t.status());
    assert!(requests(&log).contains(&SET_MEM_TABLE));

    // The backend dies: a reset and a new bring-up fail and say so instead of hanging the
    // vCPU thread.
    let backend_sock = backend.join().unwrap();
    backend_sock.shutdown(Shutdown::Both).unwrap();
    wr(&mut t, 0x070, 0);
    assert_eq!(t.status(), 0, "the reset itself still completes");
    bring_up(&mut t);
    assert!(!t.is_activated());
    assert_ne!(t.status() & status::DEVICE_NEEDS_RESET, 0);
}

/// The guest driver's bring-up: features, two queues of 256, DRIVER_OK.
fn bring_up(t: &mut MmioTransport) {
    wr(t, 0x070, status::ACKNOWLEDGE);
    wr(t, 0x070, status::ACKNOWLEDGE | status::DRIVER);
    wr(t, 0x024, 0);
    wr(t, 0x020, VIRTIO_RING_F_EVENT_IDX as u32);
    wr(t, 0x024, 1);
    wr(t, 0x020, 1);
    let ok = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
    wr(t, 0x070, ok);
    assert_eq!(t.status(), ok);
    for (q, base) in [(0u32, 0x10_0000u32), (1, 0x20_0000)] {
        wr(t, 0x030, q);
        assert_eq!(rd(t, 0x034), 1024);
        wr(t, 0x038, 256);
        wr(t, 0x080, base);
        wr(t, 0x090, base + 0x1000);
        wr(t, 0x0a0, base + 0x2000);
        wr(t, 0x044, 1);
    }
    wr(t, 0x070, ok | status::DRIVER_OK);
}

/// Takes ownership of an eventfd the device sent over the socket.
fn eventfd(file: File) -> EventFd {
    // SAFETY: the device only sends eventfds as kick and call fds; ownership moves from the
    // File, which is not used again.
    unsafe { EventFd::from_raw_fd(file.into_raw_fd()) }
}

/// A backend on a fresh socket, served on a thread; returns the socket path and its log.
fn spawn_backend(dir: &std::path::Path, name: &str, base: u32) -> (std::path::PathBuf, Log) {
    let socket = dir.join(name);
    let listener = UnixListener::bind(&socket).unwrap();
    let log: Log = Arc::default();
    let backend_log = log.clone();
    std::thread::spawn(move || {
        let (sock, _) = listener.accept().unwrap();
        serve_with_base(sock, backend_log, base);
    });
    (socket, log)
}

#[test]
fn an_unused_share_snapshots_and_restores_onto_a_new_backend_with_the_same_tag() {
    use crate::devices::virtio::persist::TransportRestoreError;
    use vm_memory::{Bytes, GuestAddress};

    let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/husk-fs-test").unwrap();
    let (first, _) = spawn_backend(dir.as_path(), "first.sock", 0);
    let mem = create_guest_memory(64 << 20, RamBacking::SharedMemfd).unwrap();
    let dev = Fs::new(&FsConfig {
        socket: first,
        tag: "share".into(),
    })
    .unwrap();
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let mut t = MmioTransport::new(mem.clone(), Box::new(dev), Interrupt::new(irq));
    bring_up(&mut t);
    assert!(t.is_activated());
    let state = t.snapshot().expect("an unused share can be snapshotted");
    assert_eq!(state.identity.as_deref(), Some("virtio-fs tag share"));
    assert!(state.activated);
    assert!(
        state
            .queues
            .iter()
            .all(|q| q.next_avail == 0 && q.next_used == 0),
        "{state:?}"
    );

    // The clone's share is served by another virtiofsd: same tag, other socket.
    let (second, log) = spawn_backend(dir.as_path(), "second.sock", 0);
    let dev = Fs::new(&FsConfig {
        socket: second.clone(),
        tag: "share".into(),
    })
    .unwrap();
    log.lock().unwrap().clear();
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let mut r = MmioTransport::restore(
        mem.clone(),
        Box::new(dev),
        Interrupt::new(irq),
        None,
        &state,
    )
    .expect("restore");
    r.start_restored().expect("start on the new backend");
    assert!(r.is_activated());
    {
        let log = log.lock().unwrap();
        let reqs: Vec<u32> = log.iter().map(|r| r.request).collect();
        assert_eq!(&reqs[..2], &[SET_FEATURES, SET_MEM_TABLE], "{reqs:?}");
        let bases: Vec<(u32, u32)> = log
            .iter()
            .filter(|r| r.request == SET_VRING_BASE)
            .map(Received::state)
            .collect();
        assert_eq!(bases, vec![(0, 0), (1, 0)]);
    }

    // Another tag: the guest driver knows the old one, so the restore is refused.
    let (third, _) = spawn_backend(dir.as_path(), "third.sock", 0);
    let dev = Fs::new(&FsConfig {
        socket: third,
        tag: "other".into(),
    })
    .unwrap();
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let err = MmioTransport::restore(
        mem.clone(),
        Box::new(dev),
        Interrupt::new(irq),
        None,
        &state,
    )
    .err()
    .expect("a different tag is refused");
    assert!(
        matches!(err, TransportRestoreError::Identity { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("tag share"), "{err}");

    // Once the guest has published a request (a mount sends FUSE_INIT), the share's
    // session lives in the backend: no snapshot.
    mem.write_obj(1u16, GuestAddress(0x20_1000 + 2)).unwrap();
    let err = r.snapshot().expect_err("a used share is refused");
    assert!(err.contains("never mounted"), "{err}");
}

/// virtiofsd killed after the VMM connected but before the guest driver started the
/// device (seen when a template VM's virtiofsd died during its boot): activation fails,
/// and the VM is told to stop, naming the share, instead of booting on (and being
/// snapshotted) with a share that never answers.
#[test]
fn a_backend_gone_before_activation_fails_it_and_stops_the_vm() {
    use crate::stop::{StopReason, StopSignal};

    let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/husk-fs-test").unwrap();
    let socket = dir.as_path().join("dying.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let (sock, _) = listener.accept().unwrap();
        tx.send(sock.try_clone().unwrap()).unwrap();
        serve(sock, Log::default());
    });
    let mut dev = Fs::new(&FsConfig {
        socket,
        tag: "share".into(),
    })
    .unwrap();
    let stop = StopSignal::new().unwrap();
    dev.stop_vm_when_backend_exits(stop.clone());
    // The backend goes away.
    rx.recv().unwrap().shutdown(Shutdown::Both).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert!(stop.reason().is_none());

    let mem = create_guest_memory(64 << 20, RamBacking::SharedMemfd).unwrap();
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let mut t = MmioTransport::new(mem, Box::new(dev), Interrupt::new(irq));
    bring_up(&mut t);
    assert!(!t.is_activated(), "status {:#x}", t.status());
    match stop.reason() {
        Some(StopReason::BackendGone(what)) => {
            assert!(
                what.contains("tag share") && what.contains("cannot start"),
                "{what}"
            )
        }
        other => panic!("want BackendGone, got {other:?}"),
    }
}
