//! What the host resources a container's spec names become in the VM (the shim's
//! `HostMapping` for `husk_runtime::bundle::guest_spec`):
//! - the pod's network namespace (a host netns made by CRI/CNI) is the VM's own: every
//!   container of the pod stays in the agent's network namespace, where the pod's
//!   interface is;
//! - a pod container's `/proc/<pid>/ns/<type>` of the sandbox (CRI names the pid the shim
//!   reported for it: the shim's own) becomes the sandbox container's namespace in the guest;
//! - host bind mounts (CRI's hosts, hostname and resolv.conf files, volumes) are bound into
//!   the VM's shared folder and reach the guest over virtio-fs; `/dev/shm` becomes the
//!   pod's guest tmpfs, and the pod's resolv.conf the guest's copy the agent wrote from
//!   CreateSandbox (`network::dns`). Without a shared folder (block rootfs) they are
//!   skipped;
//! - every container gets a private cgroup namespace (`with_private_cgroup_namespace`).

use std::path::Path;

use husk_runtime::bundle::{HostMapping, NamespaceMapping};
use serde_json::{Value, json};

use crate::pod::Role;
use crate::sandbox::SHM_MOUNT;
use crate::share::SharedDir;

/// The pod's resolv.conf as the agent wrote it from CreateSandbox's DNS settings.
const GUEST_RESOLV_CONF: &str = "sandbox://resolv.conf";

/// Adds a cgroup namespace to a guest spec that has none. containerd (CRI and `ctr`), like
/// podman and Docker, picks the cgroup namespace by the *host's* cgroup mode: private on
/// cgroup v2, the host's on v1. The guest is always cgroup v2, so its containers get the v2
/// default wherever the host stands: `/sys/fs/cgroup` shows the container's own cgroup
/// (its `memory.max`), not the guest's whole tree. Returns whether it added one.
pub fn with_private_cgroup_namespace(spec: &mut Value) -> bool {
    let Some(namespaces) = spec
        .get_mut("linux")
        .and_then(|l| l.get_mut("namespaces"))
        .and_then(Value::as_array_mut)
    else {
        // No namespace list: the spec asks for none at all; leave it so.
        return false;
    };
    if namespaces
        .iter()
        .any(|ns| ns.get("type").and_then(Value::as_str) == Some("cgroup"))
    {
        return false;
    }
    namespaces.push(json!({"type": "cgroup"}));
    true
}

pub struct PodMapping<'a> {
    pub role: &'a Role,
    pub container_id: &'a str,
    pub shared: Option<&'a SharedDir>,
    /// The pid containerd knows the pod's sandbox by (the shim's).
    pub host_pid: u32,
    /// The sandbox container's init pid in the guest (pod containers only).
    pub sandbox_guest_pid: Option<u32>,
    /// The host resolv.conf whose settings the guest's `sandbox://resolv.conf` holds.
    pub resolv_conf_source: Option<&'a Path>,
    next_bind: usize,
}

impl<'a> PodMapping<'a> {
    pub fn new(
        role: &'a Role,
        container_id: &'a str,
        shared: Option<&'a SharedDir>,
        host_pid: u32,
        sandbox_guest_pid: Option<u32>,
        resolv_conf_source: Option<&'a Path>,
    ) -> Self {
        Self {
            role,
            container_id,
            shared,
            host_pid,
            sandbox_guest_pid,
            resolv_conf_source,
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
        if destination == "/etc/resolv.conf" && self.resolv_conf_source == Some(Path::new(source)) {
            return Ok(Some(GUEST_RESOLV_CONF.to_owned()));
        }
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
    fn containers_get_a_private_cgroup_namespace_once() {
        let mut spec = json!({"linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}]}});
        assert!(with_private_cgroup_namespace(&mut spec));
        assert_eq!(
            spec["linux"]["namespaces"],
            json!([{"type": "pid"}, {"type": "mount"}, {"type": "cgroup"}])
        );
        // Already there (new or joined): unchanged.
        assert!(!with_private_cgroup_namespace(&mut spec));
        let mut joined = json!({"linux": {"namespaces": [
            {"type": "cgroup", "path": "/proc/7/ns/cgroup"}]}});
        let before = joined.clone();
        assert!(!with_private_cgroup_namespace(&mut joined));
        assert_eq!(joined, before);
        // No namespace list at all: none asked for, none added.
        let mut bare = json!({"linux": {}});
        assert!(!with_private_cgroup_namespace(&mut bare));
        assert_eq!(bare, json!({"linux": {}}));
    }

    #[test]
    fn namespaces_by_role() {
        let member = Role::PodMember {
            sandbox_id: "pod".into(),
        };
        let mut m = PodMapping::new(&member, "c1", None, 4242, Some(7), None);
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
        let mut m = PodMapping::new(&sandbox, "pod", None, 4242, None, None);
        assert_eq!(
            m.namespace("network", "/var/run/netns/cni-1"),
            NamespaceMapping::Inherit
        );

        let lone = Role::Standalone;
        let mut m = PodMapping::new(&lone, "c", None, 4242, None, None);
        assert_eq!(
            m.namespace("network", "/var/run/netns/x"),
            NamespaceMapping::New
        );
        // No shared folder: binds are skipped.
        assert_eq!(m.bind("/etc/hosts", "/x/hosts", &[]), Ok(None));
    }

    #[test]
    fn the_pods_resolv_conf_becomes_the_guests_copy() {
        let member = Role::PodMember {
            sandbox_id: "pod".into(),
        };
        let pod_file = Path::new("/var/lib/containerd/sandboxes/pod/resolv.conf");
        let mut m = PodMapping::new(&member, "c1", None, 4242, Some(7), Some(pod_file));
        assert_eq!(
            m.bind("/etc/resolv.conf", &pod_file.display().to_string(), &[]),
            Ok(Some("sandbox://resolv.conf".into()))
        );
        // Another file at that place, or the pod's file elsewhere, is an ordinary bind
        // (skipped here: no shared folder).
        assert_eq!(
            m.bind("/etc/resolv.conf", "/etc/resolv.conf", &[]),
            Ok(None)
        );
        assert_eq!(
            m.bind("/mnt/resolv.conf", &pod_file.display().to_string(), &[]),
            Ok(None)
        );
        // Without DNS in the guest (None), the pod's file is an ordinary bind too.
        let mut m = PodMapping::new(&member, "c1", None, 4242, Some(7), None);
        assert_eq!(
            m.bind("/etc/resolv.conf", &pod_file.display().to_string(), &[]),
            Ok(None)
        );
    }
}
