//! Ethernet MAC addresses of virtio-net devices.

use std::fmt;
use std::str::FromStr;

/// A unicast Ethernet address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MacAddr([u8; 6]);

/// Why a MAC address was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MacError {
    #[error("{0:?} is not a MAC address (expected six hex pairs like 02:00:00:00:00:01)")]
    Syntax(String),
    #[error("{0} is a multicast address; a NIC needs a unicast one (first octet even)")]
    Multicast(String),
    #[error("00:00:00:00:00:00 is not a usable NIC address")]
    Zero,
}

impl MacAddr {
    /// Bit 1 of the first octet: the address was assigned locally, not by a vendor.
    const LOCALLY_ADMINISTERED: u8 = 0x02;
    /// Bit 0 of the first octet: a group (multicast) address.
    const MULTICAST: u8 = 0x01;

    /// Validates a unicast, non-zero address.
    pub fn new(octets: [u8; 6]) -> Result<Self, MacError> {
        let mac = MacAddr(octets);
        if octets[0] & Self::MULTICAST != 0 {
            return Err(MacError::Multicast(mac.to_string()));
        }
        if octets == [0; 6] {
            return Err(MacError::Zero);
        }
        Ok(mac)
    }

    /// A locally administered unicast address derived from `seed` (the tap name), so the
    /// same configuration always gives the guest the same address.
    pub fn derived(seed: &str) -> Self {
        // FNV-1a: stable across Rust releases, unlike std's hasher.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in seed.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        let b = h.to_be_bytes();
        let first = (b[0] & !Self::MULTICAST) | Self::LOCALLY_ADMINISTERED;
        MacAddr([first, b[1], b[2], b[3], b[4], b[5]])
    }

    pub fn octets(&self) -> [u8; 6] {
        self.0
    }
}

impl FromStr for MacAddr {
    type Err = MacError;

    fn from_str(s: &str) -> Result<Self, MacError> {
        let syntax = || MacError::Syntax(s.to_string());
        let mut octets = [0u8; 6];
        let mut parts = s.split(':');
        for o in &mut octets {
            let p = parts.next().ok_or_else(syntax)?;
            if p.len() != 2 || !p.bytes().all(|c| c.is_ascii_hexdigit()) {
                return Err(syntax());
            }
            *o = u8::from_str_radix(p, 16).map_err(|_| syntax())?;
        }
        if parts.next().is_some() {
            return Err(syntax());
        }
        MacAddr::new(octets)
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let o = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            o[0], o[1], o[2], o[3], o[4], o[5]
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        let m: MacAddr = "02:AB:cd:00:10:ff".parse().unwrap();
        assert_eq!(m.octets(), [0x02, 0xab, 0xcd, 0x00, 0x10, 0xff]);
        assert_eq!(m.to_string(), "02:ab:cd:00:10:ff");
    }

    #[test]
    fn refuses_bad_addresses() {
        for bad in [
            "",
            "02:00:00:00:00",
            "02:00:00:00:00:01:02",
            "02-00-00-00-00-01",
            "2:00:00:00:00:01",
            "02:00:00:00:00:0g",
            "02:00:00:00:00:+1",
            "020:0:00:00:00:01",
        ] {
            assert!(
                matches!(bad.parse::<MacAddr>(), Err(MacError::Syntax(_))),
                "{bad}"
            );
        }
        assert_eq!(
            "01:00:5e:00:00:01".parse::<MacAddr>(),
            Err(MacError::Multicast("01:00:5e:00:00:01".into()))
        );
        assert_eq!("00:00:00:00:00:00".parse::<MacAddr>(), Err(MacError::Zero));
    }

    #[test]
    fn derived_is_stable_local_unicast_and_differs_by_seed() {
        let a = MacAddr::derived("tap0");
        assert_eq!(a, MacAddr::derived("tap0"));
        assert_ne!(a, MacAddr::derived("tap1"));
        for seed in ["", "tap0", "tap1", "a-very-long-n"] {
            let o = MacAddr::derived(seed).octets();
            assert_eq!(o[0] & 0x03, 0x02, "{seed}: local, unicast");
            assert!(MacAddr::new(o).is_ok());
        }
    }
}
