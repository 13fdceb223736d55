//! Initial vCPU state for a 64-bit Linux entry: long mode with the boot GDT and identity
//! page tables, RSI pointing at the zero page, sane FPU/MSR defaults and the local APIC's
//! LINT pins wired the way the MP table says.

use kvm_bindings::{Msrs, kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryError};

use super::gdt::{self, CODE_SELECTOR, DATA_SELECTOR, TSS_SELECTOR};
use super::layout::{BOOT_STACK_ADDR, GDT_ADDR, IDT_ADDR, ZERO_PAGE_ADDR};
use crate::memory::GuestMemory;

const X86_CR0_PE: u64 = 1;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRs enabled, default type write-back.
const MTRR_DEF_TYPE_WB_ENABLED: u64 = (1 << 11) | 6;

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// Error setting up a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    #[error("writing the boot GDT/IDT into guest memory: {0}")]
    Gdt(#[source] GuestMemoryError),
    #[error("KVM_GET_SREGS: {0}")]
    GetSregs(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_SREGS: {0}")]
    SetSregs(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_REGS: {0}")]
    SetRegs(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_FPU: {0}")]
    SetFpu(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_MSRS: {0}")]
    SetMsrs(#[source] kvm_ioctls::Error),
    #[error("building the MSR list: {0:?}")]
    MsrList(vmm_sys_util::fam::Error),
    #[error("KVM_GET_LAPIC/KVM_SET_LAPIC: {0}")]
    Lapic(#[source] kvm_ioctls::Error),
}

/// Writes the boot GDT and an empty IDT.
pub fn write_gdt(mem: &GuestMemory) -> Result<(), GuestMemoryError> {
    let mut bytes = [0u8; 32];
    for (chunk, e) in bytes.chunks_exact_mut(8).zip(gdt::boot_gdt()) {
        chunk.copy_from_slice(&e.to_le_bytes());
    }
    mem.write_slice(&bytes, GuestAddress(GDT_ADDR))?;
    mem.write_obj(0u64, GuestAddress(IDT_ADDR))
}

/// Special registers for long mode with paging rooted at `cr3`.
pub fn boot_sregs(mut sregs: kvm_sregs, cr3: u64) -> kvm_sregs {
    let table = gdt::boot_gdt();
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (table.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    sregs.cs = gdt::segment_from_entry(table[1], CODE_SELECTOR);
    let data = gdt::segment_from_entry(table[2], DATA_SELECTOR);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = gdt::segment_from_entry(table[3], TSS_SELECTOR);
    sregs.cr0 |= X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
    sregs.cr3 = cr3;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.efer |= EFER_LME | EFER_LMA;
    sregs
}

/// General registers at the kernel's 64-bit entry point.
pub fn boot_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rflags: 0x2, // bit 1 is reserved and always set
        rip: entry,
        rsp: BOOT_STACK_ADDR,
        rbp: BOOT_STACK_ADDR,
        rsi: ZERO_PAGE_ADDR, // boot protocol: RSI = &boot_params
        ..Default::default()
    }
}

/// x87 and SSE control words at their power-on defaults.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// MSRs the kernel expects in a known state at entry.
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    let msr = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        msr(MSR_IA32_SYSENTER_CS, 0),
        msr(MSR_IA32_SYSENTER_ESP, 0),
        msr(MSR_IA32_SYSENTER_EIP, 0),
        msr(MSR_STAR, 0),
        msr(MSR_CSTAR, 0),
        msr(MSR_KERNEL_GS_BASE, 0),
        msr(MSR_SYSCALL_MASK, 0),
        msr(MSR_LSTAR, 0),
        msr(MSR_IA32_TSC, 0),
        msr(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        msr(MSR_MTRR_DEF_TYPE, MTRR_DEF_TYPE_WB_ENABLED),
    ]
}

fn lapic_reg(state: &kvm_lapic_state, off: usize) -> u32 {
    let b = &state.regs[off..off + 4];
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}

fn set_lapic_reg(state: &mut kvm_lapic_state, off: usize, v: u32) {
    for (i, b) in v.to_le_bytes().into_iter().enumerate() {
        state.regs[off + i] = b as _;
    }
}

/// LINT0 = ExtINT (the 8259), LINT1 = NMI, keeping the other LVT bits.
pub fn wire_lint_pins(state: &mut kvm_lapic_state) {
    let set_mode = |v: u32, mode: u32| (v & !0x700) | (mode << 8);
    let lvt0 = lapic_reg(state, APIC_LVT0);
    set_lapic_reg(state, APIC_LVT0, set_mode(lvt0, APIC_MODE_EXTINT));
    let lvt1 = lapic_reg(state, APIC_LVT1);
    set_lapic_reg(state, APIC_LVT1, set_mode(lvt1, APIC_MODE_NMI));
}

/// Puts a vCPU in the state the 64-bit boot protocol describes.
pub fn configure_vcpu(vcpu: &VcpuFd, entry: u64, cr3: u64) -> Result<(), RegsError> {
    let msrs = boot_msrs();
    let list = Msrs::from_entries(&msrs).map_err(RegsError::MsrList)?;
    let written = vcpu.set_msrs(&list).map_err(RegsError::SetMsrs)?;
    if written != msrs.len() {
        // KVM stops at the first MSR it refuses; the rest are optional defaults.
        let refused = msrs.get(written).map(|m| m.index).unwrap_or_default();
        tracing::debug!(
            written,
            refused = format_args!("{refused:#x}"),
            "KVM refused a boot MSR"
        );
    }
    vcpu.set_regs(&boot_regs(entry))
        .map_err(RegsError::SetRegs)?;
    let sregs = vcpu.get_sregs().map_err(RegsError::GetSregs)?;
    vcpu.set_sregs(&boot_sregs(sregs, cr3))
        .map_err(RegsError::SetSregs)?;
    vcpu.set_fpu(&boot_fpu()).map_err(RegsError::SetFpu)?;
    let mut lapic = vcpu.get_lapic().map_err(RegsError::Lapic)?;
    wire_lint_pins(&mut lapic);
    vcpu.set_lapic(&lapic).map_err(RegsError::Lapic)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sregs_enter_long_mode() {
        let s = boot_sregs(kvm_sregs::default(), 0x9000);
        assert_eq!(s.cr3, 0x9000);
        assert_eq!(s.cr0 & (X86_CR0_PE | X86_CR0_PG), X86_CR0_PE | X86_CR0_PG);
        assert_ne!(s.cr4 & X86_CR4_PAE, 0);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!((s.gdt.base, s.gdt.limit), (0x500, 31));
        assert_eq!((s.cs.selector, s.cs.l), (8, 1));
        assert_eq!((s.ss.selector, s.tr.selector), (0x10, 0x18));
    }

    #[test]
    fn regs_follow_the_boot_protocol() {
        let r = boot_regs(0x100_0000);
        assert_eq!(
            (r.rip, r.rsi, r.rsp, r.rflags),
            (0x100_0000, 0x7000, 0x8ff0, 2)
        );
    }

    #[test]
    fn lint_pins_are_rewired_without_touching_mask_bits() {
        let mut st = kvm_lapic_state::default();
        set_lapic_reg(&mut st, APIC_LVT0, 0x0001_0000); // masked
        wire_lint_pins(&mut st);
        assert_eq!(lapic_reg(&st, APIC_LVT0), 0x0001_0700);
        assert_eq!(lapic_reg(&st, APIC_LVT1), 0x400);
    }
}
