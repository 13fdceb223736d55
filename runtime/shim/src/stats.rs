//! The guest's cgroup v2 statistics (agent `StatsContainer`) as containerd's
//! `io.containerd.cgroups.v2.Metrics`, the type `ctr task metrics` and the CRI plugin decode.

use containerd_shim_protos::cgroups_v2::metrics::{
    CPUStat, IOEntry, IOStat, MemoryEvents, MemoryStat, Metrics, PidsStat,
};
use husk_protocol::agent::StatsContainerResponse;

pub fn to_metrics(s: &StatsContainerResponse) -> Metrics {
    let mut m = Metrics::new();
    if let Some(p) = s.pids.as_ref() {
        m.pids = Some(PidsStat {
            current: p.current,
            limit: p.limit,
            ..Default::default()
        })
        .into();
    }
    if let Some(c) = s.cpu.as_ref() {
        m.cpu = Some(CPUStat {
            usage_usec: c.usage_usec,
            user_usec: c.user_usec,
            system_usec: c.system_usec,
            nr_periods: c.nr_periods,
            nr_throttled: c.nr_throttled,
            throttled_usec: c.throttled_usec,
            ..Default::default()
        })
        .into();
    }
    if let Some(mem) = s.memory.as_ref() {
        let stat = |key: &str| mem.stat.get(key).copied().unwrap_or_default();
        m.memory = Some(MemoryStat {
            anon: stat("anon"),
            file: stat("file"),
            kernel_stack: stat("kernel_stack"),
            slab: stat("slab"),
            sock: stat("sock"),
            shmem: stat("shmem"),
            file_mapped: stat("file_mapped"),
            file_dirty: stat("file_dirty"),
            file_writeback: stat("file_writeback"),
            anon_thp: stat("anon_thp"),
            inactive_anon: stat("inactive_anon"),
            active_anon: stat("active_anon"),
            inactive_file: stat("inactive_file"),
            active_file: stat("active_file"),
            unevictable: stat("unevictable"),
            slab_reclaimable: stat("slab_reclaimable"),
            slab_unreclaimable: stat("slab_unreclaimable"),
            pgfault: stat("pgfault"),
            pgmajfault: stat("pgmajfault"),
            workingset_refault: stat("workingset_refault"),
            workingset_activate: stat("workingset_activate"),
            workingset_nodereclaim: stat("workingset_nodereclaim"),
            pgrefill: stat("pgrefill"),
            pgscan: stat("pgscan"),
            pgsteal: stat("pgsteal"),
            pgactivate: stat("pgactivate"),
            pgdeactivate: stat("pgdeactivate"),
            pglazyfree: stat("pglazyfree"),
            pglazyfreed: stat("pglazyfreed"),
            thp_fault_alloc: stat("thp_fault_alloc"),
            thp_collapse_alloc: stat("thp_collapse_alloc"),
            usage: mem.usage_bytes,
            // containerd reads "no limit" as max u64 (cgroup "max").
            usage_limit: if mem.limit_bytes == 0 {
                u64::MAX
            } else {
                mem.limit_bytes
            },
            swap_usage: mem.swap_usage_bytes,
            swap_limit: if mem.swap_limit_bytes == 0 {
                u64::MAX
            } else {
                mem.swap_limit_bytes
            },
            ..Default::default()
        })
        .into();
        m.memory_events = Some(MemoryEvents {
            oom: mem.oom_events,
            oom_kill: mem.oom_kill_events,
            ..Default::default()
        })
        .into();
    }
    if !s.io.is_empty() {
        m.io = Some(IOStat {
            usage: s
                .io
                .iter()
                .map(|d| IOEntry {
                    major: d.major,
                    minor: d.minor,
                    rbytes: d.read_bytes,
                    wbytes: d.write_bytes,
                    rios: d.read_ios,
                    wios: d.write_ios,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
        .into();
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use husk_protocol::agent::{CpuStats, MemoryStats};

    #[test]
    fn maps_cpu_memory_and_unlimited() {
        let mut s = StatsContainerResponse::new();
        let mut cpu = CpuStats::new();
        cpu.usage_usec = 42;
        s.cpu = Some(cpu).into();
        let mut mem = MemoryStats::new();
        mem.usage_bytes = 4096;
        mem.stat.insert("anon".into(), 1024);
        mem.oom_kill_events = 2;
        s.memory = Some(mem).into();
        let m = to_metrics(&s);
        assert_eq!(m.cpu.usage_usec, 42);
        assert_eq!(m.memory.usage, 4096);
        assert_eq!(m.memory.anon, 1024);
        assert_eq!(m.memory.usage_limit, u64::MAX);
        assert_eq!(m.memory_events.oom_kill, 2);
        assert!(m.pids.is_none() && m.io.is_none());
    }
}
