//! A synchronous rtnetlink socket: one request at a time, answered by its ack or by the
//! messages of a dump. Messages are netlink-packet-route's; the socket is netlink-sys's.
//! The socket belongs to the network namespace of the thread that opened it.

use std::io;

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

pub struct Rtnl {
    socket: Socket,
    seq: u32,
}

impl Rtnl {
    pub fn open() -> io::Result<Rtnl> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        Ok(Rtnl { socket, seq: 0 })
    }

    /// Sends `msg` with `flags` (plus REQUEST and ACK) and waits for the kernel's answer.
    /// A refusal is the kernel's errno as an `io::Error`.
    pub fn request(&mut self, msg: RouteNetlinkMessage, flags: u16) -> io::Result<()> {
        let seq = self.send(msg, flags | NLM_F_ACK)?;
        loop {
            for reply in self.receive(seq)? {
                match reply.payload {
                    NetlinkPayload::Error(e) if e.code.is_some() => return Err(e.to_io()),
                    NetlinkPayload::Error(_) | NetlinkPayload::Done(_) => return Ok(()),
                    _ => {}
                }
            }
        }
    }

    /// Sends a dump request and collects every message of the answer.
    pub fn dump(&mut self, msg: RouteNetlinkMessage) -> io::Result<Vec<RouteNetlinkMessage>> {
        let seq = self.send(msg, NLM_F_DUMP)?;
        let mut out = Vec::new();
        loop {
            for reply in self.receive(seq)? {
                match reply.payload {
                    NetlinkPayload::InnerMessage(m) => out.push(m),
                    NetlinkPayload::Error(e) if e.code.is_some() => return Err(e.to_io()),
                    NetlinkPayload::Error(_) | NetlinkPayload::Done(_) => return Ok(out),
                    _ => {}
                }
            }
        }
    }

    fn send(&mut self, msg: RouteNetlinkMessage, flags: u16) -> io::Result<u32> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.seq;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
        packet.finalize();
        let mut buf = vec![0u8; packet.buffer_len()];
        packet.serialize(&mut buf);
        let sent = self.socket.send(&buf, 0)?;
        if sent != buf.len() {
            return Err(io::Error::other(format!(
                "netlink: sent {sent} of {} bytes",
                buf.len()
            )));
        }
        Ok(self.seq)
    }

    /// The messages of one datagram that answer request `seq`.
    fn receive(&mut self, seq: u32) -> io::Result<Vec<NetlinkMessage<RouteNetlinkMessage>>> {
        let (buf, _) = self.socket.recv_from_full()?;
        let mut out = Vec::new();
        let mut offset = 0;
        while offset < buf.len() {
            let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[offset..])
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("netlink: {e}")))?;
            let len = msg.header.length as usize;
            if len == 0 {
                break;
            }
            offset += (len + 3) & !3;
            if msg.header.sequence_number == seq {
                out.push(msg);
            }
        }
        Ok(out)
    }
}
