//! A paused vCPU's architectural state, as saved in a snapshot and set again on restore.

use kvm_bindings::{
    CpuId, KVM_MAX_CPUID_ENTRIES, Msrs, kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state,
    kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

/// KVM_GET/SET_MSRS take at most this many entries per call (the fam wrapper's limit).
const MSR_CHUNK: usize = 64;

/// Error saving or restoring one vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuStateError {
    #[error("vCPU {index}: {what}: {source}")]
    Kvm {
        index: u8,
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {index}: KVM refused MSR {msr:#x} on restore")]
    MsrRefused { index: u8, msr: u32 },
    #[error("vCPU {index}: {what} has too many entries ({count})")]
    TooMany {
        index: u8,
        what: &'static str,
        count: usize,
    },
}

/// Everything KVM keeps for one vCPU that the guest can observe.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    pub index: u8,
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub msrs: Vec<kvm_msr_entry>,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    /// KVM_GET_XCRS fails on hosts whose CPU template hides XSAVE (nested PVM).
    pub xcrs: Option<kvm_xcrs>,
    pub debug_regs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub mp_state: kvm_mp_state,
    pub vcpu_events: kvm_vcpu_events,
    /// The guest TSC frequency, for refusing a restore on a host that cannot match it.
    pub tsc_khz: Option<u32>,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("index", &self.index)
            .field("rip", &format_args!("{:#x}", self.regs.rip))
            .field("msrs", &self.msrs.len())
            .finish_non_exhaustive()
    }
}

fn kvm(index: u8, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuStateError {
    move |source| VcpuStateError::Kvm {
        index,
        what,
        source,
    }
}

/// Reads every MSR of `list` that KVM can read; the ones it refuses are left out (KVM reads
/// entries in order and stops at the first it cannot read).
fn read_msrs(vcpu: &VcpuFd, index: u8, list: &[u32]) -> Result<Vec<kvm_msr_entry>, VcpuStateError> {
    let mut out = Vec::with_capacity(list.len());
    let mut rest: &[u32] = list;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(MSR_CHUNK)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&i| kvm_msr_entry {
                index: i,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| VcpuStateError::TooMany {
            index,
            what: "MSR list",
            count: entries.len(),
        })?;
        let n = vcpu
            .get_msrs(&mut msrs)
            .map_err(kvm(index, "KVM_GET_MSRS"))?;
        out.extend_from_slice(&msrs.as_slice()[..n.min(chunk.len())]);
        // Skip the entry KVM stopped at (unreadable on this host), go on after it.
        let consumed = if n < chunk.len() { n + 1 } else { n };
        rest = &rest[consumed..];
    }
    Ok(out)
}

impl VcpuState {
    /// Saves the state of a vCPU that is out of KVM_RUN with no pending I/O (the caller
    /// re-entered KVM_RUN with `immediate_exit` set, which completes it).
    pub fn save(vcpu: &VcpuFd, index: u8, msr_list: &[u32]) -> Result<Self, VcpuStateError> {
        // Order as KVM's documentation asks: vCPU events and MP state first, so that a
        // pending interrupt is not lost in the LAPIC state.
        let mp_state = vcpu
            .get_mp_state()
            .map_err(kvm(index, "KVM_GET_MP_STATE"))?;
        let vcpu_events = vcpu
            .get_vcpu_events()
            .map_err(kvm(index, "KVM_GET_VCPU_EVENTS"))?;
        let regs = vcpu.get_regs().map_err(kvm(index, "KVM_GET_REGS"))?;
        let sregs = vcpu.get_sregs().map_err(kvm(index, "KVM_GET_SREGS"))?;
        let xsave = vcpu.get_xsave().map_err(kvm(index, "KVM_GET_XSAVE"))?;
        let xcrs = vcpu.get_xcrs().ok();
        let debug_regs = vcpu
            .get_debug_regs()
            .map_err(kvm(index, "KVM_GET_DEBUGREGS"))?;
        let lapic = vcpu.get_lapic().map_err(kvm(index, "KVM_GET_LAPIC"))?;
        let msrs = read_msrs(vcpu, index, msr_list)?;
        let cpuid = vcpu
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm(index, "KVM_GET_CPUID2"))?
            .as_slice()
            .to_vec();
        let tsc_khz = vcpu.get_tsc_khz().ok();
        Ok(Self {
            index,
            cpuid,
            msrs,
            regs,
            sregs,
            xsave,
            xcrs,
            debug_regs,
            lapic,
            mp_state,
            vcpu_events,
            tsc_khz,
        })
    }

    /// Sets the state on a fresh vCPU of a VM whose irqchip already exists.
    pub fn restore(&self, vcpu: &VcpuFd) -> Result<(), VcpuStateError> {
        let index = self.index;
        let cpuid = CpuId::from_entries(&self.cpuid).map_err(|_| VcpuStateError::TooMany {
            index,
            what: "CPUID",
            count: self.cpuid.len(),
        })?;
        vcpu.set_cpuid2(&cpuid)
            .map_err(kvm(index, "KVM_SET_CPUID2"))?;
        if let Some(khz) = self.tsc_khz
            && vcpu.get_tsc_khz().ok() != Some(khz)
            && let Err(e) = vcpu.set_tsc_khz(khz)
        {
            // The guest's clocksource then runs at another rate; say so, do not fail.
            tracing::warn!("vCPU {index}: cannot set the TSC to {khz} kHz: {e}");
        }
        vcpu.set_mp_state(self.mp_state)
            .map_err(kvm(index, "KVM_SET_MP_STATE"))?;
        vcpu.set_regs(&self.regs)
            .map_err(kvm(index, "KVM_SET_REGS"))?;
        // Sets the APIC base, which the LAPIC state below needs.
        vcpu.set_sregs(&self.sregs)
            .map_err(kvm(index, "KVM_SET_SREGS"))?;
        // SAFETY: a kvm_xsave of the legacy size read from KVM_GET_XSAVE, no FAM part.
        unsafe { vcpu.set_xsave(&self.xsave) }.map_err(kvm(index, "KVM_SET_XSAVE"))?;
        if let Some(xcrs) = &self.xcrs {
            vcpu.set_xcrs(xcrs).map_err(kvm(index, "KVM_SET_XCRS"))?;
        }
        vcpu.set_debug_regs(&self.debug_regs)
            .map_err(kvm(index, "KVM_SET_DEBUGREGS"))?;
        vcpu.set_lapic(&self.lapic)
            .map_err(kvm(index, "KVM_SET_LAPIC"))?;
        // After the LAPIC: the TSC deadline MSR is only accepted with the timer in that mode.
        for chunk in self.msrs.chunks(MSR_CHUNK) {
            let msrs = Msrs::from_entries(chunk).map_err(|_| VcpuStateError::TooMany {
                index,
                what: "MSR list",
                count: chunk.len(),
            })?;
            let n = vcpu.set_msrs(&msrs).map_err(kvm(index, "KVM_SET_MSRS"))?;
            if n < chunk.len() {
                return Err(VcpuStateError::MsrRefused {
                    index,
                    msr: chunk[n].index,
                });
            }
        }
        vcpu.set_vcpu_events(&self.vcpu_events)
            .map_err(kvm(index, "KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }
}
