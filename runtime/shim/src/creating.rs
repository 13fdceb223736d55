//! Tasks whose `Create` is still running. On a slow host a create boots the VM for tens of
//! seconds; if containerd restarts meanwhile, the caller that would have got the answer is
//! gone, and the new containerd only learns of the task by asking this shim. So a create
//! in progress is a task like any other from its first moment: `State` reports it CREATED,
//! and a `Kill` or `Delete` of it cancels the create, which then discards everything it
//! made (VM, shares, mounts) and leaves an exited task to delete (as containerd's CRI does
//! when it recovers a sandbox that is not running: Wait, Kill, Delete). Without this, the
//! boot finished for nobody and the shim held its VM forever (Kata #5246).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::container::Exit;

/// Where a create stands.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Phase {
    /// Still running; `cancelled` once a Kill or Delete asked for it to be undone.
    InProgress { cancelled: bool },
    /// Undone after a cancel: an exited task until it is deleted.
    Cancelled(Exit),
    /// Done: the container is registered (or the create failed and returned its error).
    Ended,
}

/// One create in progress, with what `State` reports of it.
pub struct Creating {
    pub bundle: String,
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
    phase: Mutex<Phase>,
    changed: tokio::sync::watch::Sender<Phase>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Creating {
    pub fn phase(&self) -> Phase {
        *lock(&self.phase)
    }

    fn set(&self, phase: Phase) {
        *lock(&self.phase) = phase;
        self.changed.send_replace(phase);
    }

    /// Asks for the create to be undone; false if it already ended (the caller then deals
    /// with the registered container, or with nothing).
    pub fn cancel(&self) -> bool {
        let mut p = lock(&self.phase);
        match *p {
            Phase::InProgress { .. } => {
                *p = Phase::InProgress { cancelled: true };
                self.changed.send_replace(*p);
                true
            }
            Phase::Cancelled(_) => true,
            Phase::Ended => false,
        }
    }

    /// Called by the create once it has made its container: `Ended` and true, unless it was
    /// cancelled meanwhile (false: the create must undo its work). Atomic with [`cancel`],
    /// so a cancel is never lost between the create's last step and its registration.
    pub fn finish(&self) -> bool {
        let mut p = lock(&self.phase);
        if *p == (Phase::InProgress { cancelled: true }) {
            return false;
        }
        *p = Phase::Ended;
        self.changed.send_replace(*p);
        true
    }

    /// Resolves once a Kill or Delete asked for the create to be undone: its boot stops
    /// waiting for a VM nobody wants any more.
    pub async fn cancel_requested(&self) {
        let mut rx = self.changed.subscribe();
        let _ = rx
            .wait_for(|p| {
                matches!(
                    p,
                    Phase::InProgress { cancelled: true } | Phase::Cancelled(_)
                )
            })
            .await;
    }

    /// Waits until the create is no longer in progress.
    pub async fn settled(&self) -> Phase {
        let mut rx = self.changed.subscribe();
        let phase = rx
            .wait_for(|p| !matches!(p, Phase::InProgress { .. }))
            .await
            .map(|p| *p);
        phase.unwrap_or_else(|_| self.phase())
    }
}

/// Creates in progress (and cancelled ones not yet deleted), by container id.
#[derive(Default)]
pub struct Creates {
    by_id: Mutex<HashMap<String, Arc<Creating>>>,
}

impl Creates {
    /// Registers the create of `id`; `None` if one is already registered.
    pub fn begin(
        &self,
        id: &str,
        req: &containerd_shim_protos::api::CreateTaskRequest,
    ) -> Option<Arc<Creating>> {
        let mut map = lock(&self.by_id);
        if map.contains_key(id) {
            return None;
        }
        let phase = Phase::InProgress { cancelled: false };
        let c = Arc::new(Creating {
            bundle: req.bundle.clone(),
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
            phase: Mutex::new(phase),
            changed: tokio::sync::watch::channel(phase).0,
        });
        map.insert(id.to_owned(), Arc::clone(&c));
        Some(c)
    }

    pub fn get(&self, id: &str) -> Option<Arc<Creating>> {
        lock(&self.by_id).get(id).cloned()
    }

    /// The create of `id` ended (its container is registered, or it failed): forgotten.
    pub fn end(&self, id: &str, c: &Creating) {
        c.set(Phase::Ended);
        lock(&self.by_id).remove(id);
    }

    /// The create of `id` was undone: an exited task until `remove`.
    pub fn cancelled(&self, c: &Creating, exit: Exit) {
        c.set(Phase::Cancelled(exit));
    }

    pub fn remove(&self, id: &str) {
        lock(&self.by_id).remove(id);
    }

    /// Whether any create is still running (the shim has work even without containers).
    pub fn any_in_progress(&self) -> bool {
        lock(&self.by_id)
            .values()
            .any(|c| matches!(c.phase(), Phase::InProgress { .. }))
    }

    /// Cancels every create in progress.
    pub fn cancel_all(&self) {
        for c in lock(&self.by_id).values() {
            c.cancel();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req() -> containerd_shim_protos::api::CreateTaskRequest {
        containerd_shim_protos::api::CreateTaskRequest {
            bundle: "/b".into(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn a_cancel_before_the_end_makes_the_create_undo_its_work() {
        let creates = Creates::default();
        let c = creates.begin("a", &req()).unwrap();
        assert!(creates.begin("a", &req()).is_none(), "one create per id");
        assert!(creates.any_in_progress());
        let waiter = {
            let c = Arc::clone(&c);
            tokio::spawn(async move { c.settled().await })
        };
        assert!(c.cancel());
        assert!(
            !c.finish(),
            "a cancelled create must not register its container"
        );
        creates.cancelled(&c, Exit::now(137));
        match waiter.await.unwrap() {
            Phase::Cancelled(e) => assert_eq!(e.status, 137),
            other => panic!("{other:?}"),
        }
        assert!(!creates.any_in_progress());
        assert!(creates.get("a").is_some(), "kept for State and Delete");
        creates.remove("a");
        assert!(creates.get("a").is_none());
    }

    #[tokio::test]
    async fn a_booting_create_hears_of_its_cancel_at_once() {
        let creates = Creates::default();
        let c = creates.begin("a", &req()).unwrap();
        let booting = {
            let c = Arc::clone(&c);
            tokio::spawn(async move { c.cancel_requested().await })
        };
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!booting.is_finished(), "no cancel yet");
        assert!(c.cancel());
        tokio::time::timeout(std::time::Duration::from_secs(5), booting)
            .await
            .expect("the boot hears of the cancel")
            .unwrap();
    }

    #[tokio::test]
    async fn a_cancel_after_the_end_is_refused() {
        let creates = Creates::default();
        let c = creates.begin("a", &req()).unwrap();
        assert!(c.finish());
        assert!(
            !c.cancel(),
            "the container is registered: Kill and Delete act on it"
        );
        creates.end("a", &c);
        assert_eq!(c.settled().await, Phase::Ended);
        assert!(creates.get("a").is_none());
    }
}
