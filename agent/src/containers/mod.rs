//! Containers of the sandbox: the registry behind the container RPCs.
//!
//! - `sandbox`: CreateSandbox (hostname, resolv.conf, shared mounts, sysctls);
//! - `mounts`: rootfs sources (virtio-blk disk by serial, guest directory, tmpfs overlay);
//! - `stdio`: stream ids to fds (the stdio broker, /dev/null for empty ids);
//! - here: the registry and one method per RPC.
//!
//! The container library is blocking (fork, sync sockets, waits on pidfds), and the agent
//! runs a current-thread runtime: every library call runs in `spawn_blocking`, and the
//! locks it takes are only ever taken there. Exit statuses come from the agent's reaper
//! (the library's `Spawner`), and are published per process on a watch channel.

mod error;
mod inherited_env;
mod mounts;
mod sandbox;
mod stdio;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::SystemTime;

use husk_container::cgroup::{self, Cgroup};
use husk_container::{Container, CreateOptions, ProcessHandle, Spawner, Stdio, Timeline, spec};
use husk_protocol::agent::{
    CreateContainerRequest, CreateSandboxRequest, ExecProcessRequest, StatsContainerResponse,
    WaitProcessResponse,
};
use nix::sys::signal::Signal;
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;
use oci_spec::runtime::{LinuxResources, Process, Spec};
use tokio::sync::{mpsc, watch};
use ttrpc::Code;

pub use error::Failure;

use crate::reaper::{ExitReceiver, Reaper};
use sandbox::{SANDBOX_SCHEME, Sandbox};
use stdio::{Broker, StreamIds};

/// PID 1 of a VM, or an ordinary process in host test mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Guest,
    Host,
}

/// Where the agent keeps sandbox and container state in the guest.
pub const GUEST_STATE_DIR: &str = "/run/husk";

/// The library forks through the reaper so that exit statuses reach their waiters and the
/// child cannot be reaped before it is registered (see `Reaper::start_child`).
impl Spawner for Reaper {
    type Handle = ExitReceiver;

    fn spawn<F: FnOnce() -> husk_container::Result<Pid>>(
        &self,
        start: F,
    ) -> husk_container::Result<(Pid, ExitReceiver)> {
        self.start_child(start)
    }
}

/// How a process ended.
#[derive(Debug, Clone, Copy)]
struct Exit {
    status: WaitStatus,
    at: SystemTime,
}

/// A process of a container: the init (exec id "") or an exec'd one.
struct Proc {
    pid: Pid,
    /// Exec'd processes are signalled through their pidfd (immune to pid reuse); the init
    /// through the container.
    handle: Option<ProcessHandle>,
    exit: watch::Receiver<Option<Exit>>,
    streams: StreamIds,
}

struct Entry {
    id: String,
    /// `None` once deleted.
    container: RwLock<Option<Container>>,
    cgroup: Option<Cgroup>,
    /// The exec'd processes and the init; `None` while an exec is being set up.
    procs: Mutex<HashMap<String, Option<Arc<Proc>>>>,
    bundle: PathBuf,
    mounts: Mutex<mounts::MountSet>,
    oom_task: Option<tokio::task::AbortHandle>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned map is still consistent: every update is a single insert or remove.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Entry {
    fn what(&self) -> String {
        format!("container {}", self.id)
    }

    fn proc(&self, exec_id: &str) -> Result<Arc<Proc>, Failure> {
        match lock(&self.procs).get(exec_id) {
            Some(Some(p)) => Ok(p.clone()),
            _ if exec_id.is_empty() => Err(Failure::not_found(self.what())),
            _ => Err(Failure::not_found(format!(
                "process {exec_id} of container {}",
                self.id
            ))),
        }
    }

    fn cgroup(&self) -> Result<&Cgroup, Failure> {
        self.cgroup.as_ref().ok_or_else(|| {
            Failure::precondition(
                self.what(),
                "has no cgroup (host test mode without a cgroup2 hierarchy)",
            )
        })
    }

    /// Runs `f` on the container (read-locked) in the blocking pool.
    async fn with<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&Container) -> Result<T, Failure> + Send + 'static,
    ) -> Result<T, Failure> {
        let entry = self.clone();
        blocking(move || {
            let guard = entry.container.read().unwrap_or_else(|p| p.into_inner());
            let c = guard
                .as_ref()
                .ok_or_else(|| Failure::not_found(entry.what()))?;
            f(c)
        })
        .await
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Failure> + Send + 'static,
) -> Result<T, Failure> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Failure::internal("blocking task", e))?
}

/// A slot of the registry: `Busy` while a container is being created or removed, so a
/// concurrent request for the same id neither races nor sees half a container.
enum Slot {
    Busy,
    Ready(Arc<Entry>),
}

/// Every container of the sandbox.
pub struct Containers {
    mode: Mode,
    state_dir: PathBuf,
    sys_block: PathBuf,
    reaper: Reaper,
    /// The cgroup2 mount, if there is one (always in the guest).
    cgroup_root: Option<PathBuf>,
    broker: Broker,
    sandbox: Mutex<Option<Arc<Sandbox>>>,
    map: Mutex<HashMap<String, Slot>>,
    oom_tx: mpsc::UnboundedSender<String>,
    oom_rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<String>>,
    /// `NAME=value` entries every container process gets unless it sets NAME itself.
    inherited_env: Vec<String>,
}

/// Releases a reserved id unless the creation went through.
struct Reservation<'a> {
    map: &'a Mutex<HashMap<String, Slot>>,
    id: String,
    done: bool,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if !self.done {
            lock(self.map).remove(&self.id);
        }
    }
}

fn is_cgroup2(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
}

fn parse_json<T: serde::de::DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T, Failure> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let field = e.path().to_string();
        Failure::invalid(what, format!("{field}: {}", e.into_inner()))
    })
}

fn to_u32(pid: Pid) -> u32 {
    u32::try_from(pid.as_raw()).unwrap_or(0)
}

/// Starts forwarding `exit` to a watch channel that any number of WaitProcess calls read.
fn track_exit(exit: ExitReceiver) -> watch::Receiver<Option<Exit>> {
    let (tx, rx) = watch::channel(None);
    tokio::spawn(async move {
        if let Ok(status) = exit.await {
            tx.send_replace(Some(Exit {
                status,
                at: SystemTime::now(),
            }));
        }
    });
    rx
}

impl Containers {
    pub fn new(mode: Mode, state_dir: PathBuf, reaper: Reaper, broker: Broker) -> Self {
        let root = Path::new(cgroup::DEFAULT_ROOT);
        let cgroup_root = is_cgroup2(root).then(|| root.to_owned());
        if cgroup_root.is_none() {
            tracing::info!(
                "no cgroup2 hierarchy at {}: containers get no cgroup",
                root.display()
            );
        }
        let (oom_tx, oom_rx) = mpsc::unbounded_channel();
        Containers {
            mode,
            state_dir,
            sys_block: PathBuf::from(mounts::SYS_BLOCK),
            reaper,
            cgroup_root,
            broker,
            sandbox: Mutex::new(None),
            map: Mutex::new(HashMap::new()),
            oom_tx,
            oom_rx: tokio::sync::Mutex::new(oom_rx),
            // PID 1's environment comes from the kernel command line (see inherited_env);
            // a host-mode agent's is the developer's and stays out of containers.
            inherited_env: match mode {
                Mode::Guest => inherited_env::from_agent_env(|n| std::env::var(n).ok()),
                Mode::Host => Vec::new(),
            },
        }
    }

    fn entry(&self, id: &str) -> Result<Arc<Entry>, Failure> {
        match lock(&self.map).get(id) {
            Some(Slot::Ready(e)) => Ok(e.clone()),
            Some(Slot::Busy) => Err(Failure::precondition(
                format!("container {id}"),
                "is being created or removed",
            )),
            None => Err(Failure::not_found(format!("container {id}"))),
        }
    }

    // ---------- sandbox ----------

    pub async fn create_sandbox(&self, req: CreateSandboxRequest) -> Result<PathBuf, Failure> {
        if lock(&self.sandbox).is_some() {
            return Err(Failure::exists("sandbox"));
        }
        let dir = self.state_dir.join("sandbox");
        let mode = self.mode;
        let sandbox = blocking(move || Sandbox::create(dir, mode, &req)).await?;
        let mut slot = lock(&self.sandbox);
        if slot.is_some() {
            // Lost a race with a concurrent CreateSandbox.
            drop(slot);
            let _ = sandbox.destroy();
            return Err(Failure::exists("sandbox"));
        }
        let dir = sandbox.dir.clone();
        *slot = Some(Arc::new(sandbox));
        Ok(dir)
    }

    /// Removes every container, then the sandbox mounts and the state directory.
    pub async fn destroy_all(&self) -> Result<(), Failure> {
        let ids: Vec<String> = lock(&self.map).keys().cloned().collect();
        let mut first = None;
        for id in ids {
            if let Err(e) = self.remove(&id).await {
                tracing::warn!("{e}");
                first.get_or_insert(e);
            }
        }
        let sandbox = lock(&self.sandbox).take();
        if let Some(sb) = sandbox {
            match Arc::try_unwrap(sb) {
                Ok(sb) => {
                    if let Err(e) = blocking(move || sb.destroy()).await {
                        tracing::warn!("{e}");
                        first.get_or_insert(e);
                    }
                }
                Err(_) => tracing::warn!("sandbox still in use; its mounts stay"),
            }
        }
        if self.mode == Mode::Host {
            let _ = std::fs::remove_dir_all(&self.state_dir);
        }
        first.map_or(Ok(()), Err)
    }

    // ---------- create ----------

    /// Creates the container; returns its init's pid and the steps the creation took.
    pub async fn create(
        &self,
        req: CreateContainerRequest,
    ) -> Result<(u32, Vec<husk_container::Step>), Failure> {
        let mut timeline = Timeline::start();
        let id = req.container_id.clone();
        let what = format!("container {id}");
        husk_container::validate_id(&id).map_err(|e| Failure::lib("container_id", e))?;
        let mut reservation = {
            let mut map = lock(&self.map);
            if map.contains_key(&id) {
                return Err(Failure::exists(&what));
            }
            map.insert(id.clone(), Slot::Busy);
            Reservation {
                map: &self.map,
                id: id.clone(),
                done: false,
            }
        };

        let text = std::str::from_utf8(&req.oci_spec_json)
            .map_err(|e| Failure::invalid(format!("{what}: oci_spec_json"), e))?;
        let mut spec = spec::parse(text).map_err(|e| Failure::lib(&what, e))?;
        spec::validate(&spec).map_err(|e| Failure::lib(&what, e))?;
        let spec_terminal = spec
            .process()
            .as_ref()
            .and_then(|p| p.terminal())
            .unwrap_or(false);
        if spec_terminal != req.terminal {
            return Err(Failure::invalid(
                &what,
                format!(
                    "terminal is {} but process.terminal is {spec_terminal}",
                    req.terminal
                ),
            ));
        }
        let streams = StreamIds::from_proto(&what, req.stdio.as_ref(), req.terminal)?;
        self.resolve_sandbox_sources(&what, &mut spec)?;
        let resources = spec
            .linux()
            .as_ref()
            .and_then(|l| l.resources().clone())
            .unwrap_or_default();
        let cgroups_path = spec.linux().as_ref().and_then(|l| l.cgroups_path().clone());
        if self.cgroup_root.is_none() {
            self.check_no_resources(&what, &resources)?;
        }

        // Everything below creates state; the guard-like pieces (MountSet, the bundle
        // removal, the cgroup) undo it on every error path.
        let bundle = self.state_dir.join("containers").join(&id);
        std::fs::create_dir_all(&bundle)
            .map_err(|e| Failure::os(format!("{what}: mkdir {}", bundle.display()), &e))?;
        timeline.mark("spec");
        let result = self
            .create_in_bundle(
                &id,
                &bundle,
                spec,
                &req,
                streams,
                cgroups_path.as_deref(),
                &resources,
                &mut timeline,
            )
            .await;
        match result {
            Ok(entry) => {
                let pid = entry.proc("").map(|p| to_u32(p.pid)).unwrap_or(0);
                lock(&self.map).insert(id, Slot::Ready(entry));
                reservation.done = true;
                timeline.mark("terminal, OOM watch");
                Ok((pid, timeline.into_steps()))
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&bundle);
                Err(e)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn create_in_bundle(
        &self,
        id: &str,
        bundle: &Path,
        mut spec: Spec,
        req: &CreateContainerRequest,
        streams: StreamIds,
        cgroups_path: Option<&Path>,
        resources: &LinuxResources,
        timeline: &mut Timeline,
    ) -> Result<Arc<Entry>, Failure> {
        let what = format!("container {id}");
        let (b, rootfs_src, sys_block) = (
            bundle.to_owned(),
            req.rootfs.clone(),
            self.sys_block.clone(),
        );
        let (root, mount_set) =
            blocking(move || mounts::prepare_rootfs(&b, rootfs_src.as_ref(), &sys_block))
                .await
                .map_err(|e| Failure::new(e.code, &what, e.message))?;
        timeline.mark("rootfs (disk or share, overlay)");
        if let Some(r) = spec.root_mut() {
            r.set_path(root);
        }
        if let Some(p) = spec.process_mut() {
            inherited_env::apply(p, &self.inherited_env);
        }

        let cgroup = match &self.cgroup_root {
            Some(cg_root) => {
                let rel = cgroup::resolve_path(cgroups_path, id)
                    .map_err(|e| Failure::cgroup(&what, e))?;
                let cg = Cgroup::create(cg_root, &rel).map_err(|e| Failure::cgroup(&what, e))?;
                if let Err(e) = cg.apply(resources) {
                    let _ = cg.remove();
                    return Err(Failure::cgroup(&what, e));
                }
                Some(cg)
            }
            None => None,
        };
        timeline.mark("cgroup");
        let stdio = match stdio::prepare(&self.broker, &what, &streams, req.terminal) {
            Ok(s) => s,
            Err(e) => {
                if let Some(cg) = &cgroup {
                    let _ = cg.remove();
                }
                return Err(e);
            }
        };
        timeline.mark("stdio streams");
        let opts = CreateOptions {
            id: id.to_owned(),
            bundle: bundle.to_owned(),
            spec,
            stdio,
            cgroup: cgroup
                .clone()
                .map(|c| Box::new(c) as Box<dyn husk_container::CgroupHandle>),
        };
        let reaper = self.reaper.clone();
        // The library removes the cgroup itself when create fails. It also owns the
        // process's stdio fds and drops them once the child has them: a pipe's write end
        // or the pty slave left open in the agent would keep the host from ever reading
        // end-of-file.
        let created = blocking(move || {
            Container::create(opts, &reaper).map_err(|e| Failure::lib("create", e))
        })
        .await;
        let (mut container, exit) = match created {
            Ok(c) => c,
            Err(e) => {
                stdio::release(&self.broker, &streams);
                return Err(Failure::new(e.code, &what, e.message));
            }
        };
        timeline.include(container.take_create_steps(), "agent thread hand-off");
        if let Err(e) =
            stdio::set_terminal(&self.broker, &what, &streams, container.take_terminal())
        {
            stdio::release(&self.broker, &streams);
            if let Err(d) =
                blocking(move || container.delete().map_err(|e| Failure::lib("delete", e))).await
            {
                tracing::warn!(id, "removing a container whose terminal failed: {d}");
            }
            return Err(e);
        }
        let pid = container.pid();
        let oom_task = cgroup.as_ref().and_then(|cg| self.watch_oom(id, cg));
        let init = Proc {
            pid,
            handle: None,
            exit: track_exit(exit),
            streams,
        };
        tracing::info!(id, pid = pid.as_raw(), "container created");
        Ok(Arc::new(Entry {
            id: id.to_owned(),
            container: RwLock::new(Some(container)),
            cgroup,
            procs: Mutex::new(HashMap::from([(String::new(), Some(Arc::new(init)))])),
            bundle: bundle.to_owned(),
            mounts: Mutex::new(mount_set),
            oom_task,
        }))
    }

    /// Without cgroups (host test mode on a cgroup v1 host) a spec may ask for no limit.
    fn check_no_resources(&self, what: &str, resources: &LinuxResources) -> Result<(), Failure> {
        let no_cgroup = |why: String| {
            Failure::precondition(
                what,
                format!("{why} (no cgroup2 hierarchy at {})", cgroup::DEFAULT_ROOT),
            )
        };
        if self.mode == Mode::Guest {
            return Err(no_cgroup("the guest needs cgroup2".into()));
        }
        match cgroup::plan(resources, &[], |_| false) {
            Err(e) => Err(no_cgroup(e.to_string())),
            Ok(report) if !report.writes.is_empty() => Err(no_cgroup(format!(
                "linux.resources sets {}",
                report.writes[0].file
            ))),
            Ok(_) => Ok(()),
        }
    }

    /// Points `sandbox://...` mount sources at the sandbox directory (as bind mounts).
    fn resolve_sandbox_sources(&self, what: &str, spec: &mut Spec) -> Result<(), Failure> {
        let sandbox = lock(&self.sandbox).clone();
        let Some(mounts) = spec.mounts_mut().as_mut() else {
            return Ok(());
        };
        for (i, m) in mounts.iter_mut().enumerate() {
            let Some(src) = m.source().as_ref().and_then(|s| s.to_str()) else {
                continue;
            };
            if !src.starts_with(SANDBOX_SCHEME) {
                continue;
            }
            let sb = sandbox.as_ref().ok_or_else(|| {
                Failure::precondition(
                    format!("{what}: mounts[{i}]"),
                    "no sandbox (CreateSandbox first)",
                )
            })?;
            let path = sb
                .resolve(src)
                .map_err(|e| Failure::new(e.code, format!("{what}: mounts[{i}]"), e.message))?;
            m.set_source(Some(path));
            if m.typ().as_deref().is_none_or(|t| t.is_empty()) {
                m.set_typ(Some("bind".into()));
            }
            let opts = m.options_mut().get_or_insert_with(Vec::new);
            if !opts.iter().any(|o| o == "bind" || o == "rbind") {
                opts.push("rbind".into());
            }
        }
        Ok(())
    }

    /// Forwards OOM kills of the container's cgroup to GetOOMEvent.
    fn watch_oom(&self, id: &str, cg: &Cgroup) -> Option<tokio::task::AbortHandle> {
        let watcher = match cg.oom_watcher() {
            Ok(w) => w,
            Err(e) => {
                tracing::debug!(id, "no OOM events: {e}");
                return None;
            }
        };
        // SAFETY: OomWatcher owns its inotify fd (an OwnedFd) and always returns that one
        // from as_raw_fd; the AsyncFd owns the watcher, so the fd outlives the registration.
        let registered = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(watcher, tokio::io::Interest::READABLE)
        };
        let fd = match registered {
            Ok(fd) => fd,
            Err(e) => {
                tracing::warn!(id, "OOM watcher: {e}");
                return None;
            }
        };
        let tx = self.oom_tx.clone();
        let id = id.to_owned();
        let task = tokio::spawn(async move {
            let mut fd = fd;
            loop {
                let Ok(mut ready) = fd.readable_mut().await else {
                    return;
                };
                match ready.get_inner_mut().read_oom_kills() {
                    Ok(0) => {}
                    Ok(n) => {
                        tracing::info!(id, kills = n, "OOM kill in container");
                        if tx.send(id.clone()).is_err() {
                            return;
                        }
                    }
                    // The cgroup is gone.
                    Err(_) => return,
                }
                ready.clear_ready();
            }
        });
        Some(task.abort_handle())
    }

    // ---------- lifecycle ----------

    /// Starts the container's program; returns the steps it took.
    pub async fn start(&self, id: &str) -> Result<Vec<husk_container::Step>, Failure> {
        let entry = self.entry(id)?;
        let e2 = entry.clone();
        blocking(move || {
            let mut guard = e2.container.write().unwrap_or_else(|p| p.into_inner());
            let c = guard
                .as_mut()
                .ok_or_else(|| Failure::not_found(e2.what()))?;
            c.start().map_err(|e| Failure::lib(e2.what(), e))
        })
        .await
    }

    /// Starts a process in a running container; returns its pid and the steps it took.
    pub async fn exec(
        &self,
        req: ExecProcessRequest,
    ) -> Result<(u32, Vec<husk_container::Step>), Failure> {
        let mut timeline = Timeline::start();
        let entry = self.entry(&req.container_id)?;
        let exec_id = req.exec_id.clone();
        let what = format!("process {exec_id} of container {}", entry.id);
        husk_container::validate_id(&exec_id).map_err(|e| Failure::lib("exec_id", e))?;
        let mut process: Process = parse_json(&format!("{what}: process_json"), &req.process_json)?;
        spec::validate_process(&process, "process").map_err(|e| Failure::lib(&what, e))?;
        inherited_env::apply(&mut process, &self.inherited_env);
        if process.terminal().unwrap_or(false) != req.terminal {
            return Err(Failure::invalid(
                &what,
                "terminal differs from process.terminal",
            ));
        }
        let streams = StreamIds::from_proto(&what, req.stdio.as_ref(), req.terminal)?;
        {
            let mut procs = lock(&entry.procs);
            if procs.contains_key(&exec_id) {
                return Err(Failure::exists(&what));
            }
            procs.insert(exec_id.clone(), None);
        }
        timeline.mark("spec");
        let result = async {
            let stdio: Stdio = stdio::prepare(&self.broker, &what, &streams, req.terminal)?;
            timeline.mark("stdio streams");
            let reaper = self.reaper.clone();
            let w = what.clone();
            // As for create, the library drops the process's stdio fds after the spawn.
            let spawned = entry
                .with(move |c| {
                    c.exec(&process, stdio, &reaper)
                        .map_err(|e| Failure::lib(w, e))
                })
                .await;
            let (mut handle, exit) = match spawned {
                Ok(s) => s,
                Err(e) => {
                    // Only streams this request registered: prepare succeeded.
                    stdio::release(&self.broker, &streams);
                    return Err(e);
                }
            };
            timeline.include(handle.take_steps(), "agent thread hand-off");
            if let Err(e) =
                stdio::set_terminal(&self.broker, &what, &streams, handle.take_terminal())
            {
                stdio::release(&self.broker, &streams);
                let _ = handle.signal(nix::sys::signal::Signal::SIGKILL);
                return Err(e);
            }
            Ok::<_, Failure>(Proc {
                pid: handle.pid(),
                handle: Some(handle),
                exit: track_exit(exit),
                streams,
            })
        }
        .await;
        let mut procs = lock(&entry.procs);
        match result {
            Ok(p) => {
                let pid = to_u32(p.pid);
                procs.insert(exec_id, Some(Arc::new(p)));
                timeline.mark("terminal");
                Ok((pid, timeline.into_steps()))
            }
            Err(e) => {
                procs.remove(&exec_id);
                Err(e)
            }
        }
    }

    pub async fn signal(
        &self,
        id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<(), Failure> {
        let entry = self.entry(id)?;
        let sig = i32::try_from(signal)
            .ok()
            .and_then(|s| Signal::try_from(s).ok())
            .ok_or_else(|| Failure::invalid(format!("signal {signal}"), "not a signal number"))?;
        if exec_id.is_empty() {
            let what = entry.what();
            return entry
                .with(move |c| c.signal(sig, all).map_err(|e| Failure::lib(what, e)))
                .await;
        }
        if all {
            return Err(Failure::invalid(
                "all",
                "only for the container's init (empty exec_id)",
            ));
        }
        let p = entry.proc(exec_id)?;
        let what = format!("process {exec_id} of container {id}");
        blocking(move || match &p.handle {
            Some(h) => h.signal(sig).map_err(|e| Failure::lib(what, e)),
            None => Err(Failure::internal(what, "no process handle")),
        })
        .await
    }

    pub async fn wait(&self, id: &str, exec_id: &str) -> Result<WaitProcessResponse, Failure> {
        let entry = self.entry(id)?;
        let p = entry.proc(exec_id)?;
        drop(entry);
        let mut rx = p.exit.clone();
        let exit = match rx.wait_for(|e| e.is_some()).await {
            Ok(e) => e.as_ref().copied(),
            Err(_) => None,
        }
        .ok_or_else(|| {
            Failure::internal(
                format!("process {} of container {id}", p.pid),
                "exit status lost",
            )
        })?;
        let mut resp = WaitProcessResponse::new();
        resp.pid = to_u32(p.pid);
        match exit.status {
            WaitStatus::Exited(_, code) => resp.exit_code = code,
            WaitStatus::Signaled(_, sig, core) => {
                resp.signal = sig as u32;
                resp.core_dumped = core;
            }
            other => return Err(Failure::internal("wait status", format!("{other:?}"))),
        }
        resp.exited_at_unix_ns = exit
            .at
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        Ok(resp)
    }

    pub async fn remove(&self, id: &str) -> Result<(), Failure> {
        let entry = {
            let mut map = lock(&self.map);
            match map.get(id) {
                Some(Slot::Ready(e)) => {
                    let e = e.clone();
                    map.insert(id.to_owned(), Slot::Busy);
                    e
                }
                Some(Slot::Busy) => {
                    return Err(Failure::precondition(
                        format!("container {id}"),
                        "is being created or removed",
                    ));
                }
                None => return Err(Failure::not_found(format!("container {id}"))),
            }
        };
        if let Some(t) = &entry.oom_task {
            t.abort();
        }
        let e2 = entry.clone();
        let broker = self.broker.clone();
        let result = blocking(move || {
            let container = e2
                .container
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            let mut first = None;
            if let Some(c) = container
                && let Err(e) = c.delete()
            {
                first = Some(Failure::lib(e2.what(), e));
            }
            // The processes are gone: streams never attached close now, attached output
            // streams run to their last byte.
            for p in lock(&e2.procs).values().flatten() {
                stdio::release(&broker, &p.streams);
            }
            if let Err(e) = lock(&e2.mounts).unmount_all() {
                first.get_or_insert(Failure::new(e.code, e2.what(), e.message));
            }
            // Only once nothing is mounted below it: never recurse into a mount.
            if lock(&e2.mounts).is_empty()
                && let Err(e) = std::fs::remove_dir_all(&e2.bundle)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                first.get_or_insert(Failure::os(
                    format!("{}: removing its state", e2.what()),
                    &e,
                ));
            }
            first.map_or(Ok(()), Err)
        })
        .await;
        // The container is gone even if part of the cleanup failed; keeping it would
        // only make a retry fail on the missing init.
        lock(&self.map).remove(id);
        tracing::info!(id, ok = result.is_ok(), "container removed");
        result
    }

    pub async fn list_processes(&self, id: &str) -> Result<Vec<u32>, Failure> {
        let entry = self.entry(id)?;
        let what = entry.what();
        let pids = entry
            .with(move |c| c.all_pids().map_err(|e| Failure::lib(what, e)))
            .await?;
        let mut pids: Vec<u32> = pids.into_iter().map(to_u32).collect();
        pids.sort_unstable();
        Ok(pids)
    }

    pub async fn set_paused(&self, id: &str, paused: bool) -> Result<(), Failure> {
        let entry = self.entry(id)?;
        entry.cgroup()?;
        let e2 = entry.clone();
        blocking(move || {
            let cg = e2.cgroup()?;
            let r = if paused { cg.freeze() } else { cg.thaw() };
            r.map_err(|e| Failure::cgroup(e2.what(), e))
        })
        .await
    }

    pub async fn update(&self, id: &str, resources_json: &[u8]) -> Result<Vec<String>, Failure> {
        let entry = self.entry(id)?;
        let resources: LinuxResources =
            parse_json(&format!("{}: resources_json", entry.what()), resources_json)?;
        entry.cgroup()?;
        let e2 = entry.clone();
        blocking(move || {
            let cg = e2.cgroup()?;
            cg.update(&resources)
                .map(|r| r.skipped)
                .map_err(|e| Failure::cgroup(e2.what(), e))
        })
        .await
    }

    pub async fn stats(&self, id: &str) -> Result<StatsContainerResponse, Failure> {
        let entry = self.entry(id)?;
        entry.cgroup()?;
        let e2 = entry.clone();
        let stats = blocking(move || {
            e2.cgroup()?
                .stats()
                .map_err(|e| Failure::cgroup(e2.what(), e))
        })
        .await?;
        Ok(stats_to_proto(stats))
    }

    pub async fn next_oom_event(&self) -> Result<String, Failure> {
        let mut rx = self.oom_rx.lock().await;
        rx.recv()
            .await
            .ok_or_else(|| Failure::new(Code::UNAVAILABLE, "OOM events", "the agent is stopping"))
    }

    pub async fn resize(
        &self,
        id: &str,
        exec_id: &str,
        rows: u32,
        cols: u32,
    ) -> Result<(), Failure> {
        let p = self.entry(id)?.proc(exec_id)?;
        let what = format!("process {exec_id:?} of container {id}");
        let (Ok(rows), Ok(cols)) = (u16::try_from(rows), u16::try_from(cols)) else {
            return Err(Failure::invalid(what, "rows and cols must fit in 16 bits"));
        };
        stdio::resize(&self.broker, &what, &p.streams, rows, cols)
    }

    pub async fn close_stdin(&self, id: &str, exec_id: &str) -> Result<(), Failure> {
        let p = self.entry(id)?.proc(exec_id)?;
        let what = format!("process {exec_id:?} of container {id}");
        stdio::close_stdin(&self.broker, &what, &p.streams)
    }
}

fn stats_to_proto(s: cgroup::Stats) -> StatsContainerResponse {
    use husk_protocol::agent as pb;
    let mut out = StatsContainerResponse::new();
    if let Some(c) = s.cpu {
        let mut p = pb::CpuStats::new();
        p.usage_usec = c.usage_usec;
        p.user_usec = c.user_usec;
        p.system_usec = c.system_usec;
        p.nr_periods = c.nr_periods;
        p.nr_throttled = c.nr_throttled;
        p.throttled_usec = c.throttled_usec;
        out.cpu = Some(p).into();
    }
    if let Some(m) = s.memory {
        let mut p = pb::MemoryStats::new();
        p.usage_bytes = m.usage;
        p.limit_bytes = m.limit.unwrap_or(0);
        p.swap_usage_bytes = m.swap_usage.unwrap_or(0);
        p.swap_limit_bytes = m.swap_limit.unwrap_or(0);
        p.stat = m.stat.into_iter().collect();
        p.oom_events = m.events.oom;
        p.oom_kill_events = m.events.oom_kill;
        out.memory = Some(p).into();
    }
    if let Some(pids) = s.pids {
        let mut p = pb::PidsStats::new();
        p.current = pids.current;
        p.limit = pids.limit.unwrap_or(0);
        out.pids = Some(p).into();
    }
    out.io =
        s.io.into_iter()
            .map(|d| {
                let mut p = pb::IoDeviceStats::new();
                p.major = d.major;
                p.minor = d.minor;
                p.read_bytes = d.rbytes;
                p.write_bytes = d.wbytes;
                p.read_ios = d.rios;
                p.write_ios = d.wios;
                p
            })
            .collect();
    out
}
