//! `delete`: containerd runs it (in the bundle) when a shim is gone, e.g. killed, for each
//! container the shim served. The VMM and virtiofsd died with the shim (in-process VMM;
//! virtiofsd has a parent-death signal), so what is left is on the host: the container's
//! rootfs mount and its binds in the shared folder; for the VM's owner (a pod's sandbox
//! container, or a lone container) also the run folder, the shim's ttrpc socket and the
//! pod's cgroup. The pod's tap goes with its network namespace, which CRI deletes.
//! Idempotent: a second run finds nothing to do.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use containerd_shim::DeleteResponse;
use containerd_shim_protos::protobuf::Message;

use husk_runtime::bundle;

use crate::container::Exit;
use crate::pod::Role;
use crate::rootfs;
use crate::service::{RUN_DIR_FILE, RUN_ROOT};
use crate::share::{self, SHARE_TAG};
use husk_runtime::host_cgroup;

pub fn delete(flags: &containerd_shim::Flags) -> Result<()> {
    let bundle = if flags.bundle.is_empty() {
        std::env::current_dir().context("locating the bundle (working directory)")?
    } else {
        PathBuf::from(&flags.bundle)
    };
    let spec: serde_json::Value = std::fs::read(bundle.join(bundle::CONFIG_FILE))
        .ok()
        .and_then(|t| serde_json::from_slice(&t).ok())
        .unwrap_or_default();
    let role = Role::of_bundle(spec.to_string().as_bytes()).unwrap_or(Role::Standalone);
    let owns_vm = !matches!(role, Role::PodMember { .. });

    let marker = bundle.join(RUN_DIR_FILE);
    if let Ok(dir) = std::fs::read_to_string(&marker) {
        let dir = PathBuf::from(dir.trim());
        // Only ever a folder of ours.
        if dir.starts_with(RUN_ROOT) {
            let share = dir.join(SHARE_TAG);
            let mine = if flags.id.is_empty() {
                None
            } else {
                Some(share.join(&flags.id))
            };
            let whole = owns_vm.then_some(dir.as_path());
            for d in mine.iter().map(PathBuf::as_path).chain(whole) {
                if let Err(e) = share::remove_tree(d) {
                    eprintln!("{}: {e:#}", crate::RUNTIME_NAME);
                }
            }
        }
        let _ = std::fs::remove_file(&marker);
    }
    if let Err(e) = rootfs::unmount_all(&bundle.join("rootfs")) {
        eprintln!("{}: {e:#}", crate::RUNTIME_NAME);
    }
    if role == Role::Sandbox
        && let Some(path) = spec.pointer("/linux/cgroupsPath").and_then(|p| p.as_str())
        && !path.is_empty()
    {
        for e in host_cgroup::remove_after_crash(path) {
            eprintln!("{}: {e}", crate::RUNTIME_NAME);
        }
    }
    // The dead shim's socket (its address is in the bundle, written by `start`); a pod
    // container's address is its pod's shim, which may still be serving.
    if owns_vm && let Ok(address) = std::fs::read_to_string(bundle.join("address")) {
        let path = address.trim().trim_start_matches("unix://");
        let is_socket = std::fs::symlink_metadata(path)
            .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()));
        if is_socket {
            let _ = std::fs::remove_file(path);
        }
    }
    // The process was lost with the shim: report it as killed, as runc's shim does.
    let exit = Exit::now(128 + libc::SIGKILL as u32);
    let resp = DeleteResponse {
        pid: 0,
        exit_status: exit.status,
        exited_at: Some(exit.timestamp()).into(),
        ..Default::default()
    };
    let bytes = resp.write_to_bytes().context("encoding DeleteResponse")?;
    std::io::stdout()
        .write_all(&bytes)
        .context("writing DeleteResponse")?;
    Ok(())
}
