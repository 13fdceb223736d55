//! `delete`: containerd runs it (in the bundle) when a shim is gone, e.g. killed. The VMM
//! and virtiofsd died with the shim (in-process VMM; virtiofsd has a parent-death signal),
//! so what is left is on the host file system: the rootfs mount, the socket folder and
//! the shim's ttrpc socket.
//! Idempotent: a second run finds nothing to do.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use containerd_shim::DeleteResponse;
use containerd_shim_protos::protobuf::Message;

use crate::container::Exit;
use crate::rootfs;
use crate::service::{RUN_DIR_FILE, RUN_ROOT};

pub fn delete(flags: &containerd_shim::Flags) -> Result<()> {
    let bundle = if flags.bundle.is_empty() {
        std::env::current_dir().context("locating the bundle (working directory)")?
    } else {
        PathBuf::from(&flags.bundle)
    };
    if let Err(e) = rootfs::unmount_all(&bundle.join("rootfs")) {
        eprintln!("{}: {e:#}", crate::RUNTIME_NAME);
    }
    let marker = bundle.join(RUN_DIR_FILE);
    if let Ok(dir) = std::fs::read_to_string(&marker) {
        let dir = PathBuf::from(dir.trim());
        // Only ever a folder of ours.
        if dir.starts_with(RUN_ROOT) {
            let _ = std::fs::remove_dir_all(&dir);
        }
        let _ = std::fs::remove_file(&marker);
    }
    // The dead shim's socket (its address is in the bundle, written by `start`).
    if let Ok(address) = std::fs::read_to_string(bundle.join("address")) {
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
