//! The pod's host cgroup: the shim, and with it the VMM's threads and the guest's memory,
//! goes into the cgroup the sandbox spec names (`linux.cgroupsPath`), as runc puts the
//! pause container there; the kubelet's pod cgroup above it then accounts and limits the
//! whole VM. On teardown the shim moves back to where it started and removes the cgroup.
//!
//! Both path forms are understood: cgroupfs (`/kubepods/besteffort/pod<uid>/<id>`) and
//! systemd (`kubepods-besteffort-pod<uid>.slice:cri-containerd:<id>`, which is placed at the
//! slice's path as `cri-containerd-<id>.scope`; the folder is made directly, no transient
//! unit is registered with systemd).
//!
//! cgroup v2 is one hierarchy; on a cgroup v1 host the shim joins the same relative path
//! in every hierarchy it belongs to, as runc's cgroupfs manager does.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// The cgroup folder (relative to a hierarchy's root) for a spec's `cgroupsPath`.
pub fn relative_path(cgroups_path: &str) -> Result<PathBuf> {
    let p = cgroups_path.trim();
    if p.is_empty() {
        bail!("empty cgroupsPath");
    }
    let rel = if p.starts_with('/') {
        PathBuf::from(p.trim_start_matches('/'))
    } else {
        let parts: Vec<&str> = p.split(':').collect();
        let [slice, prefix, name] = parts[..] else {
            bail!("cgroupsPath {p:?}: neither a path (/a/b) nor systemd's slice:prefix:name");
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
        rel
    };
    if rel
        .components()
        .any(|c| !matches!(c, std::path::Component::Normal(_)))
        || rel.as_os_str().is_empty()
    {
        bail!("cgroupsPath {p:?}: not a plain path below the cgroup root");
    }
    Ok(rel)
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
/// relative path in every one of them, so does the shim).
#[derive(Debug, Clone, PartialEq)]
struct Hierarchy {
    /// Where the hierarchy's root is mounted.
    mount: PathBuf,
    /// This process's cgroup in it, relative to the root.
    own: PathBuf,
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
        if let Some((point, _, _)) = found {
            // On a hybrid host this includes the controller-less unified hierarchy
            // (systemd's bookkeeping), as runc does.
            let h = Hierarchy {
                mount: PathBuf::from(unescape_mount_point(point)),
                own: PathBuf::from(path.trim_start_matches('/')),
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

/// The shim's placement in the pod's cgroup.
#[derive(Debug)]
pub struct PodCgroup {
    /// The pod's cgroup in every hierarchy: (folder, where the shim was before, whether we
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

impl PodCgroup {
    /// Moves this whole process (every thread) into the cgroup for `cgroups_path` in every
    /// hierarchy it belongs to, creating it if needed.
    pub fn enter(cgroups_path: &str) -> Result<Self> {
        Self::enter_in(&hierarchies()?, cgroups_path)
    }

    fn enter_in(hierarchies: &[Hierarchy], cgroups_path: &str) -> Result<Self> {
        let rel = relative_path(cgroups_path)?;
        if hierarchies.is_empty() {
            bail!("no cgroup filesystem of this process is mounted (see /proc/self/cgroup)");
        }
        let mut cg = Self {
            placements: Vec::new(),
            left: std::sync::atomic::AtomicBool::new(false),
        };
        for h in hierarchies {
            let path = h.mount.join(&rel);
            let created = !path.exists();
            let placed = create_cgroup_dirs(&h.mount, &rel)
                .with_context(|| format!("creating the pod cgroup {}", path.display()))
                .and_then(|()| {
                    cg.placements.push(Placement {
                        path: path.clone(),
                        origin: h.mount.join(&h.own),
                        created,
                    });
                    move_self(&path)
                });
            if let Err(e) = placed {
                cg.leave();
                return Err(e);
            }
        }
        Ok(cg)
    }

    /// The pod's cgroup folders (one per hierarchy).
    #[cfg(test)]
    pub fn paths(&self) -> impl Iterator<Item = &Path> {
        self.placements.iter().map(|p| p.path.as_path())
    }

    /// Moves the shim back to where it started and removes the cgroup if we made it.
    /// Idempotent.
    pub fn leave(&self) {
        if self.left.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        for p in &self.placements {
            if let Err(e) = move_self(&p.origin) {
                tracing::warn!("{e:#}");
            }
            if p.created
                && let Err(e) = std::fs::remove_dir(&p.path)
            {
                tracing::warn!("removing the pod cgroup {}: {e}", p.path.display());
            }
        }
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
        .with_context(|| format!("moving the shim into {}", cgroup.display()))
}

/// `delete` after a shim died: removes the pod cgroup in every hierarchy. What is still
/// in it belonged to the dead shim (its virtiofsd, or the shim itself while the kernel is
/// still tearing it down): it is killed, and the removal retried for a few seconds.
pub fn remove_after_crash(cgroups_path: &str) {
    let (Ok(rel), Ok(hierarchies)) = (relative_path(cgroups_path), hierarchies()) else {
        return;
    };
    let deadline = std::time::Instant::now() + CRASH_CLEANUP_WAIT;
    for h in hierarchies {
        let path = h.mount.join(&rel);
        loop {
            match std::fs::remove_dir(&path) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(e)
                    if e.raw_os_error() == Some(libc::EBUSY)
                        && std::time::Instant::now() < deadline =>
                {
                    kill_members(&path);
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(e) => {
                    tracing::warn!("removing the pod cgroup {}: {e}", path.display());
                    eprintln!(
                        "{}: removing the pod cgroup {}: {e}",
                        crate::RUNTIME_NAME,
                        path.display()
                    );
                    break;
                }
            }
        }
    }
}

/// How long `delete` waits for a dead shim's cgroup to empty.
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
            relative_path("/kubepods/besteffort/pod1/abc").unwrap(),
            PathBuf::from("kubepods/besteffort/pod1/abc")
        );
        assert_eq!(
            relative_path("kubepods-besteffort-pod1.slice:cri-containerd:abc").unwrap(),
            PathBuf::from(
                "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1.slice/cri-containerd-abc.scope"
            )
        );
        assert_eq!(
            relative_path(":cri-containerd:abc").unwrap(),
            PathBuf::from("system.slice/cri-containerd-abc.scope")
        );
        for bad in [
            "",
            "/a/../b",
            "a:b",
            "x.slice:p:../n",
            "-a.slice:p:n",
            "nope:p:n",
        ] {
            assert!(relative_path(bad).is_err(), "{bad:?}");
        }
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
                own: "user.slice".into()
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
        let name = format!("husk-shim-test-{}", std::process::id());
        let child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "cgroup::tests::child_enters_and_leaves",
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
        let name = format!("husk-shim-crash-test-{}", std::process::id());
        let rel = format!("/{name}/sandbox");
        // A leftover of a dead shim: a process in the sandbox's cgroup, reaped by its parent
        // (here a thread; containerd for a real shim) once it is killed.
        let mut child = std::process::Command::new("sleep")
            .arg("1000")
            .spawn()
            .unwrap();
        let pid = child.id();
        for h in hierarchies().unwrap() {
            create_cgroup_dirs(&h.mount, &relative_path(&rel).unwrap()).unwrap();
            std::fs::write(
                h.mount.join(&name).join("sandbox").join("cgroup.procs"),
                pid.to_string(),
            )
            .unwrap();
        }
        let reaper = std::thread::spawn(move || child.wait().unwrap());
        remove_after_crash(&rel);
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
        let cg = PodCgroup::enter(&path).unwrap();
        let now = hierarchies().unwrap();
        let placed: Vec<PathBuf> = cg.paths().map(Path::to_path_buf).collect();
        assert_eq!(placed.len(), before.len());
        for h in &now {
            assert!(
                placed.contains(&h.mount.join(&h.own)),
                "the process is in the pod cgroup of {}",
                h.mount.display()
            );
        }
        cg.leave();
        assert_eq!(hierarchies().unwrap(), before);
        for p in placed {
            assert!(!p.exists());
        }
    }
}
