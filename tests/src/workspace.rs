//! Where the workspace and its built binaries are.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// Root of the cargo workspace (the folder holding `guest-image/`, `vmm/`, ...).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// The profile folder the running executable was built into (`target/debug`, `target/release`).
fn profile_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the running executable")?;
    // Test and bench executables live in <profile>/deps, binaries in <profile>.
    let mut dir = exe.parent().context("executable has no parent folder")?;
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir = dir.parent().context("deps folder has no parent")?;
    }
    Ok(dir.to_path_buf())
}

/// Path of a workspace binary built in the same profile as the running executable. Under cargo
/// (`cargo test`, `cargo bench`: `CARGO` is set) it is built first, because cargo does not
/// rebuild another package's binary for a test or bench target and a stale one would be
/// measured; elsewhere it must exist already.
pub fn binary(name: &str) -> Result<PathBuf> {
    let dir = profile_dir()?;
    let path = dir.join(name);
    if let Some(cargo) = std::env::var_os("CARGO") {
        let mut cmd = Command::new(cargo);
        cmd.current_dir(root())
            .args(["build", "--quiet", "--bin", name]);
        if dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let status = cmd
            .status()
            .with_context(|| format!("running cargo to build {name}"))?;
        if !status.success() {
            bail!("building {name} failed ({status})");
        }
    }
    if !path.exists() {
        bail!(
            "{name} is not built: expected it at {} (run `cargo build --bin {name}`)",
            path.display()
        );
    }
    Ok(path)
}
