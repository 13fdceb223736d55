//! Running code inside another network namespace. Namespaces are per thread, so the work
//! runs on a short-lived thread that enters the namespace and ends with the work; the
//! shim's own threads never move.

use std::fs::File;
use std::io;
use std::path::Path;

use anyhow::Context;
use nix::sched::{CloneFlags, setns};

/// Why a namespace could not be entered; `NotFound` when its file is gone (the pod's
/// namespace was already deleted).
#[derive(Debug, thiserror::Error)]
#[error("entering network namespace {path}: {source}")]
pub struct EnterError {
    pub path: String,
    #[source]
    pub source: io::Error,
}

impl EnterError {
    pub fn is_gone(&self) -> bool {
        self.source.kind() == io::ErrorKind::NotFound
    }
}

/// Runs `work` on a new thread inside the network namespace at `netns` (a file such as
/// /var/run/netns/NAME) and returns its result.
pub fn run_in<T: Send>(
    netns: &Path,
    work: impl FnOnce() -> anyhow::Result<T> + Send,
) -> anyhow::Result<T> {
    std::thread::scope(|s| {
        std::thread::Builder::new()
            .name("pod-netns".into())
            .spawn_scoped(s, || {
                enter(netns)?;
                work()
            })
            .context("starting a thread for the pod's network namespace")?
            .join()
            .map_err(|_| anyhow::anyhow!("the thread working in {} panicked", netns.display()))?
    })
}

fn enter(netns: &Path) -> Result<(), EnterError> {
    let err = |source| EnterError {
        path: netns.display().to_string(),
        source,
    };
    let file = File::open(netns).map_err(err)?;
    setns(&file, CloneFlags::CLONE_NEWNET).map_err(|e| err(io::Error::from(e)))
}
