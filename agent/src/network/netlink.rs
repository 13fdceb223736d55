//! A minimal rtnetlink client: the handful of requests ConfigureNetwork makes (link dump,
//! link changes, address and route additions), each sent with an ack request and
//! answered synchronously.
//!
//! Hand-rolled on purpose: the agent is unpacked from the initramfs under emulation at
//! every boot, and a general netlink crate would add far more code than these few
//! fixed-layout messages (headers from linux/netlink.h and linux/rtnetlink.h).

use std::net::IpAddr;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::errno::Errno;
use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, send,
    socket,
};

const NLMSG_HDRLEN: usize = 16;
const IFINFOMSG_LEN: usize = 16;
const IFADDRMSG_LEN: usize = 8;
const RTMSG_LEN: usize = 12;
const RTA_HDRLEN: usize = 4;

const NLMSG_ERROR: u16 = libc::NLMSG_ERROR as u16;
const NLMSG_DONE: u16 = libc::NLMSG_DONE as u16;
const RTM_NEWLINK: u16 = libc::RTM_NEWLINK;
const RTM_GETLINK: u16 = libc::RTM_GETLINK;
const RTM_NEWADDR: u16 = libc::RTM_NEWADDR;
const RTM_NEWROUTE: u16 = libc::RTM_NEWROUTE;

const NLM_F_REQUEST: u16 = libc::NLM_F_REQUEST as u16;
const NLM_F_ACK: u16 = libc::NLM_F_ACK as u16;
const NLM_F_DUMP: u16 = libc::NLM_F_DUMP as u16;
const NLM_F_CREATE: u16 = libc::NLM_F_CREATE as u16;
const NLM_F_REPLACE: u16 = libc::NLM_F_REPLACE as u16;

const IFLA_ADDRESS: u16 = libc::IFLA_ADDRESS;
const IFLA_IFNAME: u16 = libc::IFLA_IFNAME;
const IFLA_MTU: u16 = libc::IFLA_MTU;
const IFA_ADDRESS: u16 = libc::IFA_ADDRESS;
const IFA_LOCAL: u16 = libc::IFA_LOCAL;
const IFA_FLAGS: u16 = libc::IFA_FLAGS;
const RTA_DST: u16 = libc::RTA_DST;
const RTA_OIF: u16 = libc::RTA_OIF;
const RTA_GATEWAY: u16 = libc::RTA_GATEWAY;
const RTA_PREFSRC: u16 = libc::RTA_PREFSRC;
const RTA_TABLE: u16 = libc::RTA_TABLE;

/// The address came from the host, where it is already unique: no duplicate address
/// detection, which would hold an IPv6 address back for a second or more.
const IFA_F_NODAD: u32 = 0x02;
/// linux/rtnetlink.h RTNH_F_ONLINK.
const RTNH_F_ONLINK: u32 = 0x04;

/// Big enough for any message of a link dump (the kernel fills up to 32 KiB per read).
const RECV_BUF: usize = 64 * 1024;

/// A link as a dump reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: Option<[u8; 6]>,
    pub flags: u32,
}

/// A route to add to the main table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteMsg {
    pub destination: IpAddr,
    pub prefix: u8,
    pub gateway: Option<IpAddr>,
    pub oif: Option<u32>,
    pub source: Option<IpAddr>,
    /// RT_SCOPE_* (link for on-link routes, universe for routes through a gateway).
    pub scope: u8,
    pub onlink: bool,
}

/// A NETLINK_ROUTE socket in the caller's network namespace.
pub struct Netlink {
    fd: OwnedFd,
    seq: u32,
}

impl Netlink {
    pub fn open() -> Result<Netlink, Errno> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkRoute,
        )?;
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0))?;
        Ok(Netlink { fd, seq: 0 })
    }

    /// Every link of the namespace.
    pub fn links(&mut self) -> Result<Vec<Link>, Errno> {
        let mut body = vec![0u8; IFINFOMSG_LEN];
        body[0] = libc::AF_UNSPEC as u8;
        let seq = self.send(RTM_GETLINK, NLM_F_DUMP, &body)?;
        let mut links = Vec::new();
        let mut buf = vec![0u8; RECV_BUF];
        loop {
            let n = recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::empty())?;
            for msg in Messages::new(&buf[..n]) {
                if msg.seq != seq {
                    continue;
                }
                match msg.kind {
                    NLMSG_DONE => return Ok(links),
                    NLMSG_ERROR => match error_code(msg.payload) {
                        Some(0) => return Ok(links),
                        Some(code) => return Err(Errno::from_raw(-code)),
                        None => return Err(Errno::EBADMSG),
                    },
                    RTM_NEWLINK => {
                        if let Some(link) = parse_link(msg.payload) {
                            links.push(link);
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    /// Sets (`up`) or clears the link's IFF_UP flag.
    pub fn set_up(&mut self, index: u32, up: bool) -> Result<(), Errno> {
        let mut body = ifinfomsg(index);
        let flags = if up { libc::IFF_UP as u32 } else { 0 };
        body[8..12].copy_from_slice(&flags.to_ne_bytes());
        body[12..16].copy_from_slice(&(libc::IFF_UP as u32).to_ne_bytes());
        self.request(RTM_NEWLINK, 0, &body)
    }

    pub fn set_name(&mut self, index: u32, name: &str) -> Result<(), Errno> {
        let mut body = ifinfomsg(index);
        let mut value = name.as_bytes().to_vec();
        value.push(0);
        attr(&mut body, IFLA_IFNAME, &value);
        self.request(RTM_NEWLINK, 0, &body)
    }

    pub fn set_mac(&mut self, index: u32, mac: &[u8; 6]) -> Result<(), Errno> {
        let mut body = ifinfomsg(index);
        attr(&mut body, IFLA_ADDRESS, mac);
        self.request(RTM_NEWLINK, 0, &body)
    }

    pub fn set_mtu(&mut self, index: u32, mtu: u32) -> Result<(), Errno> {
        let mut body = ifinfomsg(index);
        attr(&mut body, IFLA_MTU, &mtu.to_ne_bytes());
        self.request(RTM_NEWLINK, 0, &body)
    }

    /// Adds `address/prefix` to the link, replacing an equal one.
    pub fn add_address(&mut self, index: u32, address: IpAddr, prefix: u8) -> Result<(), Errno> {
        let mut body = vec![0u8; IFADDRMSG_LEN];
        body[0] = family(address);
        body[1] = prefix;
        body[3] = libc::RT_SCOPE_UNIVERSE;
        body[4..8].copy_from_slice(&index.to_ne_bytes());
        let bytes = ip_bytes(address);
        attr(&mut body, IFA_LOCAL, &bytes);
        attr(&mut body, IFA_ADDRESS, &bytes);
        if address.is_ipv6() {
            attr(&mut body, IFA_FLAGS, &IFA_F_NODAD.to_ne_bytes());
        }
        self.request(RTM_NEWADDR, NLM_F_CREATE | NLM_F_REPLACE, &body)
    }

    /// Adds a unicast route to the main table, replacing an equal one.
    pub fn add_route(&mut self, route: &RouteMsg) -> Result<(), Errno> {
        let mut body = vec![0u8; RTMSG_LEN];
        body[0] = family(route.destination);
        body[1] = route.prefix;
        body[4] = libc::RT_TABLE_MAIN;
        body[5] = libc::RTPROT_BOOT;
        body[6] = route.scope;
        body[7] = libc::RTN_UNICAST;
        let flags = if route.onlink { RTNH_F_ONLINK } else { 0 };
        body[8..12].copy_from_slice(&flags.to_ne_bytes());
        attr(
            &mut body,
            RTA_TABLE,
            &u32::from(libc::RT_TABLE_MAIN).to_ne_bytes(),
        );
        if route.prefix > 0 {
            attr(&mut body, RTA_DST, &ip_bytes(route.destination));
        }
        if let Some(gw) = route.gateway {
            attr(&mut body, RTA_GATEWAY, &ip_bytes(gw));
        }
        if let Some(oif) = route.oif {
            attr(&mut body, RTA_OIF, &oif.to_ne_bytes());
        }
        if let Some(src) = route.source {
            attr(&mut body, RTA_PREFSRC, &ip_bytes(src));
        }
        self.request(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE, &body)
    }

    /// Sends one message and waits for its ack.
    fn request(&mut self, kind: u16, flags: u16, body: &[u8]) -> Result<(), Errno> {
        let seq = self.send(kind, flags | NLM_F_ACK, body)?;
        let mut buf = vec![0u8; RECV_BUF];
        loop {
            let n = recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::empty())?;
            for msg in Messages::new(&buf[..n]) {
                if msg.seq == seq && msg.kind == NLMSG_ERROR {
                    return match error_code(msg.payload) {
                        Some(0) => Ok(()),
                        Some(code) => Err(Errno::from_raw(-code)),
                        None => Err(Errno::EBADMSG),
                    };
                }
            }
        }
    }

    fn send(&mut self, kind: u16, flags: u16, body: &[u8]) -> Result<u32, Errno> {
        self.seq = self.seq.wrapping_add(1);
        let mut msg = Vec::with_capacity(NLMSG_HDRLEN + body.len());
        msg.extend_from_slice(&((NLMSG_HDRLEN + body.len()) as u32).to_ne_bytes());
        msg.extend_from_slice(&kind.to_ne_bytes());
        msg.extend_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
        msg.extend_from_slice(&self.seq.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        msg.extend_from_slice(body);
        let sent = send(self.fd.as_raw_fd(), &msg, MsgFlags::empty())?;
        if sent != msg.len() {
            return Err(Errno::EMSGSIZE);
        }
        Ok(self.seq)
    }
}

fn family(ip: IpAddr) -> u8 {
    match ip {
        IpAddr::V4(_) => libc::AF_INET as u8,
        IpAddr::V6(_) => libc::AF_INET6 as u8,
    }
}

fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// An `ifinfomsg` addressing link `index`, changing nothing by itself.
fn ifinfomsg(index: u32) -> Vec<u8> {
    let mut body = vec![0u8; IFINFOMSG_LEN];
    body[0] = libc::AF_UNSPEC as u8;
    body[4..8].copy_from_slice(&index.to_ne_bytes());
    body
}

/// Appends an rtattr, padded to 4 bytes.
fn attr(buf: &mut Vec<u8>, kind: u16, value: &[u8]) {
    buf.extend_from_slice(&((RTA_HDRLEN + value.len()) as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(value);
    buf.resize(align(buf.len()), 0);
}

fn align(len: usize) -> usize {
    (len + 3) & !3
}

/// The error field of an NLMSG_ERROR payload (0 for an ack, -errno for a failure).
fn error_code(payload: &[u8]) -> Option<i32> {
    Some(i32::from_ne_bytes(payload.get(..4)?.try_into().ok()?))
}

/// One message of a netlink datagram.
struct Message<'a> {
    kind: u16,
    seq: u32,
    payload: &'a [u8],
}

/// The messages of a datagram; stops at the first malformed header.
struct Messages<'a> {
    rest: &'a [u8],
}

impl<'a> Messages<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Messages { rest: buf }
    }
}

impl<'a> Iterator for Messages<'a> {
    type Item = Message<'a>;

    fn next(&mut self) -> Option<Message<'a>> {
        let header = self.rest.get(..NLMSG_HDRLEN)?;
        let len = u32::from_ne_bytes(header[0..4].try_into().ok()?) as usize;
        if len < NLMSG_HDRLEN || len > self.rest.len() {
            self.rest = &[];
            return None;
        }
        let msg = Message {
            kind: u16::from_ne_bytes(header[4..6].try_into().ok()?),
            seq: u32::from_ne_bytes(header[8..12].try_into().ok()?),
            payload: &self.rest[NLMSG_HDRLEN..len],
        };
        self.rest = self.rest.get(align(len)..).unwrap_or(&[]);
        Some(msg)
    }
}

/// The rtattrs of a message body after its fixed header.
fn attrs(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        let len = usize::from(u16::from_ne_bytes(buf.get(0..2)?.try_into().ok()?));
        let kind = u16::from_ne_bytes(buf.get(2..4)?.try_into().ok()?);
        if len < RTA_HDRLEN || len > buf.len() {
            return None;
        }
        let value = &buf[RTA_HDRLEN..len];
        buf = buf.get(align(len)..).unwrap_or(&[]);
        Some((kind, value))
    })
}

fn parse_link(payload: &[u8]) -> Option<Link> {
    let header = payload.get(..IFINFOMSG_LEN)?;
    let index = u32::from_ne_bytes(header[4..8].try_into().ok()?);
    let flags = u32::from_ne_bytes(header[8..12].try_into().ok()?);
    let mut link = Link {
        index,
        name: String::new(),
        mac: None,
        flags,
    };
    for (kind, value) in attrs(&payload[IFINFOMSG_LEN..]) {
        match kind {
            IFLA_IFNAME => {
                let name = value.split(|b| *b == 0).next().unwrap_or_default();
                link.name = String::from_utf8_lossy(name).into_owned();
            }
            IFLA_ADDRESS => link.mac = value.try_into().ok(),
            _ => {}
        }
    }
    Some(link)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_are_padded_and_walked_back() {
        let mut body = ifinfomsg(7);
        attr(&mut body, IFLA_IFNAME, b"eth0\0");
        attr(&mut body, IFLA_ADDRESS, &[2, 0, 0, 0, 0, 9]);
        assert_eq!(body.len(), IFINFOMSG_LEN + 12 + 12);
        let link = parse_link(&body).unwrap();
        assert_eq!(
            link,
            Link {
                index: 7,
                name: "eth0".into(),
                mac: Some([2, 0, 0, 0, 0, 9]),
                flags: 0
            }
        );
    }

    #[test]
    fn truncated_messages_end_the_walk() {
        let mut dgram = Vec::new();
        for (kind, seq) in [(NLMSG_ERROR, 5u32), (NLMSG_DONE, 6)] {
            dgram.extend_from_slice(&20u32.to_ne_bytes());
            dgram.extend_from_slice(&kind.to_ne_bytes());
            dgram.extend_from_slice(&0u16.to_ne_bytes());
            dgram.extend_from_slice(&seq.to_ne_bytes());
            dgram.extend_from_slice(&0u32.to_ne_bytes());
            dgram.extend_from_slice(&(-17i32).to_ne_bytes());
        }
        let msgs: Vec<_> = Messages::new(&dgram).map(|m| (m.kind, m.seq)).collect();
        assert_eq!(msgs, vec![(NLMSG_ERROR, 5), (NLMSG_DONE, 6)]);
        assert_eq!(
            error_code(Messages::new(&dgram).next().unwrap().payload),
            Some(-17)
        );
        // A length past the end: nothing is read from beyond the buffer.
        dgram[0..4].copy_from_slice(&64u32.to_ne_bytes());
        assert_eq!(Messages::new(&dgram).count(), 0);
        // A bad attribute length stops the attribute walk.
        assert_eq!(attrs(&[200, 0, 1, 0, 1, 2]).count(), 0);
    }
}
