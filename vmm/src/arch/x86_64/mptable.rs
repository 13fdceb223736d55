//! The Intel MultiProcessor Specification 1.4 table: how a guest without ACPI learns its
//! CPUs (one local APIC each), the ISA bus, the IOAPIC and how IRQs are wired to it.
//!
//! Built as a byte image (every field little-endian, tables packed) and written at the
//! start of the EBDA, which Linux scans for the `_MP_` signature.

use super::layout::{EBDA_START, HIMEM_START, IOAPIC_ADDR, IRQ_MAX, LAPIC_ADDR};

const FLOATING_LEN: usize = 16;
const HEADER_LEN: usize = 44;
const CPU_ENTRY_LEN: usize = 20;
const SMALL_ENTRY_LEN: usize = 8;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_INTSRC: u8 = 3;
const ENTRY_LINTSRC: u8 = 4;

const MP_SPEC_REV: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
/// Family 6 in the signature, FPU and APIC in the feature flags.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);
const IRQ_TYPE_INT: u8 = 0;
const IRQ_TYPE_NMI: u8 = 1;
const IRQ_TYPE_EXTINT: u8 = 3;

/// Error building the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    #[error("an MP table describes 1 to 254 CPUs, not {0}")]
    CpuCount(u8),
    #[error("the MP table ({0} bytes) does not fit in the EBDA")]
    TooLarge(usize),
}

/// Number of configuration-table entries for `cpus` CPUs.
pub fn entry_count(cpus: u8) -> usize {
    // CPUs + ISA bus + IOAPIC + one source per IOAPIC pin + 2 local sources.
    usize::from(cpus) + 2 + (IRQ_MAX as usize + 1) + 2
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |acc, b| acc.wrapping_add(*b))
        .wrapping_neg()
}

/// Builds the floating pointer followed by the configuration table, for placement at
/// `base` (the pointer names the table by its guest address).
pub fn build(cpus: u8, base: u64) -> Result<Vec<u8>, MptableError> {
    if cpus == 0 || cpus == u8::MAX {
        return Err(MptableError::CpuCount(cpus));
    }
    let ioapic_id = cpus + 1;
    let mut table = Vec::with_capacity(512);
    // Header; length, entry count and checksum are patched below.
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&0u16.to_le_bytes());
    table.push(MP_SPEC_REV);
    table.push(0);
    table.extend_from_slice(b"HUSK    ");
    table.extend_from_slice(b"HUSK-VMM    ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&0u16.to_le_bytes()); // entry count
    table.extend_from_slice(&(LAPIC_ADDR as u32).to_le_bytes());
    table.extend_from_slice(&0u32.to_le_bytes());
    debug_assert_eq!(table.len(), HEADER_LEN);

    for id in 0..cpus {
        table.push(ENTRY_PROCESSOR);
        table.push(id);
        table.push(APIC_VERSION);
        let flags = CPU_ENABLED | if id == 0 { CPU_BOOTPROCESSOR } else { 0 };
        table.push(flags);
        table.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        table.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        table.extend_from_slice(&[0u8; 8]);
    }
    table.extend_from_slice(&[ENTRY_BUS, 0]);
    table.extend_from_slice(b"ISA   ");
    table.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    table.extend_from_slice(&(IOAPIC_ADDR as u32).to_le_bytes());
    for irq in 0..=IRQ_MAX as u8 {
        // Conforming polarity and trigger; ISA IRQ n on IOAPIC pin n.
        table.extend_from_slice(&[ENTRY_INTSRC, IRQ_TYPE_INT, 0, 0, 0, irq, ioapic_id, irq]);
    }
    // The 8259 behind LINT0 of the boot CPU, NMI on LINT1 of every CPU.
    table.extend_from_slice(&[ENTRY_LINTSRC, IRQ_TYPE_EXTINT, 0, 0, 0, 0, 0, 0]);
    table.extend_from_slice(&[ENTRY_LINTSRC, IRQ_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]);

    let len = table.len();
    debug_assert_eq!(
        len,
        HEADER_LEN
            + usize::from(cpus) * CPU_ENTRY_LEN
            + (entry_count(cpus) - usize::from(cpus)) * SMALL_ENTRY_LEN
    );
    if FLOATING_LEN + len > (HIMEM_START - EBDA_START) as usize {
        return Err(MptableError::TooLarge(FLOATING_LEN + len));
    }
    table[4..6].copy_from_slice(&(len as u16).to_le_bytes());
    table[34..36].copy_from_slice(&(entry_count(cpus) as u16).to_le_bytes());
    table[7] = checksum(&table);

    let mut image = Vec::with_capacity(FLOATING_LEN + len);
    image.extend_from_slice(b"_MP_");
    image.extend_from_slice(&((base + FLOATING_LEN as u64) as u32).to_le_bytes());
    image.extend_from_slice(&[1, MP_SPEC_REV, 0, 0, 0, 0, 0, 0]);
    image[10] = checksum(&image);
    image.extend_from_slice(&table);
    Ok(image)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn checksums_and_counts() {
        for cpus in [1u8, 2, 8] {
            let img = build(cpus, 0x9fc00).unwrap();
            let (fp, table) = img.split_at(16);
            assert_eq!(&fp[..4], b"_MP_");
            assert_eq!(u32::from_le_bytes(fp[4..8].try_into().unwrap()), 0x9fc10);
            assert_eq!(sum(fp), 0, "floating pointer checksum");
            assert_eq!(&table[..4], b"PCMP");
            let len = u16::from_le_bytes([table[4], table[5]]) as usize;
            assert_eq!(len, table.len());
            assert_eq!(sum(table), 0, "configuration table checksum");
            let count = u16::from_le_bytes([table[34], table[35]]) as usize;
            assert_eq!(count, cpus as usize + 2 + 24 + 2);

            // Walk the entries by type and count each kind.
            let mut kinds = [0usize; 5];
            let mut off = 44;
            let mut apic_ids = vec![];
            while off < table.len() {
                let t = table[off] as usize;
                kinds[t] += 1;
                if t == 0 {
                    apic_ids.push(table[off + 1]);
                    assert_eq!(table[off + 3] & 2 != 0, table[off + 1] == 0, "BSP flag");
                    off += 20;
                } else {
                    off += 8;
                }
            }
            assert_eq!(off, table.len());
            assert_eq!(kinds, [cpus as usize, 1, 1, 24, 2]);
            assert_eq!(apic_ids, (0..cpus).collect::<Vec<_>>());
        }
    }

    #[test]
    fn rejects_zero_cpus() {
        assert!(matches!(build(0, 0x9fc00), Err(MptableError::CpuCount(0))));
    }
}
