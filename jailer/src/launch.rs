//! The launcher's side: starting the VMM process (jailed or not) and learning why its VM
//! stopped.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};

use husk_vmm::stop::StopReason;

use crate::entry::{Outcome, SUBCOMMAND};
use crate::spec::{BindKind, JailSpec};

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("preparing the VMM's jail: {what}: {source}")]
    Prepare {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("starting the VMM process ({exe}): {source}")]
    Spawn {
        exe: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn prepare_err(what: String) -> impl FnOnce(std::io::Error) -> LaunchError {
    move |source| LaunchError::Prepare { what, source }
}

/// A running VMM process.
pub struct VmmProcess {
    child: Child,
    result: File,
    jail: Option<JailSpec>,
}

/// Where a VMM process logs, when not to its launcher's stderr.
#[derive(Debug)]
pub struct VmmLog {
    /// Its stderr (a log file opened for appending).
    pub file: File,
    /// JSON lines instead of text.
    pub json: bool,
}

/// Starts `<exe> __vmm` with `vmm_args` (husk-vmm's arguments), in `jail` if given, logging
/// to `log` if given (else to the caller's stderr). The
/// process is killed if the calling *thread* ends (parent-death signal), so call this from
/// the thread that waits for it. It has its own process group: a terminal's Ctrl-C goes
/// to the container's relay, not to the VM.
pub fn spawn(
    exe: &Path,
    vmm_args: &[String],
    jail: Option<JailSpec>,
    console_on_stdout: bool,
    log: Option<VmmLog>,
) -> Result<VmmProcess, LaunchError> {
    if let Some(spec) = &jail {
        prepare(spec)?;
    }
    let (r, w): (OwnedFd, OwnedFd) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| prepare_err("the result pipe".into())(e.into()))?;
    let mut cmd = Command::new(exe);
    cmd.arg(SUBCOMMAND);
    if let Some(spec) = &jail {
        let json = serde_json::to_string(spec)
            .map_err(|e| prepare_err("the jail's description".into())(e.into()))?;
        cmd.arg("--jail").arg(json);
    }
    if let Some(log) = log {
        if log.json {
            cmd.arg("--log-json");
        }
        cmd.stderr(Stdio::from(log.file));
    }
    let w_fd = w.as_raw_fd();
    cmd.arg("--result-fd")
        .arg(w_fd.to_string())
        .arg("--")
        .args(vmm_args)
        .stdin(Stdio::null())
        .process_group(0);
    if !console_on_stdout {
        cmd.stdout(Stdio::null());
    }
    // SAFETY: only async-signal-safe calls (prctl, fcntl) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The child's copy of the result pipe must survive the exec.
            if libc::fcntl(w_fd, libc::F_SETFD, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|source| LaunchError::Spawn {
        exe: exe.to_path_buf(),
        source,
    })?;
    drop(w);
    Ok(VmmProcess {
        child,
        result: File::from(r),
        jail,
    })
}

impl VmmProcess {
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the VMM process to end and says why its VM stopped (or why it never ran).
    pub fn wait(mut self) -> Result<StopReason, String> {
        let mut text = String::new();
        let _ = self.result.read_to_string(&mut text);
        let status = self.child.wait();
        if let Some(spec) = &self.jail {
            reclaim(spec);
        }
        let outcome = text
            .lines()
            .last()
            .and_then(|l| serde_json::from_str::<Outcome>(l).ok());
        match (outcome, status) {
            (Some(Outcome::Stopped(r)), _) => Ok(r),
            (Some(Outcome::Failed(msg)), _) => Err(msg),
            (None, Ok(s)) => Err(format!(
                "the VMM process ended ({}) without saying why; its log is the runtime's",
                describe(s)
            )),
            (None, Err(e)) => Err(format!("waiting for the VMM process: {e}")),
        }
    }
}

fn describe(s: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (s.code(), s.signal()) {
        (Some(c), _) if c > 128 => format!("status {c}, signal {} in the jail", c - 128),
        (Some(c), _) => format!("status {c}"),
        (_, Some(sig)) => format!("killed by signal {sig}"),
        _ => s.to_string(),
    }
}

/// Creates what the jail's binds need on the host before the VMM starts: the jail folder,
/// the output files, and the folders the VMM may write as its own uid.
fn prepare(spec: &JailSpec) -> Result<(), LaunchError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&spec.root)
        .map_err(prepare_err(format!("creating {}", spec.root.display())))?;
    for b in &spec.binds {
        match b.kind {
            BindKind::Output => {
                File::options()
                    .append(true)
                    .create(true)
                    .mode(0o600)
                    .open(&b.path)
                    .map_err(prepare_err(format!("creating {}", b.path.display())))?;
            }
            BindKind::VmmOwned => {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(&b.path)
                    .map_err(prepare_err(format!("creating {}", b.path.display())))?;
                std::os::unix::fs::lchown(&b.path, Some(spec.uid), Some(spec.gid)).map_err(
                    prepare_err(format!("giving {} to the VMM", b.path.display())),
                )?;
                std::fs::set_permissions(&b.path, std::fs::Permissions::from_mode(0o700))
                    .map_err(prepare_err(format!("chmod {}", b.path.display())))?;
            }
            BindKind::ReadOnly | BindKind::Writable => {}
        }
    }
    Ok(())
}

/// After the VMM: what it wrote becomes root's again, and the (empty) jail folder goes.
fn reclaim(spec: &JailSpec) {
    for b in spec.binds.iter().filter(|b| b.kind == BindKind::VmmOwned) {
        if let Err(e) = chown_tree_to_root(&b.path) {
            tracing::warn!("giving {} back to root: {e}", b.path.display());
        }
    }
    let _ = std::fs::remove_dir(&spec.root);
}

fn chown_tree_to_root(dir: &Path) -> std::io::Result<()> {
    std::os::unix::fs::lchown(dir, Some(0), Some(0))?;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let ty = entry.file_type()?;
        if ty.is_dir() {
            chown_tree_to_root(&entry.path())?;
        } else {
            std::os::unix::fs::lchown(entry.path(), Some(0), Some(0))?;
        }
    }
    Ok(())
}
