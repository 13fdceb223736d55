//! Reaching a container's guest agent from a short-lived command: through the VM's
//! hybrid-vsock socket in the state directory.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use husk_protocol::client::{AgentClient, Target, connect_with_retry};
use husk_runtime::state::{StateStore, VM_SOCKET};

/// How long a command waits for the agent of a running VM (it answers at once unless the
/// VM is overloaded).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// Runs `f` on a fresh single-threaded tokio runtime.
pub fn block_on<F: Future>(f: F) -> Result<F::Output> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    Ok(rt.block_on(f))
}

/// The agent target of container `id`.
pub fn target(store: &StateStore, id: &str) -> Result<Target> {
    Ok(Target::hybrid_vsock(store.socket_path(id, VM_SOCKET)?))
}

/// Connects to the agent of container `id`.
pub async fn connect(store: &StateStore, id: &str) -> Result<AgentClient> {
    let target = target(store, id)?;
    connect_with_retry(&target, Instant::now() + CONNECT_TIMEOUT)
        .await
        .with_context(|| format!("container {id:?}: the VM's agent does not answer"))
}
