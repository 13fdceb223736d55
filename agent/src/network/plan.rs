//! ConfigureNetwork's request, checked and typed before anything changes: a malformed
//! field is INVALID_ARGUMENT naming the interface or route, and nothing has been touched.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use husk_protocol::agent::{ConfigureNetworkRequest, Interface, Route};

use crate::containers::Failure;

/// Longest interface name Linux accepts (IFNAMSIZ without the NUL).
const IFNAME_MAX: usize = 15;
/// Smallest MTU IPv4 allows; the kernel refuses less on most links anyway.
const MTU_MIN: u32 = 68;

/// `address/prefix`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub address: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    /// `0.0.0.0/0` or `::/0`.
    fn default_of(v6: bool) -> Cidr {
        let address = if v6 {
            IpAddr::V6(Ipv6Addr::UNSPECIFIED)
        } else {
            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        };
        Cidr { address, prefix: 0 }
    }

    /// True when no bit below the prefix is set (a network, as a route destination
    /// must be).
    fn is_network(&self) -> bool {
        match self.address {
            IpAddr::V4(a) => {
                u32::from(a)
                    .checked_shl(u32::from(self.prefix))
                    .unwrap_or(0)
                    == 0
            }
            IpAddr::V6(a) => {
                u128::from(a)
                    .checked_shl(u32::from(self.prefix))
                    .unwrap_or(0)
                    == 0
            }
        }
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not a CIDR (address/prefix)"))?;
        let address: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?}: {addr:?} is not an IP address"))?;
        let max = if address.is_ipv4() { 32 } else { 128 };
        let prefix = prefix
            .parse::<u8>()
            .ok()
            .filter(|p| *p <= max)
            .ok_or_else(|| format!("{s:?}: prefix length must be 0-{max}"))?;
        Ok(Cidr { address, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.address, self.prefix)
    }
}

/// One interface to configure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfacePlan {
    pub mac: [u8; 6],
    /// The address to find it by, when it is not `mac` yet (restored from a template).
    pub current_mac: Option<[u8; 6]>,
    pub name: Option<String>,
    pub addresses: Vec<Cidr>,
    pub mtu: Option<u32>,
}

impl InterfacePlan {
    /// "interface 02:..:01" (and its new name): how errors name it.
    pub fn what(&self) -> String {
        let mac = format_mac(&self.mac);
        match &self.name {
            Some(name) => format!("interface {mac} ({name})"),
            None => format!("interface {mac}"),
        }
    }
}

/// One route to add.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutePlan {
    pub destination: Cidr,
    pub gateway: Option<IpAddr>,
    pub device: Option<String>,
    pub source: Option<IpAddr>,
    pub onlink: bool,
}

impl RoutePlan {
    /// On the link (no gateway): added before routes through a gateway, which need it.
    pub fn is_link_scope(&self) -> bool {
        self.gateway.is_none()
    }
}

impl fmt::Display for RoutePlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "route {}", self.destination)?;
        if let Some(gw) = self.gateway {
            write!(f, " via {gw}")?;
        }
        if let Some(dev) = &self.device {
            write!(f, " dev {dev}")?;
        }
        Ok(())
    }
}

/// The whole request, routes ordered link-scope first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub interfaces: Vec<InterfacePlan>,
    pub routes: Vec<RoutePlan>,
}

impl Plan {
    pub fn from_request(req: &ConfigureNetworkRequest) -> Result<Plan, Failure> {
        let interfaces = req
            .interfaces
            .iter()
            .enumerate()
            .map(|(i, iface)| interface(i, iface))
            .collect::<Result<Vec<_>, _>>()?;
        // A handful of interfaces: pairwise checks beat a hash set's code in the binary.
        for (i, iface) in interfaces.iter().enumerate() {
            let earlier = &interfaces[..i];
            if earlier.iter().any(|e| e.mac == iface.mac) {
                return Err(Failure::invalid(iface.what(), "MAC given twice"));
            }
            if iface.name.is_some() && earlier.iter().any(|e| e.name == iface.name) {
                return Err(Failure::invalid(iface.what(), "name given twice"));
            }
        }
        let mut routes = req
            .routes
            .iter()
            .enumerate()
            .map(|(i, r)| route(i, r))
            .collect::<Result<Vec<_>, _>>()?;
        // Stable: the request's order holds within each group.
        routes.sort_by_key(|r| !r.is_link_scope());
        Ok(Plan { interfaces, routes })
    }
}

pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

fn validate_ifname(name: &str) -> Result<(), &'static str> {
    if name.len() > IFNAME_MAX {
        return Err("longer than 15 bytes");
    }
    if name == "." || name == ".." {
        return Err("'.' and '..' are not interface names");
    }
    if name
        .bytes()
        .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b == 0)
    {
        return Err("contains '/', ':', whitespace or NUL");
    }
    Ok(())
}

fn interface(index: usize, iface: &Interface) -> Result<InterfacePlan, Failure> {
    let what = format!("interface {} ({:?})", index, iface.mac);
    let mac = parse_mac(&iface.mac)
        .ok_or_else(|| Failure::invalid(&what, "MAC must be six hex octets, aa:bb:cc:dd:ee:ff"))?;
    let current_mac = if iface.current_mac.is_empty() {
        None
    } else {
        Some(parse_mac(&iface.current_mac).ok_or_else(|| {
            Failure::invalid(
                &what,
                "current MAC must be six hex octets, aa:bb:cc:dd:ee:ff",
            )
        })?)
    };
    let name = if iface.name.is_empty() {
        None
    } else {
        validate_ifname(&iface.name)
            .map_err(|why| Failure::invalid(&what, format!("name {:?}: {why}", iface.name)))?;
        Some(iface.name.clone())
    };
    let mtu = match iface.mtu {
        0 => None,
        mtu if mtu < MTU_MIN => {
            return Err(Failure::invalid(
                &what,
                format!("MTU {mtu} is below {MTU_MIN}"),
            ));
        }
        mtu => Some(mtu),
    };
    let addresses = iface
        .addresses
        .iter()
        .map(|a| {
            a.parse::<Cidr>()
                .map_err(|why| Failure::invalid(&what, why))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(InterfacePlan {
        mac,
        current_mac,
        name,
        addresses,
        mtu,
    })
}

fn optional_ip(what: &str, field: &str, value: &str) -> Result<Option<IpAddr>, Failure> {
    if value.is_empty() {
        return Ok(None);
    }
    value
        .parse()
        .map(Some)
        .map_err(|_| Failure::invalid(what, format!("{field} {value:?} is not an IP address")))
}

fn route(index: usize, r: &Route) -> Result<RoutePlan, Failure> {
    let what = format!(
        "route {index} ({} via {:?})",
        if r.destination.is_empty() {
            "default"
        } else {
            &r.destination
        },
        r.gateway
    );
    let gateway = optional_ip(&what, "gateway", &r.gateway)?;
    let source = optional_ip(&what, "source", &r.source)?;
    let destination = match r.destination.as_str() {
        "" | "default" => {
            let v6 = match (gateway, source) {
                (Some(ip), _) | (None, Some(ip)) => ip.is_ipv6(),
                (None, None) => {
                    return Err(Failure::invalid(
                        &what,
                        "a default route without a gateway needs destination 0.0.0.0/0 or ::/0",
                    ));
                }
            };
            Cidr::default_of(v6)
        }
        d => d
            .parse::<Cidr>()
            .map_err(|why| Failure::invalid(&what, why))?,
    };
    if !destination.is_network() {
        return Err(Failure::invalid(
            &what,
            format!("destination {destination} has host bits set"),
        ));
    }
    let v6 = destination.address.is_ipv6();
    for (field, ip) in [("gateway", gateway), ("source", source)] {
        if ip.is_some_and(|ip| ip.is_ipv6() != v6) {
            return Err(Failure::invalid(
                &what,
                format!("{field} is not of the destination's address family"),
            ));
        }
    }
    let device = if r.device.is_empty() {
        None
    } else {
        validate_ifname(&r.device)
            .map_err(|why| Failure::invalid(&what, format!("device {:?}: {why}", r.device)))?;
        Some(r.device.clone())
    };
    if gateway.is_none() && device.is_none() {
        return Err(Failure::invalid(
            &what,
            "a route without a gateway needs a device",
        ));
    }
    if r.onlink && gateway.is_none() {
        return Err(Failure::invalid(&what, "onlink needs a gateway"));
    }
    Ok(RoutePlan {
        destination,
        gateway,
        device,
        source,
        onlink: r.onlink,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ttrpc::Code;

    fn iface(mac: &str, name: &str, addrs: &[&str], mtu: u32) -> Interface {
        let mut i = Interface::new();
        i.mac = mac.into();
        i.name = name.into();
        i.addresses = addrs.iter().map(|a| a.to_string()).collect();
        i.mtu = mtu;
        i
    }

    fn route(dst: &str, gw: &str, dev: &str) -> Route {
        let mut r = Route::new();
        r.destination = dst.into();
        r.gateway = gw.into();
        r.device = dev.into();
        r
    }

    fn plan(ifaces: Vec<Interface>, routes: Vec<Route>) -> Result<Plan, Failure> {
        let mut req = ConfigureNetworkRequest::new();
        req.interfaces = ifaces;
        req.routes = routes;
        Plan::from_request(&req)
    }

    fn invalid(ifaces: Vec<Interface>, routes: Vec<Route>) -> String {
        let e = plan(ifaces, routes).unwrap_err();
        assert_eq!(e.code, Code::INVALID_ARGUMENT, "{e}");
        e.message
    }

    #[test]
    fn a_pod_interface_and_its_routes() {
        let p = plan(
            vec![iface(
                "02:AB:cd:00:00:01",
                "eth0",
                &["10.1.2.3/24", "fd00::3/64"],
                1450,
            )],
            vec![
                route("default", "10.1.2.1", ""),
                route("10.1.0.0/16", "", "eth0"),
                route("", "fd00::1", "eth0"),
            ],
        )
        .unwrap();
        let i = &p.interfaces[0];
        assert_eq!(i.mac, [2, 0xab, 0xcd, 0, 0, 1]);
        assert_eq!(i.name.as_deref(), Some("eth0"));
        assert_eq!(i.mtu, Some(1450));
        assert_eq!(i.addresses[0].to_string(), "10.1.2.3/24");
        assert_eq!(i.addresses[1].to_string(), "fd00::3/64");
        assert_eq!(i.what(), "interface 02:ab:cd:00:00:01 (eth0)");
        // The link route moved ahead of both gateway routes, which kept their order.
        let order: Vec<String> = p.routes.iter().map(|r| r.to_string()).collect();
        assert_eq!(
            order,
            [
                "route 10.1.0.0/16 dev eth0",
                "route 0.0.0.0/0 via 10.1.2.1",
                "route ::/0 via fd00::1 dev eth0"
            ]
        );
        assert!(p.routes[0].is_link_scope());
    }

    #[test]
    fn malformed_fields_are_named() {
        let ok = |mac: &str| iface(mac, "", &[], 0);
        assert!(invalid(vec![ok("02:00:00:00:01")], vec![]).contains("six hex octets"));
        assert!(invalid(vec![ok("02:00:00:00:00:01:02")], vec![]).contains("six hex octets"));
        assert!(invalid(vec![ok("zz:00:00:00:00:01")], vec![]).contains("\"zz:00:00:00:00:01\""));
        let m = "02:00:00:00:00:01";
        assert!(
            invalid(vec![iface(m, "", &["10.0.0.1"], 0)], vec![])
                .contains("\"10.0.0.1\" is not a CIDR")
        );
        assert!(invalid(vec![iface(m, "", &["10.0.0.1/33"], 0)], vec![]).contains("prefix length"));
        assert!(invalid(vec![iface(m, "", &["nope/8"], 0)], vec![]).contains("not an IP address"));
        assert!(
            invalid(vec![iface(m, "a-very-long-name0", &[], 0)], vec![])
                .contains("longer than 15 bytes")
        );
        assert!(invalid(vec![iface(m, "", &[], 10)], vec![]).contains("MTU 10"));
        assert!(invalid(vec![ok(m), ok(m)], vec![]).contains("MAC given twice"));

        assert!(invalid(vec![], vec![route("10.0.0.0/8", "", "")]).contains("needs a device"));
        assert!(invalid(vec![], vec![route("10.0.0.1/8", "", "eth0")]).contains("host bits set"));
        assert!(invalid(vec![], vec![route("default", "", "eth0")]).contains("0.0.0.0/0 or ::/0"));
        assert!(
            invalid(vec![], vec![route("10.0.0.0/8", "fd00::1", "")])
                .contains("gateway is not of the destination's address family")
        );
        assert!(invalid(vec![], vec![route("10.0.0.0/8", "10.0.0.x", "")]).contains("gateway"));
        let mut r = route("10.0.0.0/8", "", "eth0");
        r.onlink = true;
        assert!(invalid(vec![], vec![r]).contains("onlink needs a gateway"));
    }

    #[test]
    fn cidr_network_check() {
        let net = |s: &str| s.parse::<Cidr>().unwrap().is_network();
        assert!(net("0.0.0.0/0"));
        assert!(net("10.0.0.0/8"));
        assert!(!net("10.0.0.1/8"));
        assert!(net("10.0.0.1/32"));
        assert!(net("fd00::/8"));
        assert!(!net("fd00::1/64"));
        assert!(net("fd00::1/128"));
    }
}
