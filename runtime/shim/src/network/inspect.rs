//! What CNI left in the pod's network namespace (links, addresses, routes), read over
//! rtnetlink, and the guest configuration made from it: the guest NIC takes the pod
//! interface's MAC, addresses, MTU and routes, and the name eth0.

use std::io;
use std::net::IpAddr;

use husk_protocol::agent::{ConfigureNetworkRequest, Interface, Route};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::address::{AddressAttribute, AddressMessage, AddressScope};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
    RouteType,
};

use super::rtnl::Rtnl;

/// The guest's name for the pod interface.
pub const GUEST_IFNAME: &str = "eth0";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    pub index: u32,
    pub name: String,
    pub mac: Option<[u8; 6]>,
    pub mtu: u32,
    pub loopback: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddrInfo {
    pub index: u32,
    pub address: IpAddr,
    pub prefix: u8,
    /// Global: not a link-local (fe80::/10) or host-scoped address, which the guest
    /// makes for itself or must not have.
    pub global: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteInfo {
    pub v6: bool,
    pub destination: Option<IpAddr>,
    pub prefix: u8,
    pub gateway: Option<IpAddr>,
    pub oif: Option<u32>,
    pub source: Option<IpAddr>,
    pub onlink: bool,
    /// Main table, unicast, not made by the kernel for an address (the guest's kernel
    /// makes those itself), a single next hop.
    pub copyable: bool,
}

/// Everything the guest configuration is made from.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub links: Vec<LinkInfo>,
    pub addresses: Vec<AddrInfo>,
    pub routes: Vec<RouteInfo>,
}

impl Snapshot {
    /// The links of the calling thread's namespace.
    pub fn links_only(rtnl: &mut Rtnl) -> io::Result<Vec<LinkInfo>> {
        Ok(rtnl
            .dump(RouteNetlinkMessage::GetLink(LinkMessage::default()))?
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(link_info(&l)),
                _ => None,
            })
            .collect())
    }

    /// Reads the namespace of the calling thread.
    pub fn read(rtnl: &mut Rtnl) -> io::Result<Snapshot> {
        let links = Self::links_only(rtnl)?;
        let addresses = rtnl
            .dump(RouteNetlinkMessage::GetAddress(AddressMessage::default()))?
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewAddress(a) => addr_info(&a),
                _ => None,
            })
            .collect();
        let routes = rtnl
            .dump(RouteNetlinkMessage::GetRoute(RouteMessage::default()))?
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewRoute(r) => route_info(&r),
                _ => None,
            })
            .collect();
        Ok(Snapshot {
            links,
            addresses,
            routes,
        })
    }

    /// The pod's interface: not loopback, not `skip` (our own tap), with a global
    /// address; eth0 if it is one of them, else the lowest index.
    pub fn pod_interface(&self, skip: &str) -> Option<&LinkInfo> {
        let candidates: Vec<&LinkInfo> = self
            .links
            .iter()
            .filter(|l| !l.loopback && l.name != skip && l.mac.is_some())
            .filter(|l| {
                self.addresses
                    .iter()
                    .any(|a| a.index == l.index && a.global)
            })
            .collect();
        candidates
            .iter()
            .find(|l| l.name == GUEST_IFNAME)
            .or_else(|| candidates.iter().min_by_key(|l| l.index))
            .copied()
    }

    /// The ConfigureNetwork request giving the guest NIC `link`'s configuration.
    pub fn guest_request(&self, link: &LinkInfo) -> ConfigureNetworkRequest {
        let mut iface = Interface::new();
        iface.mac = link.mac.map(|m| format_mac(&m)).unwrap_or_default();
        iface.name = GUEST_IFNAME.to_owned();
        iface.mtu = link.mtu;
        iface.addresses = self
            .addresses
            .iter()
            .filter(|a| a.index == link.index && a.global)
            .map(|a| format!("{}/{}", a.address, a.prefix))
            .collect();
        let routes = self
            .routes
            .iter()
            .filter(|r| r.copyable)
            .filter_map(|r| {
                // Routes through other interfaces do not exist in the guest; a route
                // without a device goes wherever its gateway is.
                let device = match r.oif {
                    Some(oif) if oif == link.index => GUEST_IFNAME.to_owned(),
                    Some(_) => return None,
                    None if r.gateway.is_some() => String::new(),
                    None => return None,
                };
                let mut route = Route::new();
                route.destination = match r.destination {
                    Some(d) => format!("{d}/{}", r.prefix),
                    None if r.v6 => "::/0".to_owned(),
                    None => "0.0.0.0/0".to_owned(),
                };
                route.gateway = r.gateway.map(|g| g.to_string()).unwrap_or_default();
                route.device = device;
                route.source = r.source.map(|s| s.to_string()).unwrap_or_default();
                route.onlink = r.onlink;
                Some(route)
            })
            .collect();
        let mut req = ConfigureNetworkRequest::new();
        req.interfaces = vec![iface];
        req.routes = routes;
        req
    }
}

pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn link_info(l: &LinkMessage) -> LinkInfo {
    let mut info = LinkInfo {
        index: l.header.index,
        name: String::new(),
        mac: None,
        mtu: 0,
        loopback: l.header.flags.contains(LinkFlags::Loopback),
    };
    for attr in &l.attributes {
        match attr {
            LinkAttribute::IfName(n) => info.name = n.clone(),
            LinkAttribute::Address(a) => info.mac = a.as_slice().try_into().ok(),
            LinkAttribute::Mtu(m) => info.mtu = *m,
            _ => {}
        }
    }
    info
}

fn addr_info(a: &AddressMessage) -> Option<AddrInfo> {
    // IFA_LOCAL is the interface's own address (IFA_ADDRESS is the peer's on
    // point-to-point links); IPv6 sends only IFA_ADDRESS.
    let local = a.attributes.iter().find_map(|x| match x {
        AddressAttribute::Local(ip) => Some(*ip),
        _ => None,
    });
    let address = local.or_else(|| {
        a.attributes.iter().find_map(|x| match x {
            AddressAttribute::Address(ip) => Some(*ip),
            _ => None,
        })
    })?;
    Some(AddrInfo {
        index: a.header.index,
        address,
        prefix: a.header.prefix_len,
        global: a.header.scope == AddressScope::Universe,
    })
}

fn ip(addr: &RouteAddress) -> Option<IpAddr> {
    match addr {
        RouteAddress::Inet(a) => Some(IpAddr::V4(*a)),
        RouteAddress::Inet6(a) => Some(IpAddr::V6(*a)),
        _ => None,
    }
}

fn route_info(r: &RouteMessage) -> Option<RouteInfo> {
    let family = u8::from(r.header.address_family);
    let v6 = match i32::from(family) {
        libc::AF_INET => false,
        libc::AF_INET6 => true,
        _ => return None,
    };
    let mut table = u32::from(r.header.table);
    let mut info = RouteInfo {
        v6,
        destination: None,
        prefix: r.header.destination_prefix_length,
        gateway: None,
        oif: None,
        source: None,
        onlink: r.header.flags.contains(RouteFlags::Onlink),
        copyable: true,
    };
    let mut multipath = false;
    for attr in &r.attributes {
        match attr {
            RouteAttribute::Destination(a) => info.destination = ip(a),
            RouteAttribute::Gateway(a) => info.gateway = ip(a),
            RouteAttribute::PrefSource(a) => info.source = ip(a),
            RouteAttribute::Oif(i) => info.oif = Some(*i),
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::MultiPath(_) => multipath = true,
            _ => {}
        }
    }
    info.copyable = table == u32::from(RouteHeader::RT_TABLE_MAIN)
        && r.header.kind == RouteType::Unicast
        && r.header.protocol != RouteProtocol::Kernel
        && r.header.scope != RouteScope::Host
        && !multipath;
    if multipath && table == u32::from(RouteHeader::RT_TABLE_MAIN) {
        tracing::warn!(
            ?info,
            "pod route with several next hops not copied to the guest"
        );
    }
    Some(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(index: u32, name: &str, loopback: bool) -> LinkInfo {
        LinkInfo {
            index,
            name: name.into(),
            mac: (!loopback).then_some([2, 0, 0, 0, 0, index as u8]),
            mtu: 1450,
            loopback,
        }
    }

    fn addr(index: u32, a: &str, prefix: u8, global: bool) -> AddrInfo {
        AddrInfo {
            index,
            address: a.parse().unwrap(),
            prefix,
            global,
        }
    }

    fn route(dst: Option<&str>, prefix: u8, gw: Option<&str>, oif: Option<u32>) -> RouteInfo {
        let v6 = dst.or(gw).is_some_and(|s| s.contains(':'));
        RouteInfo {
            v6,
            destination: dst.map(|d| d.parse().unwrap()),
            prefix,
            gateway: gw.map(|g| g.parse().unwrap()),
            oif,
            source: None,
            onlink: false,
            copyable: true,
        }
    }

    #[test]
    fn picks_eth0_and_copies_its_configuration() {
        let mut kernel_route = route(Some("10.1.0.0"), 24, None, Some(3));
        kernel_route.copyable = false;
        let mut onlink = route(Some("10.9.0.0"), 16, Some("169.254.1.1"), Some(3));
        onlink.onlink = true;
        let snap = Snapshot {
            links: vec![
                link(1, "lo", true),
                link(2, "net1", false),
                link(3, "eth0", false),
            ],
            addresses: vec![
                addr(1, "127.0.0.1", 8, false),
                addr(2, "192.168.5.5", 24, true),
                addr(3, "10.1.0.7", 24, true),
                addr(3, "fd00::7", 64, true),
                addr(3, "fe80::1", 64, false),
            ],
            routes: vec![
                kernel_route,
                route(None, 0, Some("10.1.0.1"), Some(3)),
                route(None, 0, Some("fd00::1"), None),
                route(Some("169.254.1.1"), 32, None, Some(3)),
                route(Some("192.168.0.0"), 16, Some("192.168.5.1"), Some(2)),
                onlink,
            ],
        };
        let l = snap.pod_interface("tap0_husk").unwrap();
        assert_eq!(l.name, "eth0");
        let req = snap.guest_request(l);
        let i = &req.interfaces[0];
        assert_eq!(i.mac, "02:00:00:00:00:03");
        assert_eq!(i.name, "eth0");
        assert_eq!(i.mtu, 1450);
        assert_eq!(i.addresses, ["10.1.0.7/24", "fd00::7/64"]);
        let routes: Vec<(String, String, String, bool)> = req
            .routes
            .iter()
            .map(|r| {
                (
                    r.destination.clone(),
                    r.gateway.clone(),
                    r.device.clone(),
                    r.onlink,
                )
            })
            .collect();
        let s = |x: &str| x.to_owned();
        assert_eq!(
            routes,
            [
                (s("0.0.0.0/0"), s("10.1.0.1"), s("eth0"), false),
                (s("::/0"), s("fd00::1"), s(""), false),
                (s("169.254.1.1/32"), s(""), s("eth0"), false),
                (s("10.9.0.0/16"), s("169.254.1.1"), s("eth0"), true),
            ]
        );
    }

    #[test]
    fn without_eth0_the_lowest_index_with_an_address_wins() {
        let snap = Snapshot {
            links: vec![
                link(1, "lo", true),
                link(4, "tap0_husk", false),
                link(5, "veth9", false),
                link(7, "net0", false),
                link(9, "down0", false),
            ],
            addresses: vec![
                addr(4, "10.0.0.9", 24, true),
                addr(5, "fe80::5", 64, false),
                addr(7, "10.0.0.7", 24, true),
                addr(9, "10.0.1.9", 24, true),
            ],
            routes: vec![],
        };
        assert_eq!(snap.pod_interface("tap0_husk").unwrap().name, "net0");
        let only_lo = Snapshot {
            links: vec![link(1, "lo", true)],
            addresses: vec![addr(1, "127.0.0.1", 8, true)],
            routes: vec![],
        };
        assert!(only_lo.pod_interface("tap0_husk").is_none());
    }
}
