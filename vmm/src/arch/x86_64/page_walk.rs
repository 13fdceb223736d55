//! A bounds-checked walk of the guest's 4-level page tables, used to find the instruction
//! bytes at a faulting RIP. Every table entry comes from guest memory and is untrusted: a
//! read outside guest RAM or a non-present entry ends the walk with None.

use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestMemory;

const PRESENT: u64 = 1;
const PAGE_SIZE: u64 = 1 << 7;
/// Physical address bits 12..=51 of an entry.
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// Translates a linear address through the 4-level tables rooted at `cr3`.
pub fn translate(mem: &GuestMemory, cr3: u64, va: u64) -> Option<u64> {
    let mut table = cr3 & ADDR_MASK;
    // Levels PML4 (shift 39), PDPT (30), PD (21), PT (12).
    for (level, shift) in [39u32, 30, 21, 12].into_iter().enumerate() {
        let index = (va >> shift) & 0x1ff;
        let entry: u64 = mem.read_obj(GuestAddress(table + index * 8)).ok()?;
        if entry & PRESENT == 0 {
            return None;
        }
        // 1 GiB pages at the PDPT level, 2 MiB pages at the PD level.
        if (level == 1 || level == 2) && entry & PAGE_SIZE != 0 {
            let page_mask = (1u64 << shift) - 1;
            return Some((entry & ADDR_MASK & !page_mask) | (va & page_mask));
        }
        table = entry & ADDR_MASK;
    }
    Some(table | (va & 0xfff))
}

/// Reads up to `buf.len()` bytes at linear address `va`, page by page; returns how many
/// bytes could be read before the first unmapped or non-RAM page.
pub fn read_virt(mem: &GuestMemory, cr3: Option<u64>, va: u64, buf: &mut [u8]) -> usize {
    let mut done = 0;
    while done < buf.len() {
        let addr = va.wrapping_add(done as u64);
        let phys = match cr3 {
            Some(cr3) => match translate(mem, cr3, addr) {
                Some(p) => p,
                None => break,
            },
            None => addr,
        };
        let in_page = (0x1000 - (addr & 0xfff)) as usize;
        let n = in_page.min(buf.len() - done);
        if mem
            .read_slice(&mut buf[done..done + n], GuestAddress(phys))
            .is_err()
        {
            break;
        }
        done += n;
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn mem() -> GuestMemory {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    #[test]
    fn walks_4k_pages_and_rejects_hostile_entries() {
        let m = mem();
        // PML4 0x1000 -> PDPT 0x2000 -> PD 0x3000 -> PT 0x4000 -> page 0x5000.
        let va: u64 = 0xffff_8000_0020_1000 + 0x10;
        let idx = |s: u32| (va >> s) & 0x1ff;
        m.write_obj(0x2003u64, GuestAddress(0x1000 + idx(39) * 8))
            .unwrap();
        m.write_obj(0x3003u64, GuestAddress(0x2000 + idx(30) * 8))
            .unwrap();
        m.write_obj(0x4003u64, GuestAddress(0x3000 + idx(21) * 8))
            .unwrap();
        m.write_obj(0x5003u64, GuestAddress(0x4000 + idx(12) * 8))
            .unwrap();
        m.write_slice(&[0x0f, 0x0b], GuestAddress(0x5010)).unwrap();
        assert_eq!(translate(&m, 0x1000, va), Some(0x5010));
        let mut buf = [0u8; 2];
        assert_eq!(read_virt(&m, Some(0x1000), va, &mut buf), 2);
        assert_eq!(buf, [0x0f, 0x0b]);
        // A table pointer outside guest RAM ends the walk instead of reading host memory.
        m.write_obj(0xdead_0000_0003u64, GuestAddress(0x4000 + idx(12) * 8))
            .unwrap();
        assert_eq!(read_virt(&m, Some(0x1000), va, &mut buf), 0);
        // A cr3 outside RAM too.
        assert_eq!(translate(&m, 0x7fff_f000_0000, va), None);
        // Without paging, addresses are physical; reads stop at the end of RAM.
        let mut big = [0u8; 16];
        assert_eq!(read_virt(&m, None, (1 << 20) - 4, &mut big), 4);
        assert_eq!(read_virt(&m, None, 0x5010, &mut big[..2]), 2);
    }
}
