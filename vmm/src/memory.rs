//! Guest RAM, mapped at each RAM range of the layout, in one of two backings:
//! - private anonymous memory with transparent huge pages (the default): measured on a nested
//!   PVM host, the guest reaches its agent ~10 % sooner than on a memfd, because the host can
//!   back guest RAM with 2 MiB pages (shmem gets none unless the host enables shmem THP);
//! - a shared memfd, for when another process (a vhost-user backend such as virtiofsd) must map
//!   the same pages.
//!
//! The mapping is named `husk-guest-ram` where the host allows (`/memfd:husk-guest-ram`, or
//! `[anon:husk-guest-ram]` on hosts with CONFIG_ANON_VMA_NAME); the VMM also reports guest
//! RAM's host addresses in its metrics file (`guest_ram`), which works everywhere.

use std::ffi::CStr;
use std::fs::File;
use std::os::fd::FromRawFd;

use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::arch::x86_64::layout;

/// Guest RAM as every part of the VMM sees it.
pub type GuestMemory = crate::devices::virtio::GuestMemory;

const MEMFD_NAME: &CStr = c"husk-guest-ram";

/// Error creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("memfd_create(husk-guest-ram): {0}")]
    Memfd(#[source] std::io::Error),
    #[error("sizing the guest RAM memfd to {size} bytes: {source}")]
    Truncate {
        size: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("mapping {size} bytes of guest RAM: {source}")]
    Map {
        size: u64,
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
}

/// Creates the memfd for `size` bytes.
pub(crate) fn create_memfd(size: u64) -> Result<File, MemoryError> {
    // SAFETY: the name is a valid nul-terminated string; the return value is checked.
    let fd = unsafe { libc::memfd_create(MEMFD_NAME.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh descriptor owned by nothing else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)
        .map_err(|source| MemoryError::Truncate { size, source })?;
    Ok(file)
}

/// Creates `size` bytes of memfd-backed guest RAM laid out around the MMIO gap.
/// How guest RAM is backed on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RamBacking {
    /// Private anonymous memory, transparent huge pages requested.
    Anonymous,
    /// A shared memfd that other processes can map.
    SharedMemfd,
}

/// Creates guest RAM of `size` bytes laid out around the MMIO gap.
pub fn create_guest_memory(size: u64, backing: RamBacking) -> Result<GuestMemory, MemoryError> {
    match backing {
        RamBacking::Anonymous => create_anonymous(size),
        RamBacking::SharedMemfd => create_shared_memfd(size),
    }
}

fn create_anonymous(size: u64) -> Result<GuestMemory, MemoryError> {
    let ranges: Vec<(GuestAddress, usize)> = layout::ram_ranges(size)
        .into_iter()
        .map(|(start, len)| (GuestAddress(start), len as usize))
        .collect();
    let mem = GuestMemoryMmap::from_ranges(&ranges)
        .map_err(|source| MemoryError::Map { size, source })?;
    for region in mem.iter() {
        let (addr, len) = (
            region.as_ptr().cast::<libc::c_void>(),
            region.len() as usize,
        );
        // Both are hints: a host without THP or without anonymous-mapping names still runs
        // the guest, only slower or with a nameless mapping.
        // SAFETY: the range is exactly one mapping owned by `mem`; neither call changes its
        // contents or its validity.
        unsafe {
            if libc::madvise(addr, len, libc::MADV_HUGEPAGE) != 0 {
                tracing::debug!("MADV_HUGEPAGE: {}", std::io::Error::last_os_error());
            }
            if libc::prctl(
                libc::PR_SET_VMA,
                libc::PR_SET_VMA_ANON_NAME as libc::c_ulong,
                addr as libc::c_ulong,
                len as libc::c_ulong,
                MEMFD_NAME.as_ptr() as libc::c_ulong,
            ) != 0
            {
                tracing::debug!("naming guest RAM: {}", std::io::Error::last_os_error());
            }
        }
    }
    Ok(mem)
}

fn create_shared_memfd(size: u64) -> Result<GuestMemory, MemoryError> {
    let file = create_memfd(size)?;
    let mut offset = 0u64;
    let mut ranges = Vec::with_capacity(2);
    for (start, len) in layout::ram_ranges(size) {
        ranges.push((
            GuestAddress(start),
            len as usize,
            Some(FileOffset::new(
                file.try_clone().map_err(MemoryError::Memfd)?,
                offset,
            )),
        ));
        offset += len;
    }
    GuestMemoryMmap::from_ranges_with_files(&ranges)
        .map_err(|source| MemoryError::Map { size, source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn guest_ram_is_a_named_memfd_split_around_the_gap() {
        // 3.5 GiB of address space costs nothing until touched.
        let size = 0xd000_0000 + (256 << 20);
        let mem = create_guest_memory(size, RamBacking::SharedMemfd).unwrap();
        let regions: Vec<_> = mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
        assert_eq!(regions, vec![(0, 0xd000_0000), (1 << 32, 256 << 20)]);
        mem.write_obj(0xabcdu32, GuestAddress((1 << 32) + 8))
            .unwrap();
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress((1 << 32) + 8)).unwrap(),
            0xabcd
        );
        assert!(
            mem.read_obj::<u32>(GuestAddress(0xd000_0000)).is_err(),
            "gap is not RAM"
        );
        // The mapping is visible as the memfd in our own maps.
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        assert!(maps.contains("/memfd:husk-guest-ram"));
    }

    #[test]
    fn anonymous_guest_ram_is_private_and_named_where_the_host_allows() {
        let size = 128 << 20;
        let mem = create_guest_memory(size, RamBacking::Anonymous).unwrap();
        let regions: Vec<_> = mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
        assert_eq!(regions, vec![(0, size)]);
        mem.write_obj(0x1234u32, GuestAddress(size - 4)).unwrap();
        assert_eq!(mem.read_obj::<u32>(GuestAddress(size - 4)).unwrap(), 0x1234);
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let start = mem.iter().next().unwrap().as_ptr() as usize;
        let line = maps
            .lines()
            .find(|l| l.starts_with(&format!("{start:x}-")))
            .expect("guest RAM mapping in /proc/self/maps");
        assert!(line.contains(" rw-p "), "private mapping: {line}");
        // Naming anonymous memory needs CONFIG_ANON_VMA_NAME on the host.
        let named = maps.contains("[anon:husk-guest-ram]");
        if !named {
            eprintln!("host kernel does not name anonymous mappings; guest RAM is unnamed");
        }
    }
}
