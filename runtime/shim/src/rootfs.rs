//! The container's rootfs on the host: containerd hands the shim the snapshot's mounts
//! (e.g. one overlay) in `Create`, and the shim mounts them at `<bundle>/rootfs`, as runc's
//! shim does. The mounted directory is then shared into the VM (`sandbox`).

use std::path::Path;

use anyhow::{Context, Result};
use containerd_shim_protos::types::mount::Mount;

/// Mounts `mounts` in order at `target` (created if missing).
pub fn mount_all(mounts: &[Mount], target: &Path) -> Result<()> {
    std::fs::create_dir_all(target)
        .with_context(|| format!("creating the rootfs folder {}", target.display()))?;
    for m in mounts {
        let fs_type = Some(m.type_.as_str()).filter(|s| !s.is_empty());
        let source = Some(m.source.as_str()).filter(|s| !s.is_empty());
        containerd_shim::mount::mount_rootfs(fs_type, source, &m.options, target).map_err(|e| {
            anyhow::anyhow!(
                "mounting the rootfs ({} {} at {}): {e}",
                m.type_,
                m.source,
                target.display()
            )
        })?;
    }
    Ok(())
}

/// Unmounts everything at or below `target` (lazily, so a straggling user cannot make the
/// delete fail). Nothing mounted is not an error.
pub fn unmount_all(target: &Path) -> Result<()> {
    let Some(path) = target.to_str() else {
        anyhow::bail!("rootfs path {} is not UTF-8", target.display());
    };
    if !target.exists() {
        return Ok(());
    }
    containerd_shim::mount::umount_recursive(Some(path), libc::MNT_DETACH)
        .map_err(|e| anyhow::anyhow!("unmounting {path}: {e}"))
}
