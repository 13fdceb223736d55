//! The host side of a virtio-net device: an existing tap interface, attached through
//! /dev/net/tun with a 12-byte virtio-net header in front of every frame and no offloads.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::VNET_HDR_LEN;

const TUN_DEVICE: &str = "/dev/net/tun";
/// Longest interface name Linux accepts (IFNAMSIZ without the NUL).
pub const IFNAME_MAX: usize = 15;

/// Why a tap could not be attached; every variant names the interface.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("invalid tap name {name:?}: {why}")]
    InvalidName { name: String, why: &'static str },
    #[error(
        "tap device {0} does not exist in the VMM's network namespace \
         (create it first, e.g. `ip tuntap add dev {0} mode tap`)"
    )]
    NotFound(String),
    #[error("cannot open {TUN_DEVICE} for tap {name}: {source}")]
    OpenTun {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("{name} exists but is not a tap device (TUNSETIFF: {source})")]
    NotATap {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("tap {name} is already attached to another process (TUNSETIFF: {source})")]
    Busy {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot attach tap {name}: {source}")]
    Attach {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("tap device {name} does not exist in network namespace {}", netns.display())]
    NotFoundInNetns { name: String, netns: PathBuf },
    #[error("cannot enter network namespace {} to open tap {name}: {source}", netns.display())]
    EnterNetns {
        name: String,
        netns: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("in network namespace {}: {source}", netns.display())]
    InNetns {
        netns: PathBuf,
        #[source]
        source: Box<TapError>,
    },
    #[error("tap {name}: {what}: {source}")]
    Setup {
        name: String,
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

/// Checks `name` the way the kernel does (`dev_valid_name`).
pub fn validate_ifname(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("empty");
    }
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

/// `struct ifreq` as TUNSETIFF reads it: the name, then the flags (a short) in the union.
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _union_rest: [u8; 22],
}

/// An attached tap: non-blocking, close-on-exec; reads and writes carry one frame each,
/// preceded by a `virtio_net_hdr_v1`.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Attaches to the existing tap `name` in the caller's network namespace. It is never
    /// created: a missing interface is a configuration error, not something to invent.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        validate_ifname(name).map_err(|why| TapError::InvalidName {
            name: name.to_string(),
            why,
        })?;
        let cname = CString::new(name).map_err(|_| TapError::InvalidName {
            name: name.to_string(),
            why: "contains NUL",
        })?;
        // SAFETY: cname is a valid NUL-terminated string for the duration of the call.
        if unsafe { libc::if_nametoindex(cname.as_ptr()) } == 0 {
            return Err(TapError::NotFound(name.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(TUN_DEVICE)
            .map_err(|source| TapError::OpenTun {
                name: name.to_string(),
                source,
            })?;
        let mut req = IfReq {
            name: [0; 16],
            flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short,
            _union_rest: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq`, which `req` lays out with
        // the kernel's size (40 bytes) and lives across the call.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
        if rc < 0 {
            let source = io::Error::last_os_error();
            let name = name.to_string();
            return Err(match source.raw_os_error() {
                // The name belongs to a tun (L3) device or to a non-tun interface.
                Some(libc::EINVAL) => TapError::NotATap { name, source },
                Some(libc::EBUSY) => TapError::Busy { name, source },
                _ => TapError::Attach { name, source },
            });
        }
        let tap = Tap {
            file,
            name: name.to_string(),
        };
        tap.ioctl_int(
            libc::TUNSETVNETHDRSZ,
            VNET_HDR_LEN as libc::c_int,
            "TUNSETVNETHDRSZ",
        )?;
        // No offloads: the host stack hands us complete frames with final checksums,
        // which is all a guest that negotiated no offload features can take.
        tap.ioctl_ulong(libc::TUNSETOFFLOAD, 0, "TUNSETOFFLOAD")?;
        Ok(tap)
    }

    /// Attaches to the existing tap `name` in the network namespace at `netns` (a
    /// namespace file such as /var/run/netns/NAME or /proc/PID/ns/net), e.g. a pod's,
    /// while the VMM stays in its own. The namespace is entered by a short-lived thread
    /// (namespaces are per thread); the tap fd stays bound to the interface after it ends.
    pub fn open_in_netns(name: &str, netns: &Path) -> Result<Tap, TapError> {
        let (name_owned, path) = (name.to_string(), netns.to_path_buf());
        let opened = std::thread::Builder::new()
            .name("tap-netns".into())
            .spawn(move || {
                let enter_err = |source| TapError::EnterNetns {
                    name: name_owned.clone(),
                    netns: path.clone(),
                    source,
                };
                let ns = File::open(&path).map_err(enter_err)?;
                // SAFETY: setns on a valid fd; it moves only this thread, which ends
                // right after the open.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(enter_err(io::Error::last_os_error()));
                }
                Tap::open(&name_owned)
            })
            .map_err(|source| TapError::EnterNetns {
                name: name.to_string(),
                netns: netns.to_path_buf(),
                source,
            })?
            .join()
            .map_err(|_| TapError::EnterNetns {
                name: name.to_string(),
                netns: netns.to_path_buf(),
                source: io::Error::other("the thread opening the tap panicked"),
            })?;
        opened.map_err(|e| match e {
            TapError::NotFound(name) => TapError::NotFoundInNetns {
                name,
                netns: netns.to_path_buf(),
            },
            e @ TapError::EnterNetns { .. } => e,
            e => TapError::InNetns {
                netns: netns.to_path_buf(),
                source: Box::new(e),
            },
        })
    }

    fn ioctl_int(
        &self,
        req: libc::Ioctl,
        value: libc::c_int,
        what: &'static str,
    ) -> Result<(), TapError> {
        // SAFETY: `req` takes a pointer to an int, which outlives the call.
        let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), req, &value) };
        self.check(rc, what)
    }

    fn ioctl_ulong(
        &self,
        req: libc::Ioctl,
        value: libc::c_ulong,
        what: &'static str,
    ) -> Result<(), TapError> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), req, value) };
        self.check(rc, what)
    }

    fn check(&self, rc: libc::c_int, what: &'static str) -> Result<(), TapError> {
        if rc < 0 {
            return Err(TapError::Setup {
                name: self.name.clone(),
                what,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The open tap file (one frame per read or write).
    pub fn into_file(self) -> File {
        self.file
    }
}
