//! cgroup v2 statistics: parsers for the kernel's flat-keyed and nested-keyed files.

use std::collections::BTreeMap;
use std::io;
use std::path::Path;

use super::{CgroupError, Result};

/// `cpu.stat`. The usage fields exist without the cpu controller; throttling needs it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CpuStats {
    pub usage_usec: u64,
    pub user_usec: u64,
    pub system_usec: u64,
    pub nr_periods: u64,
    pub nr_throttled: u64,
    pub throttled_usec: u64,
}

/// `memory.events` counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemoryEvents {
    pub low: u64,
    pub high: u64,
    pub max: u64,
    pub oom: u64,
    pub oom_kill: u64,
}

/// Memory controller statistics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemoryStats {
    /// `memory.current`, bytes.
    pub usage: u64,
    /// `memory.max`; `None` is "max".
    pub limit: Option<u64>,
    /// `memory.swap.current`, if the kernel accounts swap.
    pub swap_usage: Option<u64>,
    /// `memory.swap.max`; `None` is "max" or no swap accounting.
    pub swap_limit: Option<u64>,
    /// `memory.stat`, all keys (anon, file, kernel_stack, shmem, pgfault, ...).
    pub stat: BTreeMap<String, u64>,
    pub events: MemoryEvents,
}

impl MemoryStats {
    /// A `memory.stat` key, 0 when absent.
    pub fn stat(&self, key: &str) -> u64 {
        self.stat.get(key).copied().unwrap_or(0)
    }
}

/// `pids.current` / `pids.max`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PidsStats {
    pub current: u64,
    /// `None` is "max".
    pub limit: Option<u64>,
}

/// One device line of `io.stat`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IoDeviceStats {
    pub major: u64,
    pub minor: u64,
    pub rbytes: u64,
    pub wbytes: u64,
    pub rios: u64,
    pub wios: u64,
    pub dbytes: u64,
    pub dios: u64,
}

/// Statistics of a cgroup; a controller that is absent leaves its part `None` (or empty).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub cpu: Option<CpuStats>,
    pub memory: Option<MemoryStats>,
    pub pids: Option<PidsStats>,
    pub io: Vec<IoDeviceStats>,
}

/// Parses a flat-keyed file (`key value` per line); malformed lines are skipped.
pub fn parse_flat(text: &str) -> BTreeMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let k = it.next()?;
            let v = it.next()?.parse().ok()?;
            Some((k.to_string(), v))
        })
        .collect()
}

/// The value of `key` in a flat-keyed file, as text.
pub(crate) fn flat_value(text: &str, key: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        (it.next()? == key).then(|| it.next().map(str::to_string))?
    })
}

/// Parses a single value file: a number, or "max" (`None`).
pub fn parse_limit(text: &str) -> Option<u64> {
    text.trim().parse().ok()
}

pub fn parse_cpu_stat(text: &str) -> CpuStats {
    let m = parse_flat(text);
    let g = |k: &str| m.get(k).copied().unwrap_or(0);
    CpuStats {
        usage_usec: g("usage_usec"),
        user_usec: g("user_usec"),
        system_usec: g("system_usec"),
        nr_periods: g("nr_periods"),
        nr_throttled: g("nr_throttled"),
        throttled_usec: g("throttled_usec"),
    }
}

pub fn parse_memory_events(text: &str) -> MemoryEvents {
    let m = parse_flat(text);
    let g = |k: &str| m.get(k).copied().unwrap_or(0);
    MemoryEvents {
        low: g("low"),
        high: g("high"),
        max: g("max"),
        oom: g("oom"),
        oom_kill: g("oom_kill"),
    }
}

/// Parses `io.stat` (`MAJ:MIN key=value ...` per line); malformed parts are skipped.
pub fn parse_io_stat(text: &str) -> Vec<IoDeviceStats> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let (maj, min) = it.next()?.split_once(':')?;
            let mut d = IoDeviceStats {
                major: maj.parse().ok()?,
                minor: min.parse().ok()?,
                ..Default::default()
            };
            for kv in it {
                let Some((k, v)) = kv.split_once('=') else {
                    continue;
                };
                let Ok(v) = v.parse() else { continue };
                match k {
                    "rbytes" => d.rbytes = v,
                    "wbytes" => d.wbytes = v,
                    "rios" => d.rios = v,
                    "wios" => d.wios = v,
                    "dbytes" => d.dbytes = v,
                    "dios" => d.dios = v,
                    _ => {}
                }
            }
            Some(d)
        })
        .collect()
}

/// Reads a file that may be absent (controller not enabled).
fn read_opt(path: &Path) -> Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(CgroupError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

pub(crate) fn read_stats(dir: &Path) -> Result<Stats> {
    let f = |name: &str| read_opt(&dir.join(name));
    let cpu = f("cpu.stat")?.map(|t| parse_cpu_stat(&t));
    let memory = match f("memory.current")? {
        None => None,
        Some(current) => Some(MemoryStats {
            usage: parse_limit(&current).unwrap_or(0),
            limit: f("memory.max")?.and_then(|t| parse_limit(&t)),
            swap_usage: f("memory.swap.current")?.and_then(|t| parse_limit(&t)),
            swap_limit: f("memory.swap.max")?.and_then(|t| parse_limit(&t)),
            stat: f("memory.stat")?
                .map(|t| parse_flat(&t))
                .unwrap_or_default(),
            events: f("memory.events")?
                .map(|t| parse_memory_events(&t))
                .unwrap_or_default(),
        }),
    };
    let pids = match f("pids.current")? {
        None => None,
        Some(current) => Some(PidsStats {
            current: parse_limit(&current).unwrap_or(0),
            limit: f("pids.max")?.and_then(|t| parse_limit(&t)),
        }),
    };
    let io = f("io.stat")?.map(|t| parse_io_stat(&t)).unwrap_or_default();
    Ok(Stats {
        cpu,
        memory,
        pids,
        io,
    })
}
