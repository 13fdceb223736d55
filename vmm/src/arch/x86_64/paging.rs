//! Identity page tables for entering the kernel in long mode: the first GiB mapped with
//! 2 MiB pages, which covers everything the boot path touches before the kernel builds
//! its own tables.

use vm_memory::{Bytes, GuestAddress, GuestMemoryError};

use super::layout::{PD_ADDR, PDPT_ADDR, PML4_ADDR};
use crate::memory::GuestMemory;

const PRESENT_RW: u64 = 0x3;
const PAGE_SIZE_2M: u64 = 0x80;

/// PML4[0] -> PDPT, PDPT[0] -> PD, PD[i] = i * 2 MiB (present, writable, large).
pub fn identity_tables() -> ([u64; 1], [u64; 1], [u64; 512]) {
    let mut pd = [0u64; 512];
    for (i, e) in pd.iter_mut().enumerate() {
        *e = ((i as u64) << 21) | PRESENT_RW | PAGE_SIZE_2M;
    }
    ([PDPT_ADDR | PRESENT_RW], [PD_ADDR | PRESENT_RW], pd)
}

/// Writes the tables to their fixed addresses; returns the CR3 value.
pub fn write_identity_tables(mem: &GuestMemory) -> Result<u64, GuestMemoryError> {
    let (pml4, pdpt, pd) = identity_tables();
    mem.write_obj(pml4[0], GuestAddress(PML4_ADDR))?;
    mem.write_obj(pdpt[0], GuestAddress(PDPT_ADDR))?;
    let mut bytes = [0u8; 512 * 8];
    for (chunk, e) in bytes.chunks_exact_mut(8).zip(pd.iter()) {
        chunk.copy_from_slice(&e.to_le_bytes());
    }
    mem.write_slice(&bytes, GuestAddress(PD_ADDR))?;
    Ok(PML4_ADDR)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::page_walk::translate;
    use vm_memory::GuestMemoryMmap;

    #[test]
    fn tables_identity_map_the_first_gib() {
        let mem: GuestMemory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let cr3 = write_identity_tables(&mem).unwrap();
        assert_eq!(cr3, 0x9000);
        assert_eq!(mem.read_obj::<u64>(GuestAddress(0x9000)).unwrap(), 0xa003);
        assert_eq!(mem.read_obj::<u64>(GuestAddress(0xa000)).unwrap(), 0xb003);
        assert_eq!(mem.read_obj::<u64>(GuestAddress(0xb000)).unwrap(), 0x83);
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(0xb000 + 511 * 8)).unwrap(),
            (511 << 21) | 0x83
        );
        for va in [0u64, 0x1234, 0x100_0000 + 0x567, (1 << 30) - 1] {
            assert_eq!(translate(&mem, cr3, va), Some(va));
        }
        assert_eq!(
            translate(&mem, cr3, 1 << 30),
            None,
            "second GiB is unmapped"
        );
    }
}
