//! Which namespaces a container gets: new ones (clone flags) and existing ones joined by
//! path (`/proc/<pid>/ns/net` of another container: the pod case), plus the fds the
//! child needs to join them.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::fcntl::{OFlag, open};
use nix::sched::{CloneFlags, setns};
use nix::sys::stat::Mode;
use nix::unistd::Pid;
use oci_spec::runtime::{Linux, LinuxNamespaceType};

use crate::error::{Error, Result, SysContext};

/// Namespace kinds the library handles, in the order they are joined: user first (it
/// grants the capabilities to join the rest), mount last (after it, host paths are gone).
const JOIN_ORDER: [LinuxNamespaceType; 7] = [
    LinuxNamespaceType::User,
    LinuxNamespaceType::Ipc,
    LinuxNamespaceType::Uts,
    LinuxNamespaceType::Network,
    LinuxNamespaceType::Pid,
    LinuxNamespaceType::Cgroup,
    LinuxNamespaceType::Mount,
];

/// Name of the namespace under /proc/<pid>/ns/ (and in error messages).
pub fn proc_name(kind: LinuxNamespaceType) -> &'static str {
    match kind {
        LinuxNamespaceType::Mount => "mnt",
        LinuxNamespaceType::Cgroup => "cgroup",
        LinuxNamespaceType::Uts => "uts",
        LinuxNamespaceType::Ipc => "ipc",
        LinuxNamespaceType::User => "user",
        LinuxNamespaceType::Pid => "pid",
        LinuxNamespaceType::Network => "net",
        LinuxNamespaceType::Time => "time",
    }
}

fn clone_flag(kind: LinuxNamespaceType, field: &str) -> Result<CloneFlags> {
    Ok(match kind {
        LinuxNamespaceType::Mount => CloneFlags::CLONE_NEWNS,
        LinuxNamespaceType::Cgroup => CloneFlags::CLONE_NEWCGROUP,
        LinuxNamespaceType::Uts => CloneFlags::CLONE_NEWUTS,
        LinuxNamespaceType::Ipc => CloneFlags::CLONE_NEWIPC,
        LinuxNamespaceType::User => CloneFlags::CLONE_NEWUSER,
        LinuxNamespaceType::Pid => CloneFlags::CLONE_NEWPID,
        LinuxNamespaceType::Network => CloneFlags::CLONE_NEWNET,
        LinuxNamespaceType::Time => {
            return Err(Error::invalid(
                field,
                "namespace type \"time\" is not supported",
            ));
        }
    })
}

/// The container's namespaces as the spec asks for them.
#[derive(Debug, Clone)]
pub struct NamespaceConfig {
    /// Namespaces created for the container (cgroup excluded: see `new_cgroup`).
    pub new: CloneFlags,
    /// A new cgroup namespace, unshared by the init after it has joined its cgroup so the
    /// namespace's root is the container's cgroup.
    pub new_cgroup: bool,
    /// Existing namespaces to join, in join order.
    pub join: Vec<(LinuxNamespaceType, PathBuf)>,
}

impl NamespaceConfig {
    /// Reads `linux.namespaces`. Duplicates and unsupported kinds are errors naming the
    /// entry; a mount namespace is required (the rootfs is set up inside it).
    pub fn from_spec(linux: &Linux) -> Result<Self> {
        let mut cfg = NamespaceConfig {
            new: CloneFlags::empty(),
            new_cgroup: false,
            join: Vec::new(),
        };
        let mut seen: Vec<LinuxNamespaceType> = Vec::new();
        let namespaces = linux.namespaces().as_deref().unwrap_or_default();
        for (i, ns) in namespaces.iter().enumerate() {
            let field = format!("linux.namespaces[{i}]");
            let kind = ns.typ();
            let flag = clone_flag(kind, &format!("{field}.type"))?;
            if seen.contains(&kind) {
                return Err(Error::invalid(
                    field,
                    format!("namespace {:?} listed twice", proc_name(kind)),
                ));
            }
            seen.push(kind);
            match ns.path() {
                Some(path) => {
                    if !path.is_absolute() {
                        return Err(Error::invalid(
                            format!("{field}.path"),
                            format!("{path:?} is not absolute"),
                        ));
                    }
                    cfg.join.push((kind, path.clone()));
                }
                None if kind == LinuxNamespaceType::Cgroup => cfg.new_cgroup = true,
                None => cfg.new |= flag,
            }
        }
        if !seen.contains(&LinuxNamespaceType::Mount) {
            return Err(Error::invalid(
                "linux.namespaces",
                "a mount namespace is required (the rootfs is set up inside it)",
            ));
        }
        cfg.join
            .sort_by_key(|(kind, _)| JOIN_ORDER.iter().position(|k| k == kind));
        let has_user = seen.contains(&LinuxNamespaceType::User);
        let maps = linux.uid_mappings().is_some() || linux.gid_mappings().is_some();
        if cfg.new.contains(CloneFlags::CLONE_NEWUSER) && !maps {
            return Err(Error::invalid(
                "linux.uidMappings",
                "a new user namespace needs uid and gid mappings",
            ));
        }
        if maps && !has_user {
            return Err(Error::invalid(
                "linux.uidMappings",
                "mappings given without a user namespace",
            ));
        }
        Ok(cfg)
    }

    /// Opens every namespace to join. Done in the agent, before forking, so a missing
    /// path fails the create without starting anything.
    pub fn open_joins(&self) -> Result<Vec<NamespaceFd>> {
        self.join
            .iter()
            .map(|(kind, path)| NamespaceFd::open(*kind, path))
            .collect()
    }

    /// True if the container gets a PID namespace of its own.
    pub fn new_pid(&self) -> bool {
        self.new.contains(CloneFlags::CLONE_NEWPID)
    }
}

/// An open namespace file, ready for setns in the child.
#[derive(Debug)]
pub struct NamespaceFd {
    pub kind: LinuxNamespaceType,
    pub fd: OwnedFd,
}

impl NamespaceFd {
    pub fn open(kind: LinuxNamespaceType, path: &Path) -> Result<Self> {
        let fd = open(path, OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty())
            .sys(|| format!("opening {} namespace {path:?}", proc_name(kind)))?;
        Ok(NamespaceFd { kind, fd })
    }

    /// Joins the namespace (child side).
    pub fn join(&self) -> Result<()> {
        let flag = clone_flag(self.kind, "namespace")?;
        setns(self.fd.as_fd(), flag).sys(|| format!("setns {}", proc_name(self.kind)))
    }
}

/// Opens every namespace of process `pid` that differs from the caller's, in join order:
/// what an exec into that process's container must join.
pub fn open_process_namespaces(pid: Pid) -> Result<Vec<NamespaceFd>> {
    let mut fds = Vec::new();
    for kind in JOIN_ORDER {
        let theirs = PathBuf::from(format!("/proc/{pid}/ns/{}", proc_name(kind)));
        let ours = PathBuf::from(format!("/proc/self/ns/{}", proc_name(kind)));
        let (Ok(a), Ok(b)) = (std::fs::metadata(&theirs), std::fs::metadata(&ours)) else {
            // A kernel without this namespace kind: nothing to join.
            continue;
        };
        use std::os::unix::fs::MetadataExt;
        if a.ino() != b.ino() || a.dev() != b.dev() {
            fds.push(NamespaceFd::open(kind, &theirs)?);
        }
    }
    Ok(fds)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::parse;

    fn linux(json: &str) -> Linux {
        let spec = parse(&format!(r#"{{"linux":{json}}}"#)).unwrap();
        spec.linux().clone().unwrap()
    }

    #[test]
    fn namespaces_from_spec() {
        let l = linux(
            r#"{"namespaces":[{"type":"mount"},{"type":"pid"},{"type":"cgroup"},
                {"type":"network","path":"/proc/1/ns/net"},{"type":"user","path":"/proc/1/ns/user"}]}"#,
        );
        let cfg = NamespaceConfig::from_spec(&l).unwrap();
        assert_eq!(cfg.new, CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWPID);
        assert!(cfg.new_cgroup);
        let kinds: Vec<_> = cfg.join.iter().map(|(k, _)| *k).collect();
        assert_eq!(
            kinds,
            [LinuxNamespaceType::User, LinuxNamespaceType::Network]
        );
    }

    #[test]
    fn bad_namespaces_name_the_entry() {
        let err =
            NamespaceConfig::from_spec(&linux(r#"{"namespaces":[{"type":"pid"}]}"#)).unwrap_err();
        assert!(
            err.to_string().contains("mount namespace is required"),
            "{err}"
        );
        let err = NamespaceConfig::from_spec(&linux(
            r#"{"namespaces":[{"type":"mount"},{"type":"time"}]}"#,
        ))
        .unwrap_err();
        assert!(
            err.to_string().contains("linux.namespaces[1].type"),
            "{err}"
        );
        let err = NamespaceConfig::from_spec(&linux(
            r#"{"namespaces":[{"type":"mount"},{"type":"mount"}]}"#,
        ))
        .unwrap_err();
        assert!(err.to_string().contains("linux.namespaces[1]"), "{err}");
        let err = NamespaceConfig::from_spec(&linux(
            r#"{"namespaces":[{"type":"mount"},{"type":"user"}]}"#,
        ))
        .unwrap_err();
        assert!(err.to_string().contains("mappings"), "{err}");
    }
}
