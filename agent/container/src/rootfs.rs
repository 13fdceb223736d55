//! The container's file system view: spec mounts in order, /dev, pivot_root, masked and
//! read-only paths, read-only root. The plan is built (and checked) in the agent; the
//! child runs it inside its new mount namespace.

use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sys::stat::{Mode, SFlag, makedev, mknod};
use nix::unistd::{Gid, Uid, chdir, chown, chroot, pivot_root};
use oci_spec::runtime::{LinuxDevice, LinuxDeviceType, Spec};

use crate::error::{Error, Result, SysContext};
use crate::safe_path::{self, Kind};

/// One mount from `mounts[]`, options already split into flags and data.
#[derive(Debug, Clone)]
pub struct MountPlan {
    pub destination: PathBuf,
    pub fstype: String,
    pub source: Option<PathBuf>,
    pub flags: MsFlags,
    /// Propagation changes applied after the mount (shared, rslave, ...).
    pub propagation: Vec<MsFlags>,
    pub data: String,
    pub bind: bool,
}

/// A device node to create under /dev.
#[derive(Debug, Clone)]
pub struct DevicePlan {
    pub path: PathBuf,
    pub kind: SFlag,
    pub major: u64,
    pub minor: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

#[derive(Debug, Clone)]
pub struct RootfsPlan {
    /// Canonical host path of the rootfs directory.
    pub root: PathBuf,
    pub readonly: bool,
    /// `linux.rootfsPropagation` applied to the rootfs mount (default: private).
    pub propagation: MsFlags,
    pub mounts: Vec<MountPlan>,
    pub devices: Vec<DevicePlan>,
    /// Create the default /dev nodes and links (when /dev is a fresh tmpfs).
    pub default_dev: bool,
    /// In a user namespace device nodes cannot be created: bind the host's instead.
    pub bind_devices: bool,
    pub masked: Vec<PathBuf>,
    pub readonly_paths: Vec<PathBuf>,
    pub sysctl: Vec<(String, String)>,
}

/// Parses mount options into (flags, propagation, data, bind).
fn parse_options(options: &[String]) -> (MsFlags, Vec<MsFlags>, String, bool) {
    let mut flags = MsFlags::empty();
    let mut prop = Vec::new();
    let mut data: Vec<&str> = Vec::new();
    let mut bind = false;
    for o in options {
        let (set, clear) = match o.as_str() {
            "ro" => (MsFlags::MS_RDONLY, MsFlags::empty()),
            "rw" => (MsFlags::empty(), MsFlags::MS_RDONLY),
            "nosuid" => (MsFlags::MS_NOSUID, MsFlags::empty()),
            "suid" => (MsFlags::empty(), MsFlags::MS_NOSUID),
            "nodev" => (MsFlags::MS_NODEV, MsFlags::empty()),
            "dev" => (MsFlags::empty(), MsFlags::MS_NODEV),
            "noexec" => (MsFlags::MS_NOEXEC, MsFlags::empty()),
            "exec" => (MsFlags::empty(), MsFlags::MS_NOEXEC),
            "sync" => (MsFlags::MS_SYNCHRONOUS, MsFlags::empty()),
            "async" => (MsFlags::empty(), MsFlags::MS_SYNCHRONOUS),
            "dirsync" => (MsFlags::MS_DIRSYNC, MsFlags::empty()),
            "mand" => (MsFlags::MS_MANDLOCK, MsFlags::empty()),
            "nomand" => (MsFlags::empty(), MsFlags::MS_MANDLOCK),
            "atime" => (MsFlags::empty(), MsFlags::MS_NOATIME),
            "noatime" => (MsFlags::MS_NOATIME, MsFlags::empty()),
            "diratime" => (MsFlags::empty(), MsFlags::MS_NODIRATIME),
            "nodiratime" => (MsFlags::MS_NODIRATIME, MsFlags::empty()),
            "relatime" => (MsFlags::MS_RELATIME, MsFlags::empty()),
            "norelatime" => (MsFlags::empty(), MsFlags::MS_RELATIME),
            "strictatime" => (MsFlags::MS_STRICTATIME, MsFlags::empty()),
            "nostrictatime" => (MsFlags::empty(), MsFlags::MS_STRICTATIME),
            "bind" => {
                bind = true;
                (MsFlags::MS_BIND, MsFlags::empty())
            }
            "rbind" => {
                bind = true;
                (MsFlags::MS_BIND | MsFlags::MS_REC, MsFlags::empty())
            }
            other => {
                if let Some(p) = propagation_flag(other) {
                    prop.push(p);
                } else {
                    data.push(other);
                }
                continue;
            }
        };
        flags = (flags | set) & !clear;
    }
    (flags, prop, data.join(","), bind)
}

fn propagation_flag(name: &str) -> Option<MsFlags> {
    Some(match name {
        "private" => MsFlags::MS_PRIVATE,
        "rprivate" => MsFlags::MS_PRIVATE | MsFlags::MS_REC,
        "shared" => MsFlags::MS_SHARED,
        "rshared" => MsFlags::MS_SHARED | MsFlags::MS_REC,
        "slave" => MsFlags::MS_SLAVE,
        "rslave" => MsFlags::MS_SLAVE | MsFlags::MS_REC,
        "unbindable" => MsFlags::MS_UNBINDABLE,
        "runbindable" => MsFlags::MS_UNBINDABLE | MsFlags::MS_REC,
        _ => return None,
    })
}

impl RootfsPlan {
    /// Builds the plan from the spec. `root` is the rootfs directory (must exist).
    pub fn from_spec(spec: &Spec, root: &Path, user_ns: bool) -> Result<Self> {
        let root = root
            .canonicalize()
            .map_err(|e| Error::invalid("root.path", format!("rootfs {root:?}: {e}")))?;
        if !root.is_dir() {
            return Err(Error::invalid(
                "root.path",
                format!("rootfs {root:?} is not a directory"),
            ));
        }
        let linux = crate::spec::linux(spec)?;
        let mut mounts = Vec::new();
        for (i, m) in spec
            .mounts()
            .as_deref()
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            let dest = m.destination();
            if !dest.is_absolute() {
                return Err(Error::invalid(
                    format!("mounts[{i}].destination"),
                    format!("{dest:?} is not absolute"),
                ));
            }
            let (flags, propagation, data, bind) =
                parse_options(m.options().as_deref().unwrap_or_default());
            let fstype = m
                .typ()
                .clone()
                .unwrap_or_else(|| if bind { "bind".into() } else { String::new() });
            if fstype.is_empty() {
                return Err(Error::invalid(format!("mounts[{i}].type"), "missing"));
            }
            let bind = bind || fstype == "bind";
            if bind && m.source().is_none() {
                return Err(Error::invalid(
                    format!("mounts[{i}].source"),
                    "a bind mount needs a source",
                ));
            }
            mounts.push(MountPlan {
                destination: dest.clone(),
                fstype,
                source: m.source().clone(),
                flags: if bind {
                    flags | MsFlags::MS_BIND
                } else {
                    flags
                },
                propagation,
                data,
                bind,
            });
        }
        let dev_is_tmpfs = mounts
            .iter()
            .any(|m| m.destination == Path::new("/dev") && !m.bind);
        let mut devices = Vec::new();
        for (i, d) in linux
            .devices()
            .as_deref()
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            devices.push(device_plan(d, &format!("linux.devices[{i}]"))?);
        }
        let propagation = match linux.rootfs_propagation().as_deref() {
            None | Some("") => MsFlags::MS_PRIVATE,
            Some(p) => propagation_flag(p).ok_or_else(|| {
                Error::invalid("linux.rootfsPropagation", format!("unknown value {p:?}"))
            })?,
        };
        let paths = |v: &Option<Vec<String>>, field: &str| -> Result<Vec<PathBuf>> {
            v.as_deref()
                .unwrap_or_default()
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    let p = PathBuf::from(p);
                    if p.is_absolute() {
                        Ok(p)
                    } else {
                        Err(Error::invalid(format!("{field}[{i}]"), "not absolute"))
                    }
                })
                .collect()
        };
        let mut sysctl: Vec<(String, String)> = Vec::new();
        for (k, v) in linux.sysctl().iter().flatten() {
            if k.is_empty() || k.split(['.', '/']).any(|c| c.is_empty() || c == "..") {
                return Err(Error::invalid(format!("linux.sysctl.{k}"), "invalid key"));
            }
            sysctl.push((k.clone(), v.clone()));
        }
        sysctl.sort();
        Ok(RootfsPlan {
            readonly: spec
                .root()
                .as_ref()
                .and_then(|r| r.readonly())
                .unwrap_or(false),
            root,
            propagation,
            mounts,
            devices,
            default_dev: dev_is_tmpfs,
            bind_devices: user_ns,
            masked: paths(linux.masked_paths(), "linux.maskedPaths")?,
            readonly_paths: paths(linux.readonly_paths(), "linux.readonlyPaths")?,
            sysctl,
        })
    }

    /// Child side, before pivot_root: makes the host's mounts invisible to propagation,
    /// makes the rootfs a mount point, performs the spec mounts and creates /dev.
    pub fn prepare(&self) -> Result<()> {
        // Nothing the container mounts may propagate back to the agent's namespace.
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_SLAVE | MsFlags::MS_REC,
            None::<&str>,
        )
        .sys(|| "making / a recursive slave".into())?;
        mount(
            Some(&self.root),
            &self.root,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .sys(|| format!("bind-mounting the rootfs {:?} onto itself", self.root))?;
        mount(
            None::<&str>,
            &self.root,
            None::<&str>,
            self.propagation,
            None::<&str>,
        )
        .sys(|| "setting the rootfs propagation".into())?;
        for m in &self.mounts {
            self.mount_one(m)
                .map_err(|e| Error::Setup(format!("mount {:?}: {e}", m.destination)))?;
        }
        self.create_devices()
    }

    fn mount_one(&self, m: &MountPlan) -> Result<()> {
        let kind = match &m.source {
            Some(src) if m.bind && !src.is_dir() => Kind::File,
            _ => Kind::Dir,
        };
        let (resolved, fd) = safe_path::open_mountpoint(&self.root, &m.destination, kind)?;
        let target = safe_path::fd_path(&fd);
        let data = (!m.data.is_empty()).then_some(m.data.as_str());
        if m.bind {
            let src = m.source.as_deref();
            mount(
                src,
                &target,
                None::<&str>,
                m.flags & (MsFlags::MS_BIND | MsFlags::MS_REC),
                None::<&str>,
            )
            .sys(|| format!("bind {src:?}"))?;
            // Bind mounts ignore most flags: apply them with a remount of the new mount.
            let extra = m.flags & !(MsFlags::MS_BIND | MsFlags::MS_REC);
            if !extra.is_empty() {
                mount(
                    None::<&str>,
                    &resolved,
                    None::<&str>,
                    extra | MsFlags::MS_BIND | MsFlags::MS_REMOUNT,
                    None::<&str>,
                )
                .sys(|| "remounting the bind mount with its options".into())?;
            }
        } else {
            let fstype = if m.fstype == "cgroup" {
                "cgroup2"
            } else {
                m.fstype.as_str()
            };
            let source = m.source.clone().unwrap_or_else(|| PathBuf::from(&m.fstype));
            mount(Some(&source), &target, Some(fstype), m.flags, data)
                .sys(|| format!("mount type {fstype}"))?;
        }
        for p in &m.propagation {
            mount(None::<&str>, &resolved, None::<&str>, *p, None::<&str>)
                .sys(|| "changing propagation".into())?;
        }
        Ok(())
    }

    fn create_devices(&self) -> Result<()> {
        let defaults: &[(&str, u64, u64)] = &[
            ("null", 1, 3),
            ("zero", 1, 5),
            ("full", 1, 7),
            ("random", 1, 8),
            ("urandom", 1, 9),
            ("tty", 5, 0),
        ];
        let mut all: Vec<DevicePlan> = Vec::new();
        if self.default_dev {
            all.extend(defaults.iter().map(|&(name, major, minor)| DevicePlan {
                path: PathBuf::from("/dev").join(name),
                kind: SFlag::S_IFCHR,
                major,
                minor,
                mode: 0o666,
                uid: 0,
                gid: 0,
            }));
        }
        all.extend(self.devices.iter().cloned());
        for d in &all {
            self.create_device(d)
                .map_err(|e| Error::Setup(format!("device {:?}: {e}", d.path)))?;
        }
        if self.default_dev {
            let links = [
                ("fd", "/proc/self/fd"),
                ("stdin", "/proc/self/fd/0"),
                ("stdout", "/proc/self/fd/1"),
                ("stderr", "/proc/self/fd/2"),
                ("ptmx", "pts/ptmx"),
                ("core", "/proc/kcore"),
            ];
            for (name, target) in links {
                let link = safe_path::resolve(&self.root, &Path::new("/dev").join(name))?;
                if std::fs::symlink_metadata(&link).is_ok() {
                    continue;
                }
                std::os::unix::fs::symlink(target, &link)
                    .sys(|| format!("creating symlink {link:?}"))?;
            }
            for dir in ["pts", "shm"] {
                safe_path::open_mountpoint(&self.root, &Path::new("/dev").join(dir), Kind::Dir)?;
            }
        }
        Ok(())
    }

    fn create_device(&self, d: &DevicePlan) -> Result<()> {
        if self.bind_devices {
            let (_, fd) = safe_path::open_mountpoint(&self.root, &d.path, Kind::File)?;
            return mount(
                Some(&d.path),
                &safe_path::fd_path(&fd),
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .sys(|| "binding the host device".into());
        }
        if let Some(parent) = d.path.parent() {
            safe_path::open_mountpoint(&self.root, parent, Kind::Dir)?;
        }
        let path = safe_path::resolve(&self.root, &d.path)?;
        if std::fs::symlink_metadata(&path).is_ok() {
            std::fs::remove_file(&path).sys(|| format!("replacing {path:?}"))?;
        }
        mknod(
            &path,
            d.kind,
            Mode::from_bits_truncate(d.mode),
            makedev(d.major, d.minor),
        )
        .sys(|| "mknod".into())?;
        chown(
            &path,
            Some(Uid::from_raw(d.uid)),
            Some(Gid::from_raw(d.gid)),
        )
        .sys(|| "chown".into())
    }

    /// Child side: makes the rootfs `/`. pivot_root, unless the current root cannot be
    /// pivoted (the guest's initramfs is `rootfs`, which pivot_root refuses with EINVAL):
    /// then the rootfs is moved over `/` and chrooted into, as `runc --no-pivot` does.
    /// The agent's old root stays reachable only to a process holding CAP_SYS_CHROOT.
    pub fn enter(&self) -> Result<()> {
        chdir(&self.root).sys(|| format!("chdir {:?}", self.root))?;
        match pivot_root(".", ".") {
            Ok(()) => {
                // The old root is now stacked on "."; detach it.
                umount2(".", MntFlags::MNT_DETACH).sys(|| "detaching the old root".into())?;
            }
            Err(Errno::EINVAL) => {
                mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
                    .sys(|| "moving the rootfs onto / (pivot_root refused)".into())?;
                chroot(".").sys(|| "chroot into the rootfs".into())?;
            }
            Err(e) => {
                return Err(Error::Sys {
                    what: "pivot_root".into(),
                    source: e,
                });
            }
        }
        chdir("/").sys(|| "chdir /".into())
    }

    /// Child side, after [`enter`](Self::enter): sysctls, masked and read-only paths,
    /// read-only root.
    pub fn finish(&self) -> Result<()> {
        let root = Path::new("/");
        for (key, value) in &self.sysctl {
            let path = Path::new("/proc/sys").join(key.replace('.', "/"));
            std::fs::write(&path, value).sys(|| format!("sysctl {key}"))?;
        }
        for p in &self.masked {
            let resolved = safe_path::resolve(root, p)?;
            let target = match std::fs::symlink_metadata(&resolved) {
                Ok(m) => m,
                Err(_) => continue,
            };
            if target.is_dir() {
                mount(
                    Some("tmpfs"),
                    &resolved,
                    Some("tmpfs"),
                    MsFlags::MS_RDONLY,
                    None::<&str>,
                )
            } else {
                mount(
                    Some("/dev/null"),
                    &resolved,
                    None::<&str>,
                    MsFlags::MS_BIND,
                    None::<&str>,
                )
            }
            .sys(|| format!("masking {p:?}"))?;
        }
        for p in &self.readonly_paths {
            let resolved = safe_path::resolve(root, p)?;
            if std::fs::symlink_metadata(&resolved).is_err() {
                continue;
            }
            readonly_bind(&resolved).sys(|| format!("making {p:?} read-only"))?;
        }
        if self.readonly {
            mount(
                None::<&str>,
                "/",
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                None::<&str>,
            )
            .sys(|| "remounting the root read-only".into())?;
        }
        Ok(())
    }
}

fn readonly_bind(path: &Path) -> nix::Result<()> {
    mount(
        Some(path),
        path,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )?;
    mount(
        None::<&str>,
        path,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_REC,
        None::<&str>,
    )
}

fn device_plan(d: &LinuxDevice, field: &str) -> Result<DevicePlan> {
    let kind = match d.typ() {
        LinuxDeviceType::C | LinuxDeviceType::U => SFlag::S_IFCHR,
        LinuxDeviceType::B => SFlag::S_IFBLK,
        LinuxDeviceType::P => SFlag::S_IFIFO,
        LinuxDeviceType::A => {
            return Err(Error::invalid(
                format!("{field}.type"),
                "\"a\" is not a device node type",
            ));
        }
    };
    if !d.path().starts_with("/dev/") {
        return Err(Error::invalid(
            format!("{field}.path"),
            "must be under /dev",
        ));
    }
    let num = |v: i64, f: &str| {
        u64::try_from(v).map_err(|_| Error::invalid(format!("{field}.{f}"), "negative"))
    };
    Ok(DevicePlan {
        path: d.path().clone(),
        kind,
        major: num(d.major(), "major")?,
        minor: num(d.minor(), "minor")?,
        mode: d.file_mode().unwrap_or(0o666) & 0o7777,
        uid: d.uid().unwrap_or(0),
        gid: d.gid().unwrap_or(0),
    })
}

/// Child side, for an init with a terminal, once in the container's root: binds the pty
/// slave `slave` (a path in the container's devpts) at `/dev/console`, as runc does. No
/// process of the container runs yet and every path resolves inside its root, so plain
/// paths are safe here; /proc may not be mounted.
pub(crate) fn bind_console(slave: &str) -> Result<()> {
    let console = safe_path::resolve(Path::new("/"), Path::new("/dev/console"))?;
    if std::fs::symlink_metadata(&console).is_err() {
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&console)
            .map(drop)
            .sys(|| format!("creating {console:?}"))?;
    }
    mount(
        Some(slave),
        &console,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .sys(|| format!("binding the terminal {slave:?} at /dev/console"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_split_into_flags_propagation_and_data() {
        let opts: Vec<String> = [
            "nosuid", "ro", "rbind", "rslave", "mode=755", "size=64k", "rw",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let (flags, prop, data, bind) = parse_options(&opts);
        assert_eq!(
            flags,
            MsFlags::MS_NOSUID | MsFlags::MS_BIND | MsFlags::MS_REC
        );
        assert_eq!(prop, vec![MsFlags::MS_SLAVE | MsFlags::MS_REC]);
        assert_eq!(data, "mode=755,size=64k");
        assert!(bind);
    }
}
