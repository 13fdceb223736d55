//! Guest RAM: one memfd named `husk-guest-ram`, mapped shared at each RAM range of the
//! layout. A memfd (rather than anonymous memory) lets a vhost-user backend map the same
//! pages later, and makes guest RAM easy to tell apart from the VMM's own memory in
//! /proc/PID/smaps (`/memfd:husk-guest-ram`).

use std::ffi::CStr;
use std::fs::File;
use std::os::fd::FromRawFd;

use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

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
fn create_memfd(size: u64) -> Result<File, MemoryError> {
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
pub fn create_guest_memory(size: u64) -> Result<GuestMemory, MemoryError> {
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
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

    #[test]
    fn guest_ram_is_a_named_memfd_split_around_the_gap() {
        // 3.5 GiB of address space costs nothing until touched.
        let size = 0xd000_0000 + (256 << 20);
        let mem = create_guest_memory(size).unwrap();
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
}
