//! Routes vsock packets between the guest and host Unix sockets (Firecracker's "hybrid
//! vsock" convention).
//!
//! - Host to guest: a host process connects to the device's Unix socket and sends
//!   `CONNECT <port>\n`; the guest gets an OP_REQUEST for `<port>` from a fresh host port,
//!   and once it answers OP_RESPONSE the host process reads `OK <host port>\n`, after which
//!   the stream carries the connection's bytes.
//! - Guest to host: an OP_REQUEST to CID 2, port P connects to the Unix socket
//!   `<uds_path>_P`.
//!
//! Everything is non-blocking and driven by one thread: host socket readiness comes from
//! the muxer's own epoll instance (whose fd the device worker polls), guest packets from
//! the TX queue, and RX buffers are filled straight from the host sockets.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use crate::devices::virtio::guest_log::guest_warn;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use virtio_vsock::packet::VsockPacket;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::VsockError;
use super::connection::{ConnKey, Connection, Produced, State};
use super::packet::*;
use crate::devices::virtio::GuestMemory;

/// Largest payload accepted in one guest TX packet (Linux sends at most 64 KiB).
pub const MAX_TX_PAYLOAD: u32 = 64 * 1024;
/// Largest RX data buffer accepted from the guest.
pub const MAX_RX_BUF: u32 = 256 * 1024;
/// Live connections at most; further requests are refused.
pub const MAX_CONNECTIONS: usize = 1024;
/// Host streams that have not finished their `CONNECT` line yet, at most.
pub const MAX_HANDSHAKES: usize = 64;
/// Longest accepted handshake line, newline included (`CONNECT 4294967295\n` is 19).
pub const MAX_HANDSHAKE_LINE: usize = 32;
/// RSTs for connections we already dropped, waiting for RX buffers.
const MAX_CTRL_QUEUE: usize = 1024;
/// How long the guest has to answer a host-initiated OP_REQUEST.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// First host port handed to host-initiated connections.
const FIRST_LOCAL_PORT: u32 = 1 << 30;

struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
}

enum LineResult {
    /// Need more bytes.
    Incomplete,
    Port(u32),
    /// Malformed, too long, EOF or error: close the stream.
    Bad,
}

/// Parses `CONNECT <port>` (without the newline): one space, 1-10 ASCII digits, a u32.
pub fn parse_connect_line(line: &[u8]) -> Option<u32> {
    let digits = line.strip_prefix(b"CONNECT ")?;
    if digits.is_empty() || digits.len() > 10 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    conns: HashMap<ConnKey, Connection>,
    by_fd: HashMap<RawFd, ConnKey>,
    handshakes: HashMap<RawFd, Handshake>,
    /// Connections with something to send to the guest, round robin.
    rxq: VecDeque<ConnKey>,
    /// Packets not tied to a live connection (RSTs), sent before connection traffic.
    ctrl: VecDeque<Header>,
    local_ports: HashSet<u32>,
    next_local_port: u32,
    /// The last `fill_rx` stopped because the guest had no RX buffers left.
    rx_starved: bool,
}

impl Muxer {
    /// Binds the host-side listener at `uds_path`.
    ///
    /// An existing socket file nobody listens on (left by a crashed VMM) is replaced; a
    /// live listener or a non-socket file at the path is an error.
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Self, VsockError> {
        let path = uds_path.to_path_buf();
        let bind_err = |source| VsockError::Bind {
            path: path.clone(),
            source,
        };
        let listener = match UnixListener::bind(uds_path) {
            Ok(l) => l,
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                use std::os::unix::fs::FileTypeExt;
                let is_socket = std::fs::symlink_metadata(uds_path)
                    .map(|m| m.file_type().is_socket())
                    .unwrap_or(false);
                if !is_socket || UnixStream::connect(uds_path).is_ok() {
                    return Err(VsockError::PathInUse(path));
                }
                std::fs::remove_file(uds_path).map_err(bind_err)?;
                UnixListener::bind(uds_path).map_err(bind_err)?
            }
            Err(e) => return Err(bind_err(e)),
        };
        // Whoever can connect drives the agent's API (root in every container): owner only,
        // whatever the umask was at bind.
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(uds_path, std::fs::Permissions::from_mode(0o600))
                .map_err(bind_err)?;
        }
        listener.set_nonblocking(true).map_err(bind_err)?;
        let epoll = Epoll::new().map_err(VsockError::Epoll)?;
        epoll
            .ctl(
                ControlOperation::Add,
                listener.as_raw_fd(),
                EpollEvent::new(EventSet::IN, listener.as_raw_fd() as u64),
            )
            .map_err(VsockError::Epoll)?;
        Ok(Self {
            guest_cid,
            uds_path: path,
            listener,
            epoll,
            conns: HashMap::new(),
            by_fd: HashMap::new(),
            handshakes: HashMap::new(),
            rxq: VecDeque::new(),
            ctrl: VecDeque::new(),
            local_ports: HashSet::new(),
            next_local_port: FIRST_LOCAL_PORT,
            rx_starved: false,
        })
    }

    /// Readable when a host socket needs attention; poll it, then call
    /// [`Muxer::process_host_events`].
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    /// Number of live connections (handshakes excluded).
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Drops every connection and pending handshake (driver reset); the listener stays.
    pub fn reset(&mut self) {
        for (_, c) in self.conns.drain() {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                c.stream.as_raw_fd(),
                EpollEvent::default(),
            );
        }
        for (fd, _) in self.handshakes.drain() {
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
        self.by_fd.clear();
        self.rxq.clear();
        self.ctrl.clear();
        self.local_ports.clear();
    }

    /// Whether there is anything to put into RX buffers.
    pub fn has_rx_work(&self) -> bool {
        !self.ctrl.is_empty() || !self.rxq.is_empty()
    }

    /// Whether the last [`Muxer::fill_rx`] ran out of guest RX buffers with work left.
    pub fn rx_starved(&self) -> bool {
        self.rx_starved
    }

    /// Whether some host-initiated connection waits for the guest (the worker then wakes up
    /// periodically to time it out).
    pub fn has_pending_connects(&self) -> bool {
        self.conns.values().any(|c| c.state == State::LocalInit)
    }

    // ---- host side -------------------------------------------------------------------

    /// Handles whatever host sockets are ready, without blocking.
    pub fn process_host_events(&mut self) {
        let mut events = [EpollEvent::default(); 32];
        let n = match self.epoll.wait(0, &mut events) {
            Ok(n) => n,
            Err(e) => {
                if e.kind() != io::ErrorKind::Interrupted {
                    warn!("vsock: epoll_wait failed: {e}");
                }
                return;
            }
        };
        for ev in &events[..n] {
            let fd = ev.data() as RawFd;
            let set = ev.event_set();
            if fd == self.listener.as_raw_fd() {
                self.accept_all();
            } else if self.handshakes.contains_key(&fd) {
                self.advance_handshake(fd);
            } else if let Some(&key) = self.by_fd.get(&fd) {
                self.conn_event(key, set);
            }
        }
    }

    fn accept_all(&mut self) {
        // Bounded so a connect storm cannot starve the queues.
        for _ in 0..MAX_HANDSHAKES {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    guest_warn!("vsock: accept on {} failed: {e}", self.uds_path.display());
                    return;
                }
            };
            if self.handshakes.len() >= MAX_HANDSHAKES || self.conns.len() >= MAX_CONNECTIONS {
                guest_warn!("vsock: too many host connections; refusing one");
                continue;
            }
            if let Err(e) = stream.set_nonblocking(true) {
                guest_warn!("vsock: cannot make host stream non-blocking: {e}");
                continue;
            }
            let fd = stream.as_raw_fd();
            if let Err(e) = self.epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, fd as u64),
            ) {
                guest_warn!("vsock: cannot watch host stream: {e}");
                continue;
            }
            self.handshakes.insert(
                fd,
                Handshake {
                    stream,
                    line: Vec::with_capacity(MAX_HANDSHAKE_LINE),
                },
            );
            // Clients usually send the line right after connecting: don't wait a round.
            self.advance_handshake(fd);
        }
    }

    /// Reads the `CONNECT` line one byte at a time: whatever follows the newline already
    /// belongs to the connection and must stay in the socket.
    fn read_line(hs: &mut Handshake) -> LineResult {
        loop {
            let mut b = [0u8; 1];
            match hs.stream.read(&mut b) {
                Ok(0) => return LineResult::Bad,
                Ok(_) if b[0] == b'\n' => {
                    return parse_connect_line(&hs.line).map_or(LineResult::Bad, LineResult::Port);
                }
                Ok(_) => {
                    hs.line.push(b[0]);
                    if hs.line.len() >= MAX_HANDSHAKE_LINE {
                        return LineResult::Bad;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return LineResult::Incomplete,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return LineResult::Bad,
            }
        }
    }

    fn advance_handshake(&mut self, fd: RawFd) {
        let Some(hs) = self.handshakes.get_mut(&fd) else {
            return;
        };
        let port = match Self::read_line(hs) {
            LineResult::Incomplete => return,
            LineResult::Bad => {
                debug!(
                    "vsock: bad handshake line {:?}",
                    String::from_utf8_lossy(&hs.line)
                );
                self.drop_handshake(fd);
                return;
            }
            LineResult::Port(p) => p,
        };
        let Some(hs) = self.handshakes.remove(&fd) else {
            return;
        };
        // Stop watching until the guest answers; hang-ups are still reported.
        if let Err(e) = self.epoll.ctl(
            ControlOperation::Modify,
            fd,
            EpollEvent::new(EventSet::empty(), fd as u64),
        ) {
            guest_warn!("vsock: epoll modify failed: {e}");
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
            return;
        }
        let Some(local_port) = self.allocate_local_port() else {
            guest_warn!("vsock: no free host port");
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
            return;
        };
        let key = ConnKey {
            local_port,
            peer_port: port,
        };
        let mut conn = Connection::host_initiated(hs.stream, key, self.guest_cid);
        conn.interest = Some(0);
        debug!("vsock: host connects to guest port {port} from {local_port}");
        self.by_fd.insert(fd, key);
        self.conns.insert(key, conn);
        self.schedule(key);
    }

    fn drop_handshake(&mut self, fd: RawFd) {
        if self.handshakes.remove(&fd).is_some() {
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
    }

    fn allocate_local_port(&mut self) -> Option<u32> {
        for _ in 0..=MAX_CONNECTIONS {
            let p = self.next_local_port;
            self.next_local_port = p.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
            if self.local_ports.insert(p) {
                return Some(p);
            }
        }
        None
    }

    fn conn_event(&mut self, key: ConnKey, set: EventSet) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if set.intersects(EventSet::HANG_UP | EventSet::ERROR) && conn.state == State::LocalInit {
            // The host gave up before the guest answered.
            self.kill(key);
            return;
        }
        if set.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR) {
            conn.host_readable = true;
        }
        if set.contains(EventSet::OUT)
            || (set.contains(EventSet::HANG_UP) && conn.tx_buffered() > 0)
        {
            match conn.flush_to_host() {
                Ok(None) => {}
                Ok(Some(_rst)) => {
                    self.kill(key);
                    return;
                }
                Err(e) => {
                    debug!("vsock {key:?}: host write failed: {e}");
                    self.kill(key);
                    return;
                }
            }
        }
        if set.contains(EventSet::HANG_UP) {
            // Level-triggered HUP would fire forever; the rest is driven by reads.
            let fd = conn.stream.as_raw_fd();
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
            conn.interest = None;
        }
        self.refresh(key);
    }

    /// Times out host-initiated connections the guest never answered.
    pub fn expire_connects(&mut self, now: Instant) {
        let expired: Vec<ConnKey> = self
            .conns
            .values()
            .filter(|c| {
                c.state == State::LocalInit && now.duration_since(c.created) >= CONNECT_TIMEOUT
            })
            .map(|c| c.key)
            .collect();
        for key in expired {
            debug!("vsock {key:?}: guest did not answer in time");
            self.kill(key);
        }
    }

    // ---- connection bookkeeping ------------------------------------------------------

    /// Brings the epoll interest and the RX schedule in line with the connection's state.
    fn refresh(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if let Some(current) = conn.interest {
            let wanted = conn.wanted_interest();
            if wanted != current {
                let fd = conn.stream.as_raw_fd();
                match self.epoll.ctl(
                    ControlOperation::Modify,
                    fd,
                    EpollEvent::new(EventSet::from_bits_truncate(wanted), fd as u64),
                ) {
                    Ok(()) => conn.interest = Some(wanted),
                    Err(e) => guest_warn!("vsock {key:?}: epoll modify failed: {e}"),
                }
            }
        }
        self.schedule(key);
    }

    fn schedule(&mut self, key: ConnKey) {
        if let Some(conn) = self.conns.get_mut(&key)
            && !conn.in_rxq
            && conn.has_rx_work()
        {
            conn.in_rxq = true;
            self.rxq.push_back(key);
        }
    }

    fn remove(&mut self, key: ConnKey) -> Option<Connection> {
        let conn = self.conns.remove(&key)?;
        let fd = conn.stream.as_raw_fd();
        self.by_fd.remove(&fd);
        if conn.interest.is_some() {
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
        if key.local_port >= FIRST_LOCAL_PORT {
            self.local_ports.remove(&key.local_port);
        }
        Some(conn)
    }

    /// Drops the connection and tells the guest with an RST.
    fn kill(&mut self, key: ConnKey) {
        if let Some(conn) = self.remove(key) {
            self.push_ctrl(conn.header(OP_RST));
        }
    }

    fn push_ctrl(&mut self, h: Header) {
        if self.ctrl.len() >= MAX_CTRL_QUEUE {
            guest_warn!("vsock: control queue full, dropping {h:?}");
            return;
        }
        self.ctrl.push_back(h);
    }

    // ---- guest TX --------------------------------------------------------------------

    /// Consumes the TX queue. Returns whether used entries were added.
    pub fn process_tx(&mut self, mem: &GuestMemory, queue: &mut Queue) -> bool {
        let mut used = false;
        let mut pass = crate::devices::virtio::chain::Pass::new(queue);
        while let Some(mut chain) = pass.pop(queue, mem) {
            let head = chain.head_index();
            match VsockPacket::from_tx_virtq_chain(mem, &mut chain, MAX_TX_PAYLOAD) {
                Ok(pkt) => {
                    let hdr = Header::of(&pkt);
                    self.handle_guest_packet(&hdr, pkt.data_slice());
                }
                Err(e) => debug!("vsock: malformed TX packet dropped: {e}"),
            }
            if let Err(e) = queue.add_used(mem, head, 0) {
                guest_warn!("vsock: cannot add used entry: {e}");
            }
            used = true;
        }
        used
    }

    /// Routes one guest packet.
    pub fn handle_guest_packet<B: vm_memory::bitmap::BitmapSlice>(
        &mut self,
        hdr: &Header,
        data: Option<&vm_memory::VolatileSlice<'_, B>>,
    ) {
        if hdr.src_cid != self.guest_cid || hdr.dst_cid != HOST_CID {
            debug!(
                "vsock: dropping packet {} -> {} (guest is {})",
                hdr.src_cid, hdr.dst_cid, self.guest_cid
            );
            return;
        }
        if hdr.type_ != TYPE_STREAM {
            if hdr.op != OP_RST {
                self.push_ctrl(hdr.reset_reply());
            }
            return;
        }
        let key = ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        let Some(conn) = self.conns.get_mut(&key) else {
            match hdr.op {
                OP_REQUEST => self.guest_connect(key, hdr),
                OP_RST => {}
                _ => self.push_ctrl(hdr.reset_reply()),
            }
            return;
        };
        conn.update_peer_credit(hdr);
        match (conn.state, hdr.op) {
            (_, OP_RST) => {
                self.remove(key);
                return;
            }
            (State::LocalInit, OP_RESPONSE) => {
                if let Err(e) = conn.establish() {
                    debug!("vsock {key:?}: cannot answer the host: {e}");
                    self.kill(key);
                    return;
                }
            }
            (State::Established, OP_RW) => {
                if let Err(e) = conn.recv_from_guest(data) {
                    debug!("vsock {key:?}: {e}");
                    self.kill(key);
                    return;
                }
            }
            (State::Established, OP_CREDIT_UPDATE) => {}
            (State::Established, OP_CREDIT_REQUEST) => conn.credit_requested_by_guest(),
            (State::Established, OP_SHUTDOWN) => {
                if conn.guest_shutdown(hdr.flags).is_some() {
                    self.kill(key);
                    return;
                }
            }
            (_, OP_REQUEST) => {
                // A second request for a live pair: refuse it, keep the connection.
                self.push_ctrl(hdr.reset_reply());
                return;
            }
            (state, op) => {
                debug!("vsock {key:?}: unexpected op {op} in state {state:?}");
                self.kill(key);
                return;
            }
        }
        self.refresh(key);
    }

    fn guest_connect(&mut self, key: ConnKey, hdr: &Header) {
        if self.conns.len() >= MAX_CONNECTIONS {
            guest_warn!("vsock: too many connections; refusing guest request");
            self.push_ctrl(hdr.reset_reply());
            return;
        }
        let mut path = self.uds_path.clone().into_os_string();
        path.push(format!("_{}", key.local_port));
        let stream = match UnixStream::connect(&path) {
            Ok(s) => s,
            Err(e) => {
                debug!("vsock: guest connect to {path:?} failed: {e}");
                self.push_ctrl(hdr.reset_reply());
                return;
            }
        };
        let fd = stream.as_raw_fd();
        let registered = stream.set_nonblocking(true).and_then(|()| {
            self.epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, fd as u64),
            )
        });
        if let Err(e) = registered {
            guest_warn!("vsock: cannot set up host stream: {e}");
            self.push_ctrl(hdr.reset_reply());
            return;
        }
        let mut conn = Connection::guest_initiated(stream, key, self.guest_cid, hdr);
        conn.interest = Some(libc::EPOLLIN as u32);
        self.by_fd.insert(fd, key);
        self.conns.insert(key, conn);
        self.schedule(key);
    }

    // ---- guest RX --------------------------------------------------------------------

    /// Fills RX buffers while there is something to send. Returns whether used entries were
    /// added. Stops early when the guest has no buffers left.
    pub fn fill_rx(&mut self, mem: &GuestMemory, queue: &mut Queue) -> bool {
        let mut used = false;
        self.rx_starved = false;
        while self.has_rx_work() {
            let Some(mut chain) = crate::devices::virtio::chain::pop(queue, mem) else {
                self.rx_starved = true;
                break;
            };
            let head = chain.head_index();
            let mut pkt = match VsockPacket::from_rx_virtq_chain(mem, &mut chain, MAX_RX_BUF) {
                Ok(p) => p,
                Err(e) => {
                    debug!("vsock: unusable RX buffer: {e}");
                    if let Err(e) = queue.add_used(mem, head, 0) {
                        guest_warn!("vsock: cannot add used entry: {e}");
                    }
                    used = true;
                    continue;
                }
            };
            let Some(hdr) = self.next_rx_packet(pkt.data_slice()) else {
                // Nothing after all (e.g. the host had no data): give the buffer back.
                queue.go_to_previous_position();
                break;
            };
            let len = if pkt.set_header_from_raw(&hdr.to_bytes()).is_ok() {
                HEADER_LEN as u32 + hdr.len
            } else {
                0
            };
            if let Err(e) = queue.add_used(mem, head, len) {
                guest_warn!("vsock: cannot add used entry: {e}");
            }
            used = true;
        }
        used
    }

    /// The next packet for the guest; data, if any, is already in `buf`.
    fn next_rx_packet<B: vm_memory::bitmap::BitmapSlice>(
        &mut self,
        buf: Option<&vm_memory::VolatileSlice<'_, B>>,
    ) -> Option<Header> {
        if let Some(h) = self.ctrl.pop_front() {
            return Some(h);
        }
        // Connections that produced nothing this time are re-queued only after the loop,
        // so one that cannot use this buffer is not retried forever.
        let mut idle = Vec::new();
        let mut out = None;
        while let Some(key) = self.rxq.pop_front() {
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            conn.in_rxq = false;
            match conn.produce(buf) {
                Produced::Packet(h) => {
                    self.refresh(key);
                    out = Some(h);
                    break;
                }
                Produced::Reset(h) => {
                    self.remove(key);
                    out = Some(h);
                    break;
                }
                Produced::Nothing => idle.push(key),
            }
        }
        for key in idle {
            self.refresh(key);
        }
        out
    }
}
