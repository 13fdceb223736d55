//! Reaching a container's guest agent from a short-lived command: through the VM's
//! hybrid-vsock socket in the state directory.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use husk_protocol::client::{AgentClient, Target, connect_with_retry};
use husk_runtime::state::{ContainerState, MONITOR_LOG, StateStore, VM_SOCKET};

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

/// After a failed call to the agent of `st`: if its VM went away during the call (the
/// monitor, which holds the VM, exits within a moment), says so, so that the user reads
/// "the VM stopped" rather than only the connection's "early eof".
pub fn explain_failed_call(
    store: &StateStore,
    st: &ContainerState,
    err: anyhow::Error,
) -> anyhow::Error {
    // The agent answered: its message says what went wrong.
    let answered = err.chain().any(|c| {
        c.downcast_ref::<husk_protocol::client::ClientError>()
            .is_some_and(|e| e.rpc_code().is_some())
    });
    let Some(monitor) = st.monitor.filter(|_| !answered) else {
        return err;
    };
    let deadline = Instant::now() + Duration::from_secs(2);
    while monitor.is_alive() {
        if Instant::now() >= deadline {
            return err;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = store
        .dir(&st.id)
        .map(|d| d.join(MONITOR_LOG).display().to_string())
        .unwrap_or_else(|_| MONITOR_LOG.into());
    err.context(format!(
        "the container's VM stopped during the call (its monitor, pid {}, exited; see {log})",
        monitor.pid
    ))
}

/// Connects to the agent of container `id`.
pub async fn connect(store: &StateStore, id: &str) -> Result<AgentClient> {
    let target = target(store, id)?;
    connect_with_retry(&target, Instant::now() + CONNECT_TIMEOUT)
        .await
        .with_context(|| format!("container {id:?}: the VM's agent does not answer"))
}
