//! What the host resources a container's spec names become in the VM (the shim's
//! `HostMapping` for `husk_runtime::bundle::guest_spec_with`):
//! - the pod's network namespace (a host netns made by CRI/CNI) is the VM's own: every
//!   container of the pod stays in the agent's network namespace, where the pod's
//!   interface is;
//! - a pod container's `/proc/<pid>/ns/<type>` of the sandbox (CRI names the pid the shim
//!   reported for it: the shim's own) becomes the sandbox container's namespace in the guest;
//! - host bind mounts (CRI's hosts, hostname and resolv.conf files, volumes) are bound into
//!   the VM's shared folder and reach the guest over virtio-fs; `/dev/shm` becomes the
//!   pod's guest tmpfs. Without a shared folder (block rootfs) they are skipped.

use std::path::Path;

use husk_runtime::bundle::{HostMapping, NamespaceMapping};

use crate::pod::Role;
use crate::sandbox::SHM_MOUNT;
use crate::share::SharedDir;

pub struct PodMapping<'a> {
    pub role: &'a Role,
    pub container_id: &'a str,
    pub shared: Option<&'a SharedDir>,
    /// The pid containerd knows the pod's sandbox by (the shim's).
    pub host_pid: u32,
    /// The sandbox container's init pid in the guest (pod containers only).
    pub sandbox_guest_pid: Option<u32>,
    next_bind: usize,
}

impl<'a> PodMapping<'a> {
    pub fn new(
        role: &'a Role,
        container_id: &'a str,
        shared: Option<&'a SharedDir>,
        host_pid: u32,
        sandbox_guest_pid: Option<u32>,
    ) -> Self {
        Self {
            role,
            container_id,
            shared,
            host_pid,
            sandbox_guest_pid,
            next_bind: 0,
        }
    }
}

impl HostMapping for PodMapping<'_> {
    fn namespace(&mut self, kind: &str, path: &str) -> NamespaceMapping {
        let in_pod = !matches!(self.role, Role::Standalone);
        if in_pod && kind == "network" {
            return NamespaceMapping::Inherit;
        }
        if let (Role::PodMember { .. }, Some(guest_pid)) = (self.role, self.sandbox_guest_pid) {
            let sandbox_ns = format!("/proc/{}/ns/", self.host_pid);
            if let Some(ns) = path.strip_prefix(&sandbox_ns) {
                return NamespaceMapping::Join(format!("/proc/{guest_pid}/ns/{ns}"));
            }
        }
        NamespaceMapping::New
    }

    fn bind(
        &mut self,
        destination: &str,
        source: &str,
        options: &[String],
    ) -> Result<Option<String>, String> {
        let Some(shared) = self.shared else {
            return Ok(None);
        };
        if destination == "/dev/shm" && !matches!(self.role, Role::Standalone) {
            return Ok(Some(format!("sandbox://mounts/{SHM_MOUNT}")));
        }
        let read_only = options.iter().any(|o| o == "ro");
        let n = self.next_bind;
        self.next_bind += 1;
        shared
            .add_bind(self.container_id, n, Path::new(source), read_only)
            .map(Some)
            .map_err(|e| format!("{e:#}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces_by_role() {
        let member = Role::PodMember {
            sandbox_id: "pod".into(),
        };
        let mut m = PodMapping::new(&member, "c1", None, 4242, Some(7));
        assert_eq!(
            m.namespace("network", "/proc/4242/ns/net"),
            NamespaceMapping::Inherit
        );
        assert_eq!(
            m.namespace("ipc", "/proc/4242/ns/ipc"),
            NamespaceMapping::Join("/proc/7/ns/ipc".into())
        );
        assert_eq!(
            m.namespace("pid", "/proc/4242/ns/pid"),
            NamespaceMapping::Join("/proc/7/ns/pid".into())
        );
        // Some other host process's namespace cannot be joined in the guest.
        assert_eq!(m.namespace("uts", "/proc/1/ns/uts"), NamespaceMapping::New);

        let sandbox = Role::Sandbox;
        let mut m = PodMapping::new(&sandbox, "pod", None, 4242, None);
        assert_eq!(
            m.namespace("network", "/var/run/netns/cni-1"),
            NamespaceMapping::Inherit
        );

        let lone = Role::Standalone;
        let mut m = PodMapping::new(&lone, "c", None, 4242, None);
        assert_eq!(
            m.namespace("network", "/var/run/netns/x"),
            NamespaceMapping::New
        );
        // No shared folder: binds are skipped.
        assert_eq!(m.bind("/etc/hosts", "/x/hosts", &[]), Ok(None));
    }
}
