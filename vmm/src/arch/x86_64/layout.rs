//! Guest physical memory layout.
//!
//! ```text
//! 0x0000_0500  GDT (4 entries), IDT (empty) right after it
//! 0x0000_7000  zero page (boot_params)
//! 0x0000_8ff0  boot stack top
//! 0x0000_9000  PML4, PDPT at 0xa000, PD at 0xb000 (identity map of the first GiB)
//! 0x0002_0000  kernel command line (CMDLINE_MAX_SIZE bytes)
//! 0x0009_fc00  EBDA: MP table (not RAM in the e820 map)
//! 0x0010_0000  high memory: the kernel is loaded from here (vmlinux at its own address)
//!   ...        initramfs at the top of low RAM
//! 0xd000_0000  MMIO gap: boot-timer page, then virtio-mmio devices, IOAPIC, LAPIC
//! 0x1_0000_0000 RAM above 4 GiB when the guest has more than the gap allows below it
//! ```

/// GDT address in guest memory.
pub const GDT_ADDR: u64 = 0x500;
/// IDT address (an empty IDT: the kernel installs its own before enabling interrupts).
pub const IDT_ADDR: u64 = 0x520;
/// Address of the Linux boot parameters ("zero page").
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK_ADDR: u64 = 0x8ff0;
/// Identity page tables for entering long mode.
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPT_ADDR: u64 = 0xa000;
pub const PD_ADDR: u64 = 0xb000;
/// Kernel command line address and capacity (x86 COMMAND_LINE_SIZE, nul included).
pub const CMDLINE_ADDR: u64 = 0x20000;
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the Extended BIOS Data Area; RAM below 1 MiB ends here.
pub const EBDA_START: u64 = 0x9fc00;
/// The MP floating pointer and configuration table live in the EBDA.
pub const MPTABLE_ADDR: u64 = EBDA_START;
/// First byte of high memory (1 MiB), where kernels are loaded.
pub const HIMEM_START: u64 = 0x10_0000;

/// The MMIO gap below 4 GiB: no RAM there.
pub const MMIO_GAP_START: u64 = 0xd000_0000;
pub const MMIO_GAP_END: u64 = 1 << 32;
/// Boot-timer page (the guest agent writes it once it runs).
pub const BOOT_TIMER_ADDR: u64 = MMIO_GAP_START;
pub const BOOT_TIMER_SIZE: u64 = 0x1000;
/// virtio-mmio devices, one 4 KiB window each, with consecutive IRQs.
pub const VIRTIO_MMIO_BASE: u64 = MMIO_GAP_START + 0x1000;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// IOAPIC pins are 0..=23: the last usable device IRQ.
pub const IRQ_MAX: u32 = 23;
/// Interrupt controllers, at their architectural addresses inside the gap.
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
pub const LAPIC_ADDR: u64 = 0xfee0_0000;
/// KVM needs three pages for the TSS in guest physical space (unused by a 64-bit guest).
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;

/// COM1.
pub const SERIAL_PORT: u64 = 0x3f8;
pub const SERIAL_PORT_LEN: u64 = 8;
pub const SERIAL_IRQ: u32 = 4;
/// i8042 keyboard controller: data port 0x60 ... command port 0x64.
pub const I8042_PORT: u64 = 0x60;
pub const I8042_PORT_LEN: u64 = 5;

/// Most virtio-mmio devices the layout has IRQs for.
pub const MAX_VIRTIO_DEVICES: usize = (IRQ_MAX - VIRTIO_IRQ_BASE + 1) as usize;

/// Guest RAM ranges `(start, len)` for `mem_size` bytes: everything below the MMIO gap
/// first, the rest above 4 GiB.
pub fn ram_ranges(mem_size: u64) -> Vec<(u64, u64)> {
    let low = mem_size.min(MMIO_GAP_START);
    let mut ranges = vec![(0, low)];
    if mem_size > MMIO_GAP_START {
        ranges.push((MMIO_GAP_END, mem_size - MMIO_GAP_START));
    }
    ranges
}

/// End (exclusive) of RAM below the MMIO gap.
pub fn low_ram_end(mem_size: u64) -> u64 {
    mem_size.min(MMIO_GAP_START)
}

/// MMIO window and IRQ of the `index`-th virtio device, or None past the last IRQ.
pub fn virtio_slot(index: usize) -> Option<(u64, u32)> {
    if index >= MAX_VIRTIO_DEVICES {
        return None;
    }
    Some((
        VIRTIO_MMIO_BASE + index as u64 * VIRTIO_MMIO_SIZE,
        VIRTIO_IRQ_BASE + index as u32,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_is_split_around_the_mmio_gap() {
        assert_eq!(ram_ranges(128 << 20), vec![(0, 128 << 20)]);
        assert_eq!(ram_ranges(MMIO_GAP_START), vec![(0, MMIO_GAP_START)]);
        assert_eq!(
            ram_ranges(4 << 30),
            vec![(0, MMIO_GAP_START), (1 << 32, (4 << 30) - MMIO_GAP_START)]
        );
    }

    #[test]
    fn virtio_slots_stay_inside_the_gap_and_ioapic_pins() {
        assert_eq!(virtio_slot(0), Some((0xd000_1000, 5)));
        assert_eq!(virtio_slot(1), Some((0xd000_2000, 6)));
        let (addr, irq) = virtio_slot(MAX_VIRTIO_DEVICES - 1).unwrap();
        assert_eq!(irq, IRQ_MAX);
        assert!(addr + VIRTIO_MMIO_SIZE <= IOAPIC_ADDR);
        assert_eq!(virtio_slot(MAX_VIRTIO_DEVICES), None);
    }
}
