//! The ttrpc `AgentService` implementation.
//!
//! This file only maps RPCs to the modules doing the work (`guest`, `containers`,
//! `network`) and turns their typed errors into ttrpc statuses following the convention in
//! agent.proto: a gRPC code plus a message "<what>: <why>".

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use husk_protocol::agent::{
    CheckRequest, CheckResponse, CloseStdinRequest, CloseStdinResponse, ConfigureNetworkRequest,
    ConfigureNetworkResponse, CreateContainerRequest, CreateContainerResponse,
    CreateSandboxRequest, CreateSandboxResponse, DestroySandboxRequest, DestroySandboxResponse,
    ExecProcessRequest, ExecProcessResponse, GetGuestDetailsRequest, GetGuestDetailsResponse,
    GetOOMEventRequest, GetOOMEventResponse, ListProcessesRequest, ListProcessesResponse,
    PauseContainerRequest, PauseContainerResponse, RemoveContainerRequest, RemoveContainerResponse,
    RestoredRequest, RestoredResponse, ResumeContainerRequest, ResumeContainerResponse,
    ServingStatus, SignalProcessRequest, SignalProcessResponse, StartContainerRequest,
    StartContainerResponse, StatsContainerRequest, StatsContainerResponse, TtyWinResizeRequest,
    TtyWinResizeResponse, UpdateContainerRequest, UpdateContainerResponse, WaitProcessRequest,
    WaitProcessResponse,
};
use husk_protocol::agent_ttrpc::AgentService;
use tokio::sync::Notify;
use ttrpc::Code;
use ttrpc::r#async::TtrpcContext;
use ttrpc::error::get_rpc_status;

use crate::containers::{Containers, Failure, Mode};

/// Shared agent state, one per agent process.
pub struct Agent {
    /// Set by DestroySandbox; `Check` then reports NOT_SERVING and new work is refused.
    shutting_down: AtomicBool,
    /// Woken once when the agent must stop (after the reply has been sent).
    shutdown: Arc<Notify>,
    containers: Containers,
    mode: Mode,
}

impl Agent {
    pub fn new(shutdown: Arc<Notify>, containers: Containers, mode: Mode) -> Self {
        Self {
            shutting_down: AtomicBool::new(false),
            shutdown,
            containers,
            mode,
        }
    }

    /// Refuses new work once DestroySandbox has begun.
    fn serving(&self, method: &str) -> ttrpc::Result<()> {
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(unavailable(method));
        }
        Ok(())
    }
}

/// ttrpc status for a failure with no better code; `what` names the object or step.
fn internal(what: &str, err: impl std::fmt::Display) -> ttrpc::Error {
    get_rpc_status(Code::INTERNAL, format!("{what}: {err}"))
}

fn unavailable(what: &str) -> ttrpc::Error {
    get_rpc_status(
        Code::UNAVAILABLE,
        format!("{what}: the agent is shutting down"),
    )
}

fn status(e: Failure) -> ttrpc::Error {
    e.to_status()
}

#[async_trait]
impl AgentService for Agent {
    async fn check(&self, _ctx: &TtrpcContext, _req: CheckRequest) -> ttrpc::Result<CheckResponse> {
        let mut resp = CheckResponse::new();
        resp.status = if self.shutting_down.load(Ordering::Relaxed) {
            ServingStatus::NOT_SERVING
        } else {
            ServingStatus::SERVING
        }
        .into();
        resp.agent_version = crate::VERSION.to_owned();
        Ok(resp)
    }

    async fn get_guest_details(
        &self,
        _ctx: &TtrpcContext,
        _req: GetGuestDetailsRequest,
    ) -> ttrpc::Result<GetGuestDetailsResponse> {
        crate::guest::collect().map_err(|e| internal("guest details", e))
    }

    async fn restored(
        &self,
        _ctx: &TtrpcContext,
        req: RestoredRequest,
    ) -> ttrpc::Result<RestoredResponse> {
        crate::restore::reseed(&req.entropy).map_err(|e| match e {
            crate::restore::RestoreError::EntropySize(_) => {
                get_rpc_status(Code::INVALID_ARGUMENT, format!("Restored: {e}"))
            }
            other => internal("Restored: reseeding the CRNG", other),
        })?;
        let now = crate::restore::set_wall_clock(req.realtime_ns)
            .map_err(|e| internal("Restored: setting the wall clock", e))?;
        tracing::info!("restored from a snapshot: CRNG reseeded, wall clock set");
        let mut resp = RestoredResponse::new();
        resp.realtime_ns = now;
        Ok(resp)
    }

    async fn destroy_sandbox(
        &self,
        _ctx: &TtrpcContext,
        _req: DestroySandboxRequest,
    ) -> ttrpc::Result<DestroySandboxResponse> {
        if self.shutting_down.swap(true, Ordering::SeqCst) {
            return Err(unavailable("DestroySandbox"));
        }
        tracing::info!("DestroySandbox: removing containers, then shutting down");
        // Failures are logged: the VM goes down regardless, which ends what is left.
        if let Err(e) = self.containers.destroy_all().await {
            tracing::warn!("DestroySandbox: {e}");
        }
        // main waits for this, lets the reply go out, then powers off.
        self.shutdown.notify_one();
        Ok(DestroySandboxResponse::new())
    }

    async fn create_sandbox(
        &self,
        _ctx: &TtrpcContext,
        req: CreateSandboxRequest,
    ) -> ttrpc::Result<CreateSandboxResponse> {
        self.serving("CreateSandbox")?;
        let dir = self.containers.create_sandbox(req).await.map_err(status)?;
        let mut resp = CreateSandboxResponse::new();
        resp.sandbox_dir = dir.to_string_lossy().into_owned();
        Ok(resp)
    }

    async fn create_container(
        &self,
        _ctx: &TtrpcContext,
        req: CreateContainerRequest,
    ) -> ttrpc::Result<CreateContainerResponse> {
        self.serving("CreateContainer")?;
        let (pid, steps) = self.containers.create(req).await.map_err(status)?;
        let mut resp = CreateContainerResponse::new();
        resp.pid = pid;
        resp.steps = proto_steps(steps);
        Ok(resp)
    }

    async fn start_container(
        &self,
        _ctx: &TtrpcContext,
        req: StartContainerRequest,
    ) -> ttrpc::Result<StartContainerResponse> {
        self.serving("StartContainer")?;
        let steps = self
            .containers
            .start(&req.container_id)
            .await
            .map_err(status)?;
        let mut resp = StartContainerResponse::new();
        resp.steps = proto_steps(steps);
        Ok(resp)
    }

    async fn exec_process(
        &self,
        _ctx: &TtrpcContext,
        req: ExecProcessRequest,
    ) -> ttrpc::Result<ExecProcessResponse> {
        self.serving("ExecProcess")?;
        let (pid, steps) = self.containers.exec(req).await.map_err(status)?;
        let mut resp = ExecProcessResponse::new();
        resp.pid = pid;
        resp.steps = proto_steps(steps);
        Ok(resp)
    }

    async fn signal_process(
        &self,
        _ctx: &TtrpcContext,
        req: SignalProcessRequest,
    ) -> ttrpc::Result<SignalProcessResponse> {
        self.containers
            .signal(&req.container_id, &req.exec_id, req.signal, req.all)
            .await
            .map_err(status)?;
        Ok(SignalProcessResponse::new())
    }

    async fn wait_process(
        &self,
        _ctx: &TtrpcContext,
        req: WaitProcessRequest,
    ) -> ttrpc::Result<WaitProcessResponse> {
        self.containers
            .wait(&req.container_id, &req.exec_id)
            .await
            .map_err(status)
    }

    async fn remove_container(
        &self,
        _ctx: &TtrpcContext,
        req: RemoveContainerRequest,
    ) -> ttrpc::Result<RemoveContainerResponse> {
        self.containers
            .remove(&req.container_id)
            .await
            .map_err(status)?;
        Ok(RemoveContainerResponse::new())
    }

    async fn list_processes(
        &self,
        _ctx: &TtrpcContext,
        req: ListProcessesRequest,
    ) -> ttrpc::Result<ListProcessesResponse> {
        let pids = self
            .containers
            .list_processes(&req.container_id)
            .await
            .map_err(status)?;
        let mut resp = ListProcessesResponse::new();
        resp.pids = pids;
        Ok(resp)
    }

    async fn pause_container(
        &self,
        _ctx: &TtrpcContext,
        req: PauseContainerRequest,
    ) -> ttrpc::Result<PauseContainerResponse> {
        self.containers
            .set_paused(&req.container_id, true)
            .await
            .map_err(status)?;
        Ok(PauseContainerResponse::new())
    }

    async fn resume_container(
        &self,
        _ctx: &TtrpcContext,
        req: ResumeContainerRequest,
    ) -> ttrpc::Result<ResumeContainerResponse> {
        self.containers
            .set_paused(&req.container_id, false)
            .await
            .map_err(status)?;
        Ok(ResumeContainerResponse::new())
    }

    async fn update_container(
        &self,
        _ctx: &TtrpcContext,
        req: UpdateContainerRequest,
    ) -> ttrpc::Result<UpdateContainerResponse> {
        let skipped = self
            .containers
            .update(&req.container_id, &req.resources_json)
            .await
            .map_err(status)?;
        let mut resp = UpdateContainerResponse::new();
        resp.skipped = skipped;
        Ok(resp)
    }

    async fn stats_container(
        &self,
        _ctx: &TtrpcContext,
        req: StatsContainerRequest,
    ) -> ttrpc::Result<StatsContainerResponse> {
        self.containers
            .stats(&req.container_id)
            .await
            .map_err(status)
    }

    async fn get_oom_event(
        &self,
        _ctx: &TtrpcContext,
        _req: GetOOMEventRequest,
    ) -> ttrpc::Result<GetOOMEventResponse> {
        let id = self.containers.next_oom_event().await.map_err(status)?;
        let mut resp = GetOOMEventResponse::new();
        resp.container_id = id;
        Ok(resp)
    }

    async fn tty_win_resize(
        &self,
        _ctx: &TtrpcContext,
        req: TtyWinResizeRequest,
    ) -> ttrpc::Result<TtyWinResizeResponse> {
        self.containers
            .resize(&req.container_id, &req.exec_id, req.rows, req.cols)
            .await
            .map_err(status)?;
        Ok(TtyWinResizeResponse::new())
    }

    async fn close_stdin(
        &self,
        _ctx: &TtrpcContext,
        req: CloseStdinRequest,
    ) -> ttrpc::Result<CloseStdinResponse> {
        self.containers
            .close_stdin(&req.container_id, &req.exec_id)
            .await
            .map_err(status)?;
        Ok(CloseStdinResponse::new())
    }

    async fn configure_network(
        &self,
        _ctx: &TtrpcContext,
        req: ConfigureNetworkRequest,
    ) -> ttrpc::Result<ConfigureNetworkResponse> {
        self.serving("ConfigureNetwork")?;
        if self.mode == Mode::Host {
            crate::network::ensure_own_namespace().map_err(status)?;
        }
        tokio::task::spawn_blocking(move || crate::network::configure(&req))
            .await
            .map_err(|e| internal("ConfigureNetwork task", e))?
            .map_err(status)?;
        Ok(ConfigureNetworkResponse::new())
    }
}

/// The library's steps as the protocol carries them.
fn proto_steps(steps: Vec<husk_container::Step>) -> Vec<husk_protocol::agent::Step> {
    steps
        .into_iter()
        .map(|s| {
            let mut p = husk_protocol::agent::Step::new();
            p.name = s.name.to_owned();
            p.micros = s.micros;
            p
        })
        .collect()
}
