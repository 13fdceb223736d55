//! CPUID as the guest sees it: KVM's supported set, with the per-vCPU topology filled in,
//! the hypervisor bit set, features KVM cannot virtualise removed, and whatever the CPU
//! template masks on top.

use kvm_bindings::kvm_cpuid_entry2;

/// One CPUID feature bit, named by leaf/subleaf/register/bit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeatureBit {
    pub leaf: u32,
    pub subleaf: u32,
    pub reg: Reg,
    pub bit: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reg {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

const fn bit(leaf: u32, reg: Reg, bit: u8) -> FeatureBit {
    FeatureBit {
        leaf,
        subleaf: 0,
        reg,
        bit,
    }
}

/// Leaf 1 ECX: MONITOR/MWAIT are not virtualised by KVM.
pub const MONITOR: FeatureBit = bit(1, Reg::Ecx, 3);
/// Leaf 1 ECX: perfmon/debug capability MSR; the guest gets no PMU.
pub const PDCM: FeatureBit = bit(1, Reg::Ecx, 15);
pub const HYPERVISOR: FeatureBit = bit(1, Reg::Ecx, 31);
pub const HTT: FeatureBit = bit(1, Reg::Edx, 28);

pub const CX16: FeatureBit = bit(1, Reg::Ecx, 13);
pub const MOVBE: FeatureBit = bit(1, Reg::Ecx, 22);
pub const POPCNT: FeatureBit = bit(1, Reg::Ecx, 23);
pub const XSAVE: FeatureBit = bit(1, Reg::Ecx, 26);
pub const OSXSAVE: FeatureBit = bit(1, Reg::Ecx, 27);
pub const AVX: FeatureBit = bit(1, Reg::Ecx, 28);
pub const RDRAND: FeatureBit = bit(1, Reg::Ecx, 30);
pub const BMI1: FeatureBit = bit(7, Reg::Ebx, 3);
pub const AVX2: FeatureBit = bit(7, Reg::Ebx, 5);
pub const BMI2: FeatureBit = bit(7, Reg::Ebx, 8);
pub const ERMS: FeatureBit = bit(7, Reg::Ebx, 9);
pub const AVX512F: FeatureBit = bit(7, Reg::Ebx, 16);
pub const RDSEED: FeatureBit = bit(7, Reg::Ebx, 18);
pub const SMAP: FeatureBit = bit(7, Reg::Ebx, 20);
pub const FSRM: FeatureBit = bit(7, Reg::Edx, 4);

fn reg_mut(e: &mut kvm_cpuid_entry2, reg: Reg) -> &mut u32 {
    match reg {
        Reg::Eax => &mut e.eax,
        Reg::Ebx => &mut e.ebx,
        Reg::Ecx => &mut e.ecx,
        Reg::Edx => &mut e.edx,
    }
}

fn matches(e: &kvm_cpuid_entry2, f: &FeatureBit) -> bool {
    e.function == f.leaf && e.index == f.subleaf
}

/// Clears every bit in `features` in the entries that carry it.
pub fn clear_features(entries: &mut [kvm_cpuid_entry2], features: &[FeatureBit]) {
    for e in entries.iter_mut() {
        for f in features {
            if matches(e, f) {
                *reg_mut(e, f.reg) &= !(1u32 << f.bit);
            }
        }
    }
}

fn set_feature(entries: &mut [kvm_cpuid_entry2], f: FeatureBit, on: bool) {
    for e in entries.iter_mut().filter(|e| matches(e, &f)) {
        let r = reg_mut(e, f.reg);
        if on {
            *r |= 1 << f.bit;
        } else {
            *r &= !(1 << f.bit);
        }
    }
}

/// Number of bits needed to hold `n` distinct ids.
fn id_bits(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// Fills in what every vCPU must see whatever the template: its APIC id, a topology of
/// `count` single-threaded cores in one package, the hypervisor bit, and no
/// MONITOR/PDCM. Leaves 6 (power management) and 0xa (performance monitoring) are
/// zeroed: the guest gets neither.
pub fn normalize(entries: &mut [kvm_cpuid_entry2], apic_id: u8, count: u8) {
    let id = u32::from(apic_id);
    let count = u32::from(count.max(1));
    let core_bits = id_bits(count);
    clear_features(entries, &[MONITOR, PDCM]);
    set_feature(entries, HYPERVISOR, true);
    set_feature(entries, HTT, count > 1);
    for e in entries.iter_mut() {
        match e.function {
            1 => {
                // EBX: [31:24] initial APIC id, [23:16] logical processors per package,
                // [15:8] CLFLUSH line size (kept).
                e.ebx = (e.ebx & 0x0000_ffff) | (id << 24) | (count << 16);
            }
            4 => {
                // EAX [31:26]: cores per package - 1; [25:14]: threads sharing the cache
                // - 1 (only a level-3 cache is shared by every core).
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level == 3 { count - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | ((count - 1) << 26) | (sharing << 14);
            }
            6 | 0xa => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            0xb | 0x1f => {
                // Extended topology: subleaf 0 = SMT level (1 thread per core), subleaf 1
                // = core level (`count` cores), then an invalid level.
                e.edx = id;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 1 << 8;
                    }
                    1 => {
                        e.eax = core_bits;
                        e.ebx = count;
                        e.ecx = (2 << 8) | 1;
                    }
                    n => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = n & 0xff;
                    }
                }
            }
            0x8000_001e => {
                // AMD extended APIC id, core id with one thread per core, node 0 of 1:
                // the host's values would make every vCPU a sibling of the same core.
                e.eax = id;
                e.ebx = id & 0xff;
                e.ecx = 0;
                e.edx = 0;
            }
            0x8000_0008 => {
                // AMD: ECX [7:0] cores - 1, [15:12] APIC id bits.
                e.ecx = (e.ecx & !0xf0ff) | (count - 1) | (core_bits << 12);
            }
            _ => {}
        }
    }
}

/// Reads a feature bit back (tests and logging).
pub fn has_feature(entries: &[kvm_cpuid_entry2], f: FeatureBit) -> bool {
    entries.iter().any(|e| {
        matches(e, &f)
            && match f.reg {
                Reg::Eax => e.eax,
                Reg::Ebx => e.ebx,
                Reg::Ecx => e.ecx,
                Reg::Edx => e.edx,
            } & (1 << f.bit)
                != 0
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn entry(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            flags: 0,
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
            ..Default::default()
        }
    }

    /// A host-like CPUID with everything on.
    pub(crate) fn synthetic() -> Vec<kvm_cpuid_entry2> {
        vec![
            entry(0, 0, [0x1f, 0, 0, 0]),
            entry(1, 0, [0x906ea, 0x00ff_0800, u32::MAX, u32::MAX]),
            entry(4, 0, [0x121, 0, 0, 0]),
            entry(4, 3, [0x163, 0, 0, 0]),
            entry(6, 0, [7, 2, 9, 0]),
            entry(7, 0, [0, u32::MAX, 0, u32::MAX]),
            entry(0xb, 0, [1, 2, 0x100, 9]),
            entry(0xb, 1, [4, 8, 0x201, 9]),
            entry(0xb, 2, [0, 0, 2, 9]),
            entry(0x8000_001e, 0, [9, 0x0103, 0x0101, 7]),
        ]
    }

    #[test]
    fn normalize_sets_apic_id_and_topology_per_vcpu() {
        for (id, count) in [(0u8, 1u8), (2, 4), (5, 8)] {
            let mut c = synthetic();
            normalize(&mut c, id, count);
            assert_eq!(c[1].ebx >> 24, u32::from(id));
            assert_eq!((c[1].ebx >> 16) & 0xff, u32::from(count));
            assert_eq!(c[1].ebx & 0xffff, 0x0800, "CLFLUSH size kept");
            assert!(has_feature(&c, HYPERVISOR));
            assert!(!has_feature(&c, MONITOR));
            assert!(!has_feature(&c, PDCM));
            assert_eq!(has_feature(&c, HTT), count > 1);
            assert_eq!(c[2].eax >> 26, u32::from(count) - 1);
            assert_eq!((c[3].eax >> 14) & 0xfff, u32::from(count) - 1, "L3 shared");
            assert_eq!((c[2].eax >> 14) & 0xfff, 0, "L1 private");
            assert_eq!([c[4].eax, c[4].ebx, c[4].ecx], [0, 0, 0], "leaf 6 cleared");
            for sub in &c[6..9] {
                assert_eq!(sub.edx, u32::from(id), "x2APIC id in leaf 0xb");
            }
            assert_eq!(c[7].ebx, u32::from(count));
            assert_eq!(c[7].ecx, 0x201);
            assert_eq!(c[8].ecx, 2);
            let ext = c[9];
            assert_eq!(
                [ext.eax, ext.ebx, ext.ecx, ext.edx],
                [u32::from(id), u32::from(id), 0, 0]
            );
        }
    }

    #[test]
    fn id_bits_rounds_up() {
        assert_eq!([1, 2, 3, 4, 5, 8].map(id_bits), [0, 1, 2, 2, 3, 3]);
    }

    #[test]
    fn clear_features_touches_only_the_named_bits() {
        let mut c = synthetic();
        clear_features(&mut c, &[POPCNT, XSAVE, BMI2, FSRM]);
        assert_eq!(c[1].ecx, !((1 << 23) | (1 << 26)));
        assert_eq!(c[5].ebx, !(1 << 8));
        assert_eq!(c[5].edx, !(1 << 4));
        assert_eq!(c[1].edx, u32::MAX);
    }
}
