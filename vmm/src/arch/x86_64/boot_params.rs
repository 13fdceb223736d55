//! The Linux zero page (`boot_params`): e820 map, command line, initramfs.

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};

use super::layout::{EBDA_START, HIMEM_START, MMIO_GAP_END, MMIO_GAP_START};

pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x100_0000;

/// One e820 map entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// The e820 map for `mem_size` bytes of RAM: low RAM up to the EBDA, the EBDA and the
/// legacy hole as reserved, RAM from 1 MiB to the MMIO gap, the gap as reserved, and the
/// rest of RAM above 4 GiB.
pub fn e820_map(mem_size: u64) -> Vec<E820Entry> {
    let entry = |addr, size, kind| E820Entry { addr, size, kind };
    let low_end = mem_size.min(MMIO_GAP_START);
    let mut map = vec![
        entry(0, EBDA_START, E820_RAM),
        entry(EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
    ];
    if low_end > HIMEM_START {
        map.push(entry(HIMEM_START, low_end - HIMEM_START, E820_RAM));
    }
    map.push(entry(
        MMIO_GAP_START,
        MMIO_GAP_END - MMIO_GAP_START,
        E820_RESERVED,
    ));
    if mem_size > MMIO_GAP_START {
        map.push(entry(MMIO_GAP_END, mem_size - MMIO_GAP_START, E820_RAM));
    }
    map
}

/// What goes into the zero page.
pub struct BootParamsSpec {
    pub mem_size: u64,
    pub cmdline_addr: u64,
    /// Length of the command line without its nul.
    pub cmdline_len: usize,
    /// Guest address and size of the initramfs.
    pub initramfs: Option<(u64, u64)>,
    /// The bzImage setup header; None for an ELF vmlinux.
    pub setup_header: Option<setup_header>,
}

/// Builds the zero page.
pub fn build_boot_params(spec: &BootParamsSpec) -> boot_params {
    let mut params = boot_params::default();
    if let Some(hdr) = spec.setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    params.hdr.cmd_line_ptr = spec.cmdline_addr as u32;
    params.ext_cmd_line_ptr = (spec.cmdline_addr >> 32) as u32;
    params.hdr.cmdline_size = spec.cmdline_len as u32;
    if let Some((addr, size)) = spec.initramfs {
        params.hdr.ramdisk_image = addr as u32;
        params.ext_ramdisk_image = (addr >> 32) as u32;
        params.hdr.ramdisk_size = size as u32;
        params.ext_ramdisk_size = (size >> 32) as u32;
    }
    let map = e820_map(spec.mem_size);
    for (slot, e) in params.e820_table.iter_mut().zip(map.iter()) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    params.e820_entries = map.len().min(params.e820_table.len()) as u8;
    params
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn e(addr: u64, size: u64, kind: u32) -> E820Entry {
        E820Entry { addr, size, kind }
    }

    #[test]
    fn e820_for_small_memory() {
        assert_eq!(
            e820_map(128 * MIB),
            vec![
                e(0, 0x9fc00, E820_RAM),
                e(0x9fc00, 0x100000 - 0x9fc00, E820_RESERVED),
                e(MIB, 127 * MIB, E820_RAM),
                e(0xd000_0000, 0x3000_0000, E820_RESERVED),
            ]
        );
    }

    #[test]
    fn e820_for_memory_filling_and_exceeding_the_gap() {
        let at_gap = e820_map(0xd000_0000);
        assert_eq!(at_gap.len(), 4);
        assert_eq!(at_gap[2], e(MIB, 0xd000_0000 - MIB, E820_RAM));

        let big = e820_map(4096 * MIB);
        assert_eq!(big.len(), 5);
        assert_eq!(big[2], e(MIB, 0xd000_0000 - MIB, E820_RAM));
        assert_eq!(big[3], e(0xd000_0000, 0x3000_0000, E820_RESERVED));
        assert_eq!(big[4], e(1 << 32, 768 * MIB, E820_RAM));
        let ram: u64 = big
            .iter()
            .filter(|x| x.kind == E820_RAM)
            .map(|x| x.size)
            .sum();
        // Everything but the EBDA/legacy hole is usable.
        assert_eq!(ram, 4096 * MIB - (MIB - 0x9fc00));
    }

    #[test]
    fn boot_params_fields() {
        let p = build_boot_params(&BootParamsSpec {
            mem_size: 256 * MIB,
            cmdline_addr: 0x20000,
            cmdline_len: 42,
            initramfs: Some((0x0f00_0000, 0x12345)),
            setup_header: None,
        });
        let hdr = p.hdr;
        assert_eq!({ hdr.boot_flag }, 0xaa55);
        assert_eq!({ hdr.header }, 0x5372_6448);
        assert_eq!({ hdr.type_of_loader }, 0xff);
        assert_eq!({ hdr.cmd_line_ptr }, 0x20000);
        assert_eq!({ hdr.cmdline_size }, 42);
        assert_eq!({ hdr.ramdisk_image }, 0x0f00_0000);
        assert_eq!({ hdr.ramdisk_size }, 0x12345);
        assert_eq!({ p.e820_entries }, 4);
        let third = p.e820_table[2];
        assert_eq!(({ third.addr }, { third.size }), (MIB, 255 * MIB));
        assert_eq!({ third.r#type }, E820_RAM);
    }

    #[test]
    fn bzimage_header_is_kept_and_completed() {
        let hdr = setup_header {
            setup_sects: 30,
            version: 0x020f,
            ..Default::default()
        };
        let p = build_boot_params(&BootParamsSpec {
            mem_size: 128 * MIB,
            cmdline_addr: 0x20000,
            cmdline_len: 1,
            initramfs: None,
            setup_header: Some(hdr),
        });
        let h = p.hdr;
        assert_eq!(({ h.setup_sects }, { h.version }), (30, 0x020f));
        assert_eq!(({ h.ramdisk_image }, { h.ramdisk_size }), (0, 0));
        assert_eq!({ h.boot_flag }, 0xaa55);
    }
}
