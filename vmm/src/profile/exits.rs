//! Counting the KVM exits that reach the VMM, per reason and per I/O port or MMIO address,
//! and naming those addresses after the devices of husk's layout.

use std::collections::HashMap;
use std::fmt::Write as _;

use kvm_ioctls::VcpuExit;

use crate::arch::x86_64::layout;

/// One kind of exit, with the port or address for I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ExitKey {
    PioIn(u16),
    PioOut(u16),
    MmioRead(u64),
    MmioWrite(u64),
    /// Every other exit, by KVM's name for it.
    Other(&'static str),
}

/// KVM_RUN returned EINTR: a kick (the sampler's or a pause request's).
pub const KICK: ExitKey = ExitKey::Other("intr (signal kick)");

impl ExitKey {
    pub fn of(exit: &VcpuExit<'_>) -> Self {
        match exit {
            VcpuExit::IoIn(port, _) => Self::PioIn(*port),
            VcpuExit::IoOut(port, _) => Self::PioOut(*port),
            VcpuExit::MmioRead(addr, _) => Self::MmioRead(*addr),
            VcpuExit::MmioWrite(addr, _) => Self::MmioWrite(*addr),
            VcpuExit::Hlt => Self::Other("hlt"),
            VcpuExit::Shutdown => Self::Other("shutdown"),
            VcpuExit::SystemEvent(..) => Self::Other("system_event"),
            VcpuExit::FailEntry(..) => Self::Other("fail_entry"),
            VcpuExit::InternalError => Self::Other("internal_error"),
            VcpuExit::IrqWindowOpen => Self::Other("irq_window_open"),
            VcpuExit::Intr => Self::Other("intr"),
            VcpuExit::Hypercall(_) => Self::Other("hypercall"),
            VcpuExit::X86Rdmsr(_) => Self::Other("x86_rdmsr"),
            VcpuExit::X86Wrmsr(_) => Self::Other("x86_wrmsr"),
            VcpuExit::IoapicEoi(_) => Self::Other("ioapic_eoi"),
            VcpuExit::Debug(_) => Self::Other("debug"),
            VcpuExit::Exception => Self::Other("exception"),
            VcpuExit::Unknown => Self::Other("unknown"),
            _ => Self::Other("other"),
        }
    }

    /// The exit reason, without the address.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::PioIn(_) => "io_in",
            Self::PioOut(_) => "io_out",
            Self::MmioRead(_) => "mmio_read",
            Self::MmioWrite(_) => "mmio_write",
            Self::Other(name) => name,
        }
    }

    fn address(&self) -> Option<u64> {
        match *self {
            Self::PioIn(p) | Self::PioOut(p) => Some(u64::from(p)),
            Self::MmioRead(a) | Self::MmioWrite(a) => Some(a),
            Self::Other(_) => None,
        }
    }
}

/// Exit counts of one vCPU (or, merged, of the VM).
#[derive(Debug, Default, Clone)]
pub struct ExitCounts {
    counts: HashMap<ExitKey, u64>,
}

impl ExitCounts {
    pub fn add(&mut self, key: ExitKey) {
        *self.counts.entry(key).or_insert(0) += 1;
    }

    pub fn merge(&mut self, other: &ExitCounts) {
        for (k, n) in &other.counts {
            *self.counts.entry(*k).or_insert(0) += n;
        }
    }

    pub fn total(&self) -> u64 {
        self.counts.values().sum()
    }

    pub fn get(&self, key: ExitKey) -> u64 {
        self.counts.get(&key).copied().unwrap_or(0)
    }

    /// Counts per reason, largest first.
    pub fn by_reason(&self) -> Vec<(&'static str, u64)> {
        let mut m: HashMap<&'static str, u64> = HashMap::new();
        for (k, n) in &self.counts {
            *m.entry(k.reason()).or_insert(0) += n;
        }
        let mut v: Vec<_> = m.into_iter().collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        v
    }

    /// Port and MMIO exits per address, largest first.
    pub fn by_address(&self) -> Vec<(ExitKey, u64)> {
        let mut v: Vec<_> = self
            .counts
            .iter()
            .filter(|(k, _)| k.address().is_some())
            .map(|(k, n)| (*k, *n))
            .collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        v
    }

    /// The text tables: per reason (with a rate over `seconds`), then per address, naming
    /// virtio slots after `slot_names`.
    pub fn render(&self, seconds: f64, slot_names: &[String]) -> String {
        let mut out = String::new();
        let total = self.total();
        let rate = |n: u64| {
            if seconds > 0.0 {
                n as f64 / seconds
            } else {
                0.0
            }
        };
        let _ = writeln!(
            out,
            "## exits to the VMM by reason ({total} in {seconds:.1} s)"
        );
        let _ = writeln!(
            out,
            "{:<22} {:>10} {:>7} {:>10}",
            "reason", "count", "%", "per s"
        );
        for (reason, n) in self.by_reason() {
            let _ = writeln!(
                out,
                "{reason:<22} {n:>10} {:>6.1}% {:>10.1}",
                percent(n, total),
                rate(n)
            );
        }
        let _ = writeln!(out, "\n## port I/O and MMIO exits by address");
        let _ = writeln!(
            out,
            "{:<11} {:>12} {:>10} {:>7}  what",
            "kind", "address", "count", "%"
        );
        for (key, n) in self.by_address() {
            let addr = key.address().unwrap_or(0);
            let _ = writeln!(
                out,
                "{:<11} {:>#12x} {n:>10} {:>6.1}%  {}",
                key.reason(),
                addr,
                percent(n, total),
                describe(key, slot_names)
            );
        }
        out
    }
}

fn percent(n: u64, total: u64) -> f64 {
    if total == 0 {
        0.0
    } else {
        100.0 * n as f64 / total as f64
    }
}

/// Register names of the virtio-mmio transport (virtio 1.2, 4.2.2).
fn virtio_register(offset: u64) -> String {
    let name = match offset {
        0x000 => "MagicValue",
        0x004 => "Version",
        0x008 => "DeviceID",
        0x00c => "VendorID",
        0x010 => "DeviceFeatures",
        0x014 => "DeviceFeaturesSel",
        0x020 => "DriverFeatures",
        0x024 => "DriverFeaturesSel",
        0x030 => "QueueSel",
        0x034 => "QueueNumMax",
        0x038 => "QueueNum",
        0x044 => "QueueReady",
        0x050 => "QueueNotify",
        0x060 => "InterruptStatus",
        0x064 => "InterruptACK",
        0x070 => "Status",
        0x080 => "QueueDescLow",
        0x084 => "QueueDescHigh",
        0x090 => "QueueDriverLow",
        0x094 => "QueueDriverHigh",
        0x0a0 => "QueueDeviceLow",
        0x0a4 => "QueueDeviceHigh",
        0x0ac => "SHMSel",
        0x0b0..=0x0bc => "SHM registers",
        0x0c0 => "QueueReset",
        0x0fc => "ConfigGeneration",
        o if o >= 0x100 => return format!("config space +{:#x}", o - 0x100),
        _ => "reserved",
    };
    name.to_string()
}

/// What sits at a port or MMIO address in husk's layout.
pub fn describe(key: ExitKey, slot_names: &[String]) -> String {
    match key {
        ExitKey::PioIn(p) | ExitKey::PioOut(p) => {
            let p = u64::from(p);
            if (layout::SERIAL_PORT..layout::SERIAL_PORT + layout::SERIAL_PORT_LEN).contains(&p) {
                format!("serial COM1 +{}", p - layout::SERIAL_PORT)
            } else if (layout::I8042_PORT..layout::I8042_PORT + layout::I8042_PORT_LEN).contains(&p)
            {
                "i8042".into()
            } else {
                match p {
                    0x20 | 0x21 | 0xa0 | 0xa1 => "8259 PIC (in-kernel irqchip)".into(),
                    0x40..=0x43 => "8254 PIT (in-kernel)".into(),
                    0x70 | 0x71 => "CMOS/RTC (none)".into(),
                    0x80 => "POST/delay port (ignored)".into(),
                    0x2f8..=0x2ff | 0x3e8..=0x3ef | 0x2e8..=0x2ef => {
                        "serial COM2-4 probe (none)".into()
                    }
                    0xcf8..=0xcff => "PCI config (none)".into(),
                    _ => "unclaimed".into(),
                }
            }
        }
        ExitKey::MmioRead(a) | ExitKey::MmioWrite(a) => {
            if (layout::BOOT_TIMER_ADDR..layout::BOOT_TIMER_ADDR + layout::BOOT_TIMER_SIZE)
                .contains(&a)
            {
                return "boot timer".into();
            }
            if a >= layout::VIRTIO_MMIO_BASE {
                let slot = (a - layout::VIRTIO_MMIO_BASE) / layout::VIRTIO_MMIO_SIZE;
                if slot < layout::MAX_VIRTIO_DEVICES as u64 {
                    let offset = (a - layout::VIRTIO_MMIO_BASE) % layout::VIRTIO_MMIO_SIZE;
                    let name = slot_names
                        .get(slot as usize)
                        .map_or("no device", String::as_str);
                    return format!("virtio slot {slot} ({name}) {}", virtio_register(offset));
                }
            }
            if (layout::IOAPIC_ADDR..layout::IOAPIC_ADDR + 0x1000).contains(&a) {
                return "IOAPIC".into();
            }
            if (layout::LAPIC_ADDR..layout::LAPIC_ADDR + 0x1000).contains(&a) {
                return "local APIC".into();
            }
            "unclaimed".into()
        }
        ExitKey::Other(_) => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_exits() {
        let mut data = [0u8; 4];
        assert_eq!(
            ExitKey::of(&VcpuExit::IoIn(0x3fd, &mut data)),
            ExitKey::PioIn(0x3fd)
        );
        assert_eq!(
            ExitKey::of(&VcpuExit::IoOut(0x80, &data)),
            ExitKey::PioOut(0x80)
        );
        assert_eq!(
            ExitKey::of(&VcpuExit::MmioWrite(0xd000_1050, &data)),
            ExitKey::MmioWrite(0xd000_1050)
        );
        assert_eq!(
            ExitKey::of(&VcpuExit::MmioRead(0xd000_0000, &mut data)),
            ExitKey::MmioRead(0xd000_0000)
        );
        assert_eq!(ExitKey::of(&VcpuExit::Hlt), ExitKey::Other("hlt"));
        assert_eq!(ExitKey::of(&VcpuExit::Intr).reason(), "intr");
        assert_eq!(ExitKey::MmioWrite(1).reason(), "mmio_write");
    }

    #[test]
    fn counts_per_reason_and_address() {
        let mut a = ExitCounts::default();
        for _ in 0..3 {
            a.add(ExitKey::MmioWrite(0xd000_1050));
        }
        a.add(ExitKey::MmioRead(0xd000_1060));
        a.add(ExitKey::PioOut(0x3f8));
        a.add(KICK);
        let mut b = ExitCounts::default();
        b.add(ExitKey::PioOut(0x3f8));
        b.add(ExitKey::PioOut(0x3f8));
        a.merge(&b);
        assert_eq!(a.total(), 8);
        assert_eq!(a.get(ExitKey::PioOut(0x3f8)), 3);
        assert_eq!(
            a.by_reason(),
            vec![
                ("io_out", 3),
                ("mmio_write", 3),
                ("intr (signal kick)", 1),
                ("mmio_read", 1)
            ]
        );
        let by_addr = a.by_address();
        assert_eq!(by_addr.len(), 3, "kicks have no address");
        assert_eq!(by_addr[0].1, 3);
        assert_eq!(by_addr[2], (ExitKey::MmioRead(0xd000_1060), 1));
    }

    #[test]
    fn addresses_are_named_after_the_layout() {
        let names = vec!["vsock".to_string(), "rng".to_string()];
        let d = |k| describe(k, &names);
        assert_eq!(d(ExitKey::PioOut(0x3f8)), "serial COM1 +0");
        assert_eq!(d(ExitKey::PioIn(0x3fd)), "serial COM1 +5");
        assert_eq!(d(ExitKey::PioOut(0x64)), "i8042");
        assert_eq!(d(ExitKey::PioOut(0x80)), "POST/delay port (ignored)");
        assert_eq!(d(ExitKey::PioIn(0x1234)), "unclaimed");
        assert_eq!(d(ExitKey::MmioWrite(0xd000_0000)), "boot timer");
        assert_eq!(
            d(ExitKey::MmioWrite(0xd000_1050)),
            "virtio slot 0 (vsock) QueueNotify"
        );
        assert_eq!(
            d(ExitKey::MmioRead(0xd000_2060)),
            "virtio slot 1 (rng) InterruptStatus"
        );
        assert_eq!(
            d(ExitKey::MmioRead(0xd000_3104)),
            "virtio slot 2 (no device) config space +0x4"
        );
        assert_eq!(d(ExitKey::MmioRead(0xfee0_0030)), "local APIC");
        assert_eq!(d(ExitKey::MmioRead(0x1000)), "unclaimed");
    }

    #[test]
    fn renders_both_tables() {
        let mut c = ExitCounts::default();
        c.add(ExitKey::MmioWrite(0xd000_1050));
        c.add(ExitKey::PioOut(0x3f8));
        c.add(KICK);
        let text = c.render(2.0, &["vsock".to_string()]);
        assert!(
            text.contains("## exits to the VMM by reason (3 in 2.0 s)"),
            "{text}"
        );
        assert!(text.contains("mmio_write"), "{text}");
        assert!(text.contains("0xd0001050"), "{text}");
        assert!(text.contains("virtio slot 0 (vsock) QueueNotify"), "{text}");
        assert!(text.contains("serial COM1 +0"), "{text}");
        assert!(text.contains("0.5"), "rate per second: {text}");
    }
}
