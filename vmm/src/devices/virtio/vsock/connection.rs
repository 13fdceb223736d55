//! One vsock stream connection between a guest socket and a host Unix stream.
//!
//! Flow control (virtio 1.2, 5.10.6.3): each side advertises `buf_alloc` (its receive
//! buffer) and `fwd_cnt` (bytes it has consumed). A sender may have at most
//! `peer_buf_alloc - (sent - peer_fwd_cnt)` bytes in flight. Here "consumed" means written
//! to the host socket, so the bytes we hold for a slow host are bounded by our `buf_alloc`.

use std::io::{self, Write};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use vm_memory::bitmap::BitmapSlice;
use vm_memory::{ReadVolatile, VolatileMemoryError, VolatileSlice, WriteVolatile};

use super::packet::*;

/// Receive buffer we advertise per connection: guest data the host has not taken yet.
pub const CONN_BUF_SIZE: u32 = 256 * 1024;
/// Forwarded bytes after which we tell the guest about the freed space unprompted.
const CREDIT_UPDATE_THRESHOLD: u32 = CONN_BUF_SIZE / 2;

/// A connection as seen from the host: `local_port` is the host-side port, `peer_port` the
/// guest's.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, PartialOrd, Ord)]
pub struct ConnKey {
    pub local_port: u32,
    pub peer_port: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Host-initiated: OP_REQUEST sent or queued, waiting for the guest's OP_RESPONSE.
    LocalInit,
    Established,
}

// Control packets waiting for an RX buffer.
const PENDING_REQUEST: u8 = 1;
const PENDING_RESPONSE: u8 = 2;
const PENDING_CREDIT_UPDATE: u8 = 4;

/// What a connection put into an RX buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Produced {
    /// Nothing to send right now.
    Nothing,
    /// A packet with this header and `hdr.len` data bytes already in the buffer.
    Packet(Header),
    /// The connection is over: send this RST and drop it.
    Reset(Header),
}

/// Guest data the host socket has not accepted yet; at most [`CONN_BUF_SIZE`] bytes.
#[derive(Default)]
struct TxBuf {
    data: Vec<u8>,
    start: usize,
}

impl TxBuf {
    fn len(&self) -> usize {
        self.data.len() - self.start
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn push<B: BitmapSlice>(&mut self, src: &VolatileSlice<'_, B>) {
        if self.start > 0 {
            self.data.drain(..self.start);
            self.start = 0;
        }
        let old = self.data.len();
        self.data.resize(old + src.len(), 0);
        src.copy_to(&mut self.data[old..]);
    }

    /// Writes as much as the socket takes; returns the bytes written.
    fn flush(&mut self, stream: &UnixStream) -> io::Result<usize> {
        let mut total = 0;
        while !self.is_empty() {
            match (&*stream).write(&self.data[self.start..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.start += n;
                    total += n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.is_empty() {
            // Give the memory back: a connection is idle most of its life.
            self.data = Vec::new();
            self.start = 0;
        }
        Ok(total)
    }
}

fn io_error(e: VolatileMemoryError) -> io::Error {
    match e {
        VolatileMemoryError::IOError(e) => e,
        other => io::Error::other(other.to_string()),
    }
}

pub struct Connection {
    pub stream: UnixStream,
    pub key: ConnKey,
    pub guest_cid: u64,
    pub state: State,
    /// When the connection was created (for the LocalInit timeout).
    pub created: Instant,
    pending: u8,
    /// The host stream may have data for the guest (EPOLLIN seen, EAGAIN not yet).
    pub host_readable: bool,
    /// The host stream reported EOF; OP_SHUTDOWN(SEND) went to the guest.
    pub host_eof: bool,
    /// The guest will send no more data.
    pub guest_shut_send: bool,
    /// The guest will receive no more data.
    pub guest_shut_rcv: bool,
    /// We shut down the write side of the host stream.
    host_write_closed: bool,
    /// Queued in the muxer's RX schedule.
    pub in_rxq: bool,
    /// epoll interest currently registered (`None`: not registered).
    pub interest: Option<u32>,
    // Flow control, all modulo 2^32 like the wire fields.
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// Data bytes sent to the guest.
    rx_cnt: Wrapping<u32>,
    /// Data bytes received from the guest.
    recv_cnt: Wrapping<u32>,
    /// Guest bytes written to the host stream.
    fwd_cnt: Wrapping<u32>,
    last_fwd_cnt_sent: Wrapping<u32>,
    /// We asked the guest for credit and have not heard from it since.
    credit_requested: bool,
    tx_buf: TxBuf,
}

impl Connection {
    /// A connection the host side opened (through `CONNECT <port>`): OP_REQUEST pending.
    pub fn host_initiated(stream: UnixStream, key: ConnKey, guest_cid: u64) -> Self {
        let mut c = Self::new(stream, key, guest_cid, State::LocalInit);
        c.pending = PENDING_REQUEST;
        c
    }

    /// A connection the guest requested and the host accepted: OP_RESPONSE pending.
    pub fn guest_initiated(
        stream: UnixStream,
        key: ConnKey,
        guest_cid: u64,
        peer: &Header,
    ) -> Self {
        let mut c = Self::new(stream, key, guest_cid, State::Established);
        c.pending = PENDING_RESPONSE;
        c.update_peer_credit(peer);
        c
    }

    fn new(stream: UnixStream, key: ConnKey, guest_cid: u64, state: State) -> Self {
        Self {
            stream,
            key,
            guest_cid,
            state,
            created: Instant::now(),
            pending: 0,
            host_readable: false,
            host_eof: false,
            guest_shut_send: false,
            guest_shut_rcv: false,
            host_write_closed: false,
            in_rxq: false,
            interest: None,
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            rx_cnt: Wrapping(0),
            recv_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            credit_requested: false,
            tx_buf: TxBuf::default(),
        }
    }

    /// A header from us to the guest for this connection.
    pub fn header(&self, op: u16) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: self.key.local_port,
            dst_port: self.key.peer_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: CONN_BUF_SIZE,
            fwd_cnt: self.fwd_cnt.0,
        }
    }

    /// Every guest packet carries its current receive window.
    pub fn update_peer_credit(&mut self, h: &Header) {
        self.peer_buf_alloc = h.buf_alloc;
        self.peer_fwd_cnt = Wrapping(h.fwd_cnt);
        self.credit_requested = false;
    }

    /// Bytes the guest can still take.
    pub fn peer_free(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn may_read_host(&self) -> bool {
        self.state == State::Established && !self.host_eof && !self.guest_shut_rcv
    }

    /// Whether [`Connection::produce`] would have something to send.
    pub fn has_rx_work(&self) -> bool {
        self.pending != 0
            || (self.may_read_host()
                && self.host_readable
                && (self.peer_free() > 0 || !self.credit_requested))
    }

    /// The epoll events this connection needs now.
    pub fn wanted_interest(&self) -> u32 {
        let mut ev = 0;
        if self.may_read_host() && !self.host_readable {
            ev |= libc::EPOLLIN as u32;
        }
        if !self.tx_buf.is_empty() {
            ev |= libc::EPOLLOUT as u32;
        }
        ev
    }

    /// Bytes of guest data buffered for the host.
    pub fn tx_buffered(&self) -> usize {
        self.tx_buf.len()
    }

    /// The guest answered our OP_REQUEST: tell the host side which port it got.
    pub fn establish(&mut self) -> io::Result<()> {
        self.state = State::Established;
        // The host may have sent data right after its CONNECT line; try reading at once
        // (a read that finds nothing re-arms EPOLLIN).
        self.host_readable = true;
        // A fresh socket's send buffer takes these few bytes at once; if it does not, the
        // host end is broken and the connection is reset.
        let line = format!("OK {}\n", self.key.local_port);
        (&self.stream).write_all(line.as_bytes())
    }

    /// Guest data for the host (OP_RW). An error means the connection must be reset.
    pub fn recv_from_guest<B: BitmapSlice>(
        &mut self,
        data: Option<&VolatileSlice<'_, B>>,
    ) -> io::Result<()> {
        let Some(data) = data else {
            return Ok(());
        };
        if self.guest_shut_send {
            return Err(io::Error::other("data after the guest's SHUTDOWN(SEND)"));
        }
        let len = u32::try_from(data.len()).map_err(io::Error::other)?;
        // The guest may only send what our advertised buffer can hold.
        let held = (self.recv_cnt - self.fwd_cnt).0;
        if u64::from(held) + u64::from(len) > u64::from(CONN_BUF_SIZE) {
            return Err(io::Error::other(format!(
                "guest exceeded its credit: {held} buffered + {len} > {CONN_BUF_SIZE}"
            )));
        }
        self.recv_cnt += len;
        let mut rest = data.clone();
        if self.tx_buf.is_empty() {
            // Fast path: straight from guest memory into the socket.
            match (&self.stream).write_volatile(data) {
                Ok(n) => {
                    self.fwd_cnt += n as u32;
                    rest = data.offset(n).map_err(io_error)?;
                }
                Err(e) => {
                    let e = io_error(e);
                    if e.kind() != io::ErrorKind::WouldBlock {
                        return Err(e);
                    }
                }
            }
        }
        if !rest.is_empty() {
            self.tx_buf.push(&rest);
        }
        self.check_credit_update();
        Ok(())
    }

    fn check_credit_update(&mut self) {
        if (self.fwd_cnt - self.last_fwd_cnt_sent).0 >= CREDIT_UPDATE_THRESHOLD {
            self.pending |= PENDING_CREDIT_UPDATE;
        }
    }

    /// The guest asked for our credit.
    pub fn credit_requested_by_guest(&mut self) {
        self.pending |= PENDING_CREDIT_UPDATE;
    }

    /// Host stream writable: flush buffered guest data. Returns `Some(rst)` if the
    /// connection is finished.
    pub fn flush_to_host(&mut self) -> io::Result<Option<Header>> {
        let n = self.tx_buf.flush(&self.stream)?;
        self.fwd_cnt += n as u32;
        self.check_credit_update();
        Ok(self.after_tx_progress())
    }

    /// OP_SHUTDOWN from the guest. Returns `Some(rst)` if the connection is finished.
    pub fn guest_shutdown(&mut self, flags: u32) -> Option<Header> {
        self.guest_shut_send |= flags & SHUTDOWN_SEND != 0;
        self.guest_shut_rcv |= flags & SHUTDOWN_RCV != 0;
        self.after_tx_progress()
    }

    /// Applies the guest's shutdown once its data reached the host.
    fn after_tx_progress(&mut self) -> Option<Header> {
        if !self.tx_buf.is_empty() {
            return None;
        }
        if self.guest_shut_send && self.guest_shut_rcv {
            // The guest closed its socket and waits for our RST.
            return Some(self.header(OP_RST));
        }
        if self.guest_shut_send && !self.host_write_closed {
            self.host_write_closed = true;
            // The host end may already be gone; the guest is done sending either way.
            let _ = self.stream.shutdown(Shutdown::Write);
        }
        if self.guest_shut_send && self.host_eof {
            return Some(self.header(OP_RST));
        }
        None
    }

    /// Fills an RX buffer whose data area is `buf` (may be empty).
    pub fn produce<B: BitmapSlice>(&mut self, buf: Option<&VolatileSlice<'_, B>>) -> Produced {
        if self.pending & PENDING_REQUEST != 0 {
            self.pending &= !PENDING_REQUEST;
            return Produced::Packet(self.stamp(OP_REQUEST));
        }
        if self.pending & PENDING_RESPONSE != 0 {
            self.pending &= !PENDING_RESPONSE;
            return Produced::Packet(self.stamp(OP_RESPONSE));
        }
        if self.may_read_host() && self.host_readable {
            let free = self.peer_free() as usize;
            if free == 0 {
                if !self.credit_requested {
                    self.credit_requested = true;
                    return Produced::Packet(self.stamp(OP_CREDIT_REQUEST));
                }
            } else if let Some(buf) = buf.filter(|b| !b.is_empty()) {
                let n = free.min(buf.len());
                let mut dst = match buf.subslice(0, n) {
                    Ok(d) => d,
                    Err(_) => return Produced::Nothing,
                };
                match (&self.stream).read_volatile(&mut dst) {
                    Ok(0) => {
                        self.host_eof = true;
                        if self.guest_shut_send && self.tx_buf.is_empty() {
                            return Produced::Reset(self.header(OP_RST));
                        }
                        let mut h = self.stamp(OP_SHUTDOWN);
                        h.flags = SHUTDOWN_SEND;
                        return Produced::Packet(h);
                    }
                    Ok(k) => {
                        self.rx_cnt += k as u32;
                        let mut h = self.stamp(OP_RW);
                        h.len = k as u32;
                        return Produced::Packet(h);
                    }
                    Err(e) => {
                        let e = io_error(e);
                        match e.kind() {
                            io::ErrorKind::WouldBlock => self.host_readable = false,
                            io::ErrorKind::Interrupted => {}
                            _ => {
                                tracing::debug!("vsock {:?}: host read error: {e}", self.key);
                                return Produced::Reset(self.header(OP_RST));
                            }
                        }
                    }
                }
            }
        }
        if self.pending & PENDING_CREDIT_UPDATE != 0 {
            return Produced::Packet(self.stamp(OP_CREDIT_UPDATE));
        }
        Produced::Nothing
    }

    /// A header for a packet about to go out; any packet carries our credit, so a pending
    /// credit update is satisfied by it.
    fn stamp(&mut self, op: u16) -> Header {
        self.pending &= !PENDING_CREDIT_UPDATE;
        self.last_fwd_cnt_sent = self.fwd_cnt;
        self.header(op)
    }
}
