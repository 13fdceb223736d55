//! CPU templates: what the guest is told about its CPU, and what that implies for the
//! command line and memory size.
//!
//! - `none` (alias `host`): KVM's supported CPUID with only the per-vCPU fix-ups.
//! - `pvm`: for nested PVM hosts, where the guest kernel runs in KVM's instruction
//!   emulator. It masks the features the emulator cannot execute at CPL0 (and a few that
//!   only slow it down), but masking through KVM_SET_CPUID2 has no effect on such a host,
//!   so the same masking is repeated on the guest command line, which does take effect.
//!   Memory is rounded up to 128 MiB (the kernel initialises a whole sparsemem section
//!   anyway).
//! - `auto`: `pvm` on a nested-PVM host, `none` elsewhere.

use std::str::FromStr;

use kvm_bindings::kvm_cpuid_entry2;

use crate::arch::x86_64::cpuid::{self, FeatureBit};
use crate::host::HostKind;

/// The template asked for on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TemplateChoice {
    #[default]
    Auto,
    Pvm,
    None,
}

impl FromStr for TemplateChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "pvm" => Ok(Self::Pvm),
            "none" | "host" => Ok(Self::None),
            other => Err(format!(
                "unknown CPU template '{other}' (expected auto, pvm or none)"
            )),
        }
    }
}

/// The template in effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuTemplate {
    Pvm,
    None,
}

/// Features the PVM emulator cannot execute or that slow it down; the same list as
/// [`PVM_CMDLINE`]'s clearcpuid (plus XSAVE/OSXSAVE, which `noxsave` covers).
const PVM_MASKED: &[FeatureBit] = &[
    cpuid::POPCNT,
    cpuid::CX16,
    cpuid::RDRAND,
    cpuid::MOVBE,
    cpuid::AVX,
    cpuid::XSAVE,
    cpuid::OSXSAVE,
    cpuid::RDSEED,
    cpuid::SMAP,
    cpuid::BMI1,
    cpuid::BMI2,
    cpuid::AVX2,
    cpuid::AVX512F,
    cpuid::ERMS,
    cpuid::FSRM,
];

/// Guest command-line flags of the `pvm` template (see docs/pvm-guest notes: `noxsave`,
/// clearcpuid and `pvm_syscall=pf` are needed for correctness, the rest for speed).
/// GLIBC_TUNABLES reaches the agent (PID 1) as environment and, through it, container
/// processes: guest user mode runs natively with the host's AVX state enabled, which the
/// `noxsave` guest kernel does not switch between tasks (agent `containers::inherited_env`).
pub const PVM_CMDLINE: &str = "noxsave clearcpuid=151,141,158,150,156,306,308,291,296,293,304,297,580 \
     pvm_syscall=pf rodata=off noreplace-smp percpu_alloc=page tsc=reliable slub_nosysfs \
     module_nosysfs_builtin \
     GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX,-AVX2,-AVX512F,-AVX512VL,-AVX512BW,-AVX512DQ,-AVX512CD,-AVX_Fast_Unaligned_Load";

const PVM_MEMORY_GRANULARITY_MIB: u64 = 128;

impl TemplateChoice {
    /// Resolves `auto` against the host.
    pub fn resolve(self, host: HostKind) -> CpuTemplate {
        match (self, host) {
            (Self::Pvm, _) | (Self::Auto, HostKind::NestedPvm) => CpuTemplate::Pvm,
            (Self::None, _) | (Self::Auto, HostKind::Kvm) => CpuTemplate::None,
        }
    }
}

impl CpuTemplate {
    pub fn name(self) -> &'static str {
        match self {
            Self::Pvm => "pvm",
            Self::None => "none",
        }
    }

    /// Extra guest command-line flags.
    pub fn cmdline(self) -> &'static str {
        match self {
            Self::Pvm => PVM_CMDLINE,
            Self::None => "",
        }
    }

    /// Guest memory the template wants for `requested_mib`.
    pub fn memory_mib(self, requested_mib: u64) -> u64 {
        match self {
            Self::Pvm => {
                requested_mib.div_ceil(PVM_MEMORY_GRANULARITY_MIB) * PVM_MEMORY_GRANULARITY_MIB
            }
            Self::None => requested_mib,
        }
    }

    /// Turns KVM's supported CPUID into what vCPU `apic_id` of `count` sees.
    pub fn apply(self, entries: &mut [kvm_cpuid_entry2], apic_id: u8, count: u8) {
        cpuid::normalize(entries, apic_id, count);
        if self == Self::Pvm {
            cpuid::clear_features(entries, PVM_MASKED);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::cpuid::tests::synthetic;
    use crate::arch::x86_64::cpuid::{has_feature, *};

    #[test]
    fn choice_parsing_and_resolution() {
        assert_eq!("auto".parse(), Ok(TemplateChoice::Auto));
        assert_eq!("host".parse(), Ok(TemplateChoice::None));
        assert!(
            "fast"
                .parse::<TemplateChoice>()
                .unwrap_err()
                .contains("'fast'")
        );
        assert_eq!(
            TemplateChoice::Auto.resolve(HostKind::NestedPvm),
            CpuTemplate::Pvm
        );
        assert_eq!(
            TemplateChoice::Auto.resolve(HostKind::Kvm),
            CpuTemplate::None
        );
        assert_eq!(TemplateChoice::Pvm.resolve(HostKind::Kvm), CpuTemplate::Pvm);
        assert_eq!(
            TemplateChoice::None.resolve(HostKind::NestedPvm),
            CpuTemplate::None
        );
    }

    #[test]
    fn pvm_rounds_memory_and_adds_flags() {
        assert_eq!(CpuTemplate::Pvm.memory_mib(64), 128);
        assert_eq!(CpuTemplate::Pvm.memory_mib(128), 128);
        assert_eq!(CpuTemplate::Pvm.memory_mib(129), 256);
        assert_eq!(CpuTemplate::None.memory_mib(100), 100);
        assert!(
            CpuTemplate::Pvm
                .cmdline()
                .starts_with("noxsave clearcpuid=151,")
        );
        assert!(CpuTemplate::Pvm.cmdline().contains("pvm_syscall=pf"));
        assert!(
            CpuTemplate::Pvm
                .cmdline()
                .contains("GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX,-AVX2,-AVX512F"),
            "user space must not use vector state the guest kernel does not switch"
        );
        assert_eq!(CpuTemplate::None.cmdline(), "");
    }

    #[test]
    fn pvm_clears_bits_and_none_keeps_them() {
        let mut pvm = synthetic();
        CpuTemplate::Pvm.apply(&mut pvm, 1, 2);
        for f in [
            POPCNT, CX16, XSAVE, AVX, RDRAND, MOVBE, BMI1, BMI2, AVX2, SMAP, ERMS, FSRM,
        ] {
            assert!(!has_feature(&pvm, f), "{f:?} still set");
        }
        assert!(has_feature(&pvm, HYPERVISOR));
        assert_eq!(pvm[1].ebx >> 24, 1, "APIC id of vCPU 1");

        let mut none = synthetic();
        CpuTemplate::None.apply(&mut none, 0, 1);
        assert!(has_feature(&none, POPCNT));
        assert!(has_feature(&none, AVX2));
        assert!(has_feature(&none, HYPERVISOR));
    }
}
