//! The per-container monitor: the host process that lives exactly as long as the
//! container. `create` starts it (`husk __monitor`, inheriting the caller's stdio);
//! a foreground `run` runs it in its own process.
//!
//! It holds the VMM (a jailed process of its own, `husk __vmm`, which dies with the
//! monitor's VMM thread, so no VM can be left behind), creates the container
//! through the guest agent, relays the container's stdio, reports "created" to `create`
//! over a pipe, forwards the signals it receives to the container's init, and exits with
//! the container's exit code (128+n for a signal, see `husk_runtime::exit`).

use std::fs::File;
use std::io::Write;
use std::os::fd::FromRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use husk_protocol::agent::{
    BlockRootfs, CreateContainerRequest, CreateSandboxRequest, DirectoryRootfs, Rootfs,
    SandboxMount,
};
use husk_protocol::client::{AgentClient, Target, connect_with_retry};
use husk_runtime::bundle::{self, Bundle};
use husk_runtime::config::Config;
use husk_runtime::host_cgroup::{HostCgroup, HostLimits};
use husk_runtime::process::ProcessIdentity;
use husk_runtime::sizing::{HOST_MEMORY_OVERHEAD_MIB, VmSize};
use husk_runtime::state::{
    ContainerState, ExitRecord, FS_SOCKET, ROOTFS_IMAGE, RootfsMode, StateStore, Status, VM_SOCKET,
};
use husk_runtime::template::{Lookup, Template, TemplateInputs, TemplateStore, slots_for};
use husk_runtime::vm_config::{Launch, VmmLaunch, launch_config, path_arg, rootfs_block_arg};
use husk_runtime::volumes::{self, SHARE_TAG, SHM_MOUNT, SHM_OPTIONS, SharedBinds, SharedFolder};
use husk_runtime::{console, exit, hooks, rootfs_image};
use husk_vmm::stop::StopReason;
use tokio::signal::unix::{SignalKind, signal};

use super::relay::{self, Relay, TerminalHost};
use super::{FAILURE, GlobalOpts, oci_state};

/// virtio-blk serial of the rootfs image.
/// Stream id prefix of the init's stdio.
const INIT_STREAMS: &str = "init";
/// The VMM's jail folder in the container's state folder (empty on the host).
pub(super) const JAIL_DIR: &str = "jail";
/// How long output may keep flowing after the init exited.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Args, Debug)]
pub struct MonitorArgs {
    /// Pipe to report "created" (or the error) on.
    #[arg(long)]
    pub ready_fd: Option<i32>,
    #[arg(long)]
    pub console_socket: Option<PathBuf>,
    pub id: String,
}

/// How the monitor was started.
#[derive(Debug, Clone, Default)]
pub struct MonitorOptions {
    pub console_socket: Option<PathBuf>,
    /// A terminal uses our own stdin/stdout (foreground `run`).
    pub terminal_on_own_stdio: bool,
}

/// Entry point of `husk __monitor`.
pub fn main(g: &GlobalOpts, args: MonitorArgs) -> i32 {
    // SAFETY: `create` passed us the write end of its pipe under this number; nothing
    // else in this process owns it.
    let mut ready = args.ready_fd.map(|fd| unsafe { File::from_raw_fd(fd) });
    // Children (virtiofsd, hooks) must not inherit it: `create` waits for its end-of-file.
    if let Some(r) = &ready {
        let _ = nix::fcntl::fcntl(
            r,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        );
    }
    let opts = MonitorOptions {
        console_socket: args.console_socket,
        terminal_on_own_stdio: false,
    };
    match Monitor::setup(g, &args.id, &opts) {
        Ok(m) => {
            if let Some(r) = ready.as_mut() {
                let _ = r.write_all(b"OK\n");
            }
            drop(ready);
            m.wait()
        }
        Err(e) => {
            let msg = format!("{e:#}");
            tracing::error!("create failed: {msg}");
            if let Some(r) = ready.as_mut() {
                let _ = writeln!(r, "ERR {}", msg.replace('\n', " "));
            }
            FAILURE
        }
    }
}

/// A created container and everything that keeps it alive.
pub struct Monitor {
    store: StateStore,
    id: String,
    agent_id: String,
    rt: tokio::runtime::Runtime,
    client: AgentClient,
    relay: Relay,
    vmm_done: tokio::sync::oneshot::Receiver<Result<StopReason, String>>,
    virtiofsd: Option<Child>,
    host_cgroup: Option<HostCgroup>,
}

impl Monitor {
    /// Boots the VM and creates the container (held, not started).
    pub fn setup(g: &GlobalOpts, id: &str, opts: &MonitorOptions) -> Result<Self> {
        let store = StateStore::new(&g.root);
        let me = ProcessIdentity::current().context("reading our own /proc/self/stat")?;
        let mut st = update(&store, id, |st| st.monitor = Some(me))?;
        let config = Config::load()?;
        let bundle = Bundle::load(&st.bundle)?;
        let dir = store.dir(id)?;
        let vm_socket = store.socket_path(id, VM_SOCKET)?;
        let _ = std::fs::remove_file(&vm_socket);

        // The host cgroup first: virtiofsd and the VMM's threads start inside it.
        let host_cgroup = enter_host_cgroup(&bundle, st.memory_mib)?;
        if let Some(cg) = &host_cgroup {
            let paths = cg.created_paths().map(Path::to_path_buf).collect();
            st = update(&store, id, |st| st.host_cgroup = paths)?;
        }

        // Host binds become entries of the shared folder; a bad one fails the create here,
        // before anything is started.
        let mut binds = SharedBinds::default();
        let (guest_spec, warnings) = bundle::guest_spec(&bundle.raw, &mut binds)
            .map_err(|e| anyhow!("{}: {e}", bundle.dir.join(bundle::CONFIG_FILE).display()))?;

        // The rootfs: an image, or shared through virtiofsd with the host binds.
        let mut vmm_args: Vec<String> = Vec::new();
        let mut virtiofsd = None;
        if st.rootfs_mode == RootfsMode::Block {
            let image = dir.join(ROOTFS_IMAGE);
            rootfs_image::build(&bundle.rootfs, &image)?;
            vmm_args.push("--block".into());
            vmm_args.push(rootfs_block_arg(Some(&image))?);
        }
        let shares_rootfs = st.rootfs_mode == RootfsMode::Virtiofs;
        if shares_rootfs || !binds.binds.is_empty() {
            let folder = SharedFolder::prepare(
                &dir.join(SHARE_TAG),
                shares_rootfs.then_some(bundle.rootfs.as_path()),
                &binds.binds,
            )?;
            let socket = store.socket_path(id, FS_SOCKET)?;
            let child = spawn_virtiofsd(&config, &folder, &socket)?;
            let ident = ProcessIdentity::of(child.id() as i32);
            virtiofsd = Some(child);
            st = update(&store, id, |st| st.virtiofsd = ident)?;
            vmm_args.push("--fs".into());
            vmm_args.push(format!("socket={},tag={SHARE_TAG}", path_arg(&socket)?));
        }
        let size = VmSize {
            vcpus: st.vcpus,
            memory_mib: st.memory_mib,
        };
        let template = choose_template(&g.root, &config, size, st.rootfs_mode, &binds);
        let launch = match &template {
            Some(t) => Launch::Restore(&t.dir),
            None => Launch::Boot,
        };
        let vmm = launch_config(&config, size, &vm_socket, vmm_args, launch)?;
        let started = Instant::now();
        let vmm_done = spawn_vmm(vmm, &config, dir.join(JAIL_DIR), Vec::new())?;

        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")?;
        let target = Target::hybrid_vsock(&vm_socket);
        // The rootfs (or the volumes) live in virtiofsd: when it dies, guest accesses to the
        // share never complete, so every step below gives up at once instead of waiting out
        // its RPC deadline.
        let share_pid = virtiofsd.as_ref().map(|c| c.id() as i32);
        let (client, vmm_done) = rt.block_on(unless_share_gone(share_pid, async {
            let mut vmm_done = vmm_done;
            let deadline = Instant::now() + Duration::from_secs(config.boot_timeout_secs);
            let client = tokio::select! {
                c = connect_with_retry(&target, deadline) => c.context("waiting for the VM's agent")?,
                r = &mut vmm_done => bail!("the VM stopped before its agent answered: {}", describe_stop(r)),
            };
            // Container creation forks and mounts in a guest that may be slow (nested PVM,
            // a loaded host): the boot timeout bounds the set-up calls too.
            let client = client.with_rpc_timeout(Duration::from_secs(config.boot_timeout_secs));
            if let Some(t) = &template {
                t.make_restored_vm_unique(&client, started).await?;
            }
            anyhow::Ok((client, vmm_done))
        }))?;

        // Sandbox, then the container.
        let mut sandbox = CreateSandboxRequest::new();
        if virtiofsd.is_some() {
            let mut m = SandboxMount::new();
            m.name = SHARE_TAG.into();
            m.source = SHARE_TAG.into();
            m.fstype = "virtiofs".into();
            sandbox.mounts.push(m);
        }
        if binds.uses_shm {
            let mut shm = SandboxMount::new();
            shm.name = SHM_MOUNT.into();
            shm.source = "shm".into();
            shm.fstype = "tmpfs".into();
            shm.options = SHM_OPTIONS.split(',').map(str::to_owned).collect();
            sandbox.mounts.push(shm);
        }
        let sandbox_dir = rt
            .block_on(unless_share_gone(share_pid, async {
                client
                    .create_sandbox(&sandbox)
                    .await
                    .context("setting up the sandbox in the VM")
            }))?
            .sandbox_dir;
        let mut rootfs = Rootfs::new();
        match st.rootfs_mode {
            RootfsMode::Block => {
                let mut b = BlockRootfs::new();
                b.serial = husk_runtime::vm_config::ROOTFS_SERIAL.into();
                b.fstype = "ext4".into();
                b.read_only = true;
                rootfs.set_block(b);
            }
            RootfsMode::Virtiofs => {
                let mut d = DirectoryRootfs::new();
                d.path = volumes::guest_rootfs(&sandbox_dir);
                d.overlay = false;
                rootfs.set_directory(d);
            }
        }
        for w in warnings {
            tracing::warn!("{w}");
        }
        let ids = relay::stream_ids(INIT_STREAMS, st.terminal);
        let mut req = CreateContainerRequest::new();
        req.container_id = st.agent_id.clone();
        req.oci_spec_json = guest_spec.to_string().into_bytes();
        req.rootfs = Some(rootfs).into();
        req.stdio = Some(ids.clone()).into();
        req.terminal = st.terminal;
        let created = rt.block_on(unless_share_gone(share_pid, async {
            client
                .create_container(&req)
                .await
                .with_context(|| format!("creating {id} in the VM"))
        }))?;
        tracing::debug!(
            steps = %husk_protocol::steps::summary(&created.steps),
            "container created in the VM"
        );

        let terminal_host = if st.terminal {
            match (&opts.console_socket, opts.terminal_on_own_stdio) {
                (Some(sock), _) => {
                    let pty = console::open_pty()?;
                    console::send_fd(sock, &pty.name, &pty.master)?;
                    Some(TerminalHost::PtySlave(pty.slave))
                }
                (None, true) => Some(TerminalHost::OwnStdio),
                (None, false) => bail!("process.terminal is set but no --console-socket was given"),
            }
        } else {
            None
        };
        let relay = rt.block_on(relay::start(&target, &ids, terminal_host))?;
        if let Some(fd) = relay.winsize_fd
            && let Some((rows, cols)) = relay::winsize(fd)
        {
            let _ = rt.block_on(client.tty_win_resize(&st.agent_id, "", rows.into(), cols.into()));
        }

        let st = update(&store, id, |st| {
            st.status = Status::Created;
            st.guest_pid = Some(created.pid);
        })?;
        run_create_hooks(&bundle, &st)?;
        tracing::info!(id, guest_pid = created.pid, "container created");
        Ok(Monitor {
            store,
            id: id.to_owned(),
            agent_id: st.agent_id.clone(),
            rt,
            client: client.with_rpc_timeout(Duration::from_secs(30)),
            relay,
            vmm_done,
            virtiofsd,
            host_cgroup,
        })
    }

    /// StartContainer (foreground `run`; otherwise `husk start` does it).
    pub fn start(&self) -> Result<()> {
        let steps = self
            .rt
            .block_on(self.client.start_container(&self.agent_id))
            .with_context(|| format!("starting {}", self.id))?;
        tracing::debug!(
            steps = %husk_protocol::steps::summary(&steps),
            "container started in the VM"
        );
        update(&self.store, &self.id, |st| st.status = Status::Running)?;
        Ok(())
    }

    /// Waits for the init to exit (forwarding signals meanwhile), shuts the VM down and
    /// returns the exit code.
    pub fn wait(mut self) -> i32 {
        let share_pid = self.virtiofsd.as_ref().map(|c| c.id() as i32);
        let vmm_done = &mut self.vmm_done;
        let vm_gone = async {
            tokio::select! {
                r = vmm_done => describe_stop(r),
                why = share_gone(share_pid) => why,
            }
        };
        let outcome = self.rt.block_on(wait_for_exit(
            &self.client,
            &self.agent_id,
            "",
            vm_gone,
            self.relay.winsize_fd,
        ));
        let (code, record) = match outcome {
            Ok(Some(rec)) => (exit::code(rec.exit_code, rec.signal), Some(rec)),
            Ok(None) => {
                tracing::error!("the VM stopped before the container exited");
                (FAILURE, None)
            }
            Err(e) => {
                tracing::error!("waiting for the container: {e:#}");
                (FAILURE, None)
            }
        };
        if !self.relay.wait_drained(DRAIN_TIMEOUT) {
            tracing::warn!("container output did not end within {DRAIN_TIMEOUT:?} of its exit");
        }
        // A delete may hold the lock while it waits for us: do not wait long for it.
        if let Ok(lock) = self.store.lock_timeout(&self.id, Duration::from_secs(1))
            && let Ok(mut st) = self.store.load(&lock)
        {
            st.status = Status::Stopped;
            st.exit = record;
            let _ = self.store.save(&lock, &st);
        }
        self.shutdown();
        code
    }

    /// Stops virtiofsd; the VM ends with this process. No orderly power-off: callers such
    /// as podman wait only a few seconds for this pid after the container died, and nothing
    /// in the guest needs flushing (virtio-fs writes go through to virtiofsd at once; in
    /// block mode the image is read-only and the overlay is a tmpfs).
    fn shutdown(&mut self) {
        if let Ok(r) = self.vmm_done.try_recv() {
            tracing::info!("VM stopped: {}", describe_stop(Ok(r)));
        }
        if let Some(mut child) = self.virtiofsd.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(cg) = self.host_cgroup.take() {
            cg.leave();
        }
    }
}

/// Joins the spec's `linux.cgroupsPath` on the host with its CPU and pids limits, and a
/// memory limit of the VM's memory plus its host overhead when the spec limits memory.
/// No cgroupsPath: the monitor stays where its caller put it.
fn enter_host_cgroup(bundle: &Bundle, vm_memory_mib: u64) -> Result<Option<HostCgroup>> {
    let Some(linux) = bundle.spec.linux().as_ref() else {
        return Ok(None);
    };
    let Some(path) = linux
        .cgroups_path()
        .as_ref()
        .filter(|p| !p.as_os_str().is_empty())
    else {
        return Ok(None);
    };
    let path = path.to_string_lossy();
    let resources = linux.resources().as_ref();
    let mut limits = resources
        .map(HostLimits::from_resources)
        .unwrap_or_default();
    if resources
        .and_then(|r| r.memory().as_ref())
        .and_then(|m| m.limit())
        .is_some_and(|l| l > 0)
    {
        limits.memory_bytes = Some((vm_memory_mib + HOST_MEMORY_OVERHEAD_MIB) << 20);
    }
    HostCgroup::enter_with_limits(&path, &limits)
        .map(Some)
        .with_context(|| format!("linux.cgroupsPath {path:?}"))
}

/// The VMM's outcome, sent when its thread ends.
pub(super) type VmmDone = tokio::sync::oneshot::Receiver<Result<StopReason, String>>;

/// Starts the VMM process of `launch` (jailed in `jail_root` under `vmm_jail = "on"`) from a
/// thread that waits for it: the process is killed when that thread ends, so the VM dies
/// with this process.
pub(super) fn spawn_vmm(
    launch: VmmLaunch,
    config: &Config,
    jail_root: PathBuf,
    snapshot_dirs: Vec<PathBuf>,
) -> Result<VmmDone> {
    let (tx, vmm_done) = tokio::sync::oneshot::channel();
    let config = config.clone();
    std::thread::Builder::new()
        .name("vmm".into())
        .spawn(move || {
            let _ = tx.send(launch.run(&config, &jail_root, &snapshot_dirs));
        })
        .context("starting the VMM thread")?;
    Ok(vmm_done)
}

/// The template this container's VM restores from, under `template = "auto"`; `None` boots
/// cold, with one log line saying why.
fn choose_template(
    root: &Path,
    config: &Config,
    size: VmSize,
    mode: RootfsMode,
    binds: &SharedBinds,
) -> Option<Template> {
    if config.template == husk_runtime::template::TemplateMode::Off {
        return None;
    }
    let slots = slots_for(mode, !binds.binds.is_empty(), SHARE_TAG, false);
    let inputs = match TemplateInputs::new(config, size, slots) {
        Ok(i) => i,
        Err(e) => {
            tracing::warn!("booting cold: the template inputs cannot be read: {e}");
            return None;
        }
    };
    tracing::debug!(
        inputs = %serde_json::to_string(&inputs).unwrap_or_default(),
        "template inputs of this VM"
    );
    match TemplateStore::for_config(config, root).find(&inputs) {
        Ok(Lookup::Found(t)) => match husk_vmm::persist::MachineState::read(&t.dir) {
            Ok(_) => Some(*t),
            Err(e) => {
                tracing::warn!(
                    "booting cold: template {} is unusable ({e}); remove it with `husk template rm {}`",
                    t.manifest.key,
                    t.manifest.key
                );
                None
            }
        },
        Ok(Lookup::Missing(key)) => {
            let mut create = format!(
                "husk template create --vcpus {} --memory-mib {}",
                size.vcpus, size.memory_mib
            );
            if mode == RootfsMode::Block {
                create.push_str(" --rootfs-mode block");
                if !binds.binds.is_empty() {
                    create.push_str(" --volumes");
                }
            }
            tracing::info!(
                "booting cold: no template {key} for this VM ({}); `{create}` makes one",
                inputs.summary()
            );
            None
        }
        Err(e) => {
            tracing::warn!("booting cold: looking up the template: {e}");
            None
        }
    }
}

pub(super) fn describe_stop(
    r: Result<Result<StopReason, String>, tokio::sync::oneshot::error::RecvError>,
) -> String {
    match r {
        Ok(Ok(reason)) => reason.label(),
        Ok(Err(e)) => e,
        Err(_) => "the VMM thread ended without a result".into(),
    }
}

/// Resolves, saying why, when the container's virtiofsd (`pid`, a child of this process)
/// has exited; never without one.
async fn share_gone(pid: Option<i32>) -> String {
    let Some(pid) = pid else {
        return std::future::pending().await;
    };
    match husk_runtime::process::child_exited(pid).await {
        Ok(how) => format!("virtiofsd (pid {pid}) {how}: the container's shared folder is gone"),
        Err(e) => {
            tracing::warn!("cannot watch virtiofsd (pid {pid}): {e}");
            std::future::pending().await
        }
    }
}

/// `step`, unless the container's virtiofsd exits first: then its error names that.
async fn unless_share_gone<T>(
    pid: Option<i32>,
    step: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    tokio::select! {
        r = step => r,
        why = share_gone(pid) => Err(anyhow!(why)),
    }
}

/// Waits for the exit of the init (`exec_id` empty) or an exec'd process, forwarding the
/// signals we receive to it and following the terminal's window size. `Ok(None)`: the VM
/// went away first (`vm_gone` resolved, with the reason).
pub async fn wait_for_exit(
    client: &AgentClient,
    agent_id: &str,
    exec_id: &str,
    vm_gone: impl std::future::Future<Output = String>,
    winsize_fd: Option<i32>,
) -> Result<Option<ExitRecord>> {
    let kinds = [
        SignalKind::terminate(),
        SignalKind::interrupt(),
        SignalKind::hangup(),
        SignalKind::quit(),
        SignalKind::user_defined1(),
        SignalKind::user_defined2(),
    ];
    let mut streams = Vec::new();
    for k in kinds {
        streams.push((
            k.as_raw_value(),
            signal(k).context("installing signal handlers")?,
        ));
    }
    let (sig_tx, mut sig_rx) = tokio::sync::mpsc::unbounded_channel::<i32>();
    for (num, mut s) in streams {
        let tx = sig_tx.clone();
        tokio::spawn(async move {
            while s.recv().await.is_some() {
                if tx.send(num).is_err() {
                    break;
                }
            }
        });
    }
    let wait = client.wait_process(agent_id, exec_id);
    tokio::pin!(wait);
    tokio::pin!(vm_gone);
    let mut tick = tokio::time::interval(Duration::from_millis(300));
    let mut last_size = winsize_fd.and_then(relay::winsize);
    loop {
        tokio::select! {
            r = &mut wait => {
                let r = r.context("WaitProcess")?;
                return Ok(Some(ExitRecord { exit_code: r.exit_code, signal: r.signal }));
            }
            why = &mut vm_gone => {
                tracing::error!("VM stopped: {why}");
                return Ok(None);
            }
            Some(sig) = sig_rx.recv() => {
                tracing::info!("forwarding signal {sig} to the container");
                if let Err(e) = client.signal_process(agent_id, exec_id, sig, false).await {
                    tracing::warn!("forwarding signal {sig}: {e}");
                }
            }
            _ = tick.tick(), if winsize_fd.is_some() => {
                let now = winsize_fd.and_then(relay::winsize);
                if now != last_size {
                    if let Some((rows, cols)) = now {
                        let _ = client.tty_win_resize(agent_id, exec_id, rows.into(), cols.into()).await;
                    }
                    last_size = now;
                }
            }
        }
    }
}

/// Loads, changes and saves the state under the container's lock.
pub fn update(
    store: &StateStore,
    id: &str,
    change: impl FnOnce(&mut ContainerState),
) -> Result<ContainerState> {
    let lock = store.lock(id)?;
    let mut st = store.load(&lock)?;
    change(&mut st);
    store.save(&lock, &st)?;
    Ok(st)
}

/// Starts virtiofsd sharing `folder` on `socket`, with the folder's binds made in its own
/// mount namespace. It dies with the monitor (PDEATHSIG), and its pid is recorded so
/// `delete` can kill it if it outlives a SIGKILLed monitor anyway.
pub(super) fn spawn_virtiofsd(
    config: &Config,
    folder: &SharedFolder,
    socket: &Path,
) -> Result<Child> {
    let bin = config.virtiofsd_path().ok_or_else(|| {
        anyhow!(
            "sharing the rootfs (rootfs_mode = \"virtiofs\") or host bind mounts needs virtiofsd: install it (`cargo install virtiofsd`, needs libseccomp-dev and libcap-ng-dev) or set `virtiofsd` in {}",
            config.source
        )
    })?;
    let _ = std::fs::remove_file(socket);
    let log = socket.with_file_name("virtiofsd.log");
    let log_file = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let mut cmd = Command::new(&bin);
    cmd.arg("--socket-path")
        .arg(socket)
        .arg("--shared-dir")
        .arg(folder.path())
        // virtiofsd's default namespace sandbox (husk runs as root): the guest must not
        // reach host files outside the shared folder through it. The rootfs and each bind
        // are mounts of their own below it: announced, they keep their inode numbers apart.
        .args([
            "--cache",
            "auto",
            "--announce-submounts",
            "--log-level",
            "warn",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log_file));
    // Its own process group: a ^C meant for a foreground `husk run` (forwarded to the
    // container) must not kill the file server under it.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    // SAFETY: prctl, unshare and mount are async-signal-safe, and the binds' paths were
    // prepared before the fork; nothing else runs between fork and exec.
    unsafe {
        let folder: *const SharedFolder = folder;
        let folder = &*folder;
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            folder.mount_in_new_namespace()
        });
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        if let Some(status) = child.try_wait().context("waiting for virtiofsd")? {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            bail!(
                "virtiofsd exited ({status}) before listening: {}",
                text.trim()
            );
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            bail!("virtiofsd did not create {} within 10 s", socket.display());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(child)
}

/// prestart and createRuntime hooks (host side); createContainer is skipped with a warning.
fn run_create_hooks(bundle: &Bundle, st: &ContainerState) -> Result<()> {
    let Some(h) = bundle.spec.hooks() else {
        return Ok(());
    };
    let state_json = serde_json::to_vec(&oci_state::document(st))?;
    if let Some(list) = h.prestart() {
        hooks::run("prestart", list, &state_json)?;
    }
    if let Some(list) = h.create_runtime() {
        hooks::run("createRuntime", list, &state_json)?;
    }
    if h.create_container().as_ref().is_some_and(|l| !l.is_empty()) {
        tracing::warn!(
            "createContainer hooks are not run: they would have to run inside the VM, where host binaries are not available"
        );
    }
    Ok(())
}
