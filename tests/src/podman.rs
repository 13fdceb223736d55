//! Driving podman with husk as its OCI runtime, isolated from the host's own podman state:
//! private storage (vfs driver), run root, tmp dir and containers.conf, cgroupfs, and a
//! busybox image made by `podman import` (no registry).
//!
//! podman 4.3 passes neither the caller's environment (so no `HUSK_CONFIG`) nor its
//! `--runtime-flag`s to every runtime call: the exit command conmon runs
//! (`podman container cleanup`, which does the `--rm` delete) gets no runtime flags, so a
//! `--runtime-flag root=…` container would be deleted from husk's default root and leak in
//! the private one. The runtime podman is given is therefore a two-line wrapper script that
//! execs the real `husk` with `--root` and `HUSK_CONFIG` fixed.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use anyhow::{Context, Result, bail};

use crate::husk_cli::Husk;

/// Where Debian installs podman.
pub const PODMAN: &str = "/usr/bin/podman";

/// The image the tests run, imported from a busybox rootfs.
pub const IMAGE: &str = "localhost/husk-busybox";

/// Why podman tests cannot run here, or `None`.
pub fn podman_unavailable_reason() -> Option<String> {
    match Command::new(PODMAN)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
    {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(format!(
            "{PODMAN} --version failed ({}): {}",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Some(format!(
            "podman is not installed ({PODMAN}: {e}; scripts/install-deps.sh installs it)"
        )),
    }
}

/// The virtiofsd husk would use: on PATH or in ~/.cargo/bin (`cargo install virtiofsd`).
pub fn find_virtiofsd() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(Path::new(&home).join(".cargo/bin"));
    }
    dirs.into_iter()
        .map(|d| d.join("virtiofsd"))
        .find(|p| p.is_file())
}

/// A podman with private state and husk (its own root and config, from [`Husk`]) as the
/// runtime. Dropping it removes every container (`podman rm -f -a`), then the husk test dir.
pub struct Podman {
    husk: Husk,
    runtime: PathBuf,
}

impl Podman {
    /// Sets up the private podman state and imports [`IMAGE`] from `rootfs` (a directory).
    /// `husk_config` is husk's config text (see [`Husk::guest_config`]).
    pub fn new(husk_config: &str, rootfs: &Path) -> Result<Self> {
        let husk = Husk::new(husk_config)?;
        let dir = husk.dir();
        std::fs::create_dir_all(husk.root()).context("creating husk's root")?;
        let runtime = dir.join("husk");
        let script = format!(
            "#!/bin/sh\nHUSK_CONFIG={config} exec {bin} --root {root} \"$@\"\n",
            config = sh_quote(&dir.join("config.toml")),
            bin = sh_quote(&husk.bin),
            root = sh_quote(&husk.root()),
        );
        std::fs::write(&runtime, script).context("writing the runtime wrapper")?;
        std::fs::set_permissions(&runtime, std::fs::Permissions::from_mode(0o755))
            .context("making the runtime wrapper executable")?;
        // A containers.conf of our own, so the host's (e.g. a systemd cgroup manager or
        // journald events) does not apply.
        std::fs::write(
            dir.join("containers.conf"),
            "[engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n",
        )
        .context("writing containers.conf")?;
        let p = Self { husk, runtime };

        let mut import = p
            .command(&["import", "-", IMAGE])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running podman import")?;
        let stdin = import.stdin.take().context("podman import stdin")?;
        // tar writes the image straight into podman's stdin.
        let tar = Command::new("tar")
            .arg("-C")
            .arg(rootfs)
            .args(["-c", "."])
            .stdout(stdin)
            .status()
            .context("running tar of the rootfs")?;
        let out = import
            .wait_with_output()
            .context("waiting for podman import")?;
        if !tar.success() || !out.status.success() {
            bail!(
                "podman import of {} failed (tar {tar}, podman {}): {}",
                rootfs.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(p)
    }

    /// The `husk` behind podman (its root and config).
    pub fn husk(&self) -> &Husk {
        &self.husk
    }

    /// husk's state root (what the wrapper passes as `--root`).
    pub fn husk_root(&self) -> PathBuf {
        self.husk.root()
    }

    /// The private dir everything lives in.
    pub fn dir(&self) -> &Path {
        self.husk.dir()
    }

    /// `podman <private state flags> <args>`; stdio is the caller's to set.
    pub fn command(&self, args: &[&str]) -> Command {
        let dir = self.dir();
        let mut c = Command::new(PODMAN);
        c.env("CONTAINERS_CONF", dir.join("containers.conf"))
            .arg("--root")
            .arg(dir.join("storage"))
            .arg("--runroot")
            .arg(dir.join("run"))
            .arg("--tmpdir")
            .arg(dir.join("tmp"))
            .args(["--storage-driver", "vfs"])
            .args(["--cgroup-manager", "cgroupfs"])
            .args(["--events-backend", "file"])
            .arg("--runtime")
            .arg(&self.runtime)
            .args(args);
        c
    }

    /// Runs podman with stdin from /dev/null and its output captured.
    pub fn output(&self, args: &[&str]) -> Result<Output> {
        self.command(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running podman {args:?}"))
    }

    /// Runs podman and fails unless it succeeds; returns its stdout.
    pub fn ok(&self, args: &[&str]) -> Result<String> {
        let o = self.output(args)?;
        if !o.status.success() {
            bail!(
                "podman {args:?} failed ({}): {}{}",
                o.status,
                String::from_utf8_lossy(&o.stderr),
                self.diagnostics()
            );
        }
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    }

    /// husk's monitor logs of every container still in its root, for failure messages.
    pub fn diagnostics(&self) -> String {
        let mut s = String::new();
        if let Ok(entries) = std::fs::read_dir(self.husk_root()) {
            for e in entries.flatten() {
                let id = e.file_name().to_string_lossy().into_owned();
                s.push_str(&format!(
                    "\n--- monitor.log of {id}:\n{}",
                    self.husk.monitor_log(&id)
                ));
            }
        }
        s
    }

    /// What husk left behind: entries in its root and host processes (monitors,
    /// virtiofsd, exec monitors) whose command line names that root.
    pub fn husk_leftovers(&self) -> Vec<String> {
        let root = self.husk_root();
        let mut left: Vec<String> = std::fs::read_dir(&root)
            .map(|d| {
                d.flatten()
                    // VM templates are kept on purpose, not a container's leftovers.
                    .filter(|e| e.file_name() != "@templates")
                    .map(|e| format!("state {}", e.path().display()))
                    .collect()
            })
            .unwrap_or_default();
        let marker = root.to_string_lossy().into_owned();
        let me = std::process::id().to_string();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let pid = entry.file_name().to_string_lossy().into_owned();
            if !pid.bytes().all(|b| b.is_ascii_digit()) || pid == me {
                continue;
            }
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains(&marker) && crate::husk_cli::pid_alive(pid.parse().unwrap_or(0)) {
                left.push(format!("process {pid}: {cmdline}"));
            }
        }
        left
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self.output(&["rm", "--force", "--all", "--time", "0"]);
        // vfs layers are plain directories, removed with the temp dir by Husk's drop.
    }
}

/// `'…'`-quotes a path for the wrapper script.
fn sh_quote(p: &Path) -> String {
    format!("'{}'", p.to_string_lossy().replace('\'', r"'\''"))
}
