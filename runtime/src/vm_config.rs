//! The VMM configuration for one container or pod VM, shared by the CLI's monitor and the
//! containerd shim. Built through the VMM's own argument parser so that its validation
//! applies unchanged.

use std::path::{Path, PathBuf};

use crate::config::{Config, ConfigError};
use crate::sizing::VmSize;

#[derive(Debug, thiserror::Error)]
pub enum VmConfigError {
    #[error("path {0} is not UTF-8")]
    PathNotUtf8(PathBuf),
    #[error("path {0} contains a comma, which the VMM's device syntax cannot carry")]
    PathHasComma(String),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("VM configuration: {0}")]
    Invalid(String),
    #[error(transparent)]
    Launch(husk_jailer::LaunchError),
}

/// How the VMM processes of this process log, when their launcher said.
static VMM_LOG: std::sync::OnceLock<VmmLogging> = std::sync::OnceLock::new();

/// How the VMM processes a launcher starts log: its own filter, and its log file (if it
/// logs to one: a CLI monitor, whose stderr is the container's) with its format.
#[derive(Debug, Clone)]
pub struct VmmLogging {
    pub filter: String,
    pub file: Option<PathBuf>,
    pub json: bool,
}

/// Makes every VMM this process launches log as `logging` says (the launcher's level and
/// file, so that its log holds the VMM's lines as it did when the VMM was one of its
/// threads); without it VMMs log at the configuration's `log_level` to the launcher's
/// stderr. Only the first call counts.
pub fn set_vmm_logging(logging: VmmLogging) {
    let _ = VMM_LOG.set(logging);
}

/// The serial of a container's rootfs disk in block mode; the agent finds the disk by it.
pub const ROOTFS_SERIAL: &str = "rootfs";

/// The `--block` value of a container's read-only rootfs disk: its `image`, or none (the
/// empty slot a template VM is booted with; each restore fills it with its own image).
pub fn rootfs_block_arg(image: Option<&Path>) -> Result<String, VmConfigError> {
    Ok(match image {
        Some(image) => format!("path={},ro=on,serial={ROOTFS_SERIAL}", path_arg(image)?),
        None => format!("empty=on,ro=on,serial={ROOTFS_SERIAL}"),
    })
}

/// `p` as a VMM argument (device options are comma-separated `key=value` lists).
pub fn path_arg(p: &Path) -> Result<String, VmConfigError> {
    let s = p
        .to_str()
        .ok_or_else(|| VmConfigError::PathNotUtf8(p.to_owned()))?;
    if s.contains(',') {
        return Err(VmConfigError::PathHasComma(s.to_owned()));
    }
    Ok(s.to_owned())
}

/// How a VM comes to life: its kernel boots, or a template's snapshot is restored.
#[derive(Debug, Clone, Copy)]
pub enum Launch<'a> {
    Boot,
    /// The template folder (state and memory files) to restore.
    Restore(&'a Path),
}

/// A VMM ready to start: its arguments and the configuration they parse into.
#[derive(Debug, Clone)]
pub struct VmmLaunch {
    /// husk-vmm's arguments (no program name).
    pub args: Vec<String>,
    pub config: husk_vmm::config::VmConfig,
}

impl VmmLaunch {
    /// Starts the VMM process, jailed in `jail_root` (a per-VM folder, left empty on the host)
    /// under `vmm_jail = "on"`. `snapshot_dirs` are folders a snapshot requested through the
    /// API socket may be written into. The process is killed when the calling thread ends:
    /// call this from the thread that waits for it.
    pub fn spawn(
        &self,
        runtime: &Config,
        jail_root: &Path,
        snapshot_dirs: &[PathBuf],
    ) -> Result<husk_jailer::VmmProcess, VmConfigError> {
        let jail = if runtime.vmm_jail {
            Some(
                husk_jailer::JailSpec::for_vm(
                    &self.config,
                    jail_root,
                    runtime.vmm_uid,
                    runtime.vmm_gid,
                    snapshot_dirs,
                )
                .map_err(|e| VmConfigError::Invalid(e.to_string()))?,
            )
        } else {
            None
        };
        let console_on_stdout = self.config.console == husk_vmm::config::Console::Stdout;
        let log = match VMM_LOG.get() {
            Some(VmmLogging {
                file: Some(path),
                json,
                ..
            }) => Some(husk_jailer::VmmLog {
                file: std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|e| {
                        VmConfigError::Invalid(format!(
                            "opening the log file {} for the VMM: {e}",
                            path.display()
                        ))
                    })?,
                json: *json,
            }),
            _ => None,
        };
        husk_jailer::launch::spawn(
            Path::new(SELF_EXE),
            &self.args,
            jail,
            console_on_stdout,
            log,
        )
        .map_err(VmConfigError::Launch)
    }

    /// Runs the VMM process to its end ([`VmmLaunch::spawn`], from the calling thread): why
    /// its VM stopped, or why it never ran.
    pub fn run(
        &self,
        runtime: &Config,
        jail_root: &Path,
        snapshot_dirs: &[PathBuf],
    ) -> Result<husk_vmm::stop::StopReason, String> {
        let process = self
            .spawn(runtime, jail_root, snapshot_dirs)
            .map_err(|e| format!("{e:#}"))?;
        tracing::debug!(pid = process.id(), "VMM process started");
        process.wait()
    }
}

/// The VMM process is this binary again (`husk_jailer::SUBCOMMAND`): nothing to find on
/// a PATH, and always the same build as the runtime.
const SELF_EXE: &str = "/proc/self/exe";

/// The VMM configuration: kernel, initramfs, CPU template, console and command line from
/// `config`, the VM's size, its hybrid-vsock socket and extra device arguments.
pub fn vm_config(
    config: &Config,
    size: VmSize,
    vm_socket: &Path,
    devices: Vec<String>,
) -> Result<VmmLaunch, VmConfigError> {
    launch_config(config, size, vm_socket, devices, Launch::Boot)
}

/// [`vm_config`] for either kind of launch. A restore leaves out the kernel, initramfs and
/// command line (the snapshot's guest is already past them); the devices must be the
/// template's slots, bound to this VM's host sides.
pub fn launch_config(
    config: &Config,
    size: VmSize,
    vm_socket: &Path,
    devices: Vec<String>,
    launch: Launch<'_>,
) -> Result<VmmLaunch, VmConfigError> {
    let mut args: Vec<String> = vec!["husk-vmm".into()];
    match launch {
        Launch::Boot => args.extend([
            "--kernel".into(),
            path_arg(&config.kernel_path()?)?,
            "--initramfs".into(),
            path_arg(&config.initramfs_path()?)?,
        ]),
        Launch::Restore(dir) => args.extend(["--restore".into(), path_arg(dir)?]),
    }
    args.extend([
        "--memory-mib".into(),
        size.memory_mib.to_string(),
        "--vcpus".into(),
        size.vcpus.to_string(),
        "--vsock-uds".into(),
        path_arg(vm_socket)?,
        "--cpu-template".into(),
        config.cpu_template.clone(),
        // The VMM is a process of its own: without this it would log at its default level
        // (warn), not at the runtime's (its snapshot and device lines at info).
        "--log-level".into(),
        VMM_LOG
            .get()
            .map(|l| l.filter.clone())
            .unwrap_or_else(|| config.log_level.clone()),
    ]);
    args.extend(devices);
    if config.vmm_seccomp == husk_vmm::seccomp::SeccompMode::Off {
        args.push("--seccomp=off".into());
    }
    if let Some(console) = &config.guest_console {
        args.push("--console".into());
        args.push(format!("file:{}", path_arg(console)?));
    }
    if matches!(launch, Launch::Boot) && !config.kernel_cmdline.is_empty() {
        args.push(format!("--cmdline={}", config.kernel_cmdline));
    }
    let cli = <husk_vmm::config::Cli as clap::Parser>::try_parse_from(&args)
        .map_err(|e| VmConfigError::Invalid(e.to_string().trim().to_owned()))?;
    let config = cli
        .into_vm_config()
        .map_err(|e| VmConfigError::Invalid(e.to_string()))?;
    args.remove(0);
    Ok(VmmLaunch { args, config })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_args_refuse_commas_and_keep_the_rest() {
        assert_eq!(path_arg(Path::new("/a/b.sock")).unwrap(), "/a/b.sock");
        let err = path_arg(Path::new("/a,b")).unwrap_err();
        assert!(err.to_string().contains("comma"), "{err}");
    }

    #[test]
    fn a_restore_names_the_snapshot_and_no_kernel() {
        let tmp = tempfile::tempdir().unwrap();
        let (k, i) = (tmp.path().join("k"), tmp.path().join("i"));
        std::fs::write(&k, b"k").unwrap();
        std::fs::write(&i, b"i").unwrap();
        let config = Config::parse(
            &format!(
                "kernel = {:?}\ninitramfs = {:?}\nkernel_cmdline = \"quiet\"\nlog_level = \"info\"\n",
                k.display().to_string(),
                i.display().to_string()
            ),
            Path::new("t.toml"),
        )
        .unwrap();
        let size = VmSize {
            vcpus: 1,
            memory_mib: 128,
        };
        let sock = Path::new("/run/x/vm.sock");
        let launch = vm_config(&config, size, sock, vec![]).unwrap();
        assert!(
            launch.args.windows(2).any(|w| w == ["--log-level", "info"]),
            "the VMM process logs at the runtime's level: {:?}",
            launch.args
        );
        let boot = launch.config;
        assert_eq!(boot.log_level, "info");
        assert_eq!(boot.restore, None);
        assert_eq!(boot.seccomp, husk_vmm::seccomp::SeccompMode::Enforce);
        let mut unconfined = config.clone();
        unconfined.vmm_seccomp = husk_vmm::seccomp::SeccompMode::Off;
        let off = vm_config(&unconfined, size, sock, vec![]).unwrap().config;
        assert_eq!(off.seccomp, husk_vmm::seccomp::SeccompMode::Off);
        let restore = launch_config(
            &config,
            size,
            sock,
            vec![],
            Launch::Restore(Path::new("/t/k")),
        )
        .unwrap()
        .config;
        assert_eq!(restore.restore, Some("/t/k".into()));
        assert!(restore.initramfs.is_none());
    }
}
