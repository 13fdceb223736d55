//! ConfigureNetwork: the guest side of a pod's network. The host mirrors the pod's
//! interface onto the VM's NIC; this gives that NIC the pod interface's name, MTU,
//! addresses and routes, so the pod's IP works inside the guest.
//!
//! - `plan`: the request checked and typed (nothing changes on a malformed one);
//! - `netlink`: the few rtnetlink requests this needs;
//! - here: resolving interfaces by MAC and applying the plan in order (lo, interfaces,
//!   link-scope routes, gateway routes).

mod netlink;
mod plan;

use std::os::unix::fs::MetadataExt;

use husk_protocol::agent::ConfigureNetworkRequest;
use nix::errno::Errno;
use ttrpc::Code;

use crate::containers::Failure;
use netlink::{Link, Netlink, RouteMsg};
use plan::{InterfacePlan, Plan, RoutePlan, format_mac};

/// Applies the request in the agent's network namespace. Blocking (netlink round trips).
pub fn configure(req: &ConfigureNetworkRequest) -> Result<(), Failure> {
    let plan = Plan::from_request(req)?;
    let mut nl = Netlink::open().map_err(|e| errno_failure("netlink socket", e))?;
    let links = nl.links().map_err(|e| errno_failure("listing links", e))?;

    // Every interface is found before anything changes.
    let mut targets = Vec::with_capacity(plan.interfaces.len());
    for iface in &plan.interfaces {
        let find_by = iface.current_mac.unwrap_or(iface.mac);
        let link = links
            .iter()
            .find(|l| l.mac == Some(find_by))
            .ok_or_else(|| {
                Failure::new(
                    Code::NOT_FOUND,
                    iface.what(),
                    "no interface has this MAC address",
                )
            })?;
        targets.push((iface, link.clone()));
    }

    let lo = links
        .iter()
        .find(|l| l.name == "lo")
        .ok_or_else(|| Failure::new(Code::NOT_FOUND, "interface lo", "not found"))?;
    nl.set_up(lo.index, true)
        .map_err(|e| errno_failure("interface lo: bringing it up", e))?;

    for (iface, link) in &targets {
        configure_interface(&mut nl, iface, link)?;
    }

    // Devices by name as they are now, renames included.
    let links = nl.links().map_err(|e| errno_failure("listing links", e))?;
    for route in &plan.routes {
        add_route(&mut nl, route, &links)?;
    }
    tracing::info!(
        interfaces = plan.interfaces.len(),
        routes = plan.routes.len(),
        "network configured"
    );
    Ok(())
}

fn configure_interface(
    nl: &mut Netlink,
    iface: &InterfacePlan,
    link: &Link,
) -> Result<(), Failure> {
    let what = format!("{} (was {})", iface.what(), link.name);
    let step = |doing: &str| {
        let what = what.clone();
        let doing = doing.to_owned();
        move |e: Errno| errno_failure(&format!("{what}: {doing}"), e)
    };
    if link.mac != Some(iface.mac) {
        // A template's NIC: the pod's address replaces the one the guest saw at boot.
        if link.flags & libc::IFF_UP as u32 != 0 {
            nl.set_up(link.index, false)
                .map_err(step("bringing it down to change its MAC"))?;
        }
        nl.set_mac(link.index, &iface.mac)
            .map_err(step(&format!("setting MAC {}", format_mac(&iface.mac))))?;
    }
    if let Some(name) = &iface.name
        && *name != link.name
    {
        // A link that is up cannot be renamed.
        if link.flags & libc::IFF_UP as u32 != 0 {
            nl.set_up(link.index, false)
                .map_err(step("bringing it down to rename it"))?;
        }
        nl.set_name(link.index, name)
            .map_err(step(&format!("renaming it to {name}")))?;
    }
    if let Some(mtu) = iface.mtu {
        nl.set_mtu(link.index, mtu)
            .map_err(step(&format!("setting MTU {mtu}")))?;
    }
    for cidr in &iface.addresses {
        nl.add_address(link.index, cidr.address, cidr.prefix)
            .map_err(step(&format!("adding address {cidr}")))?;
    }
    nl.set_up(link.index, true)
        .map_err(step("bringing it up"))?;
    tracing::debug!(mac = %format_mac(&iface.mac), index = link.index, "interface configured");
    Ok(())
}

fn add_route(nl: &mut Netlink, route: &RoutePlan, links: &[Link]) -> Result<(), Failure> {
    let oif = match &route.device {
        Some(dev) => Some(
            links
                .iter()
                .find(|l| l.name == *dev)
                .map(|l| l.index)
                .ok_or_else(|| {
                    Failure::new(Code::NOT_FOUND, route, format!("device {dev} not found"))
                })?,
        ),
        None => None,
    };
    let msg = RouteMsg {
        destination: route.destination.address,
        prefix: route.destination.prefix,
        gateway: route.gateway,
        oif,
        source: route.source,
        scope: if route.is_link_scope() {
            libc::RT_SCOPE_LINK
        } else {
            libc::RT_SCOPE_UNIVERSE
        },
        onlink: route.onlink,
    };
    nl.add_route(&msg)
        .map_err(|e| errno_failure(&route.to_string(), e))
}

/// A netlink failure: "<what>: EXXX: description", with a code from the errno.
fn errno_failure(what: &str, e: Errno) -> Failure {
    let code = match e {
        Errno::ENODEV | Errno::ENOENT | Errno::ESRCH => Code::NOT_FOUND,
        Errno::EEXIST => Code::ALREADY_EXISTS,
        // The request itself is wrong: e.g. a gateway no route reaches, an MTU the
        // device cannot take.
        Errno::EINVAL | Errno::ENETUNREACH | Errno::EHOSTUNREACH => Code::INVALID_ARGUMENT,
        Errno::ENOMEM | Errno::ENOBUFS | Errno::ENOSPC => Code::RESOURCE_EXHAUSTED,
        Errno::EPERM | Errno::EACCES => Code::PERMISSION_DENIED,
        _ => Code::INTERNAL,
    };
    Failure::new(code, what, e)
}

/// The initial network namespace's inode on kernels that give it a fixed one
/// (include/linux/proc_ns.h PROC_NET_INIT_INO); other namespaces' inodes are allocated
/// from 0xF0000000 up, so this one is never anything else.
const INIT_NET_INO: u64 = 0xEFFF_FFF9;
/// First kernel release known to use [`INIT_NET_INO`] (this project's hosts run it).
const FIXED_INIT_NET_INO_SINCE: (u32, u32) = (6, 18);

/// Host test mode only: refuses unless the agent runs in a network namespace other than
/// the host's initial one, so a test agent can never reconfigure the host's network.
/// Compares with PID 1's namespace; where /proc/1 is off limits (some sandboxes deny even
/// root), the initial namespace's fixed inode tells, on kernels that have one.
pub fn ensure_own_namespace() -> Result<(), Failure> {
    let what = "ConfigureNetwork in host test mode";
    let refuse = |why: String| Err(Failure::precondition(what, why));
    let ns = |path: &str| std::fs::metadata(path).map(|m| (m.dev(), m.ino()));
    let own = match ns("/proc/self/ns/net") {
        Ok(own) => own,
        Err(e) => return refuse(format!("/proc/self/ns/net: {e}")),
    };
    let initial = "the agent runs in the host's initial network namespace; start it in a \
                   namespace of its own (ip netns exec NS husk-agent ...)";
    if own.1 == INIT_NET_INO {
        return refuse(initial.to_owned());
    }
    match ns("/proc/1/ns/net") {
        Ok(init) if init == own => refuse(initial.to_owned()),
        Ok(_) => Ok(()),
        Err(_) if kernel_at_least(FIXED_INIT_NET_INO_SINCE) => Ok(()),
        Err(e) => refuse(format!(
            "cannot tell the agent's network namespace from the host's (/proc/1/ns/net: {e})"
        )),
    }
}

/// True when the running kernel's release is at least `major.minor`.
fn kernel_at_least(min: (u32, u32)) -> bool {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .ok()
        .and_then(|r| parse_release(&r))
        .is_some_and(|v| v >= min)
}

/// "6.18.44-fc-v657" -> (6, 18).
fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.trim().split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_releases() {
        assert_eq!(parse_release("6.18.44-fc-v657\n"), Some((6, 18)));
        assert_eq!(parse_release("6.1.192-husk"), Some((6, 1)));
        assert_eq!(parse_release("5.10"), Some((5, 10)));
        assert_eq!(parse_release("garbage"), None);
        assert!((6, 1) < FIXED_INIT_NET_INO_SINCE && (7, 0) > FIXED_INIT_NET_INO_SINCE);
    }

    #[test]
    fn errnos_map_to_codes_and_are_named() {
        let f = errno_failure("interface x: setting MTU 9", Errno::EINVAL);
        assert_eq!(f.code, Code::INVALID_ARGUMENT);
        assert!(
            f.message.starts_with("interface x: setting MTU 9: EINVAL"),
            "{}",
            f.message
        );
        assert_eq!(errno_failure("r", Errno::ENODEV).code, Code::NOT_FOUND);
        assert_eq!(errno_failure("r", Errno::EEXIST).code, Code::ALREADY_EXISTS);
        assert_eq!(errno_failure("r", Errno::EIO).code, Code::INTERNAL);
    }
}
