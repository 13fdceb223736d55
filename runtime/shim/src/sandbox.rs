//! The shim's VM: the VMM as a jailed process of its own (this binary again, see
//! `husk_jailer`), virtiofsd sharing the VM's shared folder (every container's rootfs and
//! binds, see `share`) or a rootfs image, and the agent client.
//!
//! The VMM process is started from a thread that waits for it and dies with that thread
//! (parent-death signal): the VM cannot outlive the shim (containerd kills a shim it gives
//! up on, and that must take the VM with it). A VM that will not stop is ended by the
//! shim's exit, which is what happens after `Shutdown`.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use husk_protocol::agent::{BlockRootfs, CreateSandboxRequest, Rootfs, SandboxMount};
use husk_protocol::client::{AgentClient, Target, connect_with_retry};
use husk_runtime::config::Config;
use husk_runtime::sizing::VmSize;
use husk_runtime::template::Template;
use husk_runtime::vm_config::{Launch, VmmLaunch, launch_config, path_arg, rootfs_block_arg};
use tokio::sync::watch;

use crate::network::dns::GuestDns;
use crate::share::{SHARE_TAG, SharedDir};
use crate::template::{self as templates, TemplateRequest};

/// virtio-blk serial of a rootfs image.
const VM_SOCKET: &str = "vm.sock";
const FS_SOCKET: &str = "fs.sock";
/// The VMM's jail folder in the run folder (empty on the host).
const JAIL_DIR: &str = "jail";
/// The pod's /dev/shm: one guest tmpfs that every container of the VM binds (CRI binds
/// the sandbox's shm folder into each container).
pub use husk_runtime::volumes::{SHM_MOUNT, SHM_OPTIONS};
const VIRTIOFSD_START_TIMEOUT: Duration = Duration::from_secs(10);
/// DestroySandbox (a slow nested guest takes 5 s and more), the wait for the VM after it
/// and the host cgroup's removal (2 s) fit in containerd's 10 s for a delete; a VM that has
/// not stopped by then ends with the shim process, its virtiofsd is killed.
const DESTROY_TIMEOUT: Duration = Duration::from_secs(5);
const STOP_TIMEOUT: Duration = Duration::from_secs(2);

/// How containers' root file systems reach the guest.
pub enum RootfsShare<'a> {
    /// virtiofsd shares the VM's shared folder (`share`); containers write through to
    /// their rootfs on the host, and any number of containers can join later.
    Virtiofs { shared: &'a SharedDir },
    /// A read-only ext4 image (already built) with a tmpfs overlay in the guest: one
    /// container only, known at boot.
    Block { image: PathBuf },
}

/// A booted VM with its sandbox set up.
pub struct Sandbox {
    client: AgentClient,
    target: Target,
    /// The rootfs image's description for the agent (block mode).
    block_rootfs: Option<Rootfs>,
    /// The host resolv.conf whose settings the guest's `sandbox://resolv.conf` holds.
    resolv_conf_source: Option<PathBuf>,
    stopped: watch::Receiver<Option<String>>,
    /// The template the VM was restored from, if it was.
    template: Option<Template>,
}

impl Sandbox {
    /// Boots the VM (sockets in `run_dir`, `extra_args` are more husk-vmm device flags,
    /// e.g. `--net`), waits for its agent and creates the sandbox (with the pod's `dns`).
    /// With `template`, the VM is restored from the template of its shape, made first if
    /// missing.
    pub async fn boot(
        config: &Config,
        size: VmSize,
        run_dir: &Path,
        share: RootfsShare<'_>,
        extra_args: Vec<String>,
        dns: Option<GuestDns>,
        template: Option<TemplateRequest>,
    ) -> Result<Self> {
        let vm_socket = run_dir.join(VM_SOCKET);
        let _ = std::fs::remove_file(&vm_socket);
        let mut devices = Vec::new();
        // What a template of this VM is booted with: the same slots, the rootfs disk empty
        // (no container's image in a snapshot other VMs restore).
        let mut template_devices = Vec::new();
        let mut virtiofsd = None;
        let block_rootfs = match &share {
            RootfsShare::Virtiofs { shared } => {
                let bin = config.virtiofsd_path().ok_or_else(|| {
                    anyhow!(
                        "rootfs_mode = \"virtiofs\" (and every pod) needs virtiofsd: install it (`cargo install virtiofsd`) or set `virtiofsd` in {}",
                        config.source
                    )
                })?;
                let socket = run_dir.join(FS_SOCKET);
                devices.push("--fs".to_owned());
                devices.push(format!("socket={},tag={SHARE_TAG}", path_arg(&socket)?));
                template_devices.clone_from(&devices);
                virtiofsd = Some(Virtiofsd {
                    bin,
                    socket,
                    dir: shared.path().to_path_buf(),
                    log: run_dir.join("virtiofsd.log"),
                });
                None
            }
            RootfsShare::Block { image } => {
                devices.push("--block".to_owned());
                devices.push(rootfs_block_arg(Some(image))?);
                template_devices.push("--block".to_owned());
                template_devices.push(rootfs_block_arg(None)?);
                let mut b = BlockRootfs::new();
                b.serial = husk_runtime::vm_config::ROOTFS_SERIAL.into();
                b.fstype = "ext4".into();
                b.read_only = true;
                let mut r = Rootfs::new();
                r.set_block(b);
                Some(r)
            }
        };
        // The NIC (extra_args) comes after the rootfs slots (slots_for's order).
        devices.extend(extra_args.iter().cloned());
        template_devices.extend(extra_args);
        let template = match template {
            Some(request) => {
                templates::find_or_build(
                    config,
                    size,
                    run_dir,
                    &template_devices,
                    virtiofsd.as_ref(),
                    request,
                )
                .await
            }
            None => None,
        };
        let launch = match &template {
            Some(t) => Launch::Restore(&t.dir),
            None => Launch::Boot,
        };
        let job = VmmJob {
            launch: launch_config(config, size, &vm_socket, devices, launch)?,
            runtime: config.clone(),
            jail_root: run_dir.join(JAIL_DIR),
            snapshot_dirs: Vec::new(),
        };
        let started = Instant::now();

        let (tx, stopped) = watch::channel(None);
        std::thread::Builder::new()
            .name("vmm".into())
            .spawn(move || {
                let reason = run_vm(job, virtiofsd);
                tracing::info!("VM stopped: {reason}");
                let _ = tx.send(Some(reason));
            })
            .context("starting the VMM thread")?;

        let target = Target::hybrid_vsock(&vm_socket);
        let boot_timeout = Duration::from_secs(config.boot_timeout_secs);
        let deadline = Instant::now() + boot_timeout;
        let mut watch_stop = stopped.clone();
        let client = tokio::select! {
            c = connect_with_retry(&target, deadline) => c.context("waiting for the VM's agent")?,
            r = watch_stop.wait_for(Option::is_some) => {
                let why = r.ok().and_then(|v| v.clone()).unwrap_or_default();
                bail!("the VM stopped before its agent answered: {why}");
            }
        };
        // Container creation and exec fork and mount in a guest that may be slow (nested
        // virtualization, a loaded host: 30 s seen): the boot timeout bounds every call.
        // WaitProcess and GetOOMEvent have no deadline; DestroySandbox has its own.
        let client = client.with_rpc_timeout(boot_timeout);
        if let Some(t) = &template {
            t.make_restored_vm_unique(&client, started).await?;
        }
        let sandbox = Self {
            client,
            target,
            block_rootfs,
            resolv_conf_source: dns.as_ref().map(|d| d.source.clone()),
            stopped,
            template,
        };
        let shared = match &share {
            RootfsShare::Virtiofs { shared } => Some(*shared),
            RootfsShare::Block { .. } => None,
        };
        if let Err(e) = sandbox.create_sandbox(shared, dns).await {
            sandbox.shutdown().await;
            return Err(e);
        }
        Ok(sandbox)
    }

    async fn create_sandbox(
        &self,
        shared: Option<&SharedDir>,
        dns: Option<GuestDns>,
    ) -> Result<()> {
        let mut req = CreateSandboxRequest::new();
        if let Some(GuestDns { dns, .. }) = dns {
            req.dns_servers = dns.servers;
            req.dns_search = dns.search;
            req.dns_options = dns.options;
        }
        if shared.is_some() {
            let mut m = SandboxMount::new();
            m.name = SHARE_TAG.into();
            m.source = SHARE_TAG.into();
            m.fstype = "virtiofs".into();
            req.mounts.push(m);
        }
        let mut shm = SandboxMount::new();
        shm.name = SHM_MOUNT.into();
        shm.source = "shm".into();
        shm.fstype = "tmpfs".into();
        shm.options = SHM_OPTIONS.split(',').map(str::to_owned).collect();
        req.mounts.push(shm);
        let sandbox_dir = self
            .client
            .create_sandbox(&req)
            .await
            .context("setting up the sandbox in the VM")?
            .sandbox_dir;
        if let Some(s) = shared {
            s.set_guest_root(format!("{sandbox_dir}/mounts/{SHARE_TAG}"));
        }
        Ok(())
    }

    /// The host resolv.conf (CRI's pod file) whose settings the guest's
    /// `sandbox://resolv.conf` holds, if the pod had any DNS settings.
    pub fn resolv_conf_source(&self) -> Option<&Path> {
        self.resolv_conf_source.as_deref()
    }

    /// The rootfs image as the agent sees it (block mode), for the VM's one container.
    pub fn block_rootfs(&self) -> Option<&Rootfs> {
        self.block_rootfs.as_ref()
    }

    pub fn client(&self) -> &AgentClient {
        &self.client
    }

    /// The MAC the guest's NIC has now when it came from a template (before
    /// ConfigureNetwork gives it the pod's).
    pub fn template_nic_mac(&self) -> Option<&str> {
        self.template
            .as_ref()
            .and_then(|t| t.manifest.nic_macs.first())
            .map(String::as_str)
    }

    /// Where the agent is (for stdio attaches).
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// Waits until the VM has stopped and says why.
    pub async fn stopped(&self) -> String {
        let mut rx = self.stopped.clone();
        match rx.wait_for(Option::is_some).await {
            Ok(v) => v.clone().unwrap_or_default(),
            Err(_) => "the VMM thread ended without a result".into(),
        }
    }

    pub fn is_stopped(&self) -> bool {
        self.stopped.borrow().is_some()
    }

    /// Powers the VM off (the agent stops every process, syncs and resets the VM) and
    /// waits for the VMM to return. Idempotent.
    pub async fn shutdown(&self) {
        if self.is_stopped() {
            return;
        }
        let client = self.client.clone().with_rpc_timeout(DESTROY_TIMEOUT);
        if let Err(e) = client.destroy_sandbox().await {
            tracing::warn!("DestroySandbox: {e}");
        }
        if tokio::time::timeout(STOP_TIMEOUT, self.stopped())
            .await
            .is_err()
        {
            tracing::warn!(
                "the VM did not stop within {STOP_TIMEOUT:?}; it ends when the shim exits"
            );
        }
    }
}

/// virtiofsd to start before the VMM connects to it.
#[derive(Clone)]
pub struct Virtiofsd {
    bin: PathBuf,
    socket: PathBuf,
    dir: PathBuf,
    log: PathBuf,
}

/// The VMM process to start: its arguments, and where its jail goes.
pub struct VmmJob {
    pub launch: VmmLaunch,
    pub runtime: Config,
    /// The jail folder (empty on the host).
    pub jail_root: PathBuf,
    /// Folders a snapshot may be written into.
    pub snapshot_dirs: Vec<PathBuf>,
}

/// Body of the VMM thread: virtiofsd (if any), then the VMM process until it ends. Both are
/// spawned from this thread on purpose: their parent-death signal fires when the spawning
/// thread ends, which is when the VM has stopped (or the shim has died).
pub fn run_vm(job: VmmJob, virtiofsd: Option<Virtiofsd>) -> String {
    let mut child = None;
    if let Some(spec) = virtiofsd {
        match spawn_virtiofsd(&spec) {
            Ok(c) => child = Some(c),
            Err(e) => return format!("{e:#}"),
        }
    }
    let reason = match job
        .launch
        .run(&job.runtime, &job.jail_root, &job.snapshot_dirs)
    {
        Ok(r) => r.label(),
        Err(msg) => format!("the VM could not run: {msg}"),
    };
    if let Some(mut c) = child {
        let _ = c.kill();
        let _ = c.wait();
    }
    reason
}

/// Waits (bounded) until no process holds the flock virtiofsd keeps on `<socket>.pid`: after
/// a template build the previous virtiofsd's sandboxed child, which shares that lock, can
/// outlive its killed parent for a moment, and a new virtiofsd on the same socket then
/// fails with EAGAIN.
fn wait_for_pid_file_unlocked(socket: &Path, timeout: Duration) {
    use std::os::fd::AsRawFd;
    let mut pid_file = socket.as_os_str().to_owned();
    pid_file.push(".pid");
    let Ok(file) = File::open(&pid_file) else {
        return; // none yet, nothing holds it
    };
    let deadline = Instant::now() + timeout;
    loop {
        // SAFETY: flock on an fd this function owns.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            // SAFETY: as above; closing the file would release it as well.
            unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_UN) };
            return;
        }
        if Instant::now() >= deadline {
            tracing::warn!(
                "{} is still locked by another virtiofsd after {timeout:?}",
                Path::new(&pid_file).display()
            );
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn spawn_virtiofsd(spec: &Virtiofsd) -> Result<Child> {
    wait_for_pid_file_unlocked(&spec.socket, Duration::from_secs(5));
    let _ = std::fs::remove_file(&spec.socket);
    let log =
        File::create(&spec.log).with_context(|| format!("creating {}", spec.log.display()))?;
    let mut cmd = Command::new(&spec.bin);
    cmd.arg("--socket-path")
        .arg(&spec.socket)
        .arg("--shared-dir")
        .arg(&spec.dir)
        // virtiofsd's default namespace sandbox (pivot_root into the folder): the guest must
        // not reach host files outside it. Binds made in the folder later reach that
        // namespace through the folder's shared propagation (`share`). Containers' rootfs
        // and binds are mounts below the folder: announcing them gives each its own file
        // system (and inode numbers) in the guest.
        .args([
            "--announce-submounts",
            "--cache",
            "auto",
            "--log-level",
            "warn",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log));
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", spec.bin.display()))?;
    let deadline = Instant::now() + VIRTIOFSD_START_TIMEOUT;
    while !spec.socket.exists() {
        if let Some(status) = child.try_wait().context("waiting for virtiofsd")? {
            let text = std::fs::read_to_string(&spec.log).unwrap_or_default();
            bail!(
                "virtiofsd exited ({status}) before listening: {}",
                text.trim()
            );
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "virtiofsd did not create {} within {VIRTIOFSD_START_TIMEOUT:?}",
                spec.socket.display()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(child)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[test]
    fn a_new_virtiofsd_waits_for_the_old_ones_pid_file_lock() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("fs.sock");
        let held = File::create(dir.path().join("fs.sock.pid")).unwrap();
        // SAFETY: flock on a file this test owns.
        assert_eq!(
            unsafe { libc::flock(held.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) },
            0
        );
        let released = Arc::new(AtomicBool::new(false));
        let r = Arc::clone(&released);
        let holder = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            r.store(true, Ordering::SeqCst);
            drop(held); // the old virtiofsd's last holder exits
        });
        wait_for_pid_file_unlocked(&socket, Duration::from_secs(10));
        assert!(
            released.load(Ordering::SeqCst),
            "returned while still locked"
        );
        holder.join().unwrap();
        // No pid file at all: nothing to wait for.
        wait_for_pid_file_unlocked(&dir.path().join("other.sock"), Duration::from_secs(10));
    }
}
