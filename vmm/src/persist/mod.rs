//! Snapshots of a whole VM: a state file (vCPUs, VM-wide KVM state, devices) and a memory
//! file, in one folder. Each part's state is defined beside the code it belongs to
//! (`vcpu::persist`, `devices::virtio::persist`, `devices::serial`); this module puts them
//! together, versions and checks them.

pub mod file;
pub mod memory;
pub mod vm_state;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::devices::serial::SerialSnapshot;
use crate::devices::virtio::persist::TransportState;
use crate::vcpu::persist::VcpuState;
use memory::MemoryRegionState;
use vm_state::VmState;

/// Version of the state file's contents; a snapshot of another version is refused.
pub const FORMAT_VERSION: u32 = 1;
pub const STATE_FILE: &str = "state";
pub const MEMORY_FILE: &str = "memory";

/// Everything but guest RAM.
#[derive(Serialize, Deserialize)]
pub struct MachineState {
    /// The husk-vmm that took it: device models may change between versions.
    pub husk_version: String,
    /// [`crate::BUILD_ID`] of the VMM that took it: a rebuilt VMM does not restore it.
    #[serde(default)]
    pub vmm_build: String,
    pub cpu_template: String,
    /// Guest RAM as configured (before the template's rounding), for matching the
    /// configuration of a restore.
    pub memory_mib: u64,
    pub vcpus: Vec<VcpuState>,
    pub vm: VmState,
    pub serial: SerialSnapshot,
    /// One per virtio slot, in slot order.
    pub devices: Vec<TransportState>,
    pub memory: Vec<MemoryRegionState>,
}

/// Error reading a snapshot or matching it to a configuration.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(transparent)]
    File(#[from] file::FileError),
    #[error("{path}: the state does not parse: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("the snapshot was taken by husk-vmm {found}; this is {ours}")]
    HuskVersion { found: String, ours: String },
    #[error(
        "the snapshot was taken by another build of husk-vmm (build {found}; this is {ours}): take it again"
    )]
    VmmBuild { found: String, ours: String },
    #[error("the snapshot does not fit the configuration: {0}")]
    Mismatch(String),
}

/// The paths of a snapshot folder's two files.
pub fn paths(dir: &Path) -> (PathBuf, PathBuf) {
    (dir.join(STATE_FILE), dir.join(MEMORY_FILE))
}

impl MachineState {
    pub fn write(&self, dir: &Path) -> Result<u64, SnapshotError> {
        let (state, _) = paths(dir);
        let payload = serde_json::to_vec(self).map_err(|source| SnapshotError::Parse {
            path: state.clone(),
            source,
        })?;
        file::write(&state, FORMAT_VERSION, &payload)?;
        Ok(payload.len() as u64)
    }

    pub fn read(dir: &Path) -> Result<Self, SnapshotError> {
        let (state, _) = paths(dir);
        let payload = file::read(&state, FORMAT_VERSION)?;
        let me: Self = serde_json::from_slice(&payload).map_err(|source| SnapshotError::Parse {
            path: state.clone(),
            source,
        })?;
        let ours = env!("CARGO_PKG_VERSION");
        if me.husk_version != ours {
            return Err(SnapshotError::HuskVersion {
                found: me.husk_version,
                ours: ours.to_string(),
            });
        }
        if me.vmm_build != crate::BUILD_ID {
            return Err(SnapshotError::VmmBuild {
                found: me.vmm_build,
                ours: crate::BUILD_ID.to_string(),
            });
        }
        Ok(me)
    }
}
