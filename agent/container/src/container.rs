//! The Container object: create (held init), start, signal, state, delete.
//!
//! The library never calls `waitpid`: processes are started through the caller's
//! [`Spawner`] (the agent's reaper), which receives exit statuses. The library tracks
//! liveness with pidfds, which also make signalling immune to pid reuse.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use oci_spec::runtime::{LinuxIdMapping, Spec};

use crate::error::{Error, Result, SysContext};
use crate::init::{self, ChildPlan, SETUP_TIMEOUT, Stdio};
use crate::namespaces::NamespaceConfig;
use crate::process::ProcessPlan;
use crate::rootfs::RootfsPlan;
use crate::seccomp::BpfProgram;
use crate::sync::{self, Channel, Msg};
use crate::timing::{Step, Timeline};

/// How long delete waits for killed processes to exit.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);

/// Starts children on behalf of the library and hands their exit statuses to whoever
/// waits for them. The agent implements it with `Reaper::start_child`: `start` forks and
/// returns the pid; the implementation must make sure the child cannot be reaped between
/// `start` returning and its registration (the reaper holds its lock around both).
pub trait Spawner {
    /// What the caller gets back per process (e.g. a receiver for the exit status).
    type Handle;
    fn spawn<F: FnOnce() -> Result<Pid>>(&self, start: F) -> Result<(Pid, Self::Handle)>;
}

/// What the container code needs from the container's cgroup. The agent builds it from
/// `linux.cgroupsPath` / `linux.resources` with the `cgroup` module and passes it in.
pub trait CgroupHandle: Send + Sync {
    /// Moves `pid` into the cgroup. Called before the process runs any container code.
    fn add_process(&self, pid: Pid) -> Result<()>;
    /// Every process in the cgroup (to signal them all).
    fn processes(&self) -> Result<Vec<Pid>>;
    /// Removes the cgroup once its processes are gone.
    fn destroy(&self) -> Result<()>;
}

/// A process the library started, tracked by pidfd.
#[derive(Debug)]
pub struct ProcessHandle {
    pid: Pid,
    pidfd: OwnedFd,
    /// The master of the pty the process opened for a [`Stdio::Terminal`], until taken.
    terminal: Option<OwnedFd>,
    /// How its setup went, step by step, until taken.
    pub(crate) steps: Vec<Step>,
}

impl ProcessHandle {
    /// Opens a pidfd for `pid`. Must be called before the pid can have been reaped
    /// (inside the spawner's `start`), so the pidfd is known to be that process.
    pub(crate) fn open(pid: Pid) -> Result<Self> {
        // SAFETY: plain syscall; the result is a new fd we own.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), 0) };
        let fd = Errno::result(fd).sys(|| format!("pidfd_open({pid})"))?;
        // SAFETY: the kernel just returned this fd.
        let pidfd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        Ok(ProcessHandle {
            pid,
            pidfd,
            terminal: None,
            steps: Vec::new(),
        })
    }

    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// The master of the process's terminal ([`Stdio::Terminal`]), once: non-blocking
    /// is the caller's to set.
    pub fn take_terminal(&mut self) -> Option<OwnedFd> {
        self.terminal.take()
    }

    /// The steps of the process's setup (the init's creation, an exec), once.
    pub fn take_steps(&mut self) -> Vec<Step> {
        std::mem::take(&mut self.steps)
    }

    /// Receives the process's setup messages until it is set up: `Ready` for a held init
    /// (`held`), end-of-file (its execve) otherwise. Keeps the terminal master it sends
    /// on the way, which `terminal` says to expect, and adds the steps it reports to
    /// `timeline`. `who` names the process in errors.
    pub(crate) fn await_setup(
        &mut self,
        chan: &Channel,
        held: bool,
        terminal: bool,
        who: &str,
        timeline: &mut Timeline,
    ) -> Result<()> {
        loop {
            match chan.recv(Some(SETUP_TIMEOUT))? {
                Some(Msg::Terminal(fd)) if terminal && self.terminal.is_none() => {
                    self.terminal = Some(fd);
                    continue;
                }
                Some(Msg::Marks(marks)) if !held => {
                    timeline.add_child(&marks);
                    continue;
                }
                Some(Msg::Ready(marks)) if held => {
                    timeline.add_child(&marks);
                    timeline.mark("ready");
                }
                None if !held => timeline.mark("execve"),
                None => return Err(Error::Setup(format!("{who} exited during setup"))),
                Some(Msg::Fail(why)) => return Err(Error::Setup(why)),
                Some(other) => {
                    return Err(Error::Setup(format!("unexpected {other:?} from {who}")));
                }
            }
            if terminal && self.terminal.is_none() {
                return Err(Error::Setup(format!("{who} sent no terminal")));
            }
            return Ok(());
        }
    }

    /// Sends `sig`; a process that has exited is not an error (nothing to signal).
    pub fn signal(&self, sig: Signal) -> Result<()> {
        // SAFETY: plain syscall on our pidfd.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.pidfd.as_raw_fd(),
                sig as libc::c_int,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        match Errno::result(rc) {
            Ok(_) | Err(Errno::ESRCH) => Ok(()),
            Err(e) => Err(Error::Sys {
                what: format!("signal {sig} to pid {}", self.pid),
                source: e,
            }),
        }
    }

    /// True once the process has exited (zombie or reaped).
    pub fn exited(&self) -> bool {
        self.wait_exit(Duration::ZERO)
    }

    /// Waits up to `timeout` for the process to exit; true if it has.
    pub fn wait_exit(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
            let mut fds = [PollFd::new(self.pidfd.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::from(ms)) {
                Ok(n) if n > 0 => return true,
                Ok(_) if Instant::now() >= deadline => return false,
                Ok(_) | Err(Errno::EINTR) => continue,
                Err(_) => return false,
            }
        }
    }

    /// SIGKILL and wait for the exit (bounded).
    pub(crate) fn kill_and_wait(&self) {
        let _ = self.signal(Signal::SIGKILL);
        if !self.wait_exit(KILL_TIMEOUT) {
            tracing::warn!(
                pid = self.pid.as_raw(),
                "process did not exit after SIGKILL"
            );
        }
    }
}

/// The container's lifecycle state (the runtime-spec states).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Init set up and held; the user's program has not run yet.
    Created,
    Running,
    Stopped,
}

/// A snapshot of the container's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct State {
    pub id: String,
    pub status: Status,
    /// The init's pid in the agent's pid namespace.
    pub pid: Pid,
    pub bundle: PathBuf,
}

/// Everything needed to create a container.
pub struct CreateOptions {
    /// Container id: 1-256 bytes of `[A-Za-z0-9_.-]`, not starting with `.`.
    pub id: String,
    /// The bundle directory: `root.path` is relative to it.
    pub bundle: PathBuf,
    pub spec: Spec,
    /// Standard streams of the init.
    pub stdio: Stdio,
    /// The container's cgroup, already created with the spec's resources.
    pub cgroup: Option<Box<dyn CgroupHandle>>,
}

/// A container: its init process and what is needed to exec into it and tear it down.
pub struct Container {
    pub(crate) id: String,
    pub(crate) bundle: PathBuf,
    pub(crate) spec: Spec,
    pub(crate) init: ProcessHandle,
    /// The held init's channel; None once started.
    pub(crate) sync: Option<Channel>,
    pub(crate) cgroup: Option<Box<dyn CgroupHandle>>,
    /// The container's seccomp filter, also applied to exec'd processes.
    pub(crate) seccomp: Option<BpfProgram>,
    pub(crate) own_pid_ns: bool,
}

impl std::fmt::Debug for Container {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Container")
            .field("id", &self.id)
            .field("pid", &self.init.pid)
            .field("created", &self.sync.is_some())
            .finish_non_exhaustive()
    }
}

/// Checks a container id (it ends up in paths and cgroup names).
pub fn validate_id(id: &str) -> Result<()> {
    let bad = |reason| Error::InvalidId {
        id: id.to_owned(),
        reason,
    };
    if id.is_empty() || id.len() > 256 {
        return Err(bad("must be 1-256 bytes"));
    }
    if id.starts_with('.') {
        return Err(bad("must not start with '.'"));
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
    {
        return Err(bad("only letters, digits, '_', '-' and '.' are allowed"));
    }
    Ok(())
}

fn write_id_map(pid: Pid, file: &str, maps: &[LinuxIdMapping]) -> Result<()> {
    let text: String = maps
        .iter()
        .map(|m| format!("{} {} {}\n", m.container_id(), m.host_id(), m.size()))
        .collect();
    let path = format!("/proc/{pid}/{file}");
    std::fs::write(&path, text).sys(|| format!("writing {path}"))
}

/// Kills what a failed create or exec left and removes nothing else: mounts live in the
/// process's own mount namespace and vanish with it.
struct Cleanup<'a> {
    process: Option<&'a ProcessHandle>,
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        if let Some(p) = self.process {
            p.kill_and_wait();
        }
    }
}

impl Container {
    /// Creates the container: namespaces, rootfs, process setup, then holds the init
    /// before the user's program until [`start`](Self::start). On error nothing is left:
    /// the process is killed (and waited for), and the cgroup destroyed.
    pub fn create<S: Spawner>(opts: CreateOptions, spawner: &S) -> Result<(Self, S::Handle)> {
        let CreateOptions {
            id,
            bundle,
            spec,
            stdio,
            cgroup,
        } = opts;
        let result = Self::create_inner(&id, &bundle, &spec, &stdio, cgroup.as_deref(), spawner);
        match result {
            Ok((init, sync, seccomp, own_pid_ns, handle)) => Ok((
                Container {
                    id,
                    bundle,
                    spec,
                    init,
                    sync: Some(sync),
                    cgroup,
                    seccomp,
                    own_pid_ns,
                },
                handle,
            )),
            Err(e) => {
                if let Some(cg) = &cgroup
                    && let Err(ce) = cg.destroy()
                {
                    tracing::warn!(id, "removing the cgroup of a failed create: {ce}");
                }
                Err(e)
            }
        }
    }

    #[allow(clippy::type_complexity)]
    fn create_inner<S: Spawner>(
        id: &str,
        bundle: &Path,
        spec: &Spec,
        stdio: &Stdio,
        cgroup: Option<&dyn CgroupHandle>,
        spawner: &S,
    ) -> Result<(ProcessHandle, Channel, Option<BpfProgram>, bool, S::Handle)> {
        let mut timeline = Timeline::start();
        validate_id(id)?;
        crate::spec::validate(spec)?;
        let linux = crate::spec::linux(spec)?;
        let ns = NamespaceConfig::from_spec(linux)?;
        let new_uts = ns.new.contains(nix::sched::CloneFlags::CLONE_NEWUTS);
        if (spec.hostname().is_some() || spec.domainname().is_some()) && !new_uts {
            return Err(Error::invalid(
                "hostname",
                "setting a hostname needs a new UTS namespace",
            ));
        }
        let user_ns = ns.new.contains(nix::sched::CloneFlags::CLONE_NEWUSER)
            || ns
                .join
                .iter()
                .any(|(k, _)| *k == oci_spec::runtime::LinuxNamespaceType::User);
        let rootfs_dir = crate::spec::rootfs_path(spec, bundle)?;
        let rootfs = RootfsPlan::from_spec(spec, &rootfs_dir, user_ns)?;
        let process = ProcessPlan::from_spec(crate::spec::process(spec)?, "process")?;
        if process.terminal && !matches!(stdio, Stdio::Terminal) {
            return Err(Error::invalid(
                "process.terminal",
                "true, but the caller passed no terminal",
            ));
        }
        let seccomp = match linux.seccomp() {
            Some(s) => Some(crate::seccomp::compile(s).map_err(|e| Error::Seccomp(e.to_string()))?),
            None => None,
        };
        let join = ns.open_joins()?;
        timeline.mark("plan (spec, seccomp filter)");
        let plan = ChildPlan {
            join: &join,
            new_namespaces: ns.new,
            new_cgroup_ns: ns.new_cgroup,
            hostname: spec.hostname().as_deref(),
            domainname: spec.domainname().as_deref(),
            rootfs: Some(&rootfs),
            process: &process,
            stdio,
            seccomp: seccomp.as_ref(),
            hold: true,
        };
        let (parent, child) = sync::pair()?;
        let mut handle_out = None;
        let (pid, handle) = spawner.spawn(|| {
            let pid = init::spawn(&plan, &parent, child)?;
            handle_out = Some(ProcessHandle::open(pid)?);
            Ok(pid)
        })?;
        let init = handle_out.ok_or_else(|| Error::Setup(format!("no pidfd for {pid}")))?;
        timeline.mark("spawn (fork, clone)");
        let mut guard = Cleanup {
            process: Some(&init),
        };
        if ns.new.contains(nix::sched::CloneFlags::CLONE_NEWUSER) {
            if let Some(m) = linux.uid_mappings() {
                write_id_map(pid, "uid_map", m)?;
            }
            if let Some(m) = linux.gid_mappings() {
                write_id_map(pid, "gid_map", m)?;
            }
        }
        if let Some(cg) = cgroup {
            cg.add_process(pid)?;
        }
        timeline.mark("id maps, cgroup join");
        parent.send(&Msg::Go)?;
        guard.process = None;
        drop(guard);
        let mut init = init;
        let terminal = matches!(stdio, Stdio::Terminal);
        if let Err(e) = init.await_setup(&parent, true, terminal, "init", &mut timeline) {
            init.kill_and_wait();
            return Err(e);
        }
        init.steps = timeline.into_steps();
        tracing::debug!(id, pid = pid.as_raw(), "container created");
        Ok((init, parent, seccomp, ns.new_pid(), handle))
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The init's pid (in the agent's pid namespace).
    pub fn pid(&self) -> Pid {
        self.init.pid
    }

    /// The master of the init's terminal (created with [`Stdio::Terminal`]), once.
    pub fn take_terminal(&mut self) -> Option<OwnedFd> {
        self.init.take_terminal()
    }

    pub fn spec(&self) -> &Spec {
        &self.spec
    }

    pub fn status(&self) -> Status {
        if self.init.exited() {
            Status::Stopped
        } else if self.sync.is_some() {
            Status::Created
        } else {
            Status::Running
        }
    }

    pub fn state(&self) -> State {
        State {
            id: self.id.clone(),
            status: self.status(),
            pid: self.init.pid,
            bundle: self.bundle.clone(),
        }
    }

    /// The steps of the init's creation, once.
    pub fn take_create_steps(&mut self) -> Vec<Step> {
        self.init.take_steps()
    }

    /// Runs the user's program in the held init; returns the steps (the Start message,
    /// the init's seccomp filter and execve). Fails if the container is not Created or if
    /// execve fails (the init then exits; delete the container).
    pub fn start(&mut self) -> Result<Vec<Step>> {
        let mut timeline = Timeline::start();
        if self.status() != Status::Created {
            return Err(self.wrong_state("start", "is not in the created state"));
        }
        let Some(sync) = self.sync.take() else {
            return Err(self.wrong_state("start", "is not in the created state"));
        };
        sync.send(&Msg::Start)?;
        timeline.mark("start message");
        match sync.recv(Some(SETUP_TIMEOUT))? {
            None => {
                timeline.mark("execve");
                tracing::debug!(id = self.id, "container started");
                Ok(timeline.into_steps())
            }
            Some(Msg::Fail(why)) => Err(Error::Setup(why)),
            Some(other) => Err(Error::Setup(format!("unexpected {other:?} from init"))),
        }
    }

    fn wrong_state(&self, op: &str, reason: &str) -> Error {
        Error::State {
            id: self.id.clone(),
            reason: format!("cannot {op}: the container {reason}"),
        }
    }

    /// Signals the init, or with `all` every process of the container: those of its
    /// cgroup when there is one, else those of its PID namespace.
    pub fn signal(&self, sig: Signal, all: bool) -> Result<()> {
        if !all {
            return self.init.signal(sig);
        }
        let pids = self.all_pids()?;
        for pid in pids {
            if pid == self.init.pid {
                self.init.signal(sig)?;
                continue;
            }
            match nix::sys::signal::kill(pid, sig) {
                Ok(()) | Err(Errno::ESRCH) => {}
                Err(e) => {
                    return Err(Error::Sys {
                        what: format!("signal {sig} to pid {pid}"),
                        source: e,
                    });
                }
            }
        }
        Ok(())
    }

    /// Every process of the container (the init included).
    pub fn all_pids(&self) -> Result<Vec<Pid>> {
        if let Some(cg) = &self.cgroup {
            return cg.processes();
        }
        if !self.own_pid_ns {
            return Ok(vec![self.init.pid]);
        }
        let target = std::fs::read_link(format!("/proc/{}/ns/pid", self.init.pid)).ok();
        let mut pids = vec![self.init.pid];
        let Some(target) = target else {
            return Ok(pids);
        };
        let entries = std::fs::read_dir("/proc").sys(|| "listing /proc".into())?;
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<i32>().ok())
            else {
                continue;
            };
            let pid = Pid::from_raw(pid);
            if pid != self.init.pid
                && std::fs::read_link(format!("/proc/{pid}/ns/pid"))
                    .ok()
                    .as_ref()
                    == Some(&target)
            {
                pids.push(pid);
            }
        }
        Ok(pids)
    }

    /// Kills whatever still runs (SIGKILL to every process), waits for the init to exit,
    /// and removes the cgroup. Mounts go away with the container's mount namespace.
    pub fn delete(mut self) -> Result<()> {
        // Dropping the held init's channel makes it exit quietly if it is still waiting.
        self.sync = None;
        if !self.init.exited() {
            self.signal(Signal::SIGKILL, true)?;
            if !self.init.wait_exit(KILL_TIMEOUT) {
                return Err(self.wrong_state("delete", "init survived SIGKILL"));
            }
        }
        if let Some(cg) = &self.cgroup {
            // Processes outside a PID namespace of their own may outlive the init.
            let deadline = Instant::now() + KILL_TIMEOUT;
            while cg.processes().map(|p| !p.is_empty()).unwrap_or(false) {
                if Instant::now() >= deadline {
                    return Err(self.wrong_state("delete", "cgroup still has processes"));
                }
                let _ = self.signal(Signal::SIGKILL, true);
                std::thread::sleep(Duration::from_millis(10));
            }
            cg.destroy()?;
        }
        tracing::debug!(id = self.id, "container deleted");
        Ok(())
    }
}
