//! The ttrpc `AgentService` implementation.
//!
//! Layout for what comes next: this file only maps RPCs to the modules doing the work
//! (`guest` today; containers, processes and stats later) and turns their typed errors
//! into ttrpc statuses following the convention in agent.proto: a gRPC code plus a
//! message "<what>: <why>".

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use husk_protocol::agent::{
    CheckRequest, CheckResponse, DestroySandboxRequest, DestroySandboxResponse,
    GetGuestDetailsRequest, GetGuestDetailsResponse, ServingStatus,
};
use husk_protocol::agent_ttrpc::AgentService;
use tokio::sync::Notify;
use ttrpc::Code;
use ttrpc::r#async::TtrpcContext;
use ttrpc::error::get_rpc_status;

use crate::reaper::Reaper;

/// Shared agent state, one per agent process.
pub struct Agent {
    /// Set by DestroySandbox; `Check` then reports NOT_SERVING.
    shutting_down: AtomicBool,
    /// Woken once when the agent must stop (after the reply has been sent).
    shutdown: Arc<Notify>,
    /// Child registry for the container code (next issue).
    #[allow(dead_code)]
    reaper: Reaper,
}

impl Agent {
    pub fn new(shutdown: Arc<Notify>, reaper: Reaper) -> Self {
        Self {
            shutting_down: AtomicBool::new(false),
            shutdown,
            reaper,
        }
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

    async fn destroy_sandbox(
        &self,
        _ctx: &TtrpcContext,
        _req: DestroySandboxRequest,
    ) -> ttrpc::Result<DestroySandboxResponse> {
        if self.shutting_down.swap(true, Ordering::SeqCst) {
            return Err(unavailable("DestroySandbox"));
        }
        tracing::info!("DestroySandbox: shutting down");
        // main waits for this, lets the reply go out, then powers off.
        self.shutdown.notify_one();
        Ok(DestroySandboxResponse::new())
    }
}
