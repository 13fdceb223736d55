//! Putting the guest's software in RAM: the kernel (ELF vmlinux or bzImage), the
//! initramfs at the top of low RAM, and the kernel command line.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress};

use crate::arch::x86_64::layout::{self, CMDLINE_MAX_SIZE, HIMEM_START};
use crate::memory::GuestMemory;

const PAGE_SIZE: u64 = 0x1000;
/// Offset of the 64-bit entry point from the start of a bzImage's protected-mode kernel.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

/// Error loading the guest's software.
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error("kernel {path}: {source}")]
    OpenKernel {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("kernel {0}: neither an ELF vmlinux nor a bzImage")]
    NotAKernel(PathBuf),
    #[error("kernel {path}: {source}")]
    Load {
        path: PathBuf,
        #[source]
        source: linux_loader::loader::Error,
    },
    #[error("initramfs {path}: {source}")]
    OpenInitramfs {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "initramfs {path} ({size} bytes) does not fit in guest RAM between the kernel \
         (ends at {kernel_end:#x}) and {limit:#x}: give the guest more memory"
    )]
    InitramfsTooLarge {
        path: PathBuf,
        size: u64,
        kernel_end: u64,
        limit: u64,
    },
    #[error("initramfs {path}: copying into guest memory: {source}")]
    InitramfsCopy {
        path: PathBuf,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("kernel command line: {0} (at most {max} bytes)", max = CMDLINE_MAX_SIZE - 1)]
    Cmdline(#[source] linux_loader::cmdline::Error),
    #[error("writing the kernel command line: {0}")]
    CmdlineWrite(#[source] linux_loader::loader::Error),
}

/// Where the kernel landed.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    /// 64-bit entry point.
    pub entry: u64,
    /// First byte after the kernel image.
    pub end: u64,
    /// bzImage setup header to start the zero page from (None for ELF).
    pub setup_header: Option<setup_header>,
}

/// Kernel image formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    Elf,
    BzImage,
}

/// Recognises a kernel by its magic numbers: `\x7fELF` at 0, or `HdrS` at 0x202.
pub fn sniff_kernel(image: &mut (impl Read + Seek)) -> std::io::Result<Option<KernelFormat>> {
    let mut head = [0u8; 0x206];
    image.seek(SeekFrom::Start(0))?;
    let mut n = 0;
    while n < head.len() {
        match image.read(&mut head[n..])? {
            0 => break,
            k => n += k,
        }
    }
    image.seek(SeekFrom::Start(0))?;
    if n >= 4 && &head[..4] == b"\x7fELF" {
        return Ok(Some(KernelFormat::Elf));
    }
    if n >= 0x206 && &head[0x202..0x206] == b"HdrS" {
        return Ok(Some(KernelFormat::BzImage));
    }
    Ok(None)
}

/// An opened kernel image whose format is known.
pub struct KernelImage {
    path: PathBuf,
    file: File,
    format: KernelFormat,
}

impl KernelImage {
    /// Opens `path` and checks that it is a kernel, before any VM exists.
    pub fn open(path: &Path) -> Result<Self, LoaderError> {
        let open_err = |source| LoaderError::OpenKernel {
            path: path.to_path_buf(),
            source,
        };
        let mut file = File::open(path).map_err(open_err)?;
        let format = sniff_kernel(&mut file)
            .map_err(open_err)?
            .ok_or_else(|| LoaderError::NotAKernel(path.to_path_buf()))?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
            format,
        })
    }

    pub fn format(&self) -> KernelFormat {
        self.format
    }

    /// Loads the kernel into guest memory.
    pub fn load(mut self, mem: &GuestMemory) -> Result<LoadedKernel, LoaderError> {
        let path = self.path;
        let load_err = |source| LoaderError::Load { path, source };
        let himem = Some(GuestAddress(HIMEM_START));
        match self.format {
            KernelFormat::Elf => {
                let r = Elf::load(mem, None, &mut self.file, himem).map_err(load_err)?;
                Ok(LoadedKernel {
                    entry: r.kernel_load.0,
                    end: r.kernel_end,
                    setup_header: None,
                })
            }
            KernelFormat::BzImage => {
                let r = BzImage::load(mem, None, &mut self.file, himem).map_err(load_err)?;
                Ok(LoadedKernel {
                    entry: r.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET,
                    end: r.kernel_end,
                    setup_header: r.setup_header,
                })
            }
        }
    }
}

/// Loads the kernel at `path` into guest memory.
pub fn load_kernel(mem: &GuestMemory, path: &Path) -> Result<LoadedKernel, LoaderError> {
    KernelImage::open(path)?.load(mem)
}

/// Page-aligned address for an initramfs of `size` bytes at the top of low RAM, above
/// `kernel_end` and below `addr_limit` (the kernel's initrd_addr_max + 1).
pub fn initramfs_addr(mem_size: u64, kernel_end: u64, size: u64, addr_limit: u64) -> Option<u64> {
    let top = layout::low_ram_end(mem_size).min(addr_limit);
    let addr = top.checked_sub(size)? & !(PAGE_SIZE - 1);
    let kernel_end = kernel_end.checked_add(PAGE_SIZE - 1)? & !(PAGE_SIZE - 1);
    (addr >= kernel_end && size > 0).then_some(addr)
}

/// An initramfs opened before the VM is built: a jailed VMM opens its files first and then
/// gives up the rights to open them.
pub struct InitramfsFile {
    path: std::path::PathBuf,
    file: File,
}

impl InitramfsFile {
    pub fn open(path: &Path) -> Result<Self, LoaderError> {
        let file = File::open(path).map_err(|source| LoaderError::OpenInitramfs {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
        })
    }
}

/// Copies the initramfs at `path` to the top of low RAM; returns (address, size).
pub fn load_initramfs(
    mem: &GuestMemory,
    mem_size: u64,
    kernel: &LoadedKernel,
    path: &Path,
) -> Result<(u64, u64), LoaderError> {
    load_initramfs_file(mem, mem_size, kernel, InitramfsFile::open(path)?)
}

/// [`load_initramfs`] of an already opened file.
pub fn load_initramfs_file(
    mem: &GuestMemory,
    mem_size: u64,
    kernel: &LoadedKernel,
    initramfs: InitramfsFile,
) -> Result<(u64, u64), LoaderError> {
    let InitramfsFile { path, mut file } = initramfs;
    let path = path.as_path();
    let size = file
        .metadata()
        .map_err(|source| LoaderError::OpenInitramfs {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    // bzImages state how high an initrd may go; a vmlinux is entered in 64-bit mode and
    // takes it anywhere in low RAM.
    let limit = match kernel.setup_header {
        Some(h) if h.initrd_addr_max != 0 => u64::from(h.initrd_addr_max) + 1,
        _ => u64::MAX,
    };
    let addr = initramfs_addr(mem_size, kernel.end, size, limit).ok_or_else(|| {
        LoaderError::InitramfsTooLarge {
            path: path.to_path_buf(),
            size,
            kernel_end: kernel.end,
            limit: layout::low_ram_end(mem_size).min(limit),
        }
    })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|source| LoaderError::InitramfsCopy {
            path: path.to_path_buf(),
            source,
        })?;
    Ok((addr, size))
}

/// Everything the command line is made of.
pub struct CmdlineSpec<'a> {
    pub console: bool,
    pub template_flags: &'a str,
    /// (MMIO base, IRQ) of each virtio-mmio device.
    pub virtio_devices: &'a [(u64, u32)],
    pub extra: &'a str,
}

/// Assembles the guest command line: husk's base flags, the console, the CPU template's
/// flags, the boot-timer address, the virtio-mmio devices, then the user's extra args.
pub fn build_cmdline(spec: &CmdlineSpec) -> Result<Cmdline, LoaderError> {
    let mut c = Cmdline::new(CMDLINE_MAX_SIZE).map_err(LoaderError::Cmdline)?;
    c.insert_str("reboot=k panic=-1 quiet")
        .map_err(LoaderError::Cmdline)?;
    if spec.console {
        c.insert_str("console=ttyS0")
            .map_err(LoaderError::Cmdline)?;
    }
    if !spec.template_flags.is_empty() {
        c.insert_str(spec.template_flags)
            .map_err(LoaderError::Cmdline)?;
    }
    c.insert_str(format!("husk.boot_timer={:#x}", layout::BOOT_TIMER_ADDR))
        .map_err(LoaderError::Cmdline)?;
    for &(addr, irq) in spec.virtio_devices {
        c.add_virtio_mmio_device(layout::VIRTIO_MMIO_SIZE, GuestAddress(addr), irq, None)
            .map_err(LoaderError::Cmdline)?;
    }
    if !spec.extra.is_empty() {
        c.insert_str(spec.extra).map_err(LoaderError::Cmdline)?;
    }
    Ok(c)
}

/// Writes the command line at its fixed address; returns its length without the nul.
pub fn write_cmdline(mem: &GuestMemory, cmdline: &Cmdline) -> Result<usize, LoaderError> {
    linux_loader::loader::load_cmdline(mem, GuestAddress(layout::CMDLINE_ADDR), cmdline)
        .map_err(LoaderError::CmdlineWrite)?;
    let len = cmdline
        .as_cstring()
        .map_err(LoaderError::Cmdline)?
        .as_bytes()
        .len();
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;
    use vm_memory::GuestMemoryMmap;

    const MIB: u64 = 1 << 20;

    fn cmdline_string(spec: &CmdlineSpec) -> String {
        build_cmdline(spec)
            .unwrap()
            .as_cstring()
            .unwrap()
            .into_string()
            .unwrap()
    }

    #[test]
    fn cmdline_order_and_devices() {
        let s = cmdline_string(&CmdlineSpec {
            console: true,
            template_flags: "noxsave pvm_syscall=pf",
            virtio_devices: &[(0xd000_1000, 5), (0xd000_2000, 6)],
            extra: "init=/sbin/init foo=bar",
        });
        assert_eq!(
            s,
            "reboot=k panic=-1 quiet console=ttyS0 noxsave pvm_syscall=pf \
             husk.boot_timer=0xd0000000 virtio_mmio.device=4K@0xd0001000:5 \
             virtio_mmio.device=4K@0xd0002000:6 init=/sbin/init foo=bar"
        );
        let quiet = cmdline_string(&CmdlineSpec {
            console: false,
            template_flags: "",
            virtio_devices: &[],
            extra: "",
        });
        assert_eq!(quiet, "reboot=k panic=-1 quiet husk.boot_timer=0xd0000000");
    }

    #[test]
    fn cmdline_length_is_limited() {
        let long = "x".repeat(CMDLINE_MAX_SIZE);
        let err = build_cmdline(&CmdlineSpec {
            console: false,
            template_flags: "",
            virtio_devices: &[],
            extra: &long,
        })
        .unwrap_err();
        assert!(err.to_string().contains("at most 2047 bytes"), "{err}");
        // Just under the limit fits.
        let base = "reboot=k panic=-1 quiet husk.boot_timer=0xd0000000".len();
        let fits = "y".repeat(CMDLINE_MAX_SIZE - 1 - base - 1);
        let c = build_cmdline(&CmdlineSpec {
            console: false,
            template_flags: "",
            virtio_devices: &[],
            extra: &fits,
        })
        .unwrap();
        let mem: GuestMemory =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MIB as usize)]).unwrap();
        let len = write_cmdline(&mem, &c).unwrap();
        assert_eq!(len, CMDLINE_MAX_SIZE - 1);
        let mut buf = vec![0u8; len + 1];
        mem.read_slice(&mut buf, GuestAddress(layout::CMDLINE_ADDR))
            .unwrap();
        assert!(buf.starts_with(b"reboot=k"));
        assert_eq!(buf[len], 0);
    }

    #[test]
    fn initramfs_goes_to_the_top_of_low_ram() {
        // 128 MiB guest, kernel ending at 20 MiB, 1 MiB + 1 byte initramfs.
        let addr = initramfs_addr(128 * MIB, 20 * MIB, MIB + 1, u64::MAX).unwrap();
        assert_eq!(addr, 127 * MIB - 0x1000); // rounded down to a page
        assert_eq!(addr % 0x1000, 0);
        assert!(addr + MIB < 128 * MIB);
        // Large guests: still below the MMIO gap.
        let addr = initramfs_addr(8 << 30, 20 * MIB, 4096, u64::MAX).unwrap();
        assert_eq!(addr, 0xd000_0000 - 4096);
        // bzImage limit.
        let addr = initramfs_addr(4 << 30, 20 * MIB, 4096, 0x8000_0000).unwrap();
        assert_eq!(addr, 0x8000_0000 - 4096);
        // Does not fit above the kernel.
        assert_eq!(initramfs_addr(64 * MIB, 20 * MIB, 45 * MIB, u64::MAX), None);
        assert_eq!(
            initramfs_addr(64 * MIB, 20 * MIB, 200 * MIB, u64::MAX),
            None
        );
    }

    #[test]
    fn initramfs_that_does_not_fit_is_a_named_error() {
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/husk-ld").unwrap();
        let path = dir.as_path().join("big.cpio");
        let f = File::create(&path).unwrap();
        f.set_len(3 * MIB).unwrap();
        let mem: GuestMemory =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 * MIB as usize)]).unwrap();
        let kernel = LoadedKernel {
            entry: 0x100000,
            end: 2 * MIB,
            setup_header: None,
        };
        let err = load_initramfs(&mem, 4 * MIB, &kernel, &path)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("big.cpio") && err.contains("does not fit"),
            "{err}"
        );

        let small = dir.as_path().join("small.cpio");
        std::fs::write(&small, b"070701hello").unwrap();
        let (addr, size) = load_initramfs(&mem, 4 * MIB, &kernel, &small).unwrap();
        assert_eq!((addr, size), (4 * MIB - 0x1000, 11));
        let mut buf = [0u8; 11];
        mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        assert_eq!(&buf, b"070701hello");
    }

    #[test]
    fn kernel_formats_are_sniffed() {
        let mut elf = Cursor::new(b"\x7fELF\x02\x01\x01".to_vec());
        assert_eq!(sniff_kernel(&mut elf).unwrap(), Some(KernelFormat::Elf));
        let mut bz = vec![0u8; 0x300];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(
            sniff_kernel(&mut Cursor::new(bz)).unwrap(),
            Some(KernelFormat::BzImage)
        );
        assert_eq!(
            sniff_kernel(&mut Cursor::new(b"#!/bin/sh\n".to_vec())).unwrap(),
            None
        );
    }

    #[test]
    fn non_kernel_and_missing_files_are_named() {
        let mem: GuestMemory =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 * MIB as usize)]).unwrap();
        let err = load_kernel(&mem, Path::new("/nonexistent/vmlinux")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/vmlinux"));
        assert!(err.to_string().contains("No such file"));
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/husk-ld").unwrap();
        let script = dir.as_path().join("not-a-kernel");
        std::fs::write(&script, b"#!/bin/sh\necho hi\n").unwrap();
        let err = load_kernel(&mem, &script).unwrap_err();
        assert!(matches!(err, LoaderError::NotAKernel(_)), "{err}");
    }
}
