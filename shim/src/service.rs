//! containerd's task API (`containerd.task.v2.Task`, and v3 under the same handlers) on top
//! of the husk agent. One shim serves one container in one VM.
//!
//! Pids: containerd gets the shim's own pid for every process, as the VM's processes have
//! no host pid (the VMM runs in the shim, so signals and cgroups of that pid reach the VM);
//! `Pids` lists the guest pids.
//!
//! Events go out in containerd's order: TaskCreate at the end of `Create`; TaskStart in
//! `Start` before the exit watcher exists; TaskExit before `Wait` returns or `Delete` can
//! see the exit; TaskDelete in `Delete`; TaskExecAdded in `Exec`; TaskExecStarted in
//! `Start` of an exec; TaskPaused/TaskResumed; TaskOOM from the agent's OOM events.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use containerd_shim::ExitSignal;
use containerd_shim::util::convert_to_any;
use containerd_shim_protos::api::{
    CloseIORequest, ConnectRequest, ConnectResponse, CreateTaskRequest, CreateTaskResponse,
    DeleteRequest, DeleteResponse, ExecProcessRequest, KillRequest, PauseRequest, PidsRequest,
    PidsResponse, ResizePtyRequest, ResumeRequest, ShutdownRequest, StartRequest, StartResponse,
    StateRequest, StateResponse, StatsRequest, StatsResponse, UpdateTaskRequest, WaitRequest,
    WaitResponse,
};
use containerd_shim_protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim_protos::protobuf::well_known_types::empty::Empty;
use containerd_shim_protos::shim::shim::CheckpointTaskRequest;
use containerd_shim_protos::shim_async::Task;
use containerd_shim_protos::topics;
use containerd_shim_protos::ttrpc::r#async::TtrpcContext;
use containerd_shim_protos::ttrpc::{self};
use containerd_shim_protos::types::task::{ProcessInfo, Status as TaskStatus};
use husk_protocol::agent::{CreateContainerRequest, ExecProcessRequest as AgentExec};
use husk_runtime::bundle::{self, Bundle};
use husk_runtime::config::Config;
use husk_runtime::state::RootfsMode;
use husk_runtime::{rootfs_image, sizing};

use crate::container::{Container, Exit, Process, Status, UNKNOWN_EXIT_STATUS};
use crate::error::{ShimError, ShimResult};
use crate::events::Events;
use crate::sandbox::{RootfsShare, Sandbox};
use crate::stdio::{self, IoPaths};
use crate::{rootfs, stats};

/// Where the shim keeps its VM's sockets (not under /run/husk, the `husk` CLI's state
/// root, which it tidies): short paths (a bundle path can exceed the
/// 108-byte limit of a socket address), one folder per shim process.
pub const RUN_ROOT: &str = "/run/husk-shim";
/// File in the bundle naming the run folder, for `delete` after a crash.
pub const RUN_DIR_FILE: &str = "husk-run-dir";
/// The read-only rootfs image in `rootfs_mode = "block"`.
const ROOTFS_IMAGE: &str = "husk-rootfs.ext4";
/// How long output may keep flowing after a process exited.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Service {
    inner: Arc<Inner>,
}

struct Inner {
    shim_id: String,
    events: Events,
    exit: Arc<ExitSignal>,
    container: tokio::sync::Mutex<Option<Arc<Container>>>,
}

impl Service {
    pub fn new(shim_id: &str, events: Events, exit: Arc<ExitSignal>) -> Self {
        Self {
            inner: Arc::new(Inner {
                shim_id: shim_id.to_owned(),
                events,
                exit,
                container: tokio::sync::Mutex::new(None),
            }),
        }
    }
}

/// The pid containerd sees for every process of the container (see the module doc).
fn host_pid() -> u32 {
    std::process::id()
}

impl Inner {
    /// The container `id`, unless it was never created or is deleted.
    async fn container(&self, id: &str) -> ShimResult<Arc<Container>> {
        match self.container.lock().await.as_ref() {
            Some(c) if c.id == id && !c.is_deleted() => Ok(Arc::clone(c)),
            _ => Err(ShimError::NotFound(format!("container {id}: not found"))),
        }
    }

    async fn process(&self, id: &str, exec_id: &str) -> ShimResult<(Arc<Container>, Arc<Process>)> {
        let c = self.container(id).await?;
        let p = c.process(exec_id).ok_or_else(|| {
            ShimError::NotFound(format!("exec {exec_id} of container {id}: not found"))
        })?;
        Ok((c, p))
    }

    async fn create(self: &Arc<Self>, req: CreateTaskRequest) -> ShimResult<CreateTaskResponse> {
        let mut slot = self.container.lock().await;
        if slot.is_some() {
            return Err(ShimError::AlreadyExists(format!(
                "this shim already holds a container; {} needs its own shim",
                req.id
            )));
        }
        if !req.checkpoint.is_empty() {
            return Err(ShimError::Unimplemented(
                "restoring a container from a checkpoint is not supported by husk".into(),
            ));
        }
        let bundle = PathBuf::from(&req.bundle);
        let mounted = if req.rootfs.is_empty() {
            None
        } else {
            let target = bundle.join("rootfs");
            rootfs::mount_all(&req.rootfs, &target)?;
            Some(target)
        };
        let container = match self.create_in_vm(&req, &bundle, mounted.clone()).await {
            Ok(c) => Arc::new(c),
            Err(e) => {
                if let Some(m) = &mounted
                    && let Err(u) = rootfs::unmount_all(m)
                {
                    tracing::warn!("after the failed create: {u:#}");
                }
                return Err(e);
            }
        };
        *slot = Some(Arc::clone(&container));
        drop(slot);
        tracing::info!(id = %req.id, "container created");

        let mut io = TaskIO::new();
        io.stdin = req.stdin.clone();
        io.stdout = req.stdout.clone();
        io.stderr = req.stderr.clone();
        io.terminal = req.terminal;
        let event = TaskCreate {
            container_id: req.id.clone(),
            bundle: req.bundle.clone(),
            rootfs: req.rootfs.clone(),
            io: Some(io).into(),
            checkpoint: req.checkpoint.clone(),
            pid: host_pid(),
            ..Default::default()
        };
        self.events
            .publish(topics::TASK_CREATE_EVENT_TOPIC, Box::new(event))
            .await;
        tokio::spawn(Arc::clone(self).forward_oom_events(container));
        Ok(CreateTaskResponse {
            pid: host_pid(),
            ..Default::default()
        })
    }

    /// Boots the VM and creates the (held) container in it.
    async fn create_in_vm(
        &self,
        req: &CreateTaskRequest,
        bundle_dir: &Path,
        mounted: Option<PathBuf>,
    ) -> ShimResult<Container> {
        let b = Bundle::load(bundle_dir).map_err(|e| ShimError::InvalidArgument(e.to_string()))?;
        let config = Config::load().map_err(|e| ShimError::FailedPrecondition(e.to_string()))?;
        let template = config
            .cpu_template
            .parse::<husk_vmm::cpu_template::TemplateChoice>()
            .map_err(|e| ShimError::FailedPrecondition(format!("cpu_template: {e}")))?
            .resolve(husk_vmm::host::probe());
        let size = sizing::vm_size(&b.spec, &config, template)
            .map_err(|e| ShimError::InvalidArgument(e.to_string()))?;

        let run_dir = Path::new(RUN_ROOT).join(std::process::id().to_string());
        std::fs::create_dir_all(&run_dir)
            .map_err(|e| anyhow::anyhow!("creating {}: {e}", run_dir.display()))?;
        std::fs::write(
            bundle_dir.join(RUN_DIR_FILE),
            run_dir.as_os_str().as_encoded_bytes(),
        )
        .map_err(|e| anyhow::anyhow!("writing {RUN_DIR_FILE} in the bundle: {e}"))?;

        let share = match config.rootfs_mode {
            RootfsMode::Virtiofs => RootfsShare::Virtiofs {
                dir: b.rootfs.clone(),
            },
            RootfsMode::Block => {
                let image = bundle_dir.join(ROOTFS_IMAGE);
                let (src, dst) = (b.rootfs.clone(), image.clone());
                tokio::task::spawn_blocking(move || rootfs_image::build(&src, &dst))
                    .await
                    .map_err(|e| anyhow::anyhow!("rootfs image builder: {e}"))?
                    .map_err(|e| anyhow::anyhow!("building the rootfs image: {e}"))?;
                RootfsShare::Block { image }
            }
        };
        tracing::info!(
            id = %req.id, vcpus = size.vcpus, memory_mib = size.memory_mib,
            rootfs_mode = ?config.rootfs_mode, "booting the VM"
        );
        let sandbox = Sandbox::boot(&config, size, &run_dir, share).await?;

        let (guest_spec, warnings) = bundle::guest_spec(&b.raw);
        for w in warnings {
            tracing::warn!("{w}");
        }
        let io = IoPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let streams = stdio::stream_ids(&io);
        let mut creq = CreateContainerRequest::new();
        creq.container_id = req.id.clone();
        creq.oci_spec_json = guest_spec.to_string().into_bytes();
        creq.rootfs = Some(sandbox.rootfs().clone()).into();
        creq.stdio = Some(streams.clone()).into();
        creq.terminal = req.terminal;
        let setup = async {
            sandbox
                .client()
                .create_container(&creq)
                .await
                .map_err(ShimError::agent("creating the container in the VM"))?;
            stdio::start(sandbox.target(), &io, &streams)
                .await
                .map_err(ShimError::from)
        };
        let relays = match setup.await {
            Ok(r) => r,
            Err(e) => {
                sandbox.shutdown().await;
                return Err(e);
            }
        };
        let init = Arc::new(Process::new("", io, streams, Vec::new()));
        init.set_relays(relays);
        Ok(Container::new(
            req.id.clone(),
            bundle_dir.to_path_buf(),
            sandbox,
            mounted,
            run_dir,
            init,
        ))
    }

    async fn start(self: &Arc<Self>, req: StartRequest) -> ShimResult<StartResponse> {
        let (c, p) = self.process(&req.id, &req.exec_id).await?;
        if p.status() != Status::Created {
            return Err(ShimError::FailedPrecondition(format!(
                "{}: already started",
                describe(&c, &p)
            )));
        }
        let client = c.sandbox.client();
        if p.exec_id.is_empty() {
            client
                .start_container(&c.id)
                .await
                .map_err(ShimError::agent(format!("starting container {}", c.id)))?;
            p.set_running();
            let event = TaskStart {
                container_id: c.id.clone(),
                pid: host_pid(),
                ..Default::default()
            };
            self.events
                .publish(topics::TASK_START_EVENT_TOPIC, Box::new(event))
                .await;
        } else {
            if c.init.status() != Status::Running {
                return Err(ShimError::FailedPrecondition(format!(
                    "container {}: not running",
                    c.id
                )));
            }
            let mut ereq = AgentExec::new();
            ereq.container_id = c.id.clone();
            ereq.exec_id = p.exec_id.clone();
            ereq.process_json = p.process_json.clone();
            ereq.stdio = Some(p.streams.clone()).into();
            ereq.terminal = p.io.terminal;
            client
                .exec_process(&ereq)
                .await
                .map_err(ShimError::agent(describe(&c, &p)))?;
            match stdio::start(c.sandbox.target(), &p.io, &p.streams).await {
                Ok(r) => p.set_relays(r),
                Err(e) => tracing::warn!("{}: stdio: {e:#}", describe(&c, &p)),
            }
            p.set_running();
            let event = TaskExecStarted {
                container_id: c.id.clone(),
                exec_id: p.exec_id.clone(),
                pid: host_pid(),
                ..Default::default()
            };
            self.events
                .publish(topics::TASK_EXEC_STARTED_EVENT_TOPIC, Box::new(event))
                .await;
        }
        tokio::spawn(Arc::clone(self).watch_exit(c, p));
        Ok(StartResponse {
            pid: host_pid(),
            ..Default::default()
        })
    }

    /// Waits for the process to exit (or the VM to stop), lets its output drain, publishes
    /// TaskExit, then records the exit.
    async fn watch_exit(self: Arc<Self>, c: Arc<Container>, p: Arc<Process>) {
        let exit = tokio::select! {
            r = c.sandbox.client().wait_process(&c.id, &p.exec_id) => match r {
                Ok(w) => Exit::from_agent(w.exit_code, w.signal, w.exited_at_unix_ns),
                Err(e) => {
                    tracing::error!("{}: WaitProcess: {e}", describe(&c, &p));
                    Exit::now(UNKNOWN_EXIT_STATUS)
                }
            },
            why = c.sandbox.stopped() => {
                tracing::error!("{}: the VM stopped first: {why}", describe(&c, &p));
                Exit::now(UNKNOWN_EXIT_STATUS)
            }
        };
        if let Some(relays) = p.take_relays()
            && !relays.drained(DRAIN_TIMEOUT).await
        {
            tracing::warn!(
                "{}: output did not end within {DRAIN_TIMEOUT:?} of the exit",
                describe(&c, &p)
            );
        }
        tracing::info!(status = exit.status, "{} exited", describe(&c, &p));
        let event = TaskExit {
            container_id: c.id.clone(),
            id: if p.exec_id.is_empty() {
                c.id.clone()
            } else {
                p.exec_id.clone()
            },
            pid: host_pid(),
            exit_status: exit.status,
            exited_at: Some(exit.timestamp()).into(),
            ..Default::default()
        };
        self.events
            .publish(topics::TASK_EXIT_EVENT_TOPIC, Box::new(event))
            .await;
        p.set_exited(exit);
    }

    async fn forward_oom_events(self: Arc<Self>, c: Arc<Container>) {
        loop {
            let r = tokio::select! {
                r = c.sandbox.client().get_oom_event() => r,
                _ = c.sandbox.stopped() => return,
            };
            match r {
                Ok(id) => {
                    tracing::info!(container = %id, "OOM kill in the guest");
                    let event = TaskOOM {
                        container_id: id,
                        ..Default::default()
                    };
                    self.events
                        .publish(topics::TASK_OOM_EVENT_TOPIC, Box::new(event))
                        .await;
                }
                Err(e) => {
                    if c.is_deleted() || c.sandbox.is_stopped() {
                        return;
                    }
                    // e.g. no memory controller in the guest: do not spin.
                    tracing::warn!("OOM events unavailable: {e}");
                    return;
                }
            }
        }
    }

    async fn delete(&self, req: DeleteRequest) -> ShimResult<DeleteResponse> {
        let (c, p) = self.process(&req.id, &req.exec_id).await?;
        let exit = match p.status() {
            Status::Exited(e) => e,
            Status::Running => {
                return Err(ShimError::FailedPrecondition(format!(
                    "{}: still running (kill it first)",
                    describe(&c, &p)
                )));
            }
            // Never started: an exec unknown to the agent, or a held init that the
            // removal below kills.
            Status::Created => {
                let e = Exit::now(128 + libc::SIGKILL as u32);
                p.set_exited(e);
                e
            }
        };
        if !p.exec_id.is_empty() {
            c.remove_exec(&p.exec_id);
            return Ok(delete_response(exit));
        }

        c.set_deleted();
        if let Err(e) = c.sandbox.client().remove_container(&c.id).await
            && !c.sandbox.is_stopped()
        {
            tracing::warn!("removing container {} in the VM: {e}", c.id);
        }
        self.teardown(&c).await;
        let event = TaskDelete {
            container_id: c.id.clone(),
            pid: host_pid(),
            exit_status: exit.status,
            exited_at: Some(exit.timestamp()).into(),
            id: c.id.clone(),
            ..Default::default()
        };
        self.events
            .publish(topics::TASK_DELETE_EVENT_TOPIC, Box::new(event))
            .await;
        Ok(delete_response(exit))
    }

    /// Stops the VM and releases the host side: rootfs mount, sockets, image. Idempotent.
    async fn teardown(&self, c: &Container) {
        c.sandbox.shutdown().await;
        if let Some(m) = &c.mounted_rootfs
            && let Err(e) = rootfs::unmount_all(m)
        {
            tracing::warn!("{e:#}");
        }
        let _ = std::fs::remove_dir_all(&c.run_dir);
        let _ = std::fs::remove_file(c.bundle.join(RUN_DIR_FILE));
        let _ = std::fs::remove_file(c.bundle.join(ROOTFS_IMAGE));
    }

    async fn kill(&self, req: KillRequest) -> ShimResult<()> {
        let (c, p) = self.process(&req.id, &req.exec_id).await?;
        match p.status() {
            Status::Exited(_) => {
                return Err(ShimError::NotFound(format!(
                    "{}: process already finished",
                    describe(&c, &p)
                )));
            }
            Status::Created if !p.exec_id.is_empty() => {
                return Err(ShimError::FailedPrecondition(format!(
                    "{}: not started",
                    describe(&c, &p)
                )));
            }
            _ => {}
        }
        let signal = i32::try_from(req.signal).map_err(|_| {
            ShimError::InvalidArgument(format!("signal {}: out of range", req.signal))
        })?;
        c.sandbox
            .client()
            .signal_process(&c.id, &p.exec_id, signal, req.all)
            .await
            .map_err(ShimError::agent(format!(
                "signal {signal} to {}",
                describe(&c, &p)
            )))
    }

    async fn exec(&self, req: ExecProcessRequest) -> ShimResult<()> {
        let c = self.container(&req.id).await?;
        if c.init.status() != Status::Running {
            return Err(ShimError::FailedPrecondition(format!(
                "container {}: not running",
                c.id
            )));
        }
        let process_json = req
            .spec
            .as_ref()
            .map(|a| a.value.clone())
            .filter(|v| !v.is_empty())
            .ok_or_else(|| {
                ShimError::InvalidArgument(format!("exec {}: no process spec", req.exec_id))
            })?;
        let io = IoPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let streams = stdio::stream_ids(&io);
        let p = Arc::new(Process::new(&req.exec_id, io, streams, process_json));
        if !c.add_exec(p) {
            return Err(ShimError::AlreadyExists(format!(
                "exec {} of container {}: already exists",
                req.exec_id, c.id
            )));
        }
        let event = TaskExecAdded {
            container_id: c.id.clone(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        };
        self.events
            .publish(topics::TASK_EXEC_ADDED_EVENT_TOPIC, Box::new(event))
            .await;
        Ok(())
    }

    async fn state(&self, req: StateRequest) -> ShimResult<StateResponse> {
        let (c, p) = self.process(&req.id, &req.exec_id).await?;
        let mut resp = StateResponse {
            id: if p.exec_id.is_empty() {
                c.id.clone()
            } else {
                p.exec_id.clone()
            },
            bundle: c.bundle.display().to_string(),
            pid: host_pid(),
            stdin: p.io.stdin.clone(),
            stdout: p.io.stdout.clone(),
            stderr: p.io.stderr.clone(),
            terminal: p.io.terminal,
            exec_id: p.exec_id.clone(),
            ..Default::default()
        };
        let status = match p.status() {
            Status::Created => TaskStatus::CREATED,
            Status::Running if c.is_paused() => TaskStatus::PAUSED,
            Status::Running => TaskStatus::RUNNING,
            Status::Exited(e) => {
                resp.exit_status = e.status;
                resp.exited_at = Some(e.timestamp()).into();
                TaskStatus::STOPPED
            }
        };
        resp.status = status.into();
        Ok(resp)
    }

    async fn shutdown(&self, req: ShutdownRequest) -> ShimResult<()> {
        let current = self.container.lock().await.clone();
        if let Some(c) = current
            && !c.is_deleted()
        {
            if !req.now {
                // containerd asks after every delete; a live container keeps the shim.
                return Ok(());
            }
            c.set_deleted();
            self.teardown(&c).await;
        }
        tracing::info!(shim = %self.shim_id, "shutting down");
        self.exit.signal();
        Ok(())
    }
}

fn describe(c: &Container, p: &Process) -> String {
    if p.exec_id.is_empty() {
        format!("container {}", c.id)
    } else {
        format!("exec {} of container {}", p.exec_id, c.id)
    }
}

fn delete_response(exit: Exit) -> DeleteResponse {
    DeleteResponse {
        pid: host_pid(),
        exit_status: exit.status,
        exited_at: Some(exit.timestamp()).into(),
        ..Default::default()
    }
}

type TtrpcResult<T> = ttrpc::Result<T>;

fn empty(r: ShimResult<()>) -> TtrpcResult<Empty> {
    r.map(|()| Empty::new()).map_err(Into::into)
}

#[async_trait]
impl Task for Service {
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: CreateTaskRequest,
    ) -> TtrpcResult<CreateTaskResponse> {
        tracing::info!(id = %req.id, bundle = %req.bundle, "Create");
        self.inner.create(req).await.map_err(log_err("Create"))
    }

    async fn start(&self, _ctx: &TtrpcContext, req: StartRequest) -> TtrpcResult<StartResponse> {
        tracing::info!(id = %req.id, exec_id = %req.exec_id, "Start");
        self.inner.start(req).await.map_err(log_err("Start"))
    }

    async fn state(&self, _ctx: &TtrpcContext, req: StateRequest) -> TtrpcResult<StateResponse> {
        self.inner.state(req).await.map_err(Into::into)
    }

    async fn wait(&self, _ctx: &TtrpcContext, req: WaitRequest) -> TtrpcResult<WaitResponse> {
        let (_, p) = self.inner.process(&req.id, &req.exec_id).await?;
        let exit = p.wait().await;
        Ok(WaitResponse {
            exit_status: exit.status,
            exited_at: Some(exit.timestamp()).into(),
            ..Default::default()
        })
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: KillRequest) -> TtrpcResult<Empty> {
        tracing::info!(id = %req.id, exec_id = %req.exec_id, signal = req.signal, all = req.all, "Kill");
        empty(self.inner.kill(req).await)
    }

    async fn delete(&self, _ctx: &TtrpcContext, req: DeleteRequest) -> TtrpcResult<DeleteResponse> {
        tracing::info!(id = %req.id, exec_id = %req.exec_id, "Delete");
        self.inner.delete(req).await.map_err(log_err("Delete"))
    }

    async fn exec(&self, _ctx: &TtrpcContext, req: ExecProcessRequest) -> TtrpcResult<Empty> {
        tracing::info!(id = %req.id, exec_id = %req.exec_id, "Exec");
        empty(self.inner.exec(req).await)
    }

    async fn pids(&self, _ctx: &TtrpcContext, req: PidsRequest) -> TtrpcResult<PidsResponse> {
        let c = self.inner.container(&req.id).await?;
        let pids = c
            .sandbox
            .client()
            .list_processes(&c.id)
            .await
            .map_err(ShimError::agent(format!("listing processes of {}", c.id)))?;
        Ok(PidsResponse {
            processes: pids
                .into_iter()
                .map(|pid| ProcessInfo {
                    pid,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: PauseRequest) -> TtrpcResult<Empty> {
        let c = self.inner.container(&req.id).await?;
        c.sandbox
            .client()
            .pause_container(&c.id)
            .await
            .map_err(ShimError::agent(format!("pausing {}", c.id)))?;
        c.set_paused(true);
        let event = TaskPaused {
            container_id: c.id.clone(),
            ..Default::default()
        };
        self.inner
            .events
            .publish(topics::TASK_PAUSED_EVENT_TOPIC, Box::new(event))
            .await;
        Ok(Empty::new())
    }

    async fn resume(&self, _ctx: &TtrpcContext, req: ResumeRequest) -> TtrpcResult<Empty> {
        let c = self.inner.container(&req.id).await?;
        c.sandbox
            .client()
            .resume_container(&c.id)
            .await
            .map_err(ShimError::agent(format!("resuming {}", c.id)))?;
        c.set_paused(false);
        let event = TaskResumed {
            container_id: c.id.clone(),
            ..Default::default()
        };
        self.inner
            .events
            .publish(topics::TASK_RESUMED_EVENT_TOPIC, Box::new(event))
            .await;
        Ok(Empty::new())
    }

    async fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        req: CheckpointTaskRequest,
    ) -> TtrpcResult<Empty> {
        Err(ShimError::Unimplemented(format!(
            "checkpoint of container {}: not supported by husk (VM checkpoints are not implemented)",
            req.id
        ))
        .into())
    }

    async fn close_io(&self, _ctx: &TtrpcContext, req: CloseIORequest) -> TtrpcResult<Empty> {
        let (c, p) = self.inner.process(&req.id, &req.exec_id).await?;
        if req.stdin && !p.streams.stdin.is_empty() {
            c.sandbox
                .client()
                .close_stdin(&c.id, &p.exec_id)
                .await
                .map_err(ShimError::agent(format!(
                    "closing stdin of {}",
                    describe(&c, &p)
                )))?;
        }
        Ok(Empty::new())
    }

    async fn resize_pty(&self, _ctx: &TtrpcContext, req: ResizePtyRequest) -> TtrpcResult<Empty> {
        let (c, p) = self.inner.process(&req.id, &req.exec_id).await?;
        c.sandbox
            .client()
            .tty_win_resize(&c.id, &p.exec_id, req.height, req.width)
            .await
            .map_err(ShimError::agent(format!(
                "resizing the terminal of {}",
                describe(&c, &p)
            )))?;
        Ok(Empty::new())
    }

    async fn update(&self, _ctx: &TtrpcContext, req: UpdateTaskRequest) -> TtrpcResult<Empty> {
        let c = self.inner.container(&req.id).await?;
        // containerd sends the OCI `linux.resources` as JSON in an Any.
        let json = req
            .resources
            .as_ref()
            .map(|a| a.value.clone())
            .filter(|v| !v.is_empty())
            .ok_or_else(|| {
                ShimError::InvalidArgument(format!("update of {}: no resources", c.id))
            })?;
        let resp = c
            .sandbox
            .client()
            .update_container(&c.id, json)
            .await
            .map_err(ShimError::agent(format!("updating {}", c.id)))?;
        for s in resp.skipped {
            tracing::warn!(id = %c.id, "update: not applied in the guest: {s}");
        }
        Ok(Empty::new())
    }

    async fn stats(&self, _ctx: &TtrpcContext, req: StatsRequest) -> TtrpcResult<StatsResponse> {
        let c = self.inner.container(&req.id).await?;
        let s = c
            .sandbox
            .client()
            .stats_container(&c.id)
            .await
            .map_err(ShimError::agent(format!("stats of {}", c.id)))?;
        let any = convert_to_any(Box::new(stats::to_metrics(&s)))
            .map_err(|e| ShimError::Internal(anyhow::anyhow!("encoding metrics: {e}")))?;
        Ok(StatsResponse {
            stats: Some(any).into(),
            ..Default::default()
        })
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        _req: ConnectRequest,
    ) -> TtrpcResult<ConnectResponse> {
        Ok(ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: host_pid(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            ..Default::default()
        })
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, req: ShutdownRequest) -> TtrpcResult<Empty> {
        tracing::info!(now = req.now, "Shutdown");
        empty(self.inner.shutdown(req).await)
    }
}

fn log_err(rpc: &'static str) -> impl Fn(ShimError) -> ttrpc::Error {
    move |e| {
        tracing::error!("{rpc}: {e}");
        e.into()
    }
}
