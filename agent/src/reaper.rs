//! Child reaping for PID 1.
//!
//! Every orphan in the guest is re-parented to the agent, which must wait for it or it
//! stays a zombie. One task owns `waitpid(-1)`; code that starts its own children (the
//! container code) registers them here to receive their exit status instead of calling
//! waitpid itself, which would race with the reaper. For the same reason nothing in the
//! agent may use `std::process::Child::wait` or `tokio::process`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use nix::errno::Errno;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::oneshot;

/// Receives the exit status (`Exited` or `Signaled`) of a registered child.
pub type ExitReceiver = oneshot::Receiver<WaitStatus>;

/// Shared registry of children whose exit someone waits for. Cheap to clone.
#[derive(Clone, Default)]
pub struct Reaper {
    waiters: Arc<Mutex<HashMap<Pid, oneshot::Sender<WaitStatus>>>>,
}

impl Reaper {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Pid, oneshot::Sender<WaitStatus>>> {
        // A poisoned map is still a consistent map (inserts and removes are atomic).
        self.waiters.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `start` (which forks/clones a child and returns its pid) with the registry
    /// locked, then registers the child. The reaper takes the same lock before it calls
    /// waitpid, so a child that exits at once cannot be reaped before it is registered.
    /// `start` must not block on anything that needs the reaper.
    #[cfg_attr(not(test), allow(dead_code))] // the container code (next issue) calls this
    pub fn start_child<E>(
        &self,
        start: impl FnOnce() -> Result<Pid, E>,
    ) -> Result<(Pid, ExitReceiver), E> {
        let mut waiters = self.lock();
        let pid = start()?;
        let (tx, rx) = oneshot::channel();
        waiters.insert(pid, tx);
        Ok((pid, rx))
    }

    /// Reaps every child that has exited, without blocking. Registered children's
    /// statuses go to their waiters; orphans are just collected. Returns how many.
    pub fn reap(&self) -> usize {
        let mut waiters = self.lock();
        let mut reaped = 0;
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => break,
                Ok(status) => {
                    let Some(pid) = status.pid() else { break };
                    reaped += 1;
                    match waiters.remove(&pid) {
                        // The waiter may have given up (dropped its receiver): fine.
                        Some(tx) => drop(tx.send(status)),
                        None => tracing::debug!(pid = pid.as_raw(), "reaped orphan: {status:?}"),
                    }
                }
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    tracing::warn!("waitpid(-1): {e}");
                    break;
                }
            }
        }
        reaped
    }

    /// Reaps on every SIGCHLD, forever. Returns only if SIGCHLD cannot be subscribed to.
    pub async fn run(self) -> std::io::Result<()> {
        let mut sigchld = signal(SignalKind::child())?;
        // Children that exited before the handler was installed sent their SIGCHLD to
        // nobody: collect them now.
        self.reap();
        while sigchld.recv().await.is_some() {
            self.reap();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Forks a child that exits at once with `code`. Only async-signal-safe calls in the
    /// child (the test harness is multi-threaded).
    fn fork_exit(code: i32) -> Result<Pid, Errno> {
        // SAFETY: the child only calls _exit.
        match unsafe { nix::unistd::fork() }? {
            nix::unistd::ForkResult::Child => unsafe { libc::_exit(code) },
            nix::unistd::ForkResult::Parent { child } => Ok(child),
        }
    }

    #[test]
    fn registered_child_status_reaches_its_waiter_and_orphans_are_collected() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let reaper = Reaper::new();
            let (pid, exit) = reaper.start_child(|| fork_exit(42)).expect("fork");
            let orphan = fork_exit(3).expect("fork orphan");
            tokio::spawn(reaper.clone().run());
            let status = tokio::time::timeout(Duration::from_secs(10), exit)
                .await
                .expect("exit status within 10 s")
                .expect("reaper kept the sender");
            assert_eq!(status, WaitStatus::Exited(pid, 42));
            // The unregistered child is reaped too: a zombie keeps its /proc entry until
            // someone waits for it (looked at without waiting, so the test cannot reap it).
            let proc_entry = format!("/proc/{orphan}");
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while std::path::Path::new(&proc_entry).exists() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "orphan {orphan} not reaped"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert!(reaper.lock().is_empty());
        });
    }
}
