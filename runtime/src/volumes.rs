//! Host bind mounts (`podman run -v`, a spec's `bind`/`rbind` mounts of host paths) and the
//! virtio-fs rootfs, shared into the guest through one virtiofsd.
//!
//! The shared folder `<state dir>/shared/` holds only empty mount points: `rootfs/` and
//! `binds/<n>` (a folder or a file, like its source). The binds themselves are made in a
//! private mount namespace of virtiofsd, between fork and exec (`SharedFolder::mount_in_new_namespace`):
//! - they vanish with virtiofsd, so a crashed monitor leaves no mount on the host, and a
//!   recursive delete of the state folder can never delete through one into the user's files;
//! - every host-side path operation happens before the guest exists, so nothing the guest
//!   later writes into the share (a planted symlink) is ever followed by a root process;
//! - read-only binds are read-only recursively (`mount_setattr` with `AT_RECURSIVE`), so a
//!   writable mount below a read-only volume gives the guest no way to write either.

use std::ffi::CString;
use std::fs::{DirBuilder, File};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use crate::bundle::{HostMapping, NamespaceMapping};

/// virtio-fs tag of the shared folder, and the name of its sandbox mount in the guest.
pub const SHARE_TAG: &str = "shared";
/// A container's /dev/shm: a guest tmpfs (sandbox mount) instead of the host folder the
/// spec binds, which would be no shared memory with the guest.
pub const SHM_MOUNT: &str = "shm";
pub const SHM_OPTIONS: &str = "nosuid,nodev,noexec,mode=1777,size=65536k";
const ROOTFS_DIR: &str = "rootfs";
const BINDS_DIR: &str = "binds";

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("bind source {path}: {source}")]
    Source {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("creating {path}: {source}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("path {0} contains a NUL byte")]
    Nul(PathBuf),
}

/// One host path a container binds, as it is shared into the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostBind {
    pub source: PathBuf,
    pub read_only: bool,
    pub is_dir: bool,
}

/// The CLI's `HostMapping`: every host bind becomes `binds/<n>` of the shared folder (the
/// guest binds it where the spec says, with the spec's options and propagation). A
/// namespace path names a host namespace, which no process in the VM can join: a
/// network path leaves the container with a network namespace of its own in the guest
/// (the CLI's VM has no NIC; a warning says so), any other type fails the create, since
/// sharing pids, IPC, hostname, mounts, users or cgroups with a host process is
/// impossible across the VM boundary.
#[derive(Debug, Default)]
pub struct SharedBinds {
    pub binds: Vec<HostBind>,
    /// Whether a /dev/shm bind was turned into the guest tmpfs (`SHM_MOUNT`).
    pub uses_shm: bool,
}

impl HostMapping for SharedBinds {
    fn namespace(&mut self, kind: &str, _path: &str) -> NamespaceMapping {
        namespace_in_a_vm(kind)
    }

    fn bind(
        &mut self,
        destination: &str,
        source: &str,
        options: &[String],
    ) -> Result<Option<String>, String> {
        if destination == "/dev/shm" {
            self.uses_shm = true;
            return Ok(Some(format!("sandbox://mounts/{SHM_MOUNT}")));
        }
        // As runc does, a missing source fails the create instead of being skipped.
        let meta = std::fs::metadata(source).map_err(|e| format!("bind source: {e}"))?;
        let n = self.binds.len();
        self.binds.push(HostBind {
            source: PathBuf::from(source),
            read_only: options.iter().any(|o| o == "ro"),
            is_dir: meta.is_dir(),
        });
        Ok(Some(format!(
            "sandbox://mounts/{SHARE_TAG}/{BINDS_DIR}/{n}"
        )))
    }
}

/// What a host namespace path of type `kind` becomes for a container alone in its VM.
pub fn namespace_in_a_vm(kind: &str) -> NamespaceMapping {
    if kind == "network" {
        NamespaceMapping::New
    } else {
        NamespaceMapping::Refuse(format!(
            "a host {kind} namespace cannot be joined from inside a VM (each husk container has its own kernel); remove the path to get a new {kind} namespace in the guest"
        ))
    }
}

/// The container's rootfs as the guest finds it in the shared folder, relative to the
/// sandbox directory.
pub fn guest_rootfs(sandbox_dir: &str) -> String {
    format!("{sandbox_dir}/mounts/{SHARE_TAG}/{ROOTFS_DIR}")
}

struct PlannedBind {
    source: CString,
    target: CString,
    read_only: bool,
}

/// The shared folder with its mount points made, and the binds to make in virtiofsd's
/// mount namespace.
pub struct SharedFolder {
    root: PathBuf,
    binds: Vec<PlannedBind>,
}

impl SharedFolder {
    /// Creates `root` (mode 0700; it must not exist yet) with a mount point for `rootfs`,
    /// if given, and one for each of `binds`.
    pub fn prepare(
        root: &Path,
        rootfs: Option<&Path>,
        binds: &[HostBind],
    ) -> Result<Self, VolumeError> {
        let create_dir = |path: &Path| {
            DirBuilder::new()
                .mode(0o700)
                .create(path)
                .map_err(|source| VolumeError::Create {
                    path: path.to_path_buf(),
                    source,
                })
        };
        create_dir(root)?;
        let mut planned = Vec::new();
        if let Some(rootfs) = rootfs {
            let target = root.join(ROOTFS_DIR);
            create_dir(&target)?;
            planned.push(PlannedBind {
                source: c_path(rootfs)?,
                target: c_path(&target)?,
                read_only: false,
            });
        }
        if !binds.is_empty() {
            create_dir(&root.join(BINDS_DIR))?;
        }
        for (n, b) in binds.iter().enumerate() {
            let target = root.join(BINDS_DIR).join(n.to_string());
            if b.is_dir {
                create_dir(&target)?;
            } else {
                File::options()
                    .write(true)
                    .create_new(true)
                    .open(&target)
                    .map_err(|source| VolumeError::Create {
                        path: target.clone(),
                        source,
                    })?;
            }
            planned.push(PlannedBind {
                source: c_path(&b.source)?,
                target: c_path(&target)?,
                read_only: b.read_only,
            });
        }
        Ok(Self {
            root: root.to_path_buf(),
            binds: planned,
        })
    }

    pub fn path(&self) -> &Path {
        &self.root
    }

    /// Moves the calling process into a new mount namespace (a slave of the host's, so
    /// nothing done here propagates back) and makes the planned binds there.
    ///
    /// Meant for a child between fork and exec: it only makes system calls on memory
    /// prepared beforehand (no allocation), which is async-signal-safe.
    pub fn mount_in_new_namespace(&self) -> std::io::Result<()> {
        // SAFETY: plain system calls on NUL-terminated strings owned by `self`.
        unsafe {
            if libc::unshare(libc::CLONE_NEWNS) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let root = c"/";
            if libc::mount(
                std::ptr::null(),
                root.as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_SLAVE,
                std::ptr::null(),
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            for b in &self.binds {
                if libc::mount(
                    b.source.as_ptr(),
                    b.target.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND | libc::MS_REC,
                    std::ptr::null(),
                ) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                if b.read_only {
                    make_read_only_recursively(&b.target)?;
                }
            }
        }
        Ok(())
    }
}

/// Makes the mount at `target` and every mount below it read-only. A plain
/// `MS_REMOUNT|MS_RDONLY` changes only the top mount and leaves submounts writable.
pub fn make_read_only_recursively(target: &std::ffi::CStr) -> std::io::Result<()> {
    set_read_only_recursively(libc::AT_FDCWD, target, 0)
}

/// Makes the detached mount tree `tree` (from open_tree) read-only, every mount in it.
pub fn make_tree_read_only(tree: std::os::fd::BorrowedFd<'_>) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    set_read_only_recursively(tree.as_raw_fd(), c"", libc::AT_EMPTY_PATH)
}

/// mount_setattr(2) with MOUNT_ATTR_RDONLY and AT_RECURSIVE on `dirfd`/`path`.
fn set_read_only_recursively(
    dirfd: libc::c_int,
    path: &std::ffi::CStr,
    flags: libc::c_int,
) -> std::io::Result<()> {
    let attr = libc::mount_attr {
        attr_set: libc::MOUNT_ATTR_RDONLY,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: `attr` outlives the call and its size is passed along.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            dirfd,
            path.as_ptr(),
            flags | libc::AT_RECURSIVE,
            &attr as *const libc::mount_attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn c_path(p: &Path) -> Result<CString, VolumeError> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| VolumeError::Nul(p.to_path_buf()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bundle::guest_spec;
    use serde_json::json;
    use std::os::unix::process::CommandExt;
    use std::process::Command;

    #[test]
    fn binds_map_to_the_share_and_a_missing_source_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("hosts");
        std::fs::write(&file, "127.0.0.1 x\n").unwrap();
        let dir = tmp.path().to_str().unwrap();
        let spec = json!({"mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/mnt/vol", "type": "bind", "source": dir, "options": ["rbind", "rslave", "ro"]},
            {"destination": "/etc/hosts", "source": file, "options": ["bind"]},
            {"destination": "/dev/shm", "type": "bind", "source": dir, "options": ["rbind"]},
        ]});
        let mut binds = SharedBinds::default();
        let (guest, warnings) = guest_spec(&spec, &mut binds).unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        let m = guest["mounts"].as_array().unwrap();
        assert_eq!(m.len(), 4);
        assert_eq!(m[1]["source"], "sandbox://mounts/shared/binds/0");
        // The spec's options travel on to the guest, which applies them.
        assert_eq!(m[1]["options"], json!(["rbind", "rslave", "ro"]));
        assert_eq!(m[2]["source"], "sandbox://mounts/shared/binds/1");
        assert_eq!(m[3]["source"], "sandbox://mounts/shm");
        assert!(binds.uses_shm);
        assert_eq!(
            binds.binds,
            vec![
                HostBind {
                    source: tmp.path().to_path_buf(),
                    read_only: true,
                    is_dir: true
                },
                HostBind {
                    source: file.clone(),
                    read_only: false,
                    is_dir: false
                },
            ]
        );

        let spec = json!({"mounts": [
            {"destination": "/data", "type": "bind", "source": "/nonexistent/volume"}]});
        let err = guest_spec(&spec, &mut SharedBinds::default()).unwrap_err();
        assert!(
            err.contains("/data")
                && err.contains("/nonexistent/volume")
                && err.contains("No such file"),
            "{err}"
        );
    }

    #[test]
    fn host_namespace_paths_in_a_vm() {
        let spec = json!({"linux": {"namespaces": [
            {"type": "network", "path": "/run/netns/cni-1"},
            {"type": "pid"},
        ]}});
        let (guest, warnings) = guest_spec(&spec, &mut SharedBinds::default()).unwrap();
        assert_eq!(
            guest["linux"]["namespaces"],
            json!([{"type": "network"}, {"type": "pid"}])
        );
        assert!(warnings[0].contains("/run/netns/cni-1"), "{warnings:?}");
        for kind in ["ipc", "uts", "pid", "mount", "user", "cgroup"] {
            let spec = json!({"linux": {"namespaces": [
                {"type": "network"},
                {"type": kind, "path": "/proc/1/ns/x"},
            ]}});
            let err = guest_spec(&spec, &mut SharedBinds::default()).unwrap_err();
            assert!(
                err.starts_with(&format!("linux.namespaces[1]: {kind} namespace path /proc/1/ns/x: a host {kind} namespace cannot be joined")),
                "{err}"
            );
        }
    }

    #[test]
    fn the_folder_is_private_and_fresh() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("f");
        std::fs::write(&file, "x").unwrap();
        let root = tmp.path().join("shared");
        let binds = [
            HostBind {
                source: tmp.path().to_path_buf(),
                read_only: false,
                is_dir: true,
            },
            HostBind {
                source: file,
                read_only: true,
                is_dir: false,
            },
        ];
        let folder = SharedFolder::prepare(&root, Some(tmp.path()), &binds).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(folder.path())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        assert!(root.join("rootfs").is_dir());
        assert!(root.join("binds/0").is_dir());
        assert!(root.join("binds/1").is_file());
        // A second layout over the first (a leftover, or a guest-planted entry) is refused.
        let err = SharedFolder::prepare(&root, None, &[]).err().unwrap();
        assert!(err.to_string().contains("shared"), "{err}");
    }

    /// Runs `script` under `sh` in a child that made the folder's binds in its own mount
    /// namespace; returns its exit status and output.
    fn in_namespace(folder: &SharedFolder, script: &str) -> (bool, String) {
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(script);
        let folder_ptr = folder as *const SharedFolder as usize;
        // SAFETY: the closure only reads `folder`, which outlives the spawn, and makes
        // system calls (async-signal-safe).
        unsafe {
            cmd.pre_exec(move || (*(folder_ptr as *const SharedFolder)).mount_in_new_namespace());
        }
        let out = cmd.output().unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    #[test]
    fn binds_exist_only_in_the_namespace_and_read_only_covers_submounts() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: bind mounts need root");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let volume = tmp.path().join("volume");
        std::fs::create_dir_all(volume.join("sub")).unwrap();
        std::fs::write(volume.join("hello.txt"), "hello\n").unwrap();
        // A writable mount below the read-only volume.
        nix::mount::mount(
            Some("tmpfs"),
            &volume.join("sub"),
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .unwrap();
        struct Unmount(PathBuf);
        impl Drop for Unmount {
            fn drop(&mut self) {
                let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
            }
        }
        let _guard = Unmount(volume.join("sub"));
        let rootfs = tmp.path().join("rootfs");
        std::fs::create_dir(&rootfs).unwrap();
        let root = tmp.path().join("shared");
        let binds = [
            HostBind {
                source: volume.clone(),
                read_only: true,
                is_dir: true,
            },
            HostBind {
                source: volume.join("hello.txt"),
                read_only: false,
                is_dir: false,
            },
        ];
        let folder = SharedFolder::prepare(&root, Some(&rootfs), &binds).unwrap();
        let r = root.display();
        let (ok, out) = in_namespace(
            &folder,
            &format!(
                "set -e; cat {r}/binds/0/hello.txt; cat {r}/binds/1; \
                 echo w > {r}/rootfs/written; \
                 if touch {r}/binds/0/new 2>/dev/null; then echo top-writable; fi; \
                 if touch {r}/binds/0/sub/new 2>/dev/null; then echo sub-writable; fi"
            ),
        );
        assert!(ok, "{out}");
        assert_eq!(out, "hello\nhello\n", "{out}");
        // The rootfs bind writes through to the rootfs.
        assert_eq!(
            std::fs::read_to_string(rootfs.join("written")).unwrap(),
            "w\n"
        );
        // Nothing of it is mounted on the host.
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(
            !mountinfo.contains(root.to_str().unwrap()),
            "host sees a bind under {r}"
        );
        assert!(
            std::fs::read_dir(root.join("rootfs"))
                .unwrap()
                .next()
                .is_none()
        );
    }
}
