//! Address-space dispatch for port I/O and MMIO exits.
//!
//! The vCPU thread looks up the device that owns an exit's address and calls it with the
//! offset into that device's range. Devices sit behind a mutex because several vCPUs (and a
//! device's own worker) may touch them.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device reachable through a range of port-I/O or MMIO addresses.
pub trait BusDevice: Send {
    /// Guest reads `data.len()` bytes at `offset` from the start of the device's range.
    /// Bytes the device does not define must be left as zero.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Guest writes `data` at `offset` from the start of the device's range.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Error inserting a device into a [`Bus`].
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("bus range {base:#x}+{len:#x} is empty or overflows the address space")]
    InvalidRange { base: u64, len: u64 },
    #[error("bus range {base:#x}+{len:#x} overlaps a device already at {other:#x}")]
    Overlap { base: u64, len: u64, other: u64 },
}

#[derive(Clone)]
struct BusRange {
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// A set of non-overlapping address ranges, each owned by one device.
#[derive(Clone, Default)]
pub struct Bus {
    ranges: BTreeMap<u64, BusRange>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Places `device` at `[base, base + len)`.
    pub fn insert(
        &mut self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::InvalidRange { base, len })?;
        // The nearest range starting below `end` is the only one that can overlap.
        if let Some((&other, r)) = self.ranges.range(..end).next_back()
            && other + r.len > base
        {
            return Err(BusError::Overlap { base, len, other });
        }
        self.ranges.insert(base, BusRange { len, device });
        Ok(())
    }

    /// The device covering `addr` and the offset of `addr` inside its range.
    pub fn resolve(&self, addr: u64) -> Option<(Arc<Mutex<dyn BusDevice>>, u64)> {
        let (&base, r) = self.ranges.range(..=addr).next_back()?;
        let offset = addr - base;
        (offset < r.len).then(|| (Arc::clone(&r.device), offset))
    }

    /// Dispatches a guest read; returns false when no device owns `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr) {
            Some((dev, offset)) => {
                // A poisoned lock means another vCPU panicked inside the device; the VM is
                // going down anyway, so keep serving with the state as it is.
                dev.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a guest write; returns false when no device owns `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr) {
            Some((dev, offset)) => {
                dev.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(Vec<u8>);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = self.0.get(offset as usize + i).copied().unwrap_or(0);
            }
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            let o = offset as usize;
            if o + data.len() <= self.0.len() {
                self.0[o..o + data.len()].copy_from_slice(data);
            }
        }
    }

    #[test]
    fn dispatch_by_offset_and_reject_overlap() {
        let mut bus = Bus::new();
        let dev = Arc::new(Mutex::new(Echo(vec![0; 16])));
        bus.insert(dev.clone(), 0x100, 16).unwrap();
        assert!(bus.write(0x104, &[7, 8]));
        let mut buf = [0u8; 2];
        assert!(bus.read(0x104, &mut buf));
        assert_eq!(buf, [7, 8]);
        assert!(!bus.read(0x110, &mut buf), "one past the end is unowned");
        assert!(!bus.read(0xff, &mut buf));
        assert!(matches!(
            bus.insert(dev.clone(), 0x10f, 4),
            Err(BusError::Overlap { other: 0x100, .. })
        ));
        assert!(matches!(
            bus.insert(dev.clone(), 0xf0, 0x11),
            Err(BusError::Overlap { .. })
        ));
        bus.insert(dev.clone(), 0xf0, 0x10).unwrap();
        assert!(matches!(
            bus.insert(dev, u64::MAX, 2),
            Err(BusError::InvalidRange { .. })
        ));
    }
}
