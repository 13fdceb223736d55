//! The snapshot memory file: guest RAM regions one after the other, all-zero pages left as
//! holes (a sparse file), mapped back `MAP_PRIVATE` on restore so that every VM restored
//! from one file shares the pages none of them has written.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use serde::{Deserialize, Serialize};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap};

use crate::memory::GuestMemory;

/// The memory file's granularity: region lengths are whole pages.
pub(crate) const PAGE: usize = 4096;

/// Where each RAM region sits in guest-physical space and in the memory file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRegionState {
    pub guest_addr: u64,
    pub len: u64,
    pub file_offset: u64,
}

/// Error saving or mapping the memory file.
#[derive(Debug, thiserror::Error)]
pub enum MemoryFileError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} has {found} bytes; the state file expects {expected}")]
    Size {
        path: String,
        found: u64,
        expected: u64,
    },
    #[error("the snapshot's memory layout is invalid: {0}")]
    Layout(String),
    #[error("mapping {path}: {source}")]
    Map {
        path: String,
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
}

/// Writes guest RAM to `path`; returns the layout and the bytes actually written (the
/// non-zero pages).
pub fn save(
    mem: &GuestMemory,
    path: &Path,
) -> Result<(Vec<MemoryRegionState>, u64), MemoryFileError> {
    let io = |source| MemoryFileError::Io {
        path: path.display().to_string(),
        source,
    };
    let file = File::create(path).map_err(io)?;
    let mut layout = Vec::new();
    let mut offset = 0u64;
    let mut written = 0u64;
    for region in mem.iter() {
        let len = region.len() as usize;
        // SAFETY: the region is a live mapping of `len` bytes owned by `mem`; every vCPU is
        // paused and every device worker stopped, so nothing writes it while we read.
        let bytes = unsafe { std::slice::from_raw_parts(region.as_ptr(), len) };
        let mut page = 0;
        while page < len {
            // One write per run of non-zero pages.
            let end_of = |p: usize| (p + PAGE).min(len);
            if bytes[page..end_of(page)].iter().all(|&b| b == 0) {
                page = end_of(page);
                continue;
            }
            let start = page;
            while page < len && !bytes[page..end_of(page)].iter().all(|&b| b == 0) {
                page = end_of(page);
            }
            file.write_all_at(&bytes[start..page], offset + start as u64)
                .map_err(io)?;
            written += (page - start) as u64;
        }
        layout.push(MemoryRegionState {
            guest_addr: region.start_addr().0,
            len: len as u64,
            file_offset: offset,
        });
        offset += len as u64;
    }
    file.set_len(offset).map_err(io)?;
    file.sync_all().map_err(io)?;
    Ok((layout, written))
}

/// Opens the memory file and checks it against the saved layout.
fn open_checked(path: &Path, layout: &[MemoryRegionState]) -> Result<File, MemoryFileError> {
    let name = || path.display().to_string();
    let file = File::open(path).map_err(|source| MemoryFileError::Io {
        path: name(),
        source,
    })?;
    let found = file
        .metadata()
        .map_err(|source| MemoryFileError::Io {
            path: name(),
            source,
        })?
        .len();
    let mut expected = 0u64;
    for r in layout {
        if r.len == 0 || r.len % PAGE as u64 != 0 || r.file_offset != expected {
            return Err(MemoryFileError::Layout(format!(
                "region at {:#x}: length {:#x}, file offset {:#x}",
                r.guest_addr, r.len, r.file_offset
            )));
        }
        expected = expected
            .checked_add(r.len)
            .ok_or_else(|| MemoryFileError::Layout("regions overflow".into()))?;
    }
    if layout.is_empty() {
        return Err(MemoryFileError::Layout("no RAM regions".into()));
    }
    if found != expected {
        return Err(MemoryFileError::Size {
            path: name(),
            found,
            expected,
        });
    }
    Ok(file)
}

/// Maps `file` at `layout` with `flags` (MAP_PRIVATE or MAP_SHARED).
fn map_layout(
    path: &Path,
    file: &File,
    layout: &[MemoryRegionState],
    flags: i32,
) -> Result<GuestMemory, MemoryFileError> {
    let name = || path.display().to_string();
    let mut regions = Vec::with_capacity(layout.len());
    for r in layout {
        let fo = FileOffset::new(
            file.try_clone().map_err(|source| MemoryFileError::Io {
                path: name(),
                source,
            })?,
            r.file_offset,
        );
        let mapping = MmapRegionBuilder::new(r.len as usize)
            .with_file_offset(fo)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(flags | libc::MAP_NORESERVE)
            .build()
            .map_err(|source| MemoryFileError::Map {
                path: name(),
                source,
            })?;
        let region =
            GuestRegionMmap::new(mapping, GuestAddress(r.guest_addr)).ok_or_else(|| {
                MemoryFileError::Layout(format!("region at {:#x} wraps around", r.guest_addr))
            })?;
        regions.push(region);
    }
    GuestMemory::from_regions(regions).map_err(|e| MemoryFileError::Layout(e.to_string()))
}

/// Maps the memory file privately at the saved layout.
pub fn map(path: &Path, layout: &[MemoryRegionState]) -> Result<GuestMemory, MemoryFileError> {
    let file = open_checked(path, layout)?;
    map_layout(path, &file, layout, libc::MAP_PRIVATE)
}

/// Copies the memory file into a fresh shared memfd and maps that: a vhost-user backend
/// (virtiofsd) must map guest RAM itself, which a private file mapping cannot give it. Only
/// the file's data extents are read (holes are the memfd's zeroes already), so the copy
/// costs the snapshot's written bytes, not the VM's size. Clones made this way share no pages.
pub fn copy_to_shared_memfd(
    path: &Path,
    layout: &[MemoryRegionState],
) -> Result<GuestMemory, MemoryFileError> {
    let file = open_checked(path, layout)?;
    let size: u64 = layout.iter().map(|r| r.len).sum();
    let memfd = crate::memory::create_memfd(size).map_err(|e| MemoryFileError::Io {
        path: "guest RAM memfd".into(),
        source: std::io::Error::other(e.to_string()),
    })?;
    let mem = map_layout(path, &memfd, layout, libc::MAP_SHARED)?;
    let io = |source| MemoryFileError::Io {
        path: path.display().to_string(),
        source,
    };
    for (r, region) in layout.iter().zip(mem.iter()) {
        // SAFETY: the region is a fresh shared mapping of `r.len` bytes that nothing else
        // uses yet (no vCPU or device exists).
        let bytes = unsafe { std::slice::from_raw_parts_mut(region.as_ptr(), r.len as usize) };
        for (start, end) in data_extents(&file, r.file_offset, r.file_offset + r.len).map_err(io)? {
            let at = (start - r.file_offset) as usize;
            let len = (end - start) as usize;
            file.read_exact_at(&mut bytes[at..at + len], start)
                .map_err(io)?;
        }
    }
    Ok(mem)
}

/// The data extents of `file` within `[from, to)` (SEEK_DATA / SEEK_HOLE), as
/// `(start, end)` offsets. A file system without them reports all of it as data.
fn data_extents(file: &File, from: u64, to: u64) -> std::io::Result<Vec<(u64, u64)>> {
    use std::os::fd::AsRawFd;
    let seek = |offset: u64, whence: i32| -> std::io::Result<Option<u64>> {
        // SAFETY: lseek on a descriptor we own; the result is checked.
        let r = unsafe { libc::lseek(file.as_raw_fd(), offset as libc::off_t, whence) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            // ENXIO: no data at or after `offset`.
            return if e.raw_os_error() == Some(libc::ENXIO) {
                Ok(None)
            } else {
                Err(e)
            };
        }
        Ok(Some(r as u64))
    };
    let mut extents = Vec::new();
    let mut at = from;
    while at < to {
        let Some(start) = seek(at, libc::SEEK_DATA)? else {
            break;
        };
        if start >= to {
            break;
        }
        let end = seek(start, libc::SEEK_HOLE)?.unwrap_or(to).min(to);
        if end <= start {
            break;
        }
        extents.push((start, end));
        at = end;
    }
    Ok(extents)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{RamBacking, create_guest_memory};
    use std::os::unix::fs::MetadataExt;
    use vm_memory::Bytes;

    #[test]
    fn saved_memory_maps_back_privately_and_zero_pages_take_no_space() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory");
        let mem = create_guest_memory(64 << 20, RamBacking::Anonymous).unwrap();
        mem.write_obj(0xfeed_f00d_u32, GuestAddress(0x1000))
            .unwrap();
        mem.write_obj(0x1234_u32, GuestAddress((64 << 20) - 4))
            .unwrap();
        let (layout, written) = save(&mem, &path).unwrap();
        assert_eq!(written, 2 * PAGE as u64, "two non-zero pages");
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), 64 << 20);
        assert!(
            meta.blocks() * 512 < 1 << 20,
            "sparse: {} blocks",
            meta.blocks()
        );

        let a = map(&path, &layout).unwrap();
        let b = map(&path, &layout).unwrap();
        assert_eq!(
            a.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0xfeed_f00d
        );
        assert_eq!(
            a.read_obj::<u32>(GuestAddress((64 << 20) - 4)).unwrap(),
            0x1234
        );
        // Each clone's writes stay its own, and the file is untouched.
        a.write_obj(7u32, GuestAddress(0x1000)).unwrap();
        assert_eq!(
            b.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0xfeed_f00d
        );
        let c = map(&path, &layout).unwrap();
        assert_eq!(
            c.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0xfeed_f00d
        );
    }

    #[test]
    fn a_memory_file_of_the_wrong_size_or_layout_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory");
        let mem = create_guest_memory(64 << 20, RamBacking::Anonymous).unwrap();
        let (layout, _) = save(&mem, &path).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(32 << 20)
            .unwrap();
        let e = map(&path, &layout).unwrap_err();
        assert!(matches!(e, MemoryFileError::Size { .. }), "{e}");
        let mut bad = layout.clone();
        bad[0].len = 123;
        let e = map(&path, &bad).unwrap_err();
        assert!(matches!(e, MemoryFileError::Layout(_)), "{e}");
    }

    #[test]
    fn a_shared_copy_holds_the_saved_bytes_and_is_a_memfd() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory");
        let mem = create_guest_memory(64 << 20, RamBacking::Anonymous).unwrap();
        mem.write_obj(0xfeed_f00d_u32, GuestAddress(0x1000))
            .unwrap();
        mem.write_obj(0x1234_u32, GuestAddress((64 << 20) - 4))
            .unwrap();
        let (layout, _) = save(&mem, &path).unwrap();
        let copy = copy_to_shared_memfd(&path, &layout).unwrap();
        assert_eq!(
            copy.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0xfeed_f00d
        );
        assert_eq!(
            copy.read_obj::<u32>(GuestAddress((64 << 20) - 4)).unwrap(),
            0x1234
        );
        assert_eq!(copy.read_obj::<u32>(GuestAddress(0x2000)).unwrap(), 0);
        // A vhost-user backend can map it: every region has a file behind it.
        for region in copy.iter() {
            assert!(region.file_offset().is_some());
        }
        // Writes go to the memfd, never to the snapshot.
        copy.write_obj(7u32, GuestAddress(0x1000)).unwrap();
        let again = map(&path, &layout).unwrap();
        assert_eq!(
            again.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0xfeed_f00d
        );
    }

    #[test]
    fn data_extents_skip_holes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sparse");
        let f = File::create(&path).unwrap();
        f.set_len(4 << 20).unwrap();
        f.write_all_at(&[1u8; PAGE], 1 << 20).unwrap();
        let f = File::open(&path).unwrap();
        let ext = data_extents(&f, 0, 4 << 20).unwrap();
        let covered: u64 = ext.iter().map(|(s, e)| e - s).sum();
        assert!(
            ext.iter()
                .any(|&(s, e)| s <= 1 << 20 && e >= (1 << 20) + PAGE as u64)
        );
        assert!(covered < 4 << 20, "holes are skipped: {ext:?}");
    }
}
