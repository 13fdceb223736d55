//! containerd's task API (`containerd.task.v2.Task`, and v3 under the same handlers) on top
//! of the husk agent. One shim serves one VM: a Kubernetes pod (its sandbox container and
//! every container of the pod, see `pod`) or a lone container.
//!
//! Pids: containerd gets the shim's own pid for every process, as the VM's processes have
//! no host pid (the VMM runs in the shim, so signals and cgroups of that pid reach the VM);
//! `Pids` lists the guest pids.
//!
//! Events go out in containerd's order: TaskCreate at the end of `Create`; TaskStart in
//! `Start` before the exit watcher exists; TaskExit before `Wait` returns or `Delete` can
//! see the exit; TaskDelete in `Delete`; TaskExecAdded in `Exec`; TaskExecStarted in
//! `Start` of an exec; TaskPaused/TaskResumed; TaskOOM from the agent's OOM events.

use std::collections::HashMap;
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
use husk_protocol::agent::{
    CreateContainerRequest, DirectoryRootfs, ExecProcessRequest as AgentExec, Rootfs, StdioStreams,
};
use husk_runtime::bundle::{self, Bundle};
use husk_runtime::config::Config;
use husk_runtime::state::RootfsMode;
use husk_runtime::{rootfs_image, sizing};

use crate::container::{Container, Exit, Process, Status, UNKNOWN_EXIT_STATUS};
use crate::creating::{Creates, Creating, Phase};
use crate::error::{ShimError, ShimResult};
use crate::events::Events;
use crate::guest_mapping::{self, PodMapping};
use crate::network::{PodNetwork, dns};
use crate::oom;
use crate::pod::{self, Role};
use crate::sandbox::{RootfsShare, Sandbox};
use crate::share::{SHARE_TAG, SharedDir};
use crate::stdio::{self, IoPaths};
use crate::vm::{PodVm, release_host_side};
use crate::{rootfs, stats};
use husk_runtime::host_cgroup::HostCgroup;

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
    /// The shim's VM, made by the first `Create`. Held across that boot, so a pod's
    /// container that arrives meanwhile waits for the VM.
    vm: tokio::sync::Mutex<Option<Arc<PodVm>>>,
    /// Containers by id, until deleted.
    containers: std::sync::Mutex<HashMap<String, Arc<Container>>>,
    /// Creates in progress, visible to State/Wait/Kill/Delete (see `creating`).
    creates: Creates,
}

impl Service {
    pub fn new(shim_id: &str, events: Events, exit: Arc<ExitSignal>) -> Self {
        Self {
            inner: Arc::new(Inner {
                shim_id: shim_id.to_owned(),
                events,
                exit,
                vm: tokio::sync::Mutex::new(None),
                containers: std::sync::Mutex::new(HashMap::new()),
                creates: Creates::default(),
            }),
        }
    }
}

/// The pid containerd sees for every process of the container (see the module doc).
fn host_pid() -> u32 {
    std::process::id()
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Inner {
    /// The container `id`, unless it was never created or is deleted.
    async fn container(&self, id: &str) -> ShimResult<Arc<Container>> {
        match lock(&self.containers).get(id) {
            Some(c) if !c.is_deleted() => Ok(Arc::clone(c)),
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
        if !req.checkpoint.is_empty() {
            return Err(ShimError::Unimplemented(
                "restoring a container from a checkpoint is not supported by husk".into(),
            ));
        }
        let creating = {
            let containers = lock(&self.containers);
            if containers.contains_key(&req.id) {
                None
            } else {
                self.creates.begin(&req.id, &req)
            }
        }
        .ok_or_else(|| ShimError::AlreadyExists(format!("container {}: already exists", req.id)))?;
        let r = self.create_task(&req, &creating).await;
        if r.is_err() {
            if matches!(creating.phase(), Phase::InProgress { .. }) {
                self.creates.end(&req.id, &creating);
            }
            // containerd answers a failed create with Delete and Shutdown; a containerd that
            // restarted meanwhile never does.
            Arc::clone(self).exit_when_idle();
        }
        r
    }

    /// The body of `create`, for the task `creating` registered.
    async fn create_task(
        self: &Arc<Self>,
        req: &CreateTaskRequest,
        creating: &Creating,
    ) -> ShimResult<CreateTaskResponse> {
        let bundle_dir = PathBuf::from(&req.bundle);
        let b = Bundle::load(&bundle_dir).map_err(|e| ShimError::InvalidArgument(e.to_string()))?;
        let role = Role::from_annotations(b.spec.annotations().as_ref());

        let mut vm_slot = self.vm.lock().await;
        let existing = vm_slot.clone();
        match (&existing, &role) {
            (None, Role::PodMember { sandbox_id }) => {
                return Err(ShimError::FailedPrecondition(format!(
                    "container {} belongs to pod {sandbox_id}, whose sandbox is not in this shim",
                    req.id
                )));
            }
            (Some(vm), Role::PodMember { sandbox_id })
                if vm.is_pod && vm.owner_id == *sandbox_id =>
            {
                if vm.sandbox.is_stopped() {
                    return Err(ShimError::FailedPrecondition(format!(
                        "pod {sandbox_id}: its VM has stopped"
                    )));
                }
            }
            (Some(vm), _) => {
                return Err(ShimError::AlreadyExists(format!(
                    "this shim's VM belongs to {}; container {} needs its own shim",
                    vm.owner_id, req.id
                )));
            }
            (None, _) => {}
        }

        let mounted = if req.rootfs.is_empty() {
            None
        } else {
            let target = bundle_dir.join("rootfs");
            rootfs::mount_all(&req.rootfs, &target)?;
            Some(target)
        };
        let booted_here = existing.is_none();
        let made = async {
            let vm = match existing {
                Some(vm) => vm,
                None => {
                    let vm = Arc::new(self.boot_vm(req, &b, &role, creating).await?);
                    *vm_slot = Some(Arc::clone(&vm));
                    vm
                }
            };
            let c = self
                .create_in_vm(req, &b, &role, &vm, mounted.clone())
                .await?;
            Ok::<_, ShimError>((vm, c))
        }
        .await;
        let (vm, container) = match made {
            Ok((vm, c)) => (vm, Arc::new(c)),
            Err(e) => {
                if booted_here && let Some(vm) = vm_slot.take() {
                    vm.teardown().await;
                }
                if let Some(m) = &mounted
                    && let Err(u) = rootfs::unmount_all(m)
                {
                    tracing::warn!("after the failed create: {u:#}");
                }
                let _ = std::fs::remove_file(bundle_dir.join(RUN_DIR_FILE));
                if creating.phase() == (Phase::InProgress { cancelled: true }) {
                    // Undone on request: the Delete (and Wait) get an exited task, as for
                    // a create cancelled after its boot.
                    self.creates
                        .cancelled(creating, Exit::now(128 + libc::SIGKILL as u32));
                }
                return Err(e);
            }
        };
        if !creating.finish() {
            // Killed or deleted while it was being made (its caller is gone, e.g. containerd
            // restarted): undo it all, and leave an exited task for the Delete.
            if booted_here {
                vm_slot.take();
            }
            drop(vm_slot);
            self.discard(&container).await;
            let exit = Exit::now(128 + libc::SIGKILL as u32);
            self.creates.cancelled(creating, exit);
            tracing::info!(id = %req.id, "create cancelled by a Kill or Delete; everything it made is released");
            return Err(ShimError::FailedPrecondition(format!(
                "container {}: killed or deleted while it was being created",
                req.id
            )));
        }
        lock(&self.containers).insert(req.id.clone(), Arc::clone(&container));
        self.creates.end(&req.id, creating);
        drop(vm_slot);
        tracing::info!(id = %req.id, pod = vm.is_pod, "container created");

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
        if booted_here {
            tokio::spawn(Arc::clone(self).forward_oom_events(vm));
        }
        Ok(CreateTaskResponse {
            pid: host_pid(),
            ..Default::default()
        })
    }

    /// Boots the shim's VM for its first container: a pod's sandbox container (the pod's
    /// cgroup, network and a shared folder for the pod's containers) or a lone container.
    async fn boot_vm(
        &self,
        req: &CreateTaskRequest,
        b: &Bundle,
        role: &Role,
        creating: &Creating,
    ) -> ShimResult<PodVm> {
        let config = Config::load().map_err(|e| ShimError::FailedPrecondition(e.to_string()))?;
        let template = config
            .cpu_template_here()
            .map_err(|e| ShimError::FailedPrecondition(e.to_string()))?;
        let is_pod = *role == Role::Sandbox;
        let size = if is_pod {
            let spec = serde_json::from_value(pod::with_pod_limits(&b.raw))
                .map_err(|e| ShimError::InvalidArgument(format!("sandbox spec: {e}")))?;
            sizing::vm_size(&spec, &config, template)
        } else {
            sizing::vm_size(&b.spec, &config, template)
        }
        .map_err(|e| ShimError::InvalidArgument(e.to_string()))?;
        // A pod's containers arrive after the boot: only a shared folder can take them.
        let mode = if is_pod {
            RootfsMode::Virtiofs
        } else {
            config.rootfs_mode
        };

        let run_dir = Path::new(RUN_ROOT).join(std::process::id().to_string());
        std::fs::create_dir_all(&run_dir)
            .map_err(|e| anyhow::anyhow!("creating {}: {e}", run_dir.display()))?;
        // Owner-only whatever the umask: it holds vm.sock (the agent's API) and fs.sock
        // (virtiofsd's, the shared folder as root).
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&run_dir, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| anyhow::anyhow!("making {} private: {e}", run_dir.display()))?;
        }
        // Before anything is mounted or started in it: if this shim dies during the boot,
        // containerd's `delete` finds the run folder (and the shared folder's mount) through
        // this marker. Written only once the VM answered, a killed boot leaked both.
        std::fs::write(
            b.dir.join(RUN_DIR_FILE),
            run_dir.as_os_str().as_encoded_bytes(),
        )
        .map_err(|e| anyhow::anyhow!("writing {RUN_DIR_FILE} in the bundle: {e}"))?;
        let mut shared = None;
        let mut cgroup = None;
        let mut network = None;
        let booted = async {
            if is_pod && let Some(path) = cgroups_path(&b.raw) {
                cgroup = Some(HostCgroup::enter(&path).map_err(|e| {
                    ShimError::FailedPrecondition(format!("pod cgroup {path}: {e:#}"))
                })?);
            }
            let mut extra_args = Vec::new();
            if is_pod && let Some(netns) = network_namespace(&b.raw) {
                let n = PodNetwork::setup(Path::new(&netns)).map_err(|e| {
                    ShimError::FailedPrecondition(format!("pod network in {netns}: {e:#}"))
                })?;
                extra_args.push("--net".to_owned());
                extra_args.push(n.net_arg());
                network = Some(n);
            }
            let share = match mode {
                RootfsMode::Virtiofs => {
                    shared = Some(SharedDir::create(&run_dir.join(SHARE_TAG))?);
                    RootfsShare::Virtiofs {
                        shared: shared.as_ref().ok_or_else(|| anyhow::anyhow!("no share"))?,
                    }
                }
                RootfsMode::Block => {
                    let image = b.dir.join(ROOTFS_IMAGE);
                    let (src, dst) = (b.rootfs.clone(), image.clone());
                    tokio::task::spawn_blocking(move || rootfs_image::build(&src, &dst))
                        .await
                        .map_err(|e| anyhow::anyhow!("rootfs image builder: {e}"))?
                        .map_err(|e| anyhow::anyhow!("building the rootfs image: {e}"))?;
                    RootfsShare::Block { image }
                }
            };
            tracing::info!(
                id = %req.id, pod = is_pod, vcpus = size.vcpus, memory_mib = size.memory_mib,
                rootfs_mode = ?mode, "booting the VM"
            );
            let dns = if is_pod {
                dns::from_sandbox_spec(&b.raw)
                    .map_err(|e| ShimError::FailedPrecondition(format!("pod DNS: {e:#}")))?
            } else {
                None
            };
            let slots = husk_runtime::template::slots_for(
                mode,
                false,
                crate::share::SHARE_TAG,
                network.is_some(),
            );
            let template = Some(crate::template::TemplateRequest {
                slots,
                nic_mac: network.as_ref().map(PodNetwork::mac),
            });
            // A Kill or Delete of the create stops the wait for its VM (a slow boot, a template
            // build first: minutes on a nested host). The VMs it started end with this shim,
            // which exits once idle; the host side is released below.
            let sandbox = tokio::select! {
                s = Sandbox::boot(&config, size, &run_dir, share, extra_args, dns, template) => s?,
                () = creating.cancel_requested() => {
                    return Err(ShimError::FailedPrecondition(format!(
                        "container {}: killed or deleted while its VM was booting",
                        req.id
                    )));
                }
            };
            if let Some(n) = &network
                && let Err(e) = n
                    .configure_guest(sandbox.client(), sandbox.template_nic_mac())
                    .await
            {
                sandbox.shutdown().await;
                return Err(ShimError::FailedPrecondition(format!(
                    "configuring the pod's network in the VM: {e:#}"
                )));
            }
            Ok(sandbox)
        }
        .await;
        match booted {
            Ok(sandbox) => Ok(PodVm::new(
                req.id.clone(),
                is_pod,
                sandbox,
                run_dir,
                shared,
                cgroup,
                network,
            )),
            Err(e) => {
                release_host_side(&run_dir, shared.as_ref(), network.as_ref(), cgroup.as_ref());
                Err(e)
            }
        }
    }

    /// Creates the (held) container in the VM and attaches its stdio.
    async fn create_in_vm(
        &self,
        req: &CreateTaskRequest,
        b: &Bundle,
        role: &Role,
        vm: &Arc<PodVm>,
        mounted: Option<PathBuf>,
    ) -> ShimResult<Container> {
        std::fs::write(
            b.dir.join(RUN_DIR_FILE),
            vm.run_dir.as_os_str().as_encoded_bytes(),
        )
        .map_err(|e| anyhow::anyhow!("writing {RUN_DIR_FILE} in the bundle: {e}"))?;
        let made = self.create_in_guest(req, b, role, vm).await;
        if made.is_err()
            && let Some(s) = &vm.shared
            && let Err(e) = s.remove_container(&req.id)
        {
            tracing::warn!("after the failed create: {e:#}");
        }
        let (streams, io, relays) = made?;
        let init = Arc::new(Process::new("", io, streams, Vec::new()));
        init.set_relays(relays);
        Ok(Container::new(
            req.id.clone(),
            b.dir.clone(),
            Arc::clone(vm),
            mounted,
            init,
        ))
    }

    async fn create_in_guest(
        &self,
        req: &CreateTaskRequest,
        b: &Bundle,
        role: &Role,
        vm: &PodVm,
    ) -> ShimResult<(StdioStreams, IoPaths, stdio::Relays)> {
        let rootfs = match (&vm.shared, vm.sandbox.block_rootfs()) {
            (Some(shared), _) => {
                let mut d = DirectoryRootfs::new();
                d.path = shared.add_rootfs(&req.id, &b.rootfs)?;
                let mut r = Rootfs::new();
                r.set_directory(d);
                r
            }
            (None, Some(block)) => block.clone(),
            (None, None) => {
                return Err(ShimError::Internal(anyhow::anyhow!(
                    "the VM has neither a shared folder nor a rootfs image"
                )));
            }
        };
        let mut mapping = PodMapping::new(
            role,
            &req.id,
            vm.shared.as_ref(),
            host_pid(),
            vm.owner_guest_pid(),
            vm.sandbox.resolv_conf_source(),
        );
        let (mut guest_spec, warnings) = bundle::guest_spec(&b.raw, &mut mapping)
            .map_err(|e| ShimError::InvalidArgument(format!("container {}: {e}", req.id)))?;
        if guest_mapping::with_private_cgroup_namespace(&mut guest_spec) {
            tracing::debug!(id = %req.id, "a private cgroup namespace (the guest is cgroup v2)");
        }
        for w in warnings {
            tracing::warn!(id = %req.id, "{w}");
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
        creq.rootfs = Some(rootfs).into();
        creq.stdio = Some(streams.clone()).into();
        creq.terminal = req.terminal;
        let client = vm.sandbox.client();
        let created = client
            .create_container(&creq)
            .await
            .map_err(ShimError::agent(format!(
                "creating container {} in the VM",
                req.id
            )))?;
        tracing::debug!(
            id = %req.id,
            steps = %husk_protocol::steps::summary(&created.steps),
            "container created in the VM"
        );
        if vm.owner_id == req.id {
            vm.set_owner_guest_pid(created.pid);
        }
        match stdio::start(vm.sandbox.target(), &io, &streams).await {
            Ok(relays) => Ok((streams, io, relays)),
            Err(e) => {
                if let Err(r) = client.remove_container(&req.id).await {
                    tracing::warn!("removing {} after its stdio failed: {r}", req.id);
                }
                Err(ShimError::from(e))
            }
        }
    }

    async fn start(self: &Arc<Self>, req: StartRequest) -> ShimResult<StartResponse> {
        let (c, p) = self.process(&req.id, &req.exec_id).await?;
        if p.status() != Status::Created {
            return Err(ShimError::FailedPrecondition(format!(
                "{}: already started",
                describe(&c, &p)
            )));
        }
        let client = c.sandbox().client();
        if p.exec_id.is_empty() {
            let steps = client
                .start_container(&c.id)
                .await
                .map_err(ShimError::agent(format!("starting container {}", c.id)))?;
            tracing::debug!(
                id = %c.id,
                steps = %husk_protocol::steps::summary(&steps),
                "container started in the VM"
            );
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
            let started = client
                .exec_process(&ereq)
                .await
                .map_err(ShimError::agent(describe(&c, &p)))?;
            tracing::debug!(
                id = %c.id,
                exec_id = %p.exec_id,
                steps = %husk_protocol::steps::summary(&started.steps),
                "process started in the VM"
            );
            match stdio::start(c.sandbox().target(), &p.io, &p.streams).await {
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
            r = c.sandbox().client().wait_process(&c.id, &p.exec_id) => match r {
                Ok(w) => Exit::from_agent(w.exit_code, w.signal, w.exited_at_unix_ns),
                Err(e) => {
                    tracing::error!("{}: WaitProcess: {e}", describe(&c, &p));
                    Exit::now(UNKNOWN_EXIT_STATUS)
                }
            },
            why = c.sandbox().stopped() => {
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

    /// Publishes TaskOOM for the agent's OOM events: only for this VM's containers, and
    /// rate-limited (`oom`), since the id comes from the guest.
    async fn forward_oom_events(self: Arc<Self>, vm: Arc<PodVm>) {
        let mut filter = oom::OomFilter::default();
        loop {
            let r = tokio::select! {
                r = vm.sandbox.client().get_oom_event() => r,
                _ = vm.sandbox.stopped() => return,
            };
            match r {
                Ok(id) => {
                    let known = lock(&self.containers)
                        .get(&id)
                        .is_some_and(|c| Arc::ptr_eq(&c.vm, &vm));
                    match filter.admit(&id, known, std::time::Instant::now()) {
                        oom::Verdict::Publish => {
                            tracing::info!(container = %id, "OOM kill in the guest");
                            let event = TaskOOM {
                                container_id: id,
                                ..Default::default()
                            };
                            self.events
                                .publish(topics::TASK_OOM_EVENT_TOPIC, Box::new(event))
                                .await;
                        }
                        oom::Verdict::Unknown => {
                            // Logged once: the text is the guest's, and so is the rate.
                            if filter.unknown == 1 {
                                tracing::warn!(
                                    "the guest reported an OOM kill for {:?}, which is not a container of this VM; ignored (further ones are counted, not logged)",
                                    id.chars().take(80).collect::<String>()
                                );
                            }
                            tokio::time::sleep(oom::MIN_INTERVAL / 10).await;
                        }
                        oom::Verdict::TooSoon => {
                            // Do not ask again at once: a guest in an OOM loop would keep
                            // this task busy.
                            tokio::time::sleep(oom::MIN_INTERVAL / 10).await;
                        }
                    }
                }
                Err(e) => {
                    if vm.sandbox.is_stopped() {
                        return;
                    }
                    // e.g. no memory controller in the guest: do not spin.
                    tracing::warn!("OOM events unavailable: {e}");
                    return;
                }
            }
        }
    }

    async fn delete(self: &Arc<Self>, req: DeleteRequest) -> ShimResult<DeleteResponse> {
        if let Some(creating) = self.create_in_progress(&req.id, &req.exec_id).await {
            // Deleting a task whose create still runs undoes the create (a held init would
            // be killed by the removal too); wait for that.
            creating.cancel();
            if let Phase::Cancelled(exit) = creating.settled().await {
                self.creates.remove(&req.id);
                Arc::clone(self).exit_when_idle();
                return Ok(self.deleted(&req.id, exit).await);
            }
        }
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

        self.discard(&c).await;
        if c.owns_vm() {
            // With the VM gone this shim serves nothing. containerd sends Shutdown right
            // after the delete; if it gave up on a slow delete it never does, and the shim
            // would linger: exit on our own after a grace period.
            let exit = Arc::clone(&self.exit);
            let shim_id = self.shim_id.clone();
            tokio::spawn(async move {
                tokio::time::sleep(ORPHAN_GRACE).await;
                tracing::warn!(
                    shim = %shim_id,
                    "no Shutdown {ORPHAN_GRACE:?} after the VM's container was deleted; exiting"
                );
                exit.signal();
            });
        }
        lock(&self.containers).remove(&c.id);
        Ok(self.deleted(&c.id, exit).await)
    }

    /// Publishes TaskDelete for task `id`, which ended with `exit`; Delete's answer.
    async fn deleted(&self, id: &str, exit: Exit) -> DeleteResponse {
        let event = TaskDelete {
            container_id: id.to_owned(),
            pid: host_pid(),
            exit_status: exit.status,
            exited_at: Some(exit.timestamp()).into(),
            id: id.to_owned(),
            ..Default::default()
        };
        self.events
            .publish(topics::TASK_DELETE_EVENT_TOPIC, Box::new(event))
            .await;
        delete_response(exit)
    }

    /// Marks `c` deleted and removes it: from the VM, and its host side (`release`).
    async fn discard(&self, c: &Container) {
        c.set_deleted();
        // The VM's own container takes the VM with it: removing it in the guest first
        // would only spend the delete's time (containerd allows 10 s) on a guest that may
        // be slow or hung.
        if !c.owns_vm()
            && let Err(e) = c.sandbox().client().remove_container(&c.id).await
            && !c.sandbox().is_stopped()
        {
            tracing::warn!("removing container {} in the VM: {e}", c.id);
        }
        self.release(c).await;
    }

    /// The create of task `id` (an init, `exec_id` empty) when it is still registered as a
    /// create (in progress, or cancelled and not yet deleted) and not as a container.
    async fn create_in_progress(&self, id: &str, exec_id: &str) -> Option<Arc<Creating>> {
        if !exec_id.is_empty() || self.container(id).await.is_ok() {
            return None;
        }
        self.creates.get(id)
    }

    /// A shim with nothing to serve (its create failed or was undone, and no container or
    /// create is left) exits after a grace period: containerd sends Shutdown after such a
    /// failure, but a containerd that restarted during the create never does.
    fn exit_when_idle(self: Arc<Self>) {
        tokio::spawn(async move {
            tokio::time::sleep(ORPHAN_GRACE).await;
            let idle = lock(&self.containers).is_empty()
                && !self.creates.any_in_progress()
                && self.vm.try_lock().is_ok_and(|vm| vm.is_none());
            if idle {
                tracing::warn!(
                    shim = %self.shim_id,
                    "nothing to serve {ORPHAN_GRACE:?} after a failed or undone create, and no Shutdown; exiting"
                );
                self.exit.signal();
            }
        });
    }

    /// Releases a deleted container's host side: its share in the VM's shared folder, its
    /// rootfs mount and files in the bundle; the VM with it when the container made it.
    /// Idempotent.
    async fn release(&self, c: &Container) {
        if c.owns_vm() {
            c.vm.teardown().await;
        } else if let Some(s) = &c.vm.shared
            && let Err(e) = s.remove_container(&c.id)
        {
            tracing::warn!("{e:#}");
        }
        if let Some(m) = &c.mounted_rootfs
            && let Err(e) = rootfs::unmount_all(m)
        {
            tracing::warn!("{e:#}");
        }
        let _ = std::fs::remove_file(c.bundle.join(RUN_DIR_FILE));
        let _ = std::fs::remove_file(c.bundle.join(ROOTFS_IMAGE));
    }

    async fn kill(&self, req: KillRequest) -> ShimResult<()> {
        if let Some(creating) = self.create_in_progress(&req.id, &req.exec_id).await
            && req.signal != 0
        {
            // A held init dies of any signal it gets: undo the create.
            match creating.phase() {
                Phase::Cancelled(_) => {
                    return Err(ShimError::NotFound(format!(
                        "container {}: process already finished",
                        req.id
                    )));
                }
                _ if creating.cancel() => {
                    tracing::info!(id = %req.id, "killed while being created: the create is undone");
                    return Ok(());
                }
                _ => {}
            }
        }
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
        c.sandbox()
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
        if let Some(creating) = self.create_in_progress(&req.id, &req.exec_id).await {
            let mut resp = StateResponse {
                id: req.id.clone(),
                bundle: creating.bundle.clone(),
                pid: host_pid(),
                stdin: creating.stdin.clone(),
                stdout: creating.stdout.clone(),
                stderr: creating.stderr.clone(),
                terminal: creating.terminal,
                ..Default::default()
            };
            match creating.phase() {
                Phase::InProgress { .. } => {
                    resp.status = TaskStatus::CREATED.into();
                    return Ok(resp);
                }
                Phase::Cancelled(e) => {
                    resp.exit_status = e.status;
                    resp.exited_at = Some(e.timestamp()).into();
                    resp.status = TaskStatus::STOPPED.into();
                    return Ok(resp);
                }
                // Registered meanwhile (or failed): as any container.
                Phase::Ended => {}
            }
        }
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
        let live: Vec<Arc<Container>> = lock(&self.containers)
            .values()
            .filter(|c| !c.is_deleted())
            .cloned()
            .collect();
        if !live.is_empty() || self.creates.any_in_progress() {
            if !req.now {
                // containerd asks after every delete; live containers (and creates still
                // running) keep the shim.
                return Ok(());
            }
            // A cancelled create undoes itself; taking the VM below waits for it.
            self.creates.cancel_all();
            for c in &live {
                c.set_deleted();
                self.release(c).await;
            }
        }
        if let Some(vm) = self.vm.lock().await.take() {
            vm.teardown().await;
        }
        tracing::info!(shim = %self.shim_id, "shutting down");
        self.exit.signal();
        Ok(())
    }
}

/// How long a shim whose VM is gone waits for containerd's Shutdown before it exits.
const ORPHAN_GRACE: Duration = Duration::from_secs(10);

/// The spec's `linux.cgroupsPath`, if any.
fn cgroups_path(spec: &serde_json::Value) -> Option<String> {
    spec.pointer("/linux/cgroupsPath")
        .and_then(serde_json::Value::as_str)
        .filter(|p| !p.is_empty())
        .map(str::to_owned)
}

/// The host network namespace the spec joins (CRI's pod netns), if any.
fn network_namespace(spec: &serde_json::Value) -> Option<String> {
    spec.pointer("/linux/namespaces")?
        .as_array()?
        .iter()
        .find(|ns| ns.get("type").and_then(serde_json::Value::as_str) == Some("network"))?
        .get("path")
        .and_then(serde_json::Value::as_str)
        .filter(|p| !p.is_empty())
        .map(str::to_owned)
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
        let inner = Arc::clone(&self.inner);
        detached(async move { inner.create(req).await })
            .await
            .map_err(log_err("Create"))
    }

    async fn start(&self, _ctx: &TtrpcContext, req: StartRequest) -> TtrpcResult<StartResponse> {
        tracing::info!(id = %req.id, exec_id = %req.exec_id, "Start");
        let inner = Arc::clone(&self.inner);
        detached(async move { inner.start(req).await })
            .await
            .map_err(log_err("Start"))
    }

    async fn state(&self, _ctx: &TtrpcContext, req: StateRequest) -> TtrpcResult<StateResponse> {
        self.inner.state(req).await.map_err(Into::into)
    }

    async fn wait(&self, _ctx: &TtrpcContext, req: WaitRequest) -> TtrpcResult<WaitResponse> {
        if let Some(creating) = self.inner.create_in_progress(&req.id, &req.exec_id).await
            && let Phase::Cancelled(exit) = creating.settled().await
        {
            return Ok(WaitResponse {
                exit_status: exit.status,
                exited_at: Some(exit.timestamp()).into(),
                ..Default::default()
            });
        }
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
        let inner = Arc::clone(&self.inner);
        empty(detached(async move { inner.kill(req).await }).await)
    }

    async fn delete(&self, _ctx: &TtrpcContext, req: DeleteRequest) -> TtrpcResult<DeleteResponse> {
        tracing::info!(id = %req.id, exec_id = %req.exec_id, "Delete");
        let inner = Arc::clone(&self.inner);
        detached(async move { inner.delete(req).await })
            .await
            .map_err(log_err("Delete"))
    }

    async fn exec(&self, _ctx: &TtrpcContext, req: ExecProcessRequest) -> TtrpcResult<Empty> {
        tracing::info!(id = %req.id, exec_id = %req.exec_id, "Exec");
        let inner = Arc::clone(&self.inner);
        empty(detached(async move { inner.exec(req).await }).await)
    }

    async fn pids(&self, _ctx: &TtrpcContext, req: PidsRequest) -> TtrpcResult<PidsResponse> {
        let c = self.inner.container(&req.id).await?;
        let pids = c
            .sandbox()
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
        c.sandbox()
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
        c.sandbox()
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
            c.sandbox()
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
        c.sandbox()
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
            .sandbox()
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
            .sandbox()
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
        let inner = Arc::clone(&self.inner);
        empty(detached(async move { inner.shutdown(req).await }).await)
    }
}

/// Runs a handler's work as a task of its own. ttrpc drops a handler's future when the
/// client's connection closes (containerd restarting, or dying): a create dropped at an
/// await point half-way through booting leaked its VM, shares, mounts, tap and cgroup, and
/// stayed "in progress" for good. Detached, the work always ends, and ends cleanly.
async fn detached<T: Send + 'static>(
    work: impl std::future::Future<Output = ShimResult<T>> + Send + 'static,
) -> ShimResult<T> {
    tokio::spawn(work)
        .await
        .map_err(|e| ShimError::Internal(anyhow::anyhow!("the request's task failed: {e}")))?
}

fn log_err(rpc: &'static str) -> impl Fn(ShimError) -> ttrpc::Error {
    move |e| {
        tracing::error!("{rpc}: {e}");
        e.into()
    }
}
