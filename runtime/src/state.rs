//! The state store: one directory per container under the root (`--root`, default
//! /run/husk), holding `state.json`, the VM's sockets, the rootfs image and the monitor log.
//!
//! Concurrency: commands on one id serialise on an exclusive `flock` of the container's
//! directory. [`StateStore::lock`] re-checks after locking that the path still names the
//! directory it locked, so a command that waited for a `delete` finds the container gone
//! rather than writing into a removed directory.

use std::collections::BTreeMap;
use std::fs::{DirBuilder, File};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::id::{self, IdError};
use crate::process::ProcessIdentity;

pub const DEFAULT_ROOT: &str = "/run/husk";
pub const STATE_FILE: &str = "state.json";
/// The container's config.json as given at create (exec defaults and hooks come from it
/// even if the bundle changes or goes away).
pub const CONFIG_COPY: &str = "config.json";
/// Socket names are short: a Unix socket path must fit in 107 bytes.
pub const VM_SOCKET: &str = "vm.sock";
pub const FS_SOCKET: &str = "fs.sock";
pub const ROOTFS_IMAGE: &str = "rootfs.ext4";
pub const MONITOR_LOG: &str = "monitor.log";
/// Longest Unix socket path (sun_path is 108 bytes with the terminating NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// OCI status, plus `creating` while the monitor sets the VM up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Creating,
    Created,
    Running,
    Paused,
    Stopped,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Creating => "creating",
            Status::Created => "created",
            Status::Running => "running",
            Status::Paused => "paused",
            Status::Stopped => "stopped",
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How the init ended, as the monitor recorded it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitRecord {
    pub exit_code: i32,
    /// 0 if the process exited rather than being killed.
    pub signal: u32,
}

/// How the rootfs reaches the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum RootfsMode {
    /// A read-only ext4 image of the rootfs on virtio-blk, with a tmpfs overlay in the guest.
    Block,
    /// The bundle's rootfs shared through virtiofsd and a vhost-user-fs device: writes land
    /// in the bundle, as with runc.
    #[default]
    Virtiofs,
}

impl std::str::FromStr for RootfsMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "block" => Ok(Self::Block),
            "virtiofs" => Ok(Self::Virtiofs),
            other => Err(format!(
                "unknown rootfs mode {other:?} (expected block or virtiofs)"
            )),
        }
    }
}

/// `state.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContainerState {
    pub id: String,
    /// The container's id inside the VM.
    pub agent_id: String,
    pub bundle: PathBuf,
    pub rootfs: PathBuf,
    pub status: Status,
    /// The monitor: the host process that lives as long as the container.
    pub monitor: Option<ProcessIdentity>,
    pub virtiofsd: Option<ProcessIdentity>,
    pub created: String,
    pub owner: String,
    pub annotations: BTreeMap<String, String>,
    pub rootfs_mode: RootfsMode,
    pub vcpus: u8,
    pub memory_mib: u64,
    /// Whether the init has a terminal.
    pub terminal: bool,
    /// The init's pid inside the guest.
    pub guest_pid: Option<u32>,
    pub exit: Option<ExitRecord>,
    /// The host cgroup folders the monitor joined (`linux.cgroupsPath`), one per
    /// hierarchy, for `delete` to remove after a crash.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub host_cgroup: Vec<PathBuf>,
}

/// State store errors.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(transparent)]
    InvalidId(#[from] IdError),
    #[error("container {0:?} does not exist")]
    NotFound(String),
    #[error("container {0:?} already exists")]
    Exists(String),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("state file {path} is corrupt: {source}")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("state directory {path} is locked by another husk command (gave up after {waited:?})")]
    LockTimeout { path: PathBuf, waited: Duration },
    #[error(
        "socket path {path} is {len} bytes long; Unix sockets allow {MAX_SOCKET_PATH} (use a shorter --root or id)"
    )]
    SocketPathTooLong { path: PathBuf, len: usize },
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StateError + 'a {
    move |source| StateError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// The root directory holding every container's state.
#[derive(Debug, Clone)]
pub struct StateStore {
    root: PathBuf,
}

/// An exclusive lock on one container's directory; released on drop.
pub struct ContainerLock {
    dir: PathBuf,
    _lock: Flock<File>,
}

impl ContainerLock {
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl StateStore {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory of container `id` (validated).
    pub fn dir(&self, id: &str) -> Result<PathBuf, StateError> {
        id::validate(id)?;
        Ok(self.root.join(id))
    }

    /// A socket path in `id`'s directory, checked against the Unix socket length limit.
    pub fn socket_path(&self, id: &str, name: &str) -> Result<PathBuf, StateError> {
        let path = self.dir(id)?.join(name);
        let len = path.as_os_str().len();
        if len > MAX_SOCKET_PATH {
            return Err(StateError::SocketPathTooLong { path, len });
        }
        Ok(path)
    }

    /// Makes the directory of a new container and locks it. Fails if the id is taken.
    pub fn create(&self, id: &str) -> Result<ContainerLock, StateError> {
        let dir = self.dir(id)?;
        // Owner-only, whatever the caller's umask: the folder holds the agent's socket (the
        // whole guest API) and the container's spec.
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.root)
            .map_err(io_err("creating state root", &self.root))?;
        match DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(StateError::Exists(id.to_owned()));
            }
            Err(e) => return Err(io_err("creating state directory", &dir)(e)),
        }
        self.lock(id)
    }

    /// Locks the directory of an existing container, waiting for other commands.
    pub fn lock(&self, id: &str) -> Result<ContainerLock, StateError> {
        self.lock_inner(id, None)
    }

    /// [`StateStore::lock`], giving up after `timeout`.
    pub fn lock_timeout(&self, id: &str, timeout: Duration) -> Result<ContainerLock, StateError> {
        self.lock_inner(id, Some(timeout))
    }

    fn lock_inner(&self, id: &str, timeout: Option<Duration>) -> Result<ContainerLock, StateError> {
        let dir = self.dir(id)?;
        let file = match File::open(&dir) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StateError::NotFound(id.to_owned()));
            }
            Err(e) => return Err(io_err("opening state directory", &dir)(e)),
        };
        let ino = file.metadata().map_err(io_err("reading", &dir))?.ino();
        let lock = match timeout {
            None => Flock::lock(file, FlockArg::LockExclusive)
                .map_err(|(_, e)| io_err("locking", &dir)(e.into()))?,
            Some(timeout) => {
                let start = Instant::now();
                let mut file = file;
                loop {
                    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                        Ok(l) => break l,
                        Err((f, nix::errno::Errno::EWOULDBLOCK)) => {
                            if start.elapsed() >= timeout {
                                return Err(StateError::LockTimeout {
                                    path: dir,
                                    waited: start.elapsed(),
                                });
                            }
                            file = f;
                            std::thread::sleep(Duration::from_millis(10));
                        }
                        Err((_, e)) => return Err(io_err("locking", &dir)(e.into())),
                    }
                }
            }
        };
        // A delete may have removed (and another create re-made) the directory meanwhile.
        match std::fs::metadata(&dir) {
            Ok(m) if m.ino() == ino => {}
            _ => return Err(StateError::NotFound(id.to_owned())),
        }
        Ok(ContainerLock { dir, _lock: lock })
    }

    /// Reads `state.json` of a locked container.
    pub fn load(&self, lock: &ContainerLock) -> Result<ContainerState, StateError> {
        read_state(&lock.dir.join(STATE_FILE))
    }

    /// Reads `state.json` without locking (for `state`/`list`, which only read).
    pub fn load_unlocked(&self, id: &str) -> Result<ContainerState, StateError> {
        let path = self.dir(id)?.join(STATE_FILE);
        read_state(&path).map_err(|e| match e {
            StateError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound => {
                StateError::NotFound(id.to_owned())
            }
            other => other,
        })
    }

    /// Replaces `state.json` atomically (write to a temp file, then rename).
    pub fn save(&self, lock: &ContainerLock, state: &ContainerState) -> Result<(), StateError> {
        let path = lock.dir.join(STATE_FILE);
        let tmp = lock.dir.join(".state.json.tmp");
        let json = serde_json::to_vec_pretty(state).map_err(|source| StateError::Corrupt {
            path: path.clone(),
            source,
        })?;
        let mut f = File::options()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_err("writing", &tmp))?;
        f.write_all(&json).map_err(io_err("writing", &tmp))?;
        f.sync_data().map_err(io_err("syncing", &tmp))?;
        std::fs::rename(&tmp, &path).map_err(io_err("renaming", &tmp))?;
        Ok(())
    }

    /// Removes the container's directory and everything in it. The lock is consumed: the
    /// directory is gone once this returns.
    pub fn remove(&self, lock: ContainerLock) -> Result<(), StateError> {
        let dir = lock.dir.clone();
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("removing state directory", &dir)(e)),
        }
    }

    /// Ids of every container directory under the root, sorted.
    pub fn list(&self) -> Result<Vec<String>, StateError> {
        let entries = match std::fs::read_dir(&self.root) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err("listing", &self.root)(e)),
        };
        let mut ids: Vec<String> = entries
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|name| id::validate(name).is_ok())
            .collect();
        ids.sort();
        Ok(ids)
    }
}

fn read_state(path: &Path) -> Result<ContainerState, StateError> {
    let bytes = std::fs::read(path).map_err(io_err("reading", path))?;
    serde_json::from_slice(&bytes).map_err(|source| StateError::Corrupt {
        path: path.to_path_buf(),
        source,
    })
}

impl ContainerState {
    /// The status as it really is: a dead monitor means the container has stopped, whatever
    /// the file says (the monitor may have been SIGKILLed before it could record it).
    pub fn effective_status(&self) -> Status {
        match self.monitor {
            Some(m) if m.is_alive() => self.status,
            // No monitor recorded yet: create is still starting it.
            None if self.status == Status::Creating => Status::Creating,
            _ => Status::Stopped,
        }
    }

    /// The pid to report: the monitor's while it lives, 0 once stopped (as runc does).
    pub fn effective_pid(&self) -> i32 {
        match (self.effective_status(), self.monitor) {
            (Status::Stopped, _) | (_, None) => 0,
            (_, Some(m)) => m.pid,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(id: &str) -> ContainerState {
        ContainerState {
            id: id.into(),
            agent_id: id.into(),
            bundle: "/b".into(),
            rootfs: "/b/rootfs".into(),
            status: Status::Created,
            monitor: ProcessIdentity::current(),
            virtiofsd: None,
            created: "2026-01-01T00:00:00.000000000Z".into(),
            owner: "root".into(),
            annotations: BTreeMap::new(),
            rootfs_mode: RootfsMode::Block,
            vcpus: 1,
            memory_mib: 128,
            terminal: false,
            guest_pid: Some(7),
            exit: None,
            host_cgroup: Vec::new(),
        }
    }

    #[test]
    fn create_save_load_list_remove() {
        let tmp = tempfile::tempdir().unwrap();
        let store = StateStore::new(tmp.path().join("root"));
        assert!(store.list().unwrap().is_empty());
        let lock = store.create("c1").unwrap();
        let st = sample("c1");
        store.save(&lock, &st).unwrap();
        assert_eq!(store.load(&lock).unwrap(), st);
        assert!(matches!(store.create("c1"), Err(StateError::Exists(_))));
        drop(lock);
        assert_eq!(store.load_unlocked("c1").unwrap(), st);
        assert_eq!(store.list().unwrap(), vec!["c1".to_owned()]);
        let lock = store.lock("c1").unwrap();
        store.remove(lock).unwrap();
        assert!(matches!(store.lock("c1"), Err(StateError::NotFound(_))));
        assert!(matches!(
            store.load_unlocked("c1"),
            Err(StateError::NotFound(_))
        ));
        assert!(store.list().unwrap().is_empty());
    }

    #[test]
    fn state_is_owner_only_under_any_umask() {
        let tmp = tempfile::tempdir().unwrap();
        let store = StateStore::new(tmp.path().join("root"));
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::empty());
        let made = store
            .create("c1")
            .and_then(|lock| store.save(&lock, &sample("c1")));
        nix::sys::stat::umask(old);
        made.unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().mode() & 0o777;
        assert_eq!(mode(&tmp.path().join("root")), 0o700);
        assert_eq!(mode(&store.dir("c1").unwrap()), 0o700);
        assert_eq!(mode(&store.dir("c1").unwrap().join(STATE_FILE)), 0o600);
    }

    #[test]
    fn bad_ids_are_refused_before_touching_disk() {
        let tmp = tempfile::tempdir().unwrap();
        let store = StateStore::new(tmp.path());
        assert!(matches!(
            store.create("../x"),
            Err(StateError::InvalidId(_))
        ));
        assert!(matches!(store.lock(".."), Err(StateError::InvalidId(_))));
    }

    #[test]
    fn lock_is_exclusive_and_times_out() {
        let tmp = tempfile::tempdir().unwrap();
        let store = StateStore::new(tmp.path());
        let held = store.create("c").unwrap();
        let err = store
            .lock_timeout("c", Duration::from_millis(50))
            .err()
            .expect("second lock must wait");
        assert!(matches!(err, StateError::LockTimeout { .. }), "{err}");
        drop(held);
        store.lock_timeout("c", Duration::from_millis(50)).unwrap();
    }

    #[test]
    fn a_waiter_sees_the_container_gone_after_delete() {
        let tmp = tempfile::tempdir().unwrap();
        let store = StateStore::new(tmp.path());
        let held = store.create("c").unwrap();
        let s2 = store.clone();
        let waiter = std::thread::spawn(move || s2.lock("c").err());
        std::thread::sleep(Duration::from_millis(50));
        store.remove(held).unwrap();
        let err = waiter.join().unwrap().expect("waiter must fail");
        assert!(matches!(err, StateError::NotFound(_)), "{err}");
    }

    #[test]
    fn dead_monitor_means_stopped() {
        let mut st = sample("c");
        st.status = Status::Running;
        assert_eq!(st.effective_status(), Status::Running);
        assert_eq!(st.effective_pid(), std::process::id() as i32);
        st.monitor = st.monitor.map(|m| ProcessIdentity {
            start_time: m.start_time + 1,
            ..m
        });
        assert_eq!(st.effective_status(), Status::Stopped);
        assert_eq!(st.effective_pid(), 0);
    }

    #[test]
    fn socket_paths_are_length_checked() {
        let store = StateStore::new("/run/husk");
        assert!(store.socket_path(&"a".repeat(64), VM_SOCKET).is_ok());
        let long = StateStore::new(format!("/{}", "r".repeat(100)));
        assert!(matches!(
            long.socket_path("c", VM_SOCKET),
            Err(StateError::SocketPathTooLong { .. })
        ));
    }
}
