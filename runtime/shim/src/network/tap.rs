//! The pod's tap: a persistent tap interface the VMM attaches to by name (with its own
//! flags: virtio-net header, no offloads; see husk-vmm's `Tap`), so the shim can make it
//! before the VMM runs and delete it after.

use std::ffi::CString;
use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};

use super::rtnl::Rtnl;

/// `struct ifreq` as TUNSETIFF reads it: the name, then the flags in the union.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _rest: [u8; 22],
}

/// Creates the persistent tap `name` in the calling thread's network namespace; an
/// unattached tap of that name (left by an earlier shim) is taken over as it is.
pub fn create_persistent(name: &str) -> io::Result<()> {
    let cname = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    if cname.as_bytes().len() >= libc::IFNAMSIZ {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    let tun = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/net/tun")?;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short,
        _rest: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes a `struct ifreq` (40 bytes), which `req` lays
    // out and which lives across the call.
    if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: TUNSETPERSIST takes its argument by value.
    if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETPERSIST, 1 as libc::c_ulong) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // Closing detaches; the persistent interface stays for the VMM to attach to.
    Ok(())
}

/// Sets link `index`'s MTU (if given) and brings it up.
pub fn set_mtu_and_up(rtnl: &mut Rtnl, index: u32, mtu: Option<u32>) -> io::Result<()> {
    let mut msg = LinkMessage::default();
    msg.header.index = index;
    msg.header.flags = LinkFlags::Up;
    msg.header.change_mask = LinkFlags::Up;
    if let Some(mtu) = mtu {
        msg.attributes.push(LinkAttribute::Mtu(mtu));
    }
    rtnl.request(RouteNetlinkMessage::SetLink(msg), 0)
}

/// Deletes link `index`.
pub fn delete_link(rtnl: &mut Rtnl, index: u32) -> io::Result<()> {
    let mut msg = LinkMessage::default();
    msg.header.index = index;
    rtnl.request(RouteNetlinkMessage::DelLink(msg), 0)
}
