//! A VM's host cgroup: the process holding the VMM (the CLI's monitor, the shim), and with
//! it the vCPU threads, virtiofsd and the guest's memory, goes into the cgroup the spec names
//! (`linux.cgroupsPath`), as runc puts a container's init there; limits written on that
//! cgroup (the CLI's, from `linux.resources`) or on a parent (the kubelet's pod cgroup)
//! then account and limit the whole VM. On teardown the process moves back to where it
//! started and removes the cgroup.
//!
//! The path forms runc knows are understood: absolute cgroupfs paths
//! (`/kubepods/besteffort/pod<uid>/<id>`, from each hierarchy's root), relative ones (`a/b`,
//! below this process's own cgroup in each hierarchy) and systemd's
//! (`kubepods-besteffort-pod<uid>.slice:cri-containerd:<id>`, which is placed at the
//! slice's path as `cri-containerd-<id>.scope`; the folder is made directly, no transient
//! unit is registered with systemd).
//!
//! cgroup v2 is one hierarchy; on a cgroup v1 host the process joins the same relative path
//! in every hierarchy it belongs to, as runc's cgroupfs manager does.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// Where a spec's `cgroupsPath` is, in each hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupPath {
    /// Below the hierarchy's root (absolute and systemd paths).
    FromRoot(PathBuf),
    /// Below this process's own cgroup in that hierarchy (a relative path).
    FromOwn(PathBuf),
}

impl CgroupPath {
    /// Parses a spec's `cgroupsPath`.
    pub fn parse(cgroups_path: &str) -> Result<Self> {
        let p = cgroups_path.trim();
        if p.is_empty() {
            bail!("empty cgroupsPath");
        }
        let (rel, from_root) = if p.starts_with('/') {
            (PathBuf::from(p.trim_start_matches('/')), true)
        } else if p.contains(':') {
            let parts: Vec<&str> = p.split(':').collect();
            let [slice, prefix, name] = parts[..] else {
                bail!(
                    "cgroupsPath {p:?}: neither a path (/a/b, a/b) nor systemd's slice:prefix:name"
                );
            };
            if prefix.contains('/') || name.contains('/') || name.is_empty() {
                bail!("cgroupsPath {p:?}: unit prefix and name must be plain names");
            }
            let mut rel = expand_slice(if slice.is_empty() {
                "system.slice"
            } else {
                slice
            })?;
            let unit = if name.ends_with(".slice") {
                name.to_owned()
            } else if prefix.is_empty() {
                format!("{name}.scope")
            } else {
                format!("{prefix}-{name}.scope")
            };
            rel.push(unit);
            (rel, true)
        } else {
            (PathBuf::from(p), false)
        };
        if rel
            .components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)))
            || rel.as_os_str().is_empty()
        {
            bail!("cgroupsPath {p:?}: not a plain path below the cgroup root");
        }
        Ok(if from_root {
            Self::FromRoot(rel)
        } else {
            Self::FromOwn(rel)
        })
    }

    /// The folder relative to `h`'s mount point.
    fn in_hierarchy(&self, h: &Hierarchy) -> PathBuf {
        match self {
            Self::FromRoot(rel) => rel.clone(),
            Self::FromOwn(rel) => h.own.join(rel),
        }
    }
}

/// systemd's slice naming: `a-b-c.slice` lives at `a.slice/a-b.slice/a-b-c.slice`.
fn expand_slice(slice: &str) -> Result<PathBuf> {
    let Some(stem) = slice.strip_suffix(".slice") else {
        bail!("systemd slice {slice:?} does not end in .slice");
    };
    if stem == "-" {
        return Ok(PathBuf::new());
    }
    if stem.is_empty() || stem.contains('/') || stem.starts_with('-') || stem.ends_with('-') {
        bail!("invalid systemd slice name {slice:?}");
    }
    let mut path = PathBuf::new();
    let mut prefix = String::new();
    for part in stem.split('-') {
        if part.is_empty() {
            bail!("invalid systemd slice name {slice:?}");
        }
        if !prefix.is_empty() {
            prefix.push('-');
        }
        prefix.push_str(part);
        path.push(format!("{prefix}.slice"));
    }
    Ok(path)
}

/// One mounted cgroup hierarchy this process belongs to: the unified (v2) one, or on a
/// cgroup v1 host each controller's own hierarchy (runc's cgroupfs manager uses the same
/// relative path in every one of them, so does husk).
#[derive(Debug, Clone, PartialEq)]
struct Hierarchy {
    /// Where the hierarchy's root is mounted.
    mount: PathBuf,
    /// This process's cgroup in it, relative to the root.
    own: PathBuf,
    /// cgroup2 (the unified hierarchy) rather than a v1 controller hierarchy.
    unified: bool,
}

/// The hierarchies of this process that are mounted (with their root) in this mount
/// namespace. Only real cgroup filesystems count: a plain tmpfs at /sys/fs/cgroup (the v1
/// layout) is never written to.
fn hierarchies() -> Result<Vec<Hierarchy>> {
    let cgroup =
        std::fs::read_to_string("/proc/self/cgroup").context("reading /proc/self/cgroup")?;
    let mountinfo =
        std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    Ok(match_hierarchies(&cgroup, &mountinfo))
}

fn match_hierarchies(cgroup: &str, mountinfo: &str) -> Vec<Hierarchy> {
    // (mount point, fstype, super options) of every cgroup mount of a hierarchy's root.
    let mounts: Vec<(&str, &str, Vec<&str>)> = mountinfo
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let fields: Vec<&str> = left.split(' ').collect();
            let (root, point) = (*fields.get(3)?, *fields.get(4)?);
            let mut r = right.split(' ');
            let fstype = r.next()?;
            let opts = r.nth(1)?.split(',').collect();
            (root == "/" && (fstype == "cgroup" || fstype == "cgroup2"))
                .then_some((point, fstype, opts))
        })
        .collect();
    let mut out: Vec<Hierarchy> = Vec::new();
    for line in cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let found = mounts.iter().find(|(_, fstype, opts)| {
            if controllers.is_empty() {
                *fstype == "cgroup2"
            } else {
                *fstype == "cgroup" && controllers.split(',').all(|c| opts.contains(&c))
            }
        });
        if let Some((point, fstype, _)) = found {
            // On a hybrid host this includes the controller-less unified hierarchy
            // (systemd's bookkeeping), as runc does.
            let h = Hierarchy {
                mount: PathBuf::from(unescape_mount_point(point)),
                own: PathBuf::from(path.trim_start_matches('/')),
                unified: *fstype == "cgroup2",
            };
            if !out.iter().any(|o| o.mount == h.mount) {
                out.push(h);
            }
        }
    }
    out
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape_mount_point(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8)
        {
            out.push(v as char);
            i += 4;
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    out
}

/// Host-side limits for a VM's cgroup, from the spec's `linux.resources` (memory already
/// grown by the VM's overhead). `None` leaves a file as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostLimits {
    pub cpu_shares: Option<u64>,
    pub cpu_quota: Option<i64>,
    pub cpu_period: Option<u64>,
    pub cpus: Option<String>,
    pub mems: Option<String>,
    pub pids: Option<i64>,
    pub memory_bytes: Option<u64>,
}

impl HostLimits {
    /// The CPU and pids limits of `linux.resources` (memory is the caller's: the VM needs
    /// more than the container's limit).
    pub fn from_resources(resources: &oci_spec::runtime::LinuxResources) -> Self {
        let cpu = resources.cpu().as_ref();
        Self {
            cpu_shares: cpu.and_then(|c| c.shares()),
            cpu_quota: cpu.and_then(|c| c.quota()),
            cpu_period: cpu.and_then(|c| c.period()),
            cpus: cpu.and_then(|c| c.cpus().clone()).filter(|c| !c.is_empty()),
            mems: cpu.and_then(|c| c.mems().clone()).filter(|m| !m.is_empty()),
            pids: resources.pids().as_ref().map(|p| p.limit()),
            memory_bytes: None,
        }
    }

    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// (file, value) pairs for a cgroup of a v2 (`unified`) or v1 hierarchy, as runc
    /// writes them. A v1 hierarchy has only its controllers' files: the caller writes
    /// those present.
    fn files(&self, unified: bool) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if unified {
            if let Some(shares) = self.cpu_shares {
                out.push(("cpu.weight", shares_to_weight(shares).to_string()));
            }
            if self.cpu_quota.is_some() || self.cpu_period.is_some() {
                let quota = match self.cpu_quota {
                    Some(q) if q > 0 => q.to_string(),
                    _ => "max".into(),
                };
                let period = self.cpu_period.unwrap_or(100_000);
                out.push(("cpu.max", format!("{quota} {period}")));
            }
            if let Some(p) = self.pids {
                out.push(("pids.max", if p > 0 { p.to_string() } else { "max".into() }));
            }
            if let Some(m) = self.memory_bytes {
                out.push(("memory.max", m.to_string()));
            }
        } else {
            if let Some(shares) = self.cpu_shares {
                out.push(("cpu.shares", shares.to_string()));
            }
            // The period first: a quota is checked against the current period.
            if let Some(period) = self.cpu_period {
                out.push(("cpu.cfs_period_us", period.to_string()));
            }
            if let Some(q) = self.cpu_quota {
                out.push(("cpu.cfs_quota_us", if q > 0 { q } else { -1 }.to_string()));
            }
            if let Some(p) = self.pids {
                out.push(("pids.max", if p > 0 { p.to_string() } else { "max".into() }));
            }
            if let Some(m) = self.memory_bytes {
                out.push(("memory.limit_in_bytes", m.to_string()));
            }
        }
        if let Some(c) = &self.cpus {
            out.push(("cpuset.cpus", c.clone()));
        }
        if let Some(m) = &self.mems {
            out.push(("cpuset.mems", m.clone()));
        }
        out
    }
}

/// runc's conversion of cgroup v1 CPU shares (2..262144) to a v2 weight (1..10000).
fn shares_to_weight(shares: u64) -> u64 {
    if shares == 0 {
        return 100;
    }
    let shares = shares.clamp(2, 262_144);
    1 + ((shares - 2) * 9999) / 262_142
}

/// Writes `limits` into the cgroup folder `dir`. In a v1 hierarchy only the files of its
/// controllers exist, and only those are written. Returns the limits that were set in the
/// spec but exist in no hierarchy, for the caller to check against all of them.
fn write_limits(dir: &Path, unified: bool, limits: &HostLimits) -> Result<Vec<&'static str>> {
    let mut missing = Vec::new();
    for (file, value) in limits.files(unified) {
        let path = dir.join(file);
        if !path.exists() {
            missing.push(file);
            continue;
        }
        std::fs::write(&path, &value)
            .with_context(|| format!("writing {value:?} to {}", path.display()))?;
    }
    Ok(missing)
}

/// On cgroup v2, a child's controller files exist only once the parent delegates the
/// controllers (`cgroup.subtree_control`), level by level from the root.
fn delegate_controllers(mount: &Path, rel: &Path) {
    let mut dir = mount.to_path_buf();
    for part in rel.components() {
        let control = dir.join("cgroup.subtree_control");
        for c in ["cpu", "cpuset", "pids", "memory"] {
            // One at a time: a controller the kernel or a parent lacks must not stop the
            // others; what stays missing is reported by write_limits.
            let _ = std::fs::write(&control, format!("+{c}"));
        }
        dir.push(part);
    }
}

/// A process's placement in a VM's host cgroup.
#[derive(Debug)]
pub struct HostCgroup {
    /// The cgroup in every hierarchy: (folder, where the process was before, whether we
    /// made the folder and so remove it).
    placements: Vec<Placement>,
    left: std::sync::atomic::AtomicBool,
}

#[derive(Debug)]
struct Placement {
    path: PathBuf,
    origin: PathBuf,
    created: bool,
}

impl HostCgroup {
    /// Moves this whole process (every thread) into the cgroup for `cgroups_path` in every
    /// hierarchy it belongs to, creating it if needed.
    pub fn enter(cgroups_path: &str) -> Result<Self> {
        Self::enter_in(&hierarchies()?, cgroups_path, &HostLimits::default())
    }

    /// As `enter`, with `limits` written before the move. A limit no hierarchy has a file
    /// for (its controller is not mounted or not delegated) is an error naming it.
    pub fn enter_with_limits(cgroups_path: &str, limits: &HostLimits) -> Result<Self> {
        Self::enter_in(&hierarchies()?, cgroups_path, limits)
    }

    fn enter_in(
        hierarchies: &[Hierarchy],
        cgroups_path: &str,
        limits: &HostLimits,
    ) -> Result<Self> {
        let where_ = CgroupPath::parse(cgroups_path)?;
        if hierarchies.is_empty() {
            bail!("no cgroup filesystem of this process is mounted (see /proc/self/cgroup)");
        }
        let mut cg = Self {
            placements: Vec::new(),
            left: std::sync::atomic::AtomicBool::new(false),
        };
        // Per limit file: whether some hierarchy took it.
        let mut unplaced: Option<Vec<&'static str>> = None;
        for h in hierarchies {
            let rel = where_.in_hierarchy(h);
            let path = h.mount.join(&rel);
            let created = !path.exists();
            let placed = create_cgroup_dirs(&h.mount, &rel)
                .with_context(|| format!("creating the cgroup {}", path.display()))
                .and_then(|()| {
                    cg.placements.push(Placement {
                        path: path.clone(),
                        origin: h.mount.join(&h.own),
                        created,
                    });
                    if limits.is_empty() {
                        return Ok(());
                    }
                    if h.unified {
                        delegate_controllers(&h.mount, &rel);
                    }
                    let missing = write_limits(&path, h.unified, limits)?;
                    unplaced = Some(match unplaced.take() {
                        None => missing,
                        Some(before) => {
                            before.into_iter().filter(|f| missing.contains(f)).collect()
                        }
                    });
                    Ok(())
                })
                .and_then(|()| move_self(&path));
            if let Err(e) = placed {
                cg.leave();
                return Err(e);
            }
        }
        if let Some(files) = unplaced.filter(|f| !f.is_empty()) {
            cg.leave();
            bail!(
                "linux.resources cannot be enforced on the host: no cgroup hierarchy of this host has {} (is the controller mounted and, on cgroup v2, enabled in the parent's cgroup.subtree_control?)",
                files.join(", ")
            );
        }
        Ok(cg)
    }

    /// The cgroup folders (one per hierarchy).
    pub fn paths(&self) -> impl Iterator<Item = &Path> {
        self.placements.iter().map(|p| p.path.as_path())
    }

    /// The folders this process made (and so removes), for a crash cleanup to remove; a
    /// cgroup that existed before is never emptied or removed by husk.
    pub fn created_paths(&self) -> impl Iterator<Item = &Path> {
        self.placements
            .iter()
            .filter(|p| p.created)
            .map(|p| p.path.as_path())
    }

    /// Moves the process back to where it started and removes the cgroup if we made it.
    /// Called when the VM is done with: whatever is still in a cgroup we made is the VM's
    /// (virtiofsd, when the VM did not stop in time) and is killed first. Idempotent.
    pub fn leave(&self) {
        if self.left.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        for p in &self.placements {
            if let Err(e) = move_self(&p.origin) {
                tracing::warn!("{e:#}");
            }
        }
        let made: Vec<PathBuf> = self.created_paths().map(Path::to_path_buf).collect();
        remove_killing_members(&made, LEAVE_WAIT);
    }
}

impl Drop for HostCgroup {
    fn drop(&mut self) {
        self.leave();
    }
}

/// `mkdir -p` below a hierarchy's root. In a v1 cpuset hierarchy a new cgroup starts with
/// no cpus and no memory nodes, and no process may join it: each new level inherits its
/// parent's (what runc's cgroupfs manager does too).
fn create_cgroup_dirs(mount: &Path, rel: &Path) -> Result<()> {
    let mut dir = mount.to_path_buf();
    for part in rel.components() {
        let parent = dir.clone();
        dir.push(part);
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("mkdir {}", dir.display())),
        }
        for file in ["cpuset.cpus", "cpuset.mems"] {
            let own = dir.join(file);
            let Ok(current) = std::fs::read_to_string(&own) else {
                continue; // not a v1 cpuset hierarchy
            };
            if current.trim().is_empty() {
                let from_parent = std::fs::read_to_string(parent.join(file))
                    .with_context(|| format!("reading {}", parent.join(file).display()))?;
                std::fs::write(&own, from_parent.trim())
                    .with_context(|| format!("writing {}", own.display()))?;
            }
        }
    }
    Ok(())
}

fn move_self(cgroup: &Path) -> Result<()> {
    // cgroup.procs moves every thread of the process, in v1 as in v2.
    let procs = cgroup.join("cgroup.procs");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(&procs)
        .with_context(|| format!("opening {}", procs.display()))?;
    std::io::Write::write_all(&mut f, std::process::id().to_string().as_bytes())
        .with_context(|| format!("moving this process into {}", cgroup.display()))
}

/// `delete` after the process holding a VM died: removes its cgroup in every hierarchy
/// (`cgroups_path` resolved as `HostCgroup::enter` does; a relative path only resolves
/// the same from a process in the same cgroup, so the CLI records the folders and uses
/// `remove_paths_after_crash`). Returns what could not be removed.
pub fn remove_after_crash(cgroups_path: &str) -> Vec<String> {
    let (Ok(where_), Ok(hierarchies)) = (CgroupPath::parse(cgroups_path), hierarchies()) else {
        return Vec::new();
    };
    let paths: Vec<PathBuf> = hierarchies
        .iter()
        .map(|h| h.mount.join(where_.in_hierarchy(h)))
        .collect();
    remove_paths_after_crash(&paths)
}

/// Removes cgroup folders a dead process left. What is still in them belonged to it (its
/// virtiofsd, or the process itself while the kernel is still tearing it down): it is
/// killed, and the removal retried for a few seconds. Returns what could not be removed.
pub fn remove_paths_after_crash(paths: &[PathBuf]) -> Vec<String> {
    remove_killing_members(paths, CRASH_CLEANUP_WAIT)
}

/// Removes each cgroup folder, killing what is left in it, retrying for up to `wait` while
/// the killed processes exit. Returns what could not be removed (also logged).
fn remove_killing_members(paths: &[PathBuf], wait: std::time::Duration) -> Vec<String> {
    let deadline = std::time::Instant::now() + wait;
    let mut failed = Vec::new();
    for path in paths {
        loop {
            match std::fs::remove_dir(path) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(e)
                    if e.raw_os_error() == Some(libc::EBUSY)
                        && std::time::Instant::now() < deadline =>
                {
                    kill_members(path);
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(e) => {
                    tracing::warn!("removing the cgroup {}: {e}", path.display());
                    failed.push(format!("removing the cgroup {}: {e}", path.display()));
                    break;
                }
            }
        }
    }
    failed
}

/// How long leaving waits for the VM's leftovers to die (inside containerd's 10 s delete).
const LEAVE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// How long `delete` waits for a dead process's cgroup to empty.
const CRASH_CLEANUP_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// SIGKILL to every process listed in a cgroup (never to ourselves).
fn kill_members(cgroup: &Path) {
    let me = std::process::id();
    let procs = std::fs::read_to_string(cgroup.join("cgroup.procs")).unwrap_or_default();
    for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
        if pid > 0 && pid as u32 != me {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroupfs_and_systemd_paths() {
        assert_eq!(
            CgroupPath::parse("/kubepods/besteffort/pod1/abc").unwrap(),
            CgroupPath::FromRoot("kubepods/besteffort/pod1/abc".into())
        );
        assert_eq!(
            CgroupPath::parse("kubepods-besteffort-pod1.slice:cri-containerd:abc").unwrap(),
            CgroupPath::FromRoot(
                "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1.slice/cri-containerd-abc.scope"
                    .into()
            )
        );
        assert_eq!(
            CgroupPath::parse(":cri-containerd:abc").unwrap(),
            CgroupPath::FromRoot("system.slice/cri-containerd-abc.scope".into())
        );
        // A relative path is below the process's own cgroup, in each hierarchy.
        let own = CgroupPath::parse("husk/c1").unwrap();
        assert_eq!(own, CgroupPath::FromOwn("husk/c1".into()));
        let h = Hierarchy {
            mount: "/sys/fs/cgroup/pids".into(),
            own: "user/1".into(),
            unified: false,
        };
        assert_eq!(own.in_hierarchy(&h), PathBuf::from("user/1/husk/c1"));
        for bad in [
            "",
            "/a/../b",
            "a:b",
            "x.slice:p:../n",
            "-a.slice:p:n",
            "nope:p:n",
        ] {
            assert!(CgroupPath::parse(bad).is_err(), "{bad:?}");
        }
    }

    fn limits() -> HostLimits {
        HostLimits {
            cpu_shares: Some(512),
            cpu_quota: Some(50_000),
            cpu_period: Some(100_000),
            cpus: Some("0".into()),
            mems: None,
            pids: Some(64),
            memory_bytes: Some(256 << 20),
        }
    }

    #[test]
    fn limits_become_v1_and_v2_files() {
        let v2 = limits().files(true);
        assert_eq!(
            v2,
            [
                ("cpu.weight", "20".to_string()),
                ("cpu.max", "50000 100000".into()),
                ("pids.max", "64".into()),
                ("memory.max", "268435456".into()),
                ("cpuset.cpus", "0".into()),
            ]
        );
        let v1 = limits().files(false);
        assert_eq!(
            v1,
            [
                ("cpu.shares", "512".to_string()),
                ("cpu.cfs_period_us", "100000".into()),
                ("cpu.cfs_quota_us", "50000".into()),
                ("pids.max", "64".into()),
                ("memory.limit_in_bytes", "268435456".into()),
                ("cpuset.cpus", "0".into()),
            ]
        );
        // No quota: unlimited, in each form.
        let unlimited = HostLimits {
            cpu_quota: Some(-1),
            pids: Some(0),
            ..HostLimits::default()
        };
        assert_eq!(
            unlimited.files(true),
            [
                ("cpu.max", "max 100000".to_string()),
                ("pids.max", "max".into())
            ]
        );
        assert_eq!(unlimited.files(false)[0], ("cpu.cfs_quota_us", "-1".into()));
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(1024), 39);
        assert_eq!(shares_to_weight(262_144), 10_000);
        assert!(HostLimits::default().is_empty());
    }

    #[test]
    fn limits_from_the_spec() {
        let r: oci_spec::runtime::LinuxResources = serde_json::from_value(serde_json::json!({
            "cpu": {"shares": 256, "quota": 20000, "period": 50000, "cpus": "0-1", "mems": ""},
            "pids": {"limit": 32},
            "memory": {"limit": 1048576}
        }))
        .unwrap();
        assert_eq!(
            HostLimits::from_resources(&r),
            HostLimits {
                cpu_shares: Some(256),
                cpu_quota: Some(20000),
                cpu_period: Some(50000),
                cpus: Some("0-1".into()),
                mems: None,
                pids: Some(32),
                memory_bytes: None,
            }
        );
    }

    #[test]
    fn only_the_files_a_hierarchy_has_are_written() {
        let tmp = tempfile::tempdir().unwrap();
        // A v1 cpu hierarchy's folder: cpu files only.
        for f in ["cpu.shares", "cpu.cfs_period_us", "cpu.cfs_quota_us"] {
            std::fs::write(tmp.path().join(f), "").unwrap();
        }
        let missing = write_limits(tmp.path(), false, &limits()).unwrap();
        assert_eq!(
            missing,
            ["pids.max", "memory.limit_in_bytes", "cpuset.cpus"]
        );
        let read = |f: &str| std::fs::read_to_string(tmp.path().join(f)).unwrap();
        assert_eq!(read("cpu.shares"), "512");
        assert_eq!(read("cpu.cfs_quota_us"), "50000");
        assert!(!tmp.path().join("pids.max").exists());
    }

    #[test]
    fn finds_v1_and_v2_hierarchies() {
        let hybrid_cgroup = "9:name=systemd:/\n4:memory:/a/b\n2:cpu,cpuacct:/\n0::/\n";
        let hybrid_mounts = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
        let found = match_hierarchies(hybrid_cgroup, hybrid_mounts);
        let mounts: Vec<_> = found.iter().map(|h| h.mount.to_str().unwrap()).collect();
        assert_eq!(
            mounts,
            [
                "/sys/fs/cgroup/systemd",
                "/sys/fs/cgroup/memory",
                "/sys/fs/cgroup/cpu,cpuacct",
                "/sys/fs/cgroup/unified"
            ],
            "never the tmpfs at /sys/fs/cgroup"
        );
        assert_eq!(found[1].own, PathBuf::from("a/b"));

        let v2 = match_hierarchies(
            "0::/user.slice\n",
            "25 22 0:22 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n\
             26 22 0:23 /sub /mnt/x rw - cgroup2 cgroup2 rw\n",
        );
        assert_eq!(
            v2,
            [Hierarchy {
                mount: "/sys/fs/cgroup".into(),
                own: "user.slice".into(),
                unified: true,
            }]
        );
        assert!(match_hierarchies("0::/\n", "").is_empty());
        assert_eq!(unescape_mount_point("/a\\040b"), "/a b");
    }

    #[test]
    fn enters_and_leaves_a_real_cgroup() {
        if !nix::unistd::geteuid().is_root() || hierarchies().map_or(true, |h| h.is_empty()) {
            eprintln!("skipped: needs root and a mounted cgroup hierarchy (v1 or v2)");
            return;
        }
        // Moving the test process itself would disturb the other tests in this binary:
        // run the move in a child process.
        let name = format!("husk-cgroup-test-{}", std::process::id());
        let child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "host_cgroup::tests::child_enters_and_leaves",
                "--nocapture",
            ])
            .env("HUSK_TEST_CGROUP", format!("/{name}/pod"))
            .output()
            .unwrap();
        assert!(
            child.status.success(),
            "{}{}",
            String::from_utf8_lossy(&child.stdout),
            String::from_utf8_lossy(&child.stderr)
        );
        for h in hierarchies().unwrap() {
            assert!(!h.mount.join(&name).join("pod").exists());
            std::fs::remove_dir(h.mount.join(&name)).unwrap();
        }
    }

    #[test]
    fn crash_cleanup_kills_what_is_left_and_removes_the_cgroup() {
        if !nix::unistd::geteuid().is_root() || hierarchies().map_or(true, |h| h.is_empty()) {
            eprintln!("skipped: needs root and a mounted cgroup hierarchy (v1 or v2)");
            return;
        }
        let name = format!("husk-cgroup-crash-test-{}", std::process::id());
        let rel = format!("/{name}/sandbox");
        // A leftover of a dead shim: a process in the sandbox's cgroup, reaped by its parent
        // (here a thread; containerd for a real shim) once it is killed.
        let mut child = std::process::Command::new("sleep")
            .arg("1000")
            .spawn()
            .unwrap();
        let pid = child.id();
        for h in hierarchies().unwrap() {
            create_cgroup_dirs(&h.mount, Path::new(rel.trim_start_matches('/'))).unwrap();
            std::fs::write(
                h.mount.join(&name).join("sandbox").join("cgroup.procs"),
                pid.to_string(),
            )
            .unwrap();
        }
        let reaper = std::thread::spawn(move || child.wait().unwrap());
        assert!(remove_after_crash(&rel).is_empty());
        let status = reaper.join().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL)
        );
        for h in hierarchies().unwrap() {
            assert!(!h.mount.join(&name).join("sandbox").exists());
            std::fs::remove_dir(h.mount.join(&name)).unwrap();
        }
    }

    /// Body of `enters_and_leaves_a_real_cgroup`, in a process of its own.
    #[test]
    fn child_enters_and_leaves() {
        let Ok(path) = std::env::var("HUSK_TEST_CGROUP") else {
            return; // only meaningful as the child above
        };
        let before = hierarchies().unwrap();
        let limits = HostLimits {
            cpu_shares: Some(512),
            cpu_quota: Some(50_000),
            cpu_period: Some(100_000),
            pids: Some(64),
            ..HostLimits::default()
        };
        let cg = HostCgroup::enter_with_limits(&path, &limits).unwrap();
        // The limits are on the cgroup the process is in, in the hierarchy that has them.
        let value = |file: &str| {
            cg.paths()
                .find_map(|p| std::fs::read_to_string(p.join(file)).ok())
                .unwrap_or_else(|| panic!("no hierarchy has {file}"))
        };
        if before.iter().any(|h| h.unified) && !before.iter().any(|h| !h.unified) {
            assert_eq!(value("cpu.max").trim(), "50000 100000");
        } else {
            assert_eq!(value("cpu.shares").trim(), "512");
            assert_eq!(value("cpu.cfs_quota_us").trim(), "50000");
        }
        assert_eq!(value("pids.max").trim(), "64");
        let now = hierarchies().unwrap();
        let placed: Vec<PathBuf> = cg.paths().map(Path::to_path_buf).collect();
        assert_eq!(placed.len(), before.len());
        for h in &now {
            assert!(
                placed.contains(&h.mount.join(&h.own)),
                "the process is in the cgroup of {}",
                h.mount.display()
            );
        }
        // A child started in the cgroup (virtiofsd, when the VM did not stop in time)
        // is killed by leaving, so the cgroup can go.
        let mut leftover = std::process::Command::new("sleep")
            .arg("100")
            .spawn()
            .unwrap();
        cg.leave();
        assert_eq!(hierarchies().unwrap(), before);
        for p in placed {
            assert!(!p.exists(), "{} left", p.display());
        }
        let status = leftover.wait().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL)
        );
    }
}
