//! Facts about the guest for `GetGuestDetails`.

use std::io;

use husk_protocol::agent::GetGuestDetailsResponse;

use crate::init::{InitError, read_small};

#[derive(Debug, thiserror::Error)]
pub enum DetailsError {
    #[error("{what}: {source}")]
    Os {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Read(#[from] InitError),
    #[error("/sys/devices/system/cpu/online: malformed {0:?}")]
    CpuList(String),
}

pub fn collect() -> Result<GetGuestDetailsResponse, DetailsError> {
    let uname = nix::sys::utsname::uname().map_err(|e| DetailsError::Os {
        what: "uname",
        source: e.into(),
    })?;
    let boot_id = read_small("/proc/sys/kernel/random/boot_id", 64)?;
    let mut details = GetGuestDetailsResponse::new();
    details.kernel_release = uname.release().to_string_lossy().into_owned();
    details.memory_total_bytes = memory_total_bytes()?;
    details.online_cpus = online_cpus()?;
    details.agent_version = crate::VERSION.to_owned();
    details.boot_id = boot_id.trim().to_owned();
    details.uptime_ns = uptime_ns()?;
    details.random_uuid = read_small("/proc/sys/kernel/random/uuid", 64)?
        .trim()
        .to_owned();
    details.realtime_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64);
    Ok(details)
}

/// MemTotal in bytes, from sysinfo(2) (the same counter /proc/meminfo prints, without
/// parsing text).
fn memory_total_bytes() -> Result<u64, DetailsError> {
    let info = nix::sys::sysinfo::sysinfo().map_err(|e| DetailsError::Os {
        what: "sysinfo",
        source: e.into(),
    })?;
    Ok(info.ram_total())
}

fn online_cpus() -> Result<u32, DetailsError> {
    let list = read_small("/sys/devices/system/cpu/online", 4096)?;
    count_cpu_list(&list)
        .ok_or_else(|| DetailsError::CpuList(list.trim().chars().take(64).collect()))
}

/// Counts a kernel CPU list such as `0-3,5,7-8`.
fn count_cpu_list(list: &str) -> Option<u32> {
    // Far above any real NR_CPUS; keeps a hostile list from overflowing the count.
    const MAX_CPU: u32 = 1 << 16;
    let list = list.trim();
    if list.is_empty() {
        return None;
    }
    let mut count: u32 = 0;
    for part in list.split(',') {
        let (lo, hi) = match part.split_once('-') {
            Some((lo, hi)) => (lo.parse::<u32>().ok()?, hi.parse::<u32>().ok()?),
            None => {
                let cpu = part.parse::<u32>().ok()?;
                (cpu, cpu)
            }
        };
        if lo > hi || hi >= MAX_CPU {
            return None;
        }
        count = count.checked_add(hi - lo + 1)?;
    }
    (count <= MAX_CPU).then_some(count)
}

fn uptime_ns() -> Result<u64, DetailsError> {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME).map_err(|e| {
        DetailsError::Os {
            what: "clock_gettime(CLOCK_BOOTTIME)",
            source: e.into(),
        }
    })?;
    let secs = u64::try_from(ts.tv_sec()).unwrap_or(0);
    let nanos = u64::try_from(ts.tv_nsec()).unwrap_or(0);
    Ok(secs.saturating_mul(1_000_000_000).saturating_add(nanos))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        assert_eq!(count_cpu_list("0\n"), Some(1));
        assert_eq!(count_cpu_list("0-1\n"), Some(2));
        assert_eq!(count_cpu_list("0-3,5,7-8"), Some(7));
        for bad in [
            "",
            "\n",
            "a",
            "3-1",
            "0-",
            "-1",
            "0,,1",
            "0-4294967295",
            "99999999999",
        ] {
            assert_eq!(count_cpu_list(bad), None, "{bad:?}");
        }
    }
}
