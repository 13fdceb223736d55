//! The boot GDT: flat 64-bit code and data segments plus a TSS descriptor, and their
//! translation into the `kvm_segment`s loaded through KVM_SET_SREGS.

use kvm_bindings::kvm_segment;

/// Access/flags word of each descriptor (bits 40..=55 of the entry, limit bits masked out).
const CODE64_FLAGS: u16 = 0xa09b; // present, DPL0, code exec/read accessed, L=1, G=1
const DATA_FLAGS: u16 = 0xc093; // present, DPL0, data read/write accessed, D/B=1, G=1
const TSS_FLAGS: u16 = 0x808b; // present, busy 64-bit TSS, G=1

/// Selectors (index * 8) of the entries in [`boot_gdt`].
pub const CODE_SELECTOR: u16 = 0x08;
pub const DATA_SELECTOR: u16 = 0x10;
pub const TSS_SELECTOR: u16 = 0x18;

/// Packs a segment descriptor from its access/flags word, base and 20-bit limit.
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let base = u64::from(base);
    let limit = u64::from(limit);
    let flags = u64::from(flags);
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
}

/// The boot GDT: null, code, data, TSS.
pub fn boot_gdt() -> [u64; 4] {
    [
        0,
        gdt_entry(CODE64_FLAGS, 0, 0xfffff),
        gdt_entry(DATA_FLAGS, 0, 0xfffff),
        gdt_entry(TSS_FLAGS, 0, 0xfffff),
    ]
}

/// Unpacks a descriptor into the form KVM wants (limit in bytes after granularity).
pub fn segment_from_entry(entry: u64, selector: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = (entry & 0xffff) | ((entry >> 32) & 0x000f_0000);
    let g = ((entry >> 55) & 1) as u8;
    let limit = if g == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base,
        limit: limit as u32,
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_gdt_entries_match_the_architectural_encoding() {
        let gdt = boot_gdt();
        assert_eq!(gdt[0], 0);
        assert_eq!(gdt[1], 0x00af_9b00_0000_ffff);
        assert_eq!(gdt[2], 0x00cf_9300_0000_ffff);
        assert_eq!(gdt[3], 0x008f_8b00_0000_ffff);
    }

    #[test]
    fn segments_decode_to_flat_long_mode() {
        let gdt = boot_gdt();
        let cs = segment_from_entry(gdt[1], CODE_SELECTOR);
        assert_eq!((cs.base, cs.limit, cs.selector), (0, 0xffff_ffff, 8));
        assert_eq!((cs.l, cs.db, cs.g, cs.s, cs.present), (1, 0, 1, 1, 1));
        assert_eq!((cs.type_, cs.dpl, cs.unusable), (0xb, 0, 0));
        let ds = segment_from_entry(gdt[2], DATA_SELECTOR);
        assert_eq!((ds.l, ds.db, ds.type_), (0, 1, 3));
        let tr = segment_from_entry(gdt[3], TSS_SELECTOR);
        assert_eq!((tr.s, tr.type_), (0, 0xb));
        let null = segment_from_entry(0, 0);
        assert_eq!(null.unusable, 1);
        let odd = segment_from_entry(gdt_entry(0x0093, 0x1234_5678, 0xabcde), 0);
        assert_eq!((odd.base, odd.limit, odd.g), (0x1234_5678, 0xabcde, 0));
    }
}
