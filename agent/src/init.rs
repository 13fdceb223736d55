//! Guest PID-1 setup: pseudo file systems, stdio, cgroup v2 controllers, the boot timer
//! and the readiness line. Everything here runs once, before the server starts, and is
//! written for a guest where each syscall costs ~0.3 ms and each mount ~40 ms.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use nix::errno::Errno;
use nix::mount::{MsFlags, mount};

/// What Firecracker's boot-timer device listens for; the husk VMM accepts the same value.
pub const BOOT_TIMER_MAGIC: u32 = 123;

const PAGE_SIZE: u64 = 4096;

/// Controllers the agent delegates to child cgroups, when the kernel has them.
const CGROUP_CONTROLLERS: [&str; 5] = ["cpu", "memory", "pids", "cpuset", "io"];

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("mount {fstype} on {target}: {source}")]
    Mount {
        fstype: &'static str,
        target: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("boot timer at {addr:#x}: {what}: {source}")]
    BootTimer {
        addr: u64,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: &'static str,
        #[source]
        source: io::Error,
    },
}

/// One pseudo file system the agent mounts.
struct MountSpec {
    fstype: &'static str,
    target: &'static str,
    flags: MsFlags,
    data: &'static str,
    /// Whether the guest is unusable without it (the agent then powers off).
    essential: bool,
}

const NOSUID_NODEV_NOEXEC: MsFlags = MsFlags::MS_NOSUID
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC);

const DEV: MountSpec = MountSpec {
    fstype: "devtmpfs",
    target: "/dev",
    flags: MsFlags::MS_NOSUID,
    data: "mode=0755",
    essential: true,
};

const PROC: MountSpec = MountSpec {
    fstype: "proc",
    target: "/proc",
    flags: NOSUID_NODEV_NOEXEC,
    data: "",
    essential: true,
};

/// Mounted after /dev and /proc, in this order (parents before children).
const LATE_MOUNTS: [MountSpec; 6] = [
    MountSpec {
        fstype: "sysfs",
        target: "/sys",
        flags: NOSUID_NODEV_NOEXEC,
        data: "",
        essential: true,
    },
    MountSpec {
        fstype: "devpts",
        target: "/dev/pts",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        data: "newinstance,ptmxmode=0666,mode=0620",
        essential: false,
    },
    MountSpec {
        fstype: "tmpfs",
        target: "/dev/shm",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: "mode=1777",
        essential: false,
    },
    MountSpec {
        fstype: "tmpfs",
        target: "/run",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: "mode=0755",
        essential: false,
    },
    MountSpec {
        fstype: "tmpfs",
        target: "/tmp",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: "mode=1777",
        essential: false,
    },
    MountSpec {
        fstype: "cgroup2",
        target: "/sys/fs/cgroup",
        flags: NOSUID_NODEV_NOEXEC,
        data: "",
        essential: false,
    },
];

/// Mounts /dev, the first thing the agent does: stdio, /dev/mem and /dev/console live there.
pub fn mount_dev() -> Result<(), InitError> {
    mount_one(&DEV)
}

/// Mounts /proc (needed to read the kernel command line).
pub fn mount_proc() -> Result<(), InitError> {
    mount_one(&PROC)
}

/// Mounts the remaining pseudo file systems. Failures of non-essential ones are logged and
/// skipped; the first essential failure is returned.
pub fn mount_rest() -> Result<(), InitError> {
    for spec in &LATE_MOUNTS {
        match mount_one(spec) {
            Ok(()) => {}
            Err(e) if spec.essential => return Err(e),
            Err(e) => tracing::warn!("{e}"),
        }
    }
    Ok(())
}

fn mount_one(spec: &MountSpec) -> Result<(), InitError> {
    let err = |source: io::Error| InitError::Mount {
        fstype: spec.fstype,
        target: spec.target,
        source,
    };
    match std::fs::create_dir(spec.target) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            // An existing directory may already be a mount point (e.g. the kernel's
            // devtmpfs automount, or a re-exec of the agent): keep it.
            if is_mount_point(spec.target).map_err(err)? {
                tracing::debug!(target = spec.target, "already mounted");
                return Ok(());
            }
        }
        Err(e) => return Err(err(e)),
    }
    let data = (!spec.data.is_empty()).then_some(spec.data);
    match mount(
        Some(spec.fstype),
        spec.target,
        Some(spec.fstype),
        spec.flags,
        data,
    ) {
        Ok(()) => Ok(()),
        // Raced with another mount of the same thing: fine.
        Err(Errno::EBUSY) => Ok(()),
        Err(e) => Err(err(e.into())),
    }
}

/// A directory is a mount point when it lives on another device than its parent.
fn is_mount_point(path: &str) -> io::Result<bool> {
    let dev = std::fs::metadata(path)?.dev();
    let parent = Path::new(path).parent().unwrap_or(Path::new("/"));
    Ok(dev != std::fs::metadata(parent)?.dev())
}

/// Makes sure fds 0, 1 and 2 are open: the kernel leaves them closed when the initramfs has
/// no usable /dev/console, and then the first file or socket the agent opens would become
/// its "stderr". Missing ones are pointed at /dev/null.
pub fn fix_stdio() -> Result<(), InitError> {
    // SAFETY: F_GETFD only inspects the descriptor table; on a closed number it fails
    // with EBADF.
    let missing: Vec<i32> = (0..3)
        .filter(|&fd| unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let io_err = |what| {
        move |source| InitError::Io {
            what,
            path: "/dev/null",
            source,
        }
    };
    // open() takes the lowest free number, i.e. the first missing one; handled by hand
    // from here on because it may have to stay open for good as stdio.
    let null_fd = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(io_err("open"))?
        .into_raw_fd();
    for fd in missing.into_iter().filter(|&fd| fd != null_fd) {
        // SAFETY: dup2 onto a closed descriptor number (0..3) that no Rust object owns.
        if unsafe { libc::dup2(null_fd, fd) } < 0 {
            return Err(io_err("dup2")(io::Error::last_os_error()));
        }
    }
    if null_fd > 2 {
        // SAFETY: null_fd came from into_raw_fd above and is owned by nothing else.
        drop(unsafe { OwnedFd::from_raw_fd(null_fd) });
    }
    Ok(())
}

/// Reads /proc/cmdline (bounded).
pub fn read_cmdline() -> Result<String, InitError> {
    read_small("/proc/cmdline", crate::cmdline::MAX_CMDLINE)
}

/// Reads a small text file, at most `max` bytes, lossy UTF-8.
pub fn read_small(path: &'static str, max: u64) -> Result<String, InitError> {
    let mut buf = Vec::with_capacity(256);
    File::open(path)
        .and_then(|f| f.take(max).read_to_end(&mut buf))
        .map_err(|source| InitError::Io {
            what: "read",
            path,
            source,
        })?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// Writes [`BOOT_TIMER_MAGIC`] to guest-physical `addr` through /dev/mem. `addr` is
/// 4-byte aligned (checked by the command-line parser), so the u32 never crosses the page.
pub fn write_boot_timer(addr: u64) -> Result<(), InitError> {
    use nix::sys::mman::{MapFlags, ProtFlags, mmap, munmap};
    use std::num::NonZeroUsize;

    let fail =
        |what: &'static str| move |source: io::Error| InitError::BootTimer { addr, what, source };
    let page = addr & !(PAGE_SIZE - 1);
    let offset_in_page = (addr - page) as usize;
    if !addr.is_multiple_of(4) {
        return Err(fail("check")(io::Error::new(
            io::ErrorKind::InvalidInput,
            "address is not 4-byte aligned",
        )));
    }
    let page_offset = i64::try_from(page).map_err(|_| {
        fail("check")(io::Error::new(
            io::ErrorKind::InvalidInput,
            "address out of range",
        ))
    })?;
    let mem = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_SYNC)
        .open("/dev/mem")
        .map_err(fail("open /dev/mem"))?;
    let len = NonZeroUsize::new(PAGE_SIZE as usize).ok_or_else(|| {
        fail("check")(io::Error::new(
            io::ErrorKind::InvalidInput,
            "zero page size",
        ))
    })?;
    // SAFETY: a fresh shared mapping of one page of /dev/mem; no Rust object aliases it.
    let ptr = unsafe {
        mmap(
            None,
            len,
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
            MapFlags::MAP_SHARED,
            mem.as_fd(),
            page_offset,
        )
    }
    .map_err(|e| fail("mmap")(e.into()))?;
    // SAFETY: offset_in_page + 4 <= PAGE_SIZE (aligned offset inside the page), so the
    // write stays inside the mapping; volatile because it is device memory (MMIO).
    unsafe {
        ptr.cast::<u8>()
            .add(offset_in_page)
            .cast::<u32>()
            .write_volatile(BOOT_TIMER_MAGIC);
    }
    // SAFETY: unmapping exactly what was mapped above; nothing references it any more.
    unsafe { munmap(ptr, PAGE_SIZE as usize) }.map_err(|e| fail("munmap")(e.into()))?;
    Ok(())
}

/// Writes the readiness line to /dev/console (for hosts with no vsock path to the guest).
pub fn announce_ready_on_console() -> Result<(), InitError> {
    let err = |what| {
        move |source| InitError::Io {
            what,
            path: "/dev/console",
            source,
        }
    };
    let mut console = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open("/dev/console")
        .map_err(err("open"))?;
    console
        .write_all(b"husk-agent: ready\n")
        .map_err(err("write"))
}

/// Enables the wanted controllers that the kernel offers in the root's subtree_control,
/// so that container cgroups created below the root can use them.
pub fn enable_cgroup_controllers() -> Result<(), InitError> {
    let available = read_small("/sys/fs/cgroup/cgroup.controllers", 4096)?;
    let request = controllers_request(&available);
    if request.is_empty() {
        tracing::warn!(
            "no cgroup v2 controllers to enable (available: {:?})",
            available.trim()
        );
        return Ok(());
    }
    std::fs::write("/sys/fs/cgroup/cgroup.subtree_control", request.as_bytes()).map_err(|source| {
        InitError::Io {
            what: "write",
            path: "/sys/fs/cgroup/cgroup.subtree_control",
            source,
        }
    })
}

/// `+cpu +memory ...` for the wanted controllers present in `available`.
fn controllers_request(available: &str) -> String {
    let present: Vec<&str> = available.split_ascii_whitespace().collect();
    CGROUP_CONTROLLERS
        .iter()
        .filter(|c| present.contains(c))
        .map(|c| format!("+{c}"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controller_request_keeps_only_present_wanted_ones() {
        assert_eq!(
            controllers_request("cpuset cpu io memory hugetlb pids rdma misc\n"),
            "+cpu +memory +pids +cpuset +io"
        );
        assert_eq!(controllers_request("memory pids"), "+memory +pids");
        assert_eq!(controllers_request(""), "");
    }

    #[test]
    fn mount_point_detection() {
        // /proc is a mount point on any Linux host running these tests; /proc/self is not.
        assert!(is_mount_point("/proc").expect("stat /proc"));
        assert!(!is_mount_point("/proc/self").expect("stat /proc/self"));
    }

    #[test]
    fn boot_timer_rejects_unaligned_address_before_touching_dev_mem() {
        let err = write_boot_timer(0xd000_0002).expect_err("unaligned");
        assert!(err.to_string().contains("aligned"), "{err}");
    }
}
