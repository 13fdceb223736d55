//! `--profile FILE`: a sampling profiler of the guest and KVM exit counts.
//!
//! - A timer thread ([`sampler`]) kicks every vCPU thread out of KVM_RUN `hz` times a second
//!   with the vCPU kick signal ([`crate::vcpu::kick`]). The vCPU thread itself, seeing
//!   KVM_RUN return EINTR, reads its RIP and CPL (KVM_GET_REGS, KVM_GET_SREGS on its own fd)
//!   and enters the guest again.
//! - The vCPU loop counts every exit that reaches the VMM, per reason and per port or MMIO
//!   address ([`exits`]), and at start takes KVM's own per-vCPU counters ([`kvm_stats`]).
//!   Without `--profile` the vCPU loop holds `None` and none of this runs.
//! - When the VM stops (the [`Profiler`] is dropped at the end of [`crate::vm::run`]), FILE
//!   receives the samples as folded stacks ([`folded`]) symbolized with the guest kernel's
//!   System.map ([`symbols`]), and FILE.exits.txt the exit counts and the profiler's own
//!   figures.
//!
//! One profiled VM per process: the vCPU threads find the profiler through a process-wide
//! slot that [`start`] fills (husk-vmm, the monitor and the shim run one VM each).

pub mod exits;
pub mod folded;
pub mod kvm_stats;
pub mod sampler;
pub mod symbols;

use std::ffi::OsString;
use std::fmt::Write as _;
use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kvm_bindings::{KVM_CAP_SYNC_REGS, KVM_SYNC_X86_REGS, KVM_SYNC_X86_SREGS};
use kvm_ioctls::{SyncReg, VcpuExit, VcpuFd};

use crate::config::{ProfileSpec, VmConfig};
use exits::{ExitCounts, ExitKey};
use folded::SampleCounts;
use kvm_stats::KvmStats;
use sampler::{Sampler, TimerStats};
use symbols::SymbolMap;

/// The registry of the VM being profiled, if any (see the module docs).
static ACTIVE: Mutex<Option<Arc<Registry>>> = Mutex::new(None);

/// Error starting the profiler.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("--profile {path}: {source}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--profile-symbols {path}: {source}")]
    Symbols {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("another VM of this process is already being profiled")]
    AlreadyActive,
    #[error("starting the sampling thread: {0}")]
    Thread(#[source] std::io::Error),
}

impl From<ProfileError> for crate::vm::VmError {
    fn from(e: ProfileError) -> Self {
        crate::vm::VmError::Io {
            what: "starting the guest profiler",
            source: std::io::Error::other(e),
        }
    }
}

/// What one vCPU thread records.
#[derive(Debug, Default)]
struct VcpuStats {
    samples: SampleCounts,
    exits: ExitCounts,
    sample_ns: u64,
    sample_errors: u64,
    sync_regs: bool,
}

struct Slot {
    index: u8,
    thread: libc::pthread_t,
    /// Cleared (under the registry lock) before the thread ends, so it is never kicked after.
    alive: bool,
    stats: Arc<Mutex<VcpuStats>>,
    kvm: Option<KvmStats>,
}

/// The vCPU threads of the profiled VM.
#[derive(Default)]
pub struct Registry {
    slots: Mutex<Vec<Slot>>,
}

impl Registry {
    /// Kicks every live vCPU thread; returns (kicks sent, failures).
    fn kick_all(&self) -> (u64, u64) {
        let Ok(slots) = self.slots.lock() else {
            return (0, 0);
        };
        let (mut sent, mut failed) = (0, 0);
        for s in slots.iter().filter(|s| s.alive) {
            match crate::vcpu::kick::kick(s.thread) {
                Ok(()) => sent += 1,
                Err(_) => failed += 1,
            }
        }
        (sent, failed)
    }
}

/// A vCPU thread's handle on the profiler: held by [`crate::vcpu::run`] when profiling.
pub struct VcpuProfile {
    registry: Arc<Registry>,
    stats: Arc<Mutex<VcpuStats>>,
    index: u8,
    /// KVM copies RIP and the segment registers into `kvm_run` at each exit.
    sync_regs: bool,
}

/// Whether KVM can copy the general and segment registers into `kvm_run` at every exit
/// (KVM_CAP_SYNC_REGS), which spares a sample the two register ioctls.
fn sync_regs_supported() -> bool {
    let wanted = u64::from(KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS);
    kvm_ioctls::Kvm::new().is_ok_and(|kvm| {
        let fields = kvm.check_extension_raw(u64::from(KVM_CAP_SYNC_REGS));
        u64::try_from(fields).is_ok_and(|f| f & wanted == wanted)
    })
}

/// Called by each vCPU thread before its first KVM_RUN: `Some` when the VM is profiled.
/// Asks KVM to copy the registers out at every exit when it can (see [`VcpuProfile::sample`]).
pub fn attach(index: u8, vcpu: &mut VcpuFd) -> Option<VcpuProfile> {
    let registry = ACTIVE.lock().ok()?.as_ref().map(Arc::clone)?;
    let sync_regs = sync_regs_supported();
    if sync_regs {
        vcpu.set_sync_valid_reg(SyncReg::Register);
        vcpu.set_sync_valid_reg(SyncReg::SystemRegister);
    }
    tracing::debug!(vcpu = index, sync_regs, "profiler attached");
    let kvm = match KvmStats::open(vcpu) {
        Ok(k) => Some(k),
        Err(e) => {
            tracing::debug!(vcpu = index, "KVM_GET_STATS_FD: {e}; no KVM counters");
            None
        }
    };
    let stats = Arc::new(Mutex::new(VcpuStats::default()));
    // SAFETY: pthread_self has no preconditions.
    let thread = unsafe { libc::pthread_self() };
    registry.slots.lock().ok()?.push(Slot {
        index,
        thread,
        alive: true,
        stats: Arc::clone(&stats),
        kvm,
    });
    Some(VcpuProfile {
        registry,
        stats,
        index,
        sync_regs,
    })
}

impl VcpuProfile {
    /// Counts an exit that reached the VMM.
    pub fn count_exit(&self, exit: &VcpuExit<'_>) {
        let key = ExitKey::of(exit);
        if let Ok(mut s) = self.stats.lock() {
            s.exits.add(key);
        }
    }

    /// KVM_RUN returned EINTR (a kick): counts it and samples where the guest was, from the
    /// registers KVM synced into `kvm_run` on the way out, or else with KVM_GET_REGS and
    /// KVM_GET_SREGS on this thread's own vCPU fd.
    pub fn sample(&self, vcpu: &VcpuFd) {
        let t0 = Instant::now();
        let state = if self.sync_regs {
            let s = vcpu.sync_regs();
            Ok((s.regs, s.sregs))
        } else {
            vcpu.get_regs().and_then(|r| Ok((r, vcpu.get_sregs()?)))
        };
        let ns = t0.elapsed().as_nanos() as u64;
        let Ok(mut s) = self.stats.lock() else {
            return;
        };
        s.exits.add(exits::KICK);
        s.sample_ns += ns;
        s.sync_regs = self.sync_regs;
        match state {
            Ok((regs, sregs)) => {
                let key = sampler::classify(&regs, &sregs);
                *s.samples.entry(key).or_insert(0) += 1;
            }
            Err(e) => {
                s.sample_errors += 1;
                if s.sample_errors == 1 {
                    tracing::warn!(vcpu = self.index, "profiler: reading registers: {e}");
                }
            }
        }
    }
}

impl Drop for VcpuProfile {
    fn drop(&mut self) {
        if let Ok(mut slots) = self.registry.slots.lock() {
            for s in slots.iter_mut().filter(|s| s.index == self.index) {
                s.alive = false;
            }
        }
    }
}

/// The running profiler of a VM; writes its files when dropped.
pub struct Profiler {
    registry: Arc<Registry>,
    sampler: Sampler,
    spec: ProfileSpec,
    symbols: Option<PathBuf>,
    file: Option<File>,
    slot_names: Vec<String>,
    started: Instant,
}

/// `FILE.exits.txt` next to the profile `FILE`.
pub fn exits_path(profile: &Path) -> PathBuf {
    let mut p = OsString::from(profile.as_os_str());
    p.push(".exits.txt");
    PathBuf::from(p)
}

/// Names of the virtio slots, in the order [`crate::vm`] assigns them (docs/architecture.md).
fn slot_names(config: &VmConfig) -> Vec<String> {
    let mut names = Vec::new();
    if config.vsock.is_some() {
        names.push("vsock".to_string());
    }
    for b in &config.blocks {
        names.push(match &b.serial {
            Some(s) => format!("block {s}"),
            None => "block".to_string(),
        });
    }
    if config.rng {
        names.push("rng".to_string());
    }
    names.extend(config.fs.iter().map(|f| format!("fs {}", f.tag)));
    names.extend(config.nets.iter().map(|n| format!("net {}", n.tap)));
    names
}

/// Starts profiling when `config` asks for it: creates FILE (so a bad path fails before the
/// boot), checks the symbols file, and starts the timer. Call before the vCPU threads start.
pub fn start(config: &VmConfig) -> Result<Option<Profiler>, ProfileError> {
    let Some(spec) = &config.profile else {
        return Ok(None);
    };
    let symbols = match &spec.symbols {
        Some(p) => {
            std::fs::metadata(p).map_err(|source| ProfileError::Symbols {
                path: p.clone(),
                source,
            })?;
            Some(p.clone())
        }
        None => symbols::default_path(&config.kernel).filter(|p| p.is_file()),
    };
    if symbols.is_none() {
        tracing::warn!(
            "--profile: no System.map next to the kernel and no --profile-symbols; kernel \
             samples stay addresses"
        );
    }
    let file = File::create(&spec.path).map_err(|source| ProfileError::Create {
        path: spec.path.clone(),
        source,
    })?;
    let registry = Arc::new(Registry::default());
    {
        let mut active = ACTIVE.lock().map_err(|_| ProfileError::AlreadyActive)?;
        if active.is_some() {
            return Err(ProfileError::AlreadyActive);
        }
        *active = Some(Arc::clone(&registry));
    }
    match Profiler::new(spec, symbols, slot_names(config), file, &registry) {
        Ok(p) => {
            tracing::info!(path = %spec.path.display(), hz = spec.hz, "profiling the guest");
            Ok(Some(p))
        }
        Err(e) => {
            clear_active(&registry);
            Err(e)
        }
    }
}

fn clear_active(registry: &Arc<Registry>) {
    if let Ok(mut active) = ACTIVE.lock()
        && active.as_ref().is_some_and(|a| Arc::ptr_eq(a, registry))
    {
        *active = None;
    }
}

/// Everything the vCPU threads recorded, merged.
#[derive(Default)]
struct Collected {
    samples: SampleCounts,
    exits: ExitCounts,
    sample_ns: u64,
    sample_errors: u64,
    sync_regs: bool,
    vcpus: usize,
    kvm: Vec<Vec<(String, u64)>>,
}

impl Profiler {
    fn new(
        spec: &ProfileSpec,
        symbols: Option<PathBuf>,
        slot_names: Vec<String>,
        file: File,
        registry: &Arc<Registry>,
    ) -> Result<Self, ProfileError> {
        let sampler =
            Sampler::start(spec.hz, Arc::clone(registry)).map_err(ProfileError::Thread)?;
        Ok(Self {
            registry: Arc::clone(registry),
            sampler,
            spec: spec.clone(),
            symbols,
            file: Some(file),
            slot_names,
            started: Instant::now(),
        })
    }

    fn collect(&self) -> Collected {
        let mut c = Collected::default();
        let Ok(slots) = self.registry.slots.lock() else {
            return c;
        };
        c.vcpus = slots.len();
        for slot in slots.iter() {
            if let Ok(s) = slot.stats.lock() {
                for (k, n) in &s.samples {
                    *c.samples.entry(*k).or_insert(0) += n;
                }
                c.exits.merge(&s.exits);
                c.sample_ns += s.sample_ns;
                c.sample_errors += s.sample_errors;
                c.sync_regs |= s.sync_regs;
            }
            if let Some(kvm) = &slot.kvm {
                match kvm.read() {
                    Ok(v) => c.kvm.push(v),
                    Err(e) => tracing::debug!(vcpu = slot.index, "reading KVM stats: {e}"),
                }
            }
        }
        c
    }

    /// Stops sampling and writes FILE and FILE.exits.txt.
    fn finish(&mut self) {
        let timer = self.sampler.stop();
        clear_active(&self.registry);
        let seconds = self.started.elapsed().as_secs_f64();
        let c = self.collect();
        let symbols = self
            .symbols
            .as_deref()
            .and_then(|p| match SymbolMap::load(p) {
                Ok(m) => Some(m),
                Err(e) => {
                    tracing::warn!("--profile: {e}; kernel samples stay addresses");
                    None
                }
            });
        let stacks = folded::fold(&c.samples, symbols.as_ref());
        let report = self.exits_report(&c, &timer, seconds, symbols.as_ref());
        let exits_file = exits_path(&self.spec.path);
        if let Some(mut f) = self.file.take()
            && let Err(e) = f.write_all(folded::render(&stacks).as_bytes())
        {
            tracing::warn!("--profile {}: {e}", self.spec.path.display());
        }
        if let Err(e) = std::fs::write(&exits_file, report) {
            tracing::warn!("--profile {}: {e}", exits_file.display());
        }
        tracing::info!(
            path = %self.spec.path.display(),
            samples = c.samples.values().sum::<u64>(),
            exits = c.exits.total(),
            "guest profile written"
        );
    }

    fn exits_report(
        &self,
        c: &Collected,
        timer: &TimerStats,
        seconds: f64,
        symbols: Option<&SymbolMap>,
    ) -> String {
        let mut out = String::new();
        let samples: u64 = c.samples.values().sum();
        let user: u64 = c
            .samples
            .iter()
            .filter(|((m, _), _)| *m == folded::Mode::User)
            .map(|(_, n)| n)
            .sum();
        let _ = writeln!(out, "# husk-vmm --profile {}", self.spec.path.display());
        let _ = writeln!(
            out,
            "profiled {seconds:.2} s, {} vCPU(s) at {} Hz: {} ticks ({} missed), {} kicks \
             ({} failed), {samples} samples (kernel {}, user {user}), {} unreadable",
            c.vcpus,
            self.spec.hz,
            timer.ticks,
            timer.missed,
            timer.kicks,
            timer.kick_errors,
            samples - user,
            c.sample_errors
        );
        let taken = samples + c.sample_errors;
        let per_sample = if taken > 0 {
            c.sample_ns as f64 / taken as f64 / 1000.0
        } else {
            0.0
        };
        let _ = writeln!(
            out,
            "register reads in the vCPU threads ({}): {per_sample:.2} us per sample, {:.1} ms \
             in total (the exit and re-entry of each kick come on top)",
            if c.sync_regs {
                "kvm_run sync regs"
            } else {
                "KVM_GET_REGS + KVM_GET_SREGS"
            },
            c.sample_ns as f64 / 1e6
        );
        let _ = match (&self.symbols, symbols) {
            (Some(p), Some(m)) => {
                writeln!(out, "symbols: {} ({} text symbols)", p.display(), m.len())
            }
            _ => writeln!(out, "symbols: none (kernel samples are addresses)"),
        };
        out.push('\n');
        out.push_str(&c.exits.render(seconds, &self.slot_names));
        if !c.kvm.is_empty() {
            let _ = writeln!(
                out,
                "\n## KVM's own counters, all vCPUs (KVM_GET_STATS_FD; exits KVM handles \
                 itself included)"
            );
            let _ = writeln!(out, "{:<32} {:>14} {:>12}", "counter", "value", "per s");
            for (name, v) in kvm_stats::sum(&c.kvm) {
                if v == 0 {
                    continue;
                }
                let rate = if seconds > 0.0 {
                    v as f64 / seconds
                } else {
                    0.0
                };
                let _ = writeln!(out, "{name:<32} {v:>14} {rate:>12.1}");
            }
        }
        out
    }
}

impl Drop for Profiler {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Cli, FileConfig, merge};

    fn config(args: &[&str]) -> VmConfig {
        let mut argv = vec!["husk-vmm", "--kernel", "/k/vmlinux"];
        argv.extend_from_slice(args);
        merge(
            <Cli as clap::Parser>::try_parse_from(argv).unwrap(),
            FileConfig::default(),
        )
        .unwrap()
    }

    #[test]
    fn exits_file_is_next_to_the_profile() {
        assert_eq!(
            exits_path(Path::new("/tmp/boot.folded")),
            PathBuf::from("/tmp/boot.folded.exits.txt")
        );
    }

    #[test]
    fn slots_are_named_in_vm_order() {
        let c = config(&[
            "--vsock-uds",
            "/v.sock",
            "--block",
            "path=/r.img,serial=rootfs",
            "--net",
            "tap=tap0",
        ]);
        assert_eq!(slot_names(&c), ["vsock", "block rootfs", "rng", "net tap0"]);
    }

    #[test]
    fn no_profile_no_profiler() {
        assert!(start(&config(&[])).unwrap().is_none());
    }

    #[test]
    fn start_checks_its_paths_and_allows_one_profiler() {
        let bad = config(&["--profile", "/nonexistent/dir/p.folded"]);
        assert!(matches!(start(&bad), Err(ProfileError::Create { .. })));
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("p.folded");
        let out = out.to_str().unwrap();
        let missing = config(&["--profile", out, "--profile-symbols", "/nonexistent/map"]);
        let err = start(&missing).err().unwrap();
        assert!(err.to_string().contains("/nonexistent/map"), "{err}");
        // The only test that fills the process-wide slot, and only for a moment.
        let c = config(&["--profile", out]);
        let first = start(&c).unwrap().unwrap();
        assert!(matches!(start(&c), Err(ProfileError::AlreadyActive)));
        drop(first);
        assert!(
            ACTIVE.lock().unwrap().is_none(),
            "the slot is free again after the drop"
        );
        assert!(std::path::Path::new(&exits_path(Path::new(out))).is_file());
    }

    /// Two fake vCPU records through to the files written at drop (no VM, no global slot).
    #[test]
    fn writes_folded_stacks_and_exit_tables_at_drop() {
        let dir = tempfile::tempdir().unwrap();
        let map = dir.path().join("System.map");
        std::fs::write(
            &map,
            "ffffffff81000000 T _stext\nffffffff81000100 T clear_page\n\
             ffffffff81000200 T _etext\n",
        )
        .unwrap();
        let out = dir.path().join("p.folded");
        let c = config(&[
            "--profile",
            out.to_str().unwrap(),
            "--profile-symbols",
            map.to_str().unwrap(),
            "--profile-hz",
            "100",
        ]);
        let spec = c.profile.clone().unwrap();
        let registry = Arc::new(Registry::default());
        let file = File::create(&out).unwrap();
        let profiler =
            Profiler::new(&spec, spec.symbols.clone(), slot_names(&c), file, &registry).unwrap();
        // What two vCPU threads would have recorded (no real vCPU fd in a unit test).
        for (index, rip) in [(0u8, 0xffff_ffff_8100_0104u64), (1, 0x40_0000)] {
            let mut s = VcpuStats::default();
            let mode = if index == 0 {
                folded::Mode::Kernel
            } else {
                folded::Mode::User
            };
            s.samples.insert((mode, rip), 3);
            s.exits.add(ExitKey::MmioWrite(0xd000_1050));
            s.exits.add(exits::KICK);
            profiler.registry.slots.lock().unwrap().push(Slot {
                index,
                thread: 0,
                alive: false,
                stats: Arc::new(Mutex::new(s)),
                kvm: None,
            });
        }
        drop(profiler);

        let folded = std::fs::read_to_string(&out).unwrap();
        assert_eq!(folded, "kernel;clear_page 3\nuser;0x400000 3\n");
        let exits = std::fs::read_to_string(exits_path(&out)).unwrap();
        assert!(exits.contains("2 vCPU(s) at 100 Hz"), "{exits}");
        assert!(exits.contains("6 samples (kernel 3, user 3)"), "{exits}");
        assert!(exits.contains("(3 text symbols)"), "{exits}");
        assert!(exits.contains("mmio_write"), "{exits}");
        assert!(exits.contains("virtio slot 0 (rng) QueueNotify"), "{exits}");
        assert!(exits.contains("intr (signal kick)"), "{exits}");
    }
}
