//! A container of the shim's VM: its init process and its exec'd processes, and each
//! process's life (created → running → exited).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use husk_protocol::agent::StdioStreams;
use tokio::sync::watch;

use crate::stdio::{IoPaths, Relays};
use crate::vm::PodVm;

/// How a process ended, as containerd records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// The exit code, or 128+n for a death by signal n; 255 when unknown (the VM died).
    pub status: u32,
    pub at: SystemTime,
}

/// containerd's status for an exit it cannot know (its `UnknownExitStatus`).
pub const UNKNOWN_EXIT_STATUS: u32 = 255;

impl Exit {
    pub fn now(status: u32) -> Self {
        Self {
            status,
            at: SystemTime::now(),
        }
    }

    /// From the agent's `WaitProcess` answer.
    pub fn from_agent(exit_code: i32, signal: u32, exited_at_unix_ns: u64) -> Self {
        let at = if exited_at_unix_ns == 0 {
            SystemTime::now()
        } else {
            UNIX_EPOCH + Duration::from_nanos(exited_at_unix_ns)
        };
        Self {
            status: husk_runtime::exit::code(exit_code, signal) as u32,
            at,
        }
    }

    pub fn timestamp(&self) -> Timestamp {
        let d = self.at.duration_since(UNIX_EPOCH).unwrap_or_default();
        Timestamp {
            seconds: d.as_secs() as i64,
            nanos: d.subsec_nanos() as i32,
            ..Default::default()
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Created,
    Running,
    Exited(Exit),
}

/// The init (`exec_id` empty) or an exec'd process.
pub struct Process {
    pub exec_id: String,
    pub io: IoPaths,
    pub streams: StdioStreams,
    /// An exec's OCI `process` JSON (empty for the init).
    pub process_json: Vec<u8>,
    status: Mutex<Status>,
    relays: Mutex<Option<Relays>>,
    exit: watch::Sender<Option<Exit>>,
}

impl Process {
    pub fn new(exec_id: &str, io: IoPaths, streams: StdioStreams, process_json: Vec<u8>) -> Self {
        Self {
            exec_id: exec_id.to_owned(),
            io,
            streams,
            process_json,
            status: Mutex::new(Status::Created),
            relays: Mutex::new(None),
            exit: watch::channel(None).0,
        }
    }

    pub fn status(&self) -> Status {
        *lock(&self.status)
    }

    pub fn set_running(&self) {
        let mut s = lock(&self.status);
        if *s == Status::Created {
            *s = Status::Running;
        }
    }

    /// Records the exit (the first one wins) and wakes every `wait`er.
    pub fn set_exited(&self, exit: Exit) {
        let mut s = lock(&self.status);
        if matches!(*s, Status::Exited(_)) {
            return;
        }
        *s = Status::Exited(exit);
        self.exit.send_replace(Some(exit));
    }

    pub async fn wait(&self) -> Exit {
        let mut rx = self.exit.subscribe();
        match rx.wait_for(Option::is_some).await {
            Ok(v) => v.unwrap_or_else(|| Exit::now(UNKNOWN_EXIT_STATUS)),
            // The sender lives in `self`: it cannot be gone while we borrow it.
            Err(_) => Exit::now(UNKNOWN_EXIT_STATUS),
        }
    }

    pub fn set_relays(&self, relays: Relays) {
        *lock(&self.relays) = Some(relays);
    }

    pub fn take_relays(&self) -> Option<Relays> {
        lock(&self.relays).take()
    }
}

/// The container and the VM it runs in.
pub struct Container {
    pub id: String,
    pub bundle: PathBuf,
    pub vm: Arc<PodVm>,
    /// `<bundle>/rootfs` when the shim mounted containerd's rootfs mounts there.
    pub mounted_rootfs: Option<PathBuf>,
    pub init: Arc<Process>,
    execs: Mutex<HashMap<String, Arc<Process>>>,
    paused: AtomicBool,
    deleted: AtomicBool,
}

impl Container {
    pub fn new(
        id: String,
        bundle: PathBuf,
        vm: Arc<PodVm>,
        mounted_rootfs: Option<PathBuf>,
        init: Arc<Process>,
    ) -> Self {
        Self {
            id,
            bundle,
            vm,
            mounted_rootfs,
            init,
            execs: Mutex::new(HashMap::new()),
            paused: AtomicBool::new(false),
            deleted: AtomicBool::new(false),
        }
    }

    /// The init for `exec_id` "", else that exec.
    pub fn process(&self, exec_id: &str) -> Option<Arc<Process>> {
        if exec_id.is_empty() {
            return Some(Arc::clone(&self.init));
        }
        lock(&self.execs).get(exec_id).cloned()
    }

    /// Adds an exec; false when the id is taken.
    pub fn add_exec(&self, p: Arc<Process>) -> bool {
        let mut execs = lock(&self.execs);
        if execs.contains_key(&p.exec_id) {
            return false;
        }
        execs.insert(p.exec_id.clone(), p);
        true
    }

    pub fn remove_exec(&self, exec_id: &str) -> Option<Arc<Process>> {
        lock(&self.execs).remove(exec_id)
    }

    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    pub fn set_paused(&self, paused: bool) {
        self.paused.store(paused, Ordering::SeqCst);
    }

    pub fn is_deleted(&self) -> bool {
        self.deleted.load(Ordering::SeqCst)
    }

    pub fn set_deleted(&self) {
        self.deleted.store(true, Ordering::SeqCst);
    }

    /// Whether this container made (and so ends) its VM.
    pub fn owns_vm(&self) -> bool {
        self.vm.owner_id == self.id
    }

    pub fn sandbox(&self) -> &crate::sandbox::Sandbox {
        &self.vm.sandbox
    }
}

/// Locks, ignoring poisoning: the data are plain values that a panicking holder cannot
/// leave half-written.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_statuses_and_times() {
        let e = Exit::from_agent(0, 9, 1_500_000_000_123_456_789);
        assert_eq!(e.status, 137);
        let ts = e.timestamp();
        assert_eq!((ts.seconds, ts.nanos), (1_500_000_000, 123_456_789));
        assert_eq!(Exit::from_agent(3, 0, 0).status, 3);
    }

    #[test]
    fn first_exit_wins_and_wakes_waiters() {
        let p = Process::new("", IoPaths::default(), StdioStreams::new(), Vec::new());
        assert_eq!(p.status(), Status::Created);
        p.set_running();
        assert_eq!(p.status(), Status::Running);
        let first = Exit::now(3);
        p.set_exited(first);
        p.set_exited(Exit::now(4));
        assert_eq!(p.status(), Status::Exited(first));
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        assert_eq!(rt.block_on(p.wait()), first);
    }
}
