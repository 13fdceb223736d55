//! cgroup v2 for containers: creation under a cgroup2 mount, resource limits converted from
//! the OCI spec as runc does, freeze/thaw, stats, kill, removal and OOM events.
//!
//! Only the unified hierarchy (cgroup v2) is supported. Everything works on a plain directory
//! too, which is how the unit tests exercise it on hosts without a usable cgroup2.

mod events;
mod resources;
mod stats;

use std::fs;
use std::io::{self, Write};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use tracing::{debug, warn};

pub use events::OomWatcher;
pub use resources::{ApplyReport, CgroupWrite, plan, shares_to_weight};
pub use stats::{CpuStats, IoDeviceStats, MemoryEvents, MemoryStats, PidsStats, Stats};

/// The default mount point of the cgroup2 hierarchy in the guest.
pub const DEFAULT_ROOT: &str = "/sys/fs/cgroup";

/// Parent of the cgroups of containers whose spec gives no `cgroupsPath`.
pub const DEFAULT_PARENT: &str = "husk";

/// Controllers enabled down the hierarchy for containers (where the kernel has them).
pub const CONTROLLERS: &[&str] = &["cpu", "cpuset", "memory", "pids", "io", "hugetlb"];

/// How long freeze, kill and remove wait for the kernel.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(5);
const POLL_INTERVAL: Duration = Duration::from_millis(2);

/// cgroup errors; each names the file or path involved.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("invalid cgroupsPath {path:?}: {reason}")]
    InvalidPath { path: String, reason: &'static str },
    #[error("creating cgroup directory {path}: {source}")]
    Create { path: PathBuf, source: io::Error },
    #[error("cgroup {0} does not exist")]
    NotFound(PathBuf),
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("writing {value:?} to {path}: {source}")]
    Write {
        path: PathBuf,
        value: String,
        source: io::Error,
    },
    #[error(
        "enabling controllers {controllers:?} in {path}: {source} (a cgroup with processes cannot delegate controllers)"
    )]
    EnableControllers {
        path: PathBuf,
        controllers: String,
        source: io::Error,
    },
    #[error("{setting} needs the {controller} controller, which is not available in {path}")]
    ControllerMissing {
        controller: String,
        setting: String,
        path: PathBuf,
    },
    #[error("invalid resource value: {0}")]
    InvalidResource(String),
    #[error("timed out after {timeout:?} waiting for {what} in {path}")]
    Timeout {
        what: &'static str,
        path: PathBuf,
        timeout: Duration,
    },
    #[error("removing cgroup {path}: {source}")]
    Remove { path: PathBuf, source: io::Error },
    #[error("signalling pid {pid} in {path}: {source}")]
    Kill {
        pid: i32,
        path: PathBuf,
        source: nix::Error,
    },
    #[error("OOM watcher on {path}: {source}")]
    Watch { path: PathBuf, source: io::Error },
}

pub type Result<T> = std::result::Result<T, CgroupError>;

/// Turns the spec's `linux.cgroupsPath` (or its absence) into a path relative to the cgroup2
/// root.
///
/// - absent or empty: `husk/<container_id>`;
/// - `/a/b` or `a/b`: `a/b` (both are taken from the root: the guest has no other hierarchy);
/// - systemd form `slice:prefix:name` (containerd/kubelet with the systemd driver):
///   `a.slice/a-b.slice/<prefix>-<name>.scope` for slice `a-b.slice`, as systemd lays it out.
///
/// `..` components, NUL bytes and paths that end at the root are refused.
pub fn resolve_path(cgroups_path: Option<&Path>, container_id: &str) -> Result<PathBuf> {
    let raw = match cgroups_path {
        Some(p) if !p.as_os_str().is_empty() => p.to_string_lossy().into_owned(),
        _ => format!("{DEFAULT_PARENT}/{container_id}"),
    };
    let invalid = |reason| CgroupError::InvalidPath {
        path: raw.clone(),
        reason,
    };
    if raw.contains('\0') {
        return Err(invalid("contains a NUL byte"));
    }
    let expanded = if !raw.contains('/') && raw.matches(':').count() == 2 {
        systemd_path(&raw).ok_or_else(|| invalid("malformed systemd slice:prefix:name"))?
    } else {
        raw.clone()
    };
    let mut out = PathBuf::new();
    for c in Path::new(&expanded).components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(n) => out.push(n),
            Component::ParentDir => return Err(invalid("'..' escapes the cgroup root")),
            Component::Prefix(_) => return Err(invalid("unexpected path prefix")),
        }
    }
    if out.as_os_str().is_empty() {
        return Err(invalid("names the cgroup root itself"));
    }
    Ok(out)
}

/// Expands `a-b.slice:prefix:name` the way systemd nests slices.
fn systemd_path(raw: &str) -> Option<String> {
    let mut parts = raw.splitn(3, ':');
    let (slice, prefix, name) = (parts.next()?, parts.next()?, parts.next()?);
    if name.is_empty() || name.contains('/') || prefix.contains('/') {
        return None;
    }
    let mut out = String::new();
    if !slice.is_empty() && slice != "-.slice" {
        let stem = slice.strip_suffix(".slice")?;
        if stem.is_empty() || stem.starts_with('-') || stem.ends_with('-') || stem.contains("--") {
            return None;
        }
        let mut acc = String::new();
        for part in stem.split('-') {
            if !acc.is_empty() {
                acc.push('-');
            }
            acc.push_str(part);
            out.push_str(&acc);
            out.push_str(".slice/");
        }
    }
    if prefix.is_empty() {
        out.push_str(name);
    } else {
        out.push_str(&format!("{prefix}-{name}.scope"));
    }
    Some(out)
}

pub(crate) fn read(path: &Path) -> Result<String> {
    fs::read_to_string(path).map_err(|source| CgroupError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes a value with one write(2), as cgroup files expect.
pub(crate) fn write(path: &Path, value: &str) -> Result<()> {
    let err = |source| CgroupError::Write {
        path: path.to_path_buf(),
        value: value.to_string(),
        source,
    };
    let mut f = fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .map_err(err)?;
    f.write_all(value.as_bytes()).map_err(err)
}

/// A container's cgroup: a directory of a cgroup2 hierarchy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cgroup {
    root: PathBuf,
    relative: PathBuf,
    dir: PathBuf,
}

impl Cgroup {
    /// Creates (or reuses) the cgroup `relative` under `root` (see [`resolve_path`]) and
    /// enables [`CONTROLLERS`] in the `cgroup.subtree_control` of the root and every ancestor,
    /// so that the new leaf gets them. The leaf itself delegates nothing: its processes live in
    /// it, and cgroup v2 forbids processes in cgroups that delegate controllers.
    pub fn create(root: impl AsRef<Path>, relative: &Path) -> Result<Cgroup> {
        let cg = Self::handle(root.as_ref(), relative)?;
        // Ancestors first: each level can only enable what its parent delegated.
        let mut dir = cg.root.clone();
        for c in cg.relative.components() {
            enable_controllers(&dir)?;
            dir.push(c);
            match fs::create_dir(&dir) {
                Ok(()) => debug!(path = %dir.display(), "created cgroup"),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(source) => return Err(CgroupError::Create { path: dir, source }),
            }
        }
        Ok(cg)
    }

    /// Opens an existing cgroup (for update, stats, kill of a running container).
    pub fn open(root: impl AsRef<Path>, relative: &Path) -> Result<Cgroup> {
        let cg = Self::handle(root.as_ref(), relative)?;
        if !cg.dir.is_dir() {
            return Err(CgroupError::NotFound(cg.dir));
        }
        Ok(cg)
    }

    fn handle(root: &Path, relative: &Path) -> Result<Cgroup> {
        // Re-validate: callers may pass paths that did not come from resolve_path.
        let relative = resolve_path(Some(relative), "")?;
        Ok(Cgroup {
            root: root.to_path_buf(),
            dir: root.join(&relative),
            relative,
        })
    }

    /// The cgroup's directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The path relative to the cgroup2 root (what /proc/<pid>/cgroup shows, without the
    /// leading `/`).
    pub fn relative_path(&self) -> &Path {
        &self.relative
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Moves a process (all its threads) into the cgroup.
    pub fn add_process(&self, pid: i32) -> Result<()> {
        write(&self.file("cgroup.procs"), &pid.to_string())
    }

    /// The pids in `cgroup.procs`.
    pub fn procs(&self) -> Result<Vec<i32>> {
        let text = read(&self.file("cgroup.procs"))?;
        Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
    }

    /// The controllers available in this cgroup (`cgroup.controllers`).
    pub fn controllers(&self) -> Result<Vec<String>> {
        let text = read(&self.file("cgroup.controllers"))?;
        Ok(text.split_whitespace().map(str::to_string).collect())
    }

    /// Applies the spec's resources (see [`plan`] for the conversion). Errors if a limit needs
    /// a controller this cgroup lacks; settings cgroup v2 has no equivalent for are listed in
    /// the report's `skipped`.
    pub fn apply(&self, resources: &oci_spec::runtime::LinuxResources) -> Result<ApplyReport> {
        let available = self.controllers()?;
        let report = plan(resources, &available, |name| self.file(name).exists())
            .map_err(|e| e.at(&self.dir))?;
        for w in &report.writes {
            write(&self.file(&w.file), &w.value)?;
        }
        for s in &report.skipped {
            warn!(cgroup = %self.dir.display(), "cgroup setting skipped: {s}");
        }
        Ok(report)
    }

    /// Applies new resources to a running container; the same conversion as [`Cgroup::apply`].
    pub fn update(&self, resources: &oci_spec::runtime::LinuxResources) -> Result<ApplyReport> {
        self.apply(resources)
    }

    /// Freezes every process of the cgroup and waits until the kernel reports it frozen.
    pub fn freeze(&self) -> Result<()> {
        self.set_frozen(true)
    }

    /// Thaws the cgroup and waits until the kernel reports it running.
    pub fn thaw(&self) -> Result<()> {
        self.set_frozen(false)
    }

    fn set_frozen(&self, frozen: bool) -> Result<()> {
        write(&self.file("cgroup.freeze"), if frozen { "1" } else { "0" })?;
        let want = if frozen { "1" } else { "0" };
        let events = self.file("cgroup.events");
        self.wait_until(if frozen { "frozen" } else { "thawed" }, || {
            let text = read(&events)?;
            Ok(stats::flat_value(&text, "frozen").as_deref() == Some(want))
        })
    }

    /// Whether `cgroup.events` says the cgroup is frozen.
    pub fn is_frozen(&self) -> Result<bool> {
        let text = read(&self.file("cgroup.events"))?;
        Ok(stats::flat_value(&text, "frozen").as_deref() == Some("1"))
    }

    fn wait_until(&self, what: &'static str, mut done: impl FnMut() -> Result<bool>) -> Result<()> {
        let start = Instant::now();
        loop {
            if done()? {
                return Ok(());
            }
            if start.elapsed() >= SETTLE_TIMEOUT {
                return Err(CgroupError::Timeout {
                    what,
                    path: self.dir.clone(),
                    timeout: SETTLE_TIMEOUT,
                });
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// Reads the cgroup's statistics; controllers that are absent leave their part `None`.
    pub fn stats(&self) -> Result<Stats> {
        stats::read_stats(&self.dir)
    }

    /// SIGKILLs every process in the cgroup and waits until `cgroup.procs` is empty. Uses
    /// `cgroup.kill` (Linux 5.14+) when present; otherwise freezes the cgroup (so nothing can
    /// fork meanwhile), signals each pid, and thaws so that the signals are delivered.
    pub fn kill_all(&self) -> Result<()> {
        if !self.dir.exists() {
            return Ok(());
        }
        let kill_file = self.file("cgroup.kill");
        if kill_file.exists() {
            write(&kill_file, "1")?;
        } else {
            let freezable = self.file("cgroup.freeze").exists();
            let start = Instant::now();
            loop {
                let pids = self.procs()?;
                if pids.is_empty() {
                    break;
                }
                if freezable {
                    self.freeze()?;
                }
                for pid in pids {
                    match nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    ) {
                        Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
                        Err(source) => {
                            return Err(CgroupError::Kill {
                                pid,
                                path: self.dir.clone(),
                                source,
                            });
                        }
                    }
                }
                if freezable {
                    self.thaw()?;
                }
                if start.elapsed() >= SETTLE_TIMEOUT {
                    break;
                }
                std::thread::sleep(POLL_INTERVAL);
            }
        }
        self.wait_until("all processes to exit", || Ok(self.procs()?.is_empty()))
    }

    /// Removes the cgroup directory. Succeeds if it is already gone; fails (after a short wait
    /// for exiting processes) if processes remain: call [`Cgroup::kill_all`] first.
    pub fn remove(&self) -> Result<()> {
        let start = Instant::now();
        loop {
            match fs::remove_dir(&self.dir) {
                Ok(()) => {
                    debug!(path = %self.dir.display(), "removed cgroup");
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                // EBUSY while the last processes finish exiting.
                Err(e)
                    if e.raw_os_error() == Some(libc::EBUSY)
                        && start.elapsed() < SETTLE_TIMEOUT =>
                {
                    std::thread::sleep(POLL_INTERVAL);
                }
                Err(source) => {
                    return Err(CgroupError::Remove {
                        path: self.dir.clone(),
                        source,
                    });
                }
            }
        }
    }

    /// Starts watching `memory.events` for OOM kills (see [`OomWatcher`]).
    pub fn oom_watcher(&self) -> Result<OomWatcher> {
        OomWatcher::new(&self.dir)
    }
}

/// The container library's view of a cgroup (see `container::CgroupHandle`).
impl crate::container::CgroupHandle for Cgroup {
    fn add_process(&self, pid: nix::unistd::Pid) -> crate::Result<()> {
        Cgroup::add_process(self, pid.as_raw()).map_err(|e| crate::Error::Cgroup(e.to_string()))
    }

    fn processes(&self) -> crate::Result<Vec<nix::unistd::Pid>> {
        let pids = self
            .procs()
            .map_err(|e| crate::Error::Cgroup(e.to_string()))?;
        Ok(pids.into_iter().map(nix::unistd::Pid::from_raw).collect())
    }

    fn destroy(&self) -> crate::Result<()> {
        self.remove()
            .map_err(|e| crate::Error::Cgroup(e.to_string()))
    }
}

/// Enables in `dir`'s `cgroup.subtree_control` those of [`CONTROLLERS`] that `dir` has and
/// does not delegate yet.
fn enable_controllers(dir: &Path) -> Result<()> {
    let have = read(&dir.join("cgroup.controllers"))?;
    let subtree_file = dir.join("cgroup.subtree_control");
    let enabled = read(&subtree_file)?;
    let enabled: Vec<&str> = enabled.split_whitespace().collect();
    let missing: Vec<String> = have
        .split_whitespace()
        .filter(|c| CONTROLLERS.contains(c) && !enabled.contains(c))
        .map(|c| format!("+{c}"))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let value = missing.join(" ");
    let Err(first) = write(&subtree_file, &value) else {
        return Ok(());
    };
    // One controller may refuse (e.g. cpu while realtime threads exist): enable the others one
    // by one; `apply` then names the missing controller if the spec needs it.
    let mut enabled_any = false;
    for c in &missing {
        match write(&subtree_file, c) {
            Ok(()) => enabled_any = true,
            Err(e) => warn!("cannot enable controller: {e}"),
        }
    }
    if enabled_any {
        return Ok(());
    }
    Err(match first {
        CgroupError::Write { path, source, .. } => CgroupError::EnableControllers {
            path,
            controllers: value,
            source,
        },
        other => other,
    })
}

#[cfg(test)]
mod tests;
