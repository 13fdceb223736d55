//! What a VMM's jail holds, derived from the VM's own configuration so that a boot and a
//! restore need nothing else.

use std::path::{Path, PathBuf};

use husk_vmm::config::{Console, VmConfig};
use serde::{Deserialize, Serialize};

/// `RLIMIT_NOFILE` of a jailed VMM: its devices, sockets, eventfds and guest connections
/// stay well below it; a guest opening vsock connections without end meets it.
pub const DEFAULT_MAX_OPEN_FILES: u64 = 4096;

/// The device node the VMM opens for KVM.
pub const KVM_DEVICE: &str = "/dev/kvm";
/// The device node a tap is opened through.
pub const TUN_DEVICE: &str = "/dev/net/tun";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error(
        "the VMM's uid and gid must not be 0 (vmm_uid = {uid}, vmm_gid = {gid}): a jailed VMM runs unprivileged; set vmm_jail = \"off\" to run it as root"
    )]
    Root { uid: u32, gid: u32 },
    #[error("the guest profiler (--profile) writes host files at exit and runs only unjailed")]
    Profile,
    #[error("{what} {path}: a jailed VMM needs absolute paths")]
    Relative { what: &'static str, path: PathBuf },
    #[error("{what} {path} has no parent folder")]
    NoParent { what: &'static str, path: PathBuf },
}

/// How a host path is bound into the jail (always at its own path).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum BindKind {
    /// Read only (kernel, initramfs, read-only images, snapshots, netns files).
    ReadOnly,
    /// Writable: writable images; folders in which the VMM creates its sockets while still
    /// root (they are root's own 0700 folders, closed to the VMM once it drops root).
    Writable,
    /// A file the VMM writes (console, metrics): the launcher creates it first, so that
    /// nothing beside it is bound.
    Output,
    /// A folder the VMM writes after dropping root (a snapshot's target): the launcher
    /// creates it owned by the VMM's uid, and gives it back to root after the VMM ends.
    VmmOwned,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bind {
    pub path: PathBuf,
    pub kind: BindKind,
}

/// Everything the jail is made of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JailSpec {
    /// Host folder on which the jail's tmpfs is mounted (in the VMM's mount namespace
    /// only): it stays an empty folder on the host.
    pub root: PathBuf,
    pub uid: u32,
    pub gid: u32,
    /// Sorted by path, so that a folder is bound before anything inside it.
    pub binds: Vec<Bind>,
    /// Character devices recreated at their own path (same major/minor), mode 0600 root:
    /// opened before root is dropped.
    pub devices: Vec<PathBuf>,
    pub max_open_files: u64,
}

impl JailSpec {
    /// The jail of the VM `config` describes, rooted at `root`, for a VMM running as
    /// `uid:gid`; `snapshot_dirs` are folders the VMM may write snapshots into.
    pub fn for_vm(
        config: &VmConfig,
        root: &Path,
        uid: u32,
        gid: u32,
        snapshot_dirs: &[PathBuf],
    ) -> Result<JailSpec, SpecError> {
        if uid == 0 || gid == 0 {
            return Err(SpecError::Root { uid, gid });
        }
        if config.profile.is_some() {
            return Err(SpecError::Profile);
        }
        let mut binds = Binds::default();
        match &config.restore {
            Some(dir) => binds.add("the snapshot", dir, BindKind::ReadOnly)?,
            None => {
                binds.add("the kernel", &config.kernel, BindKind::ReadOnly)?;
                if let Some(p) = &config.initramfs {
                    binds.add("the initramfs", p, BindKind::ReadOnly)?;
                }
            }
        }
        for b in &config.blocks {
            let kind = if b.read_only {
                BindKind::ReadOnly
            } else {
                BindKind::Writable
            };
            // An empty slot (a template build) has no host side.
            if let Some(path) = &b.path {
                binds.add("the block image", path, kind)?;
            }
        }
        for f in &config.fs {
            binds.add_parent("the virtio-fs socket", &f.socket)?;
        }
        if let Some(v) = &config.vsock {
            binds.add_parent("the vsock socket", &v.uds)?;
        }
        if let Some(p) = &config.api_socket {
            binds.add_parent("the API socket", p)?;
        }
        if let Console::File(p) = &config.console {
            binds.add("the console file", p, BindKind::Output)?;
        }
        if let Some(p) = &config.metrics_file {
            binds.add("the metrics file", p, BindKind::Output)?;
        }
        for n in &config.nets {
            if let Some(ns) = &n.netns {
                binds.add("the network namespace", ns, BindKind::ReadOnly)?;
            }
        }
        for d in snapshot_dirs {
            binds.add("the snapshot folder", d, BindKind::VmmOwned)?;
        }
        let mut devices = vec![PathBuf::from(KVM_DEVICE)];
        if !config.nets.is_empty() {
            devices.push(PathBuf::from(TUN_DEVICE));
        }
        absolute("the jail folder", root)?;
        Ok(JailSpec {
            root: root.to_path_buf(),
            uid,
            gid,
            binds: binds.done(),
            devices,
            max_open_files: DEFAULT_MAX_OPEN_FILES,
        })
    }

    /// Where `host_path` appears on the host while the jail is being built.
    pub fn inside(&self, host_path: &Path) -> PathBuf {
        let rel = host_path.strip_prefix("/").unwrap_or(host_path);
        self.root.join(rel)
    }
}

#[derive(Default)]
struct Binds(Vec<Bind>);

impl Binds {
    fn add(&mut self, what: &'static str, path: &Path, kind: BindKind) -> Result<(), SpecError> {
        absolute(what, path)?;
        let path = normalize(path);
        match self.0.iter_mut().find(|b| b.path == path) {
            // The same path twice keeps the widest access.
            Some(b) => b.kind = b.kind.max(kind),
            None => self.0.push(Bind { path, kind }),
        }
        Ok(())
    }

    fn add_parent(&mut self, what: &'static str, socket: &Path) -> Result<(), SpecError> {
        absolute(what, socket)?;
        let parent = socket
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .ok_or_else(|| SpecError::NoParent {
                what,
                path: socket.to_path_buf(),
            })?;
        self.add(what, parent, BindKind::Writable)
    }

    fn done(mut self) -> Vec<Bind> {
        self.0.sort_by(|a, b| a.path.cmp(&b.path));
        self.0
    }
}

fn absolute(what: &'static str, path: &Path) -> Result<(), SpecError> {
    if path.is_absolute() {
        Ok(())
    } else {
        Err(SpecError::Relative {
            what,
            path: path.to_path_buf(),
        })
    }
}

/// `a/./b` and trailing slashes out, so that equal paths compare equal (`..` is kept and
/// resolved by the kernel when binding).
fn normalize(path: &Path) -> PathBuf {
    path.components().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> VmConfig {
        let mut all = vec!["husk-vmm"];
        all.extend_from_slice(args);
        <husk_vmm::config::Cli as clap::Parser>::try_parse_from(all)
            .unwrap()
            .into_vm_config()
            .unwrap()
    }

    fn kinds(spec: &JailSpec) -> Vec<(String, BindKind)> {
        spec.binds
            .iter()
            .map(|b| (b.path.display().to_string(), b.kind))
            .collect()
    }

    #[test]
    fn a_boot_binds_its_files_and_its_sockets_folders_only() {
        let c = parse(&[
            "--kernel",
            "/k/vmlinux",
            "--initramfs",
            "/k/initramfs.cpio",
            "--vsock-uds",
            "/run/husk/c1/vm.sock",
            "--fs",
            "socket=/run/husk/c1/fs.sock,tag=share",
            "--block",
            "path=/run/husk/c1/rootfs.img,ro=on,serial=rootfs",
            "--block",
            "path=/data/scratch.img",
            "--console",
            "file:/var/log/husk/c1.console",
        ]);
        let spec = JailSpec::for_vm(&c, Path::new("/run/husk/c1/jail"), 900, 901, &[]).unwrap();
        assert_eq!(
            kinds(&spec),
            vec![
                ("/data/scratch.img".into(), BindKind::Writable),
                ("/k/initramfs.cpio".into(), BindKind::ReadOnly),
                ("/k/vmlinux".into(), BindKind::ReadOnly),
                ("/run/husk/c1".into(), BindKind::Writable),
                ("/run/husk/c1/rootfs.img".into(), BindKind::ReadOnly),
                ("/var/log/husk/c1.console".into(), BindKind::Output),
            ]
        );
        assert_eq!(spec.devices, vec![PathBuf::from(KVM_DEVICE)]);
        assert_eq!(
            spec.inside(Path::new("/k/vmlinux")),
            PathBuf::from("/run/husk/c1/jail/k/vmlinux")
        );
    }

    #[test]
    fn a_restore_binds_the_snapshot_not_the_kernel_and_a_nic_its_netns() {
        let c = parse(&[
            "--restore",
            "/var/lib/husk/templates/abc",
            "--vsock-uds",
            "/run/s/vm.sock",
            "--net",
            "tap=tap0,mac=02:00:00:00:00:01,netns=/var/run/netns/cni-1",
        ]);
        let spec = JailSpec::for_vm(&c, Path::new("/run/s/jail"), 900, 900, &[]).unwrap();
        assert_eq!(
            kinds(&spec),
            vec![
                ("/run/s".into(), BindKind::Writable),
                ("/var/lib/husk/templates/abc".into(), BindKind::ReadOnly),
                ("/var/run/netns/cni-1".into(), BindKind::ReadOnly),
            ]
        );
        assert_eq!(
            spec.devices,
            vec![PathBuf::from(KVM_DEVICE), PathBuf::from(TUN_DEVICE)]
        );
    }

    #[test]
    fn a_snapshot_folder_is_the_vmms_and_duplicates_keep_the_widest_access() {
        let c = parse(&[
            "--kernel",
            "/b/snapshot/../k",
            "--vsock-uds",
            "/b/vm.sock",
            "--api-socket",
            "/b/api.sock",
        ]);
        let spec =
            JailSpec::for_vm(&c, Path::new("/b/jail"), 900, 900, &["/b/snapshot/".into()]).unwrap();
        assert_eq!(
            kinds(&spec),
            vec![
                ("/b".into(), BindKind::Writable),
                ("/b/snapshot".into(), BindKind::VmmOwned),
                ("/b/snapshot/../k".into(), BindKind::ReadOnly),
            ]
        );
    }

    #[test]
    fn root_ids_profiling_and_relative_paths_are_refused_naming_them() {
        let c = parse(&["--kernel", "/k", "--vsock-uds", "/r/vm.sock"]);
        assert_eq!(
            JailSpec::for_vm(&c, Path::new("/r/jail"), 0, 900, &[]),
            Err(SpecError::Root { uid: 0, gid: 900 })
        );
        let profiled = parse(&["--kernel", "/k", "--profile", "/tmp/p"]);
        assert_eq!(
            JailSpec::for_vm(&profiled, Path::new("/r/jail"), 9, 9, &[]),
            Err(SpecError::Profile)
        );
        let relative = parse(&["--kernel", "vmlinux"]);
        let err = JailSpec::for_vm(&relative, Path::new("/r/jail"), 9, 9, &[]).unwrap_err();
        assert!(err.to_string().contains("the kernel vmlinux"), "{err}");
    }
}
