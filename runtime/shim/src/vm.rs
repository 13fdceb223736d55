//! The shim's VM and what it holds on the host: the booted sandbox (VMM + agent), the run
//! folder with its sockets, the virtio-fs shared folder, and for a pod its host cgroup (and
//! network, see `network`). One per shim: a pod's containers all run in it; a container
//! outside any pod has one of its own.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::network::PodNetwork;
use crate::sandbox::Sandbox;
use crate::share::{self, SharedDir};
use husk_runtime::host_cgroup::HostCgroup;

pub struct PodVm {
    /// The container that made the VM: the pod's sandbox container, or the lone container.
    pub owner_id: String,
    /// True for a CRI pod (containers of the pod may join).
    pub is_pod: bool,
    pub sandbox: Sandbox,
    /// Sockets of the VM and virtiofsd, and the shared folder.
    pub run_dir: PathBuf,
    pub shared: Option<SharedDir>,
    pub cgroup: Option<HostCgroup>,
    pub network: Option<PodNetwork>,
    /// The owner's init pid in the guest, whose namespaces the pod's containers join.
    owner_guest_pid: OnceLock<u32>,
}

impl PodVm {
    pub fn new(
        owner_id: String,
        is_pod: bool,
        sandbox: Sandbox,
        run_dir: PathBuf,
        shared: Option<SharedDir>,
        cgroup: Option<HostCgroup>,
        network: Option<PodNetwork>,
    ) -> Self {
        Self {
            owner_id,
            is_pod,
            sandbox,
            run_dir,
            shared,
            cgroup,
            network,
            owner_guest_pid: OnceLock::new(),
        }
    }

    pub fn set_owner_guest_pid(&self, pid: u32) {
        let _ = self.owner_guest_pid.set(pid);
    }

    pub fn owner_guest_pid(&self) -> Option<u32> {
        self.owner_guest_pid.get().copied()
    }

    /// Powers the VM off and releases every host resource. Idempotent.
    pub async fn teardown(&self) {
        self.sandbox.shutdown().await;
        release_host_side(
            &self.run_dir,
            self.shared.as_ref(),
            self.network.as_ref(),
            self.cgroup.as_ref(),
        );
    }
}

/// Host-side clean-up once the VM is gone (also used when a boot fails half-way).
pub fn release_host_side(
    run_dir: &Path,
    shared: Option<&SharedDir>,
    network: Option<&PodNetwork>,
    cgroup: Option<&HostCgroup>,
) {
    if let Some(n) = network
        && let Err(e) = n.teardown()
    {
        tracing::warn!("pod network: {e:#}");
    }
    if let Some(s) = shared
        && let Err(e) = s.remove()
    {
        tracing::warn!("{e:#}");
    }
    if let Err(e) = share::remove_tree(run_dir) {
        tracing::warn!("{e:#}");
    }
    if let Some(c) = cgroup {
        c.leave();
    }
}
