//! OCI `LinuxResources` -> cgroup v2 file writes, following runc's conversions.

use std::path::PathBuf;

use oci_spec::runtime::{LinuxBlockIo, LinuxCpu, LinuxMemory, LinuxResources, LinuxThrottleDevice};

use super::{CgroupError, Result};

/// One write to a cgroup file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupWrite {
    /// File name inside the cgroup directory, e.g. `memory.max`.
    pub file: String,
    /// The exact value written.
    pub value: String,
}

/// What applying resources does: the writes, in order, and the settings left out because
/// cgroup v2 (or this kernel) has no equivalent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplyReport {
    pub writes: Vec<CgroupWrite>,
    pub skipped: Vec<String>,
}

impl ApplyReport {
    fn push(&mut self, file: &str, value: impl Into<String>) {
        self.writes.push(CgroupWrite {
            file: file.to_string(),
            value: value.into(),
        });
    }

    /// The last value planned for `file`, if any.
    pub fn value_of(&self, file: &str) -> Option<&str> {
        self.writes
            .iter()
            .rev()
            .find(|w| w.file == file)
            .map(|w| w.value.as_str())
    }
}

impl CgroupError {
    /// Fills in the cgroup directory of a controller-missing error.
    pub(crate) fn at(self, dir: &std::path::Path) -> Self {
        match self {
            CgroupError::ControllerMissing {
                controller,
                setting,
                ..
            } => CgroupError::ControllerMissing {
                controller,
                setting,
                path: dir.to_path_buf(),
            },
            other => other,
        }
    }
}

/// cpu.weight from OCI/cgroup-v1 cpu shares, with runc's current formula: a quadratic in
/// log2(shares) that maps 2 -> 1, 1024 (the v1 default) -> 100 (the v2 default) and
/// 262144 -> 10000. 0 means unset.
pub fn shares_to_weight(shares: u64) -> u64 {
    if shares == 0 {
        return 0;
    }
    if shares <= 2 {
        return 1;
    }
    if shares >= 262_144 {
        return 10_000;
    }
    let l = (shares as f64).log2();
    let exponent = (l * l + 125.0 * l) / 612.0 - 7.0 / 34.0;
    10f64.powf(exponent).ceil() as u64
}

/// io.weight from a v1 blkio weight (10-1000), runc's linear conversion to 1-10000.
fn blkio_weight_to_io_weight(weight: u16) -> u64 {
    if weight == 0 {
        return 0;
    }
    1 + (u64::from(weight).saturating_sub(10)) * 9999 / 990
}

/// runc's numToStr: 0 is unset, -1 (any negative) is "max".
fn limit_str(v: i64) -> Option<String> {
    match v {
        0 => None,
        v if v < 0 => Some("max".to_string()),
        v => Some(v.to_string()),
    }
}

/// memory.swap.max from OCI memory+swap and memory limits (runc's
/// ConvertMemorySwapToCgroupV2Value): v2 limits swap alone, v1 limited memory+swap.
fn swap_v2(swap: i64, memory: i64) -> Result<i64> {
    if memory == -1 && swap == 0 {
        return Ok(-1);
    }
    if swap == -1 || swap == 0 {
        return Ok(swap);
    }
    if memory == 0 || memory == -1 {
        return Err(CgroupError::InvalidResource(
            "memory.swap needs a memory.limit".to_string(),
        ));
    }
    if memory < 0 {
        return Err(CgroupError::InvalidResource(format!(
            "memory.limit {memory} is negative"
        )));
    }
    if swap < memory {
        return Err(CgroupError::InvalidResource(format!(
            "memory.swap {swap} (memory+swap) is smaller than memory.limit {memory}"
        )));
    }
    Ok(swap - memory)
}

struct Planner<'a, F: Fn(&str) -> bool> {
    available: &'a [String],
    exists: F,
    report: ApplyReport,
}

impl<F: Fn(&str) -> bool> Planner<'_, F> {
    fn need(&self, controller: &str, setting: &str) -> Result<()> {
        if self.available.iter().any(|c| c == controller) {
            Ok(())
        } else {
            Err(CgroupError::ControllerMissing {
                controller: controller.to_string(),
                setting: setting.to_string(),
                path: PathBuf::new(),
            })
        }
    }

    fn skip(&mut self, what: impl Into<String>) {
        self.report.skipped.push(what.into());
    }

    fn cpu(&mut self, cpu: &LinuxCpu) -> Result<()> {
        if let Some(shares) = cpu.shares().filter(|&s| s != 0) {
            self.need("cpu", "cpu.shares")?;
            self.report
                .push("cpu.weight", shares_to_weight(shares).to_string());
        }
        let quota = cpu.quota().unwrap_or(0);
        let period = cpu.period().unwrap_or(0);
        if quota != 0 || period != 0 {
            self.need("cpu", "cpu.quota/cpu.period")?;
            let mut v = if quota > 0 {
                quota.to_string()
            } else {
                "max".to_string()
            };
            // Without a period the kernel keeps the current one.
            if period != 0 {
                v.push_str(&format!(" {period}"));
            }
            self.report.push("cpu.max", v);
        }
        if let Some(burst) = cpu.burst() {
            self.need("cpu", "cpu.burst")?;
            self.report.push("cpu.max.burst", burst.to_string());
        }
        if let Some(idle) = cpu.idle() {
            self.need("cpu", "cpu.idle")?;
            self.report.push("cpu.idle", idle.to_string());
        }
        if cpu.realtime_runtime().is_some_and(|v| v != 0)
            || cpu.realtime_period().is_some_and(|v| v != 0)
        {
            return Err(CgroupError::InvalidResource(
                "cpu.realtimeRuntime/realtimePeriod are not supported by cgroup v2".to_string(),
            ));
        }
        if let Some(cpus) = cpu.cpus().as_deref().filter(|s| !s.is_empty()) {
            self.need("cpuset", "cpu.cpus")?;
            self.report.push("cpuset.cpus", cpus);
        }
        if let Some(mems) = cpu.mems().as_deref().filter(|s| !s.is_empty()) {
            self.need("cpuset", "cpu.mems")?;
            self.report.push("cpuset.mems", mems);
        }
        Ok(())
    }

    fn memory(&mut self, m: &LinuxMemory) -> Result<()> {
        let limit = m.limit().unwrap_or(0);
        let swap = swap_v2(m.swap().unwrap_or(0), limit)?;
        let reservation = m.reservation().unwrap_or(0);
        if limit != 0 || swap != 0 || reservation != 0 || m.swap().is_some_and(|s| s > 0) {
            self.need("memory", "memory limits")?;
        }
        let mut swap_str = limit_str(swap);
        // memory+swap equal to memory: no swap at all.
        if swap_str.is_none() && swap == 0 && m.swap().is_some_and(|s| s > 0) {
            swap_str = Some("0".to_string());
        }
        if let Some(v) = swap_str {
            if (self.exists)("memory.swap.max") {
                self.report.push("memory.swap.max", v);
            } else if v == "max" || v == "0" {
                // No swap in this kernel: unlimited or no swap is what it has anyway.
                self.skip(format!(
                    "memory.swap.max={v} (kernel without swap accounting)"
                ));
            } else {
                return Err(CgroupError::ControllerMissing {
                    controller: "memory (swap accounting)".to_string(),
                    setting: "memory.swap".to_string(),
                    path: PathBuf::new(),
                });
            }
        }
        if let Some(v) = limit_str(limit) {
            self.report.push("memory.max", v);
        }
        if let Some(v) = limit_str(reservation) {
            self.report.push("memory.low", v);
        }
        if m.kernel().is_some() {
            self.skip("memory.kernel (no kernel memory limit in cgroup v2)");
        }
        if m.kernel_tcp().is_some() {
            self.skip("memory.kernelTCP (no kernel TCP limit in cgroup v2)");
        }
        if m.swappiness().is_some() {
            self.skip("memory.swappiness (no per-cgroup swappiness in cgroup v2)");
        }
        if m.disable_oom_killer() == Some(true) {
            self.skip("memory.disableOOMKiller (cgroup v2 cannot disable the OOM killer)");
        }
        Ok(())
    }

    fn block_io(&mut self, b: &LinuxBlockIo) -> Result<()> {
        let has_bfq = (self.exists)("io.bfq.weight");
        let weight_devices = b.weight_device().as_deref().unwrap_or_default();
        let throttles: [(&str, &Option<Vec<LinuxThrottleDevice>>); 4] = [
            ("rbps", b.throttle_read_bps_device()),
            ("wbps", b.throttle_write_bps_device()),
            ("riops", b.throttle_read_iops_device()),
            ("wiops", b.throttle_write_iops_device()),
        ];
        let any_throttle = throttles
            .iter()
            .any(|(_, t)| t.as_ref().is_some_and(|t| !t.is_empty()));
        let weight = b.weight().filter(|&w| w != 0);
        if weight.is_some() || !weight_devices.is_empty() || any_throttle {
            self.need("io", "blockIO")?;
        }
        if let Some(w) = weight {
            // BFQ takes v1-style weights (1-1000) as they are.
            if has_bfq {
                self.report.push("io.bfq.weight", w.to_string());
            } else {
                self.report
                    .push("io.weight", blkio_weight_to_io_weight(w).to_string());
            }
        }
        for wd in weight_devices {
            let Some(w) = wd.weight() else { continue };
            if has_bfq {
                self.report.push(
                    "io.bfq.weight",
                    format!("{}:{} {w}", wd.major(), wd.minor()),
                );
            } else {
                self.skip(format!(
                    "blockIO.weightDevice {}:{} (needs the BFQ I/O scheduler)",
                    wd.major(),
                    wd.minor()
                ));
            }
        }
        if b.leaf_weight().is_some() {
            self.skip("blockIO.leafWeight (no leaf weight in cgroup v2)");
        }
        for (key, devices) in throttles {
            for d in devices.as_deref().unwrap_or_default() {
                self.report.push(
                    "io.max",
                    format!("{}:{} {key}={}", d.major(), d.minor(), d.rate()),
                );
            }
        }
        Ok(())
    }

    fn unified(&mut self, key: &str, value: &str) -> Result<()> {
        if key.is_empty() || key.contains('/') || key.starts_with('.') || key.contains('\0') {
            return Err(CgroupError::InvalidResource(format!(
                "unified key {key:?} is not a cgroup file name"
            )));
        }
        if matches!(
            key,
            "cgroup.procs" | "cgroup.threads" | "cgroup.subtree_control" | "cgroup.kill"
        ) {
            return Err(CgroupError::InvalidResource(format!(
                "unified key {key:?} may not be set from the spec"
            )));
        }
        if !(self.exists)(key) {
            let controller = key.split('.').next().unwrap_or(key);
            if controller != "cgroup" {
                self.need(controller, &format!("unified {key}"))?;
            }
            return Err(CgroupError::InvalidResource(format!(
                "unified key {key:?}: no such cgroup file"
            )));
        }
        self.report.push(key, value);
        Ok(())
    }
}

/// Converts `resources` into cgroup v2 writes the way runc does:
///
/// - cpu: shares -> `cpu.weight` ([`shares_to_weight`]); quota/period -> `cpu.max` ("max" for a
///   quota <= 0; the period is left out when 0); burst -> `cpu.max.burst`; idle -> `cpu.idle`;
///   cpus/mems -> `cpuset.cpus`/`cpuset.mems`; realtime settings are an error;
/// - memory: swap -> `memory.swap.max` = swap - limit (OCI's swap is memory+swap; swap must be
///   >= limit), limit -> `memory.max`, reservation -> `memory.low`; -1 -> "max", 0 -> unset;
/// - pids: limit -> `pids.max` (<= 0 -> "max");
/// - blockIO: weight -> `io.bfq.weight` if the kernel has BFQ, else `io.weight` (linear
///   1-10000); per-device weights -> `io.bfq.weight` (BFQ only); throttles -> `io.max` lines
///   `MAJ:MIN rbps=N` / `wbps` / `riops` / `wiops`;
/// - hugepageLimits -> `hugetlb.<size>.max`; unified -> the named files as they are.
///
/// `available` is the cgroup's `cgroup.controllers`; `exists(file)` tells whether a file exists
/// in the cgroup (for BFQ and swap). A setting whose controller is not available is an error;
/// settings with no v2 equivalent (v1 kernel memory, swappiness, OOM-killer disable, network
/// classes, device rules, rdma) are listed in `skipped`.
pub fn plan(
    resources: &LinuxResources,
    available: &[String],
    exists: impl Fn(&str) -> bool,
) -> Result<ApplyReport> {
    let mut p = Planner {
        available,
        exists,
        report: ApplyReport::default(),
    };
    if let Some(cpu) = resources.cpu() {
        p.cpu(cpu)?;
    }
    if let Some(m) = resources.memory() {
        p.memory(m)?;
    }
    if let Some(pids) = resources.pids() {
        p.need("pids", "pids.limit")?;
        let limit = pids.limit();
        p.report.push(
            "pids.max",
            if limit <= 0 {
                "max".to_string()
            } else {
                limit.to_string()
            },
        );
    }
    if let Some(b) = resources.block_io() {
        p.block_io(b)?;
    }
    for h in resources.hugepage_limits().as_deref().unwrap_or_default() {
        let size = h.page_size();
        if size.is_empty() || !size.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(CgroupError::InvalidResource(format!(
                "hugepage size {size:?}"
            )));
        }
        p.need("hugetlb", &format!("hugepageLimits {size}"))?;
        let v = if h.limit() < 0 {
            "max".to_string()
        } else {
            h.limit().to_string()
        };
        p.report.push(&format!("hugetlb.{size}.max"), v);
    }
    if resources.devices().as_ref().is_some_and(|d| !d.is_empty()) {
        // v2 device rules are eBPF programs; in a VM the device nodes the container gets are
        // what limits it.
        p.skip("devices (cgroup v2 device filtering is not implemented)");
    }
    if resources.network().is_some() {
        p.skip("network (net_cls/net_prio exist only in cgroup v1)");
    }
    if resources.rdma().as_ref().is_some_and(|r| !r.is_empty()) {
        p.skip("rdma");
    }
    if let Some(unified) = resources.unified() {
        // Sorted, so that the order of writes does not depend on HashMap iteration.
        let mut entries: Vec<_> = unified.iter().collect();
        entries.sort();
        for (k, v) in entries {
            p.unified(k, v)?;
        }
    }
    Ok(p.report)
}
