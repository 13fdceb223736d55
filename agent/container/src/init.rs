//! Starting a container process: the agent side (`spawn`) and the child side.
//!
//! # Process model
//! ```text
//! agent ──fork──> stage 1 ──clone(CLONE_PARENT)──> container process
//!   ^                │ setns() joined, unshare() new namespaces  │ (child of the agent)
//!   └── Pid(n) ──────┘ then exits (reaped as an orphan)           │ waits for Go, sets up,
//!                                                                  │ [init: Ready, waits Start]
//!                                                                  └ execve
//! ```
//! * Stage 1 exists because setns into a mount namespace is refused to a multi-threaded
//!   process and setns into a PID namespace only affects later children: the agent
//!   cannot do either itself. `CLONE_PARENT` makes the container process the agent's own
//!   child, so the agent's reaper (the only caller of `waitpid`) gets its exit status.
//! * The agent, after it has the pid (and a pidfd, opened while the reaper cannot have
//!   reaped it yet), writes uid/gid maps, puts the process in its cgroup, then sends Go.
//!   The container process therefore never runs outside its cgroup.
//! * The init sends Ready and blocks until Start (runc's create/start split); an exec'd
//!   process goes straight to execve. Success is seen by the agent as EOF on the sync
//!   socket (its child end is close-on-exec); failure as a `Fail` message naming the step.
//!
//! # Work after fork
//! The agent may be multi-threaded (tokio, test harnesses), so after fork only the
//! forking thread exists in the child, and locks other threads held stay locked. The
//! child code here therefore takes **no** lock except malloc's: no `tracing`, no std
//! stdio, no `std::env`. It does allocate (paths, error strings): glibc's fork() takes
//! every malloc arena lock before forking and releases them in the child, so malloc is
//! usable after fork with glibc, which is what the agent is built with (static glibc).
//! Everything that needs parsing or validating is done in the agent beforehand (the
//! plans); the child runs system calls in order. The container process is made with a
//! raw `clone` syscall from single-threaded stage 1, like runc's nsexec does.

use std::convert::Infallible;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::Duration;

use nix::errno::Errno;
use nix::sched::CloneFlags;
use nix::unistd::{ForkResult, Pid, fork};

use crate::error::{Error, Result, SysContext};
use crate::namespaces::NamespaceFd;
use crate::process::ProcessPlan;
use crate::rootfs::RootfsPlan;
use crate::seccomp::BpfProgram;
use crate::sync::{Channel, Msg};
use crate::timing::{ChildMarks, ChildStep};

/// How long the agent waits for a container process to finish its setup. Only a stuck
/// child hits it (a dead one closes the channel at once), and the host's RPC deadline
/// bounds the call anyway; so it is generous: eight guests sharing two emulated cores
/// took over 60 s for a plain set-up.
pub(crate) const SETUP_TIMEOUT: Duration = Duration::from_secs(300);

/// The standard streams of a container process.
#[derive(Debug)]
pub enum Stdio {
    /// Three fds for stdin, stdout, stderr (the same fd may be passed more than once),
    /// created by the caller (pipes, a stream); the library installs them as fds 0-2.
    Fds {
        stdin: OwnedFd,
        stdout: OwnedFd,
        stderr: OwnedFd,
    },
    /// A new pty from the container's own devpts, as runc makes one: the process opens
    /// the container's `/dev/ptmx` (the init once it is in its root, before the root is
    /// made read-only; an exec'd process in the joined mount namespace), makes the slave
    /// its fds 0-2 and controlling terminal (the init also binds it at `/dev/console`)
    /// and hands the master to the caller: see [`crate::Container::take_terminal`] and
    /// [`crate::ProcessHandle::take_terminal`]. So `tty` names `/dev/pts/N` of the
    /// container, and the container needs a devpts at `/dev/pts` (OCI's default mounts).
    Terminal,
}

impl Stdio {
    fn raw(&self) -> Vec<RawFd> {
        match self {
            Stdio::Fds {
                stdin,
                stdout,
                stderr,
            } => vec![stdin.as_raw_fd(), stdout.as_raw_fd(), stderr.as_raw_fd()],
            Stdio::Terminal => Vec::new(),
        }
    }
}

/// Everything the child needs, prepared by the agent.
pub(crate) struct ChildPlan<'a> {
    /// Existing namespaces, joined by stage 1 in order.
    pub join: &'a [NamespaceFd],
    /// New namespaces for the container process (clone flags).
    pub new_namespaces: CloneFlags,
    /// Unshare a cgroup namespace once in the cgroup.
    pub new_cgroup_ns: bool,
    pub hostname: Option<&'a str>,
    pub domainname: Option<&'a str>,
    /// The rootfs to set up (init only).
    pub rootfs: Option<&'a RootfsPlan>,
    pub process: &'a ProcessPlan,
    pub stdio: &'a Stdio,
    pub seccomp: Option<&'a BpfProgram>,
    /// Init: report Ready and wait for Start before execve.
    pub hold: bool,
}

/// Agent side: forks stage 1, which clones the container process, and returns that
/// process's pid. Meant to run inside the caller's spawner (e.g. `Reaper::start_child`).
/// `child_end` is consumed: the agent must not keep it, or it would never see EOF.
pub(crate) fn spawn(plan: &ChildPlan<'_>, parent: &Channel, child_end: Channel) -> Result<Pid> {
    // SAFETY: the child runs only `stage1`, which follows the rules in the module doc,
    // and leaves through _exit.
    match unsafe { fork() }.sys(|| "fork".into())? {
        ForkResult::Child => {
            // SAFETY: closing our copy of the agent's end; nothing else uses it here.
            unsafe { libc::close(parent.raw()) };
            // A panic must not unwind into the agent's (or a test harness's) code in this
            // copy of the process: it ends the child instead.
            let result =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| stage1(plan, &child_end)));
            let code = match result {
                Ok(Ok(())) => 0,
                Ok(Err(e)) => {
                    let _ = child_end.send(&Msg::Fail(e.to_string()));
                    1
                }
                Err(_) => {
                    let _ = child_end.send(&Msg::Fail("container setup panicked".into()));
                    2
                }
            };
            // SAFETY: leaving the child without running the agent's destructors/atexit.
            unsafe { libc::_exit(code) }
        }
        ForkResult::Parent { .. } => {
            drop(child_end);
            match parent.recv(Some(SETUP_TIMEOUT))? {
                Some(Msg::Pid(pid)) if pid.as_raw() > 0 => Ok(pid),
                Some(Msg::Fail(why)) => Err(Error::Setup(why)),
                Some(other) => Err(Error::Setup(format!("unexpected {other:?} from stage 1"))),
                None => Err(Error::Setup("stage 1 exited without a pid".into())),
            }
        }
    }
}

/// Resets signal dispositions and the mask inherited from the agent (Rust ignores
/// SIGPIPE; tokio installs handlers; the caller may have blocked signals).
fn reset_signals() {
    for sig in 1..=libc::SIGRTMAX() {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        // SAFETY: restoring default dispositions; invalid numbers just fail.
        unsafe { libc::signal(sig, libc::SIG_DFL) };
    }
    // SAFETY: empty set, valid pointers.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
    }
}

/// Closes every fd from 3 up except `keep`: the agent's sockets, other containers'
/// pipes and anything another thread opened without O_CLOEXEC must not leak in.
fn close_fds_except(keep: &mut [RawFd]) {
    keep.sort_unstable();
    let mut low: u32 = 3;
    for &fd in keep.iter() {
        let Ok(fd) = u32::try_from(fd) else { continue };
        if fd < low {
            continue;
        }
        if fd > low {
            // SAFETY: closing fds this process does not use.
            unsafe { libc::syscall(libc::SYS_close_range, low, fd - 1, 0) };
        }
        low = fd + 1;
    }
    // SAFETY: as above.
    unsafe { libc::syscall(libc::SYS_close_range, low, u32::MAX, 0) };
}

fn stage1(plan: &ChildPlan<'_>, chan: &Channel) -> Result<()> {
    reset_signals();
    let mut keep: Vec<RawFd> = vec![chan.raw()];
    keep.extend(plan.stdio.raw());
    keep.extend(plan.join.iter().map(|ns| ns.fd.as_raw_fd()));
    close_fds_except(&mut keep);
    for ns in plan.join {
        ns.join()?;
    }
    // unshare here rather than clone flags: stage 1 then owns the new namespaces and the
    // clone below only needs CLONE_PARENT (the pairing runc's nsexec relies on).
    if !plan.new_namespaces.is_empty() {
        nix::sched::unshare(plan.new_namespaces)
            .sys(|| format!("unshare {:?}", plan.new_namespaces))?;
    }
    let flags = libc::CLONE_PARENT as libc::c_ulong | libc::SIGCHLD as libc::c_ulong;
    // SAFETY: fork-like clone (no CLONE_VM, no new stack): the child continues here on a
    // copy of this single-threaded process.
    let rc = unsafe { libc::syscall(libc::SYS_clone, flags, 0usize, 0usize, 0usize, 0usize) };
    match rc {
        0 => {
            let err = match container_process(plan, chan) {
                Err(e) => e,
                Ok(never) => match never {},
            };
            let _ = chan.send(&Msg::Fail(err.to_string()));
            // SAFETY: leaving the child.
            unsafe { libc::_exit(1) }
        }
        pid if pid > 0 => chan.send(&Msg::Pid(Pid::from_raw(pid as i32))),
        _ => Err(Error::Sys {
            what: "clone of the container process".into(),
            source: Errno::last(),
        }),
    }
}

/// Installs the caller's fds as fds 0-2 (nothing for a terminal: see
/// [`open_container_terminal`]).
fn install_stdio(stdio: &Stdio) -> Result<()> {
    let src = stdio.raw();
    if src.is_empty() {
        return Ok(());
    }
    // Copy above 2 first: a source may itself be 0-2 and be overwritten by an earlier dup2.
    let mut copies = [0; 3];
    for (i, fd) in src.iter().enumerate() {
        // SAFETY: plain fcntl.
        copies[i] = Errno::result(unsafe { libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 3) })
            .sys(|| format!("duplicating stdio fd {fd}"))?;
    }
    for (i, fd) in copies.iter().enumerate() {
        // SAFETY: plain dup2; the target loses O_CLOEXEC, as fds 0-2 should.
        Errno::result(unsafe { libc::dup2(*fd, i as RawFd) }).sys(|| format!("dup2 to fd {i}"))?;
        // SAFETY: the copy is no longer needed.
        unsafe { libc::close(*fd) };
    }
    Ok(())
}

/// Opens a pty from the devpts behind `/dev/ptmx` of the root this process is in (the
/// container's), makes its slave fds 0-2 and the controlling terminal, with `console`
/// binds it at `/dev/console`, and returns the master (close-on-exec).
fn open_container_terminal(console: bool) -> Result<OwnedFd> {
    let master = nix::fcntl::open(
        "/dev/ptmx",
        nix::fcntl::OFlag::O_RDWR | nix::fcntl::OFlag::O_NOCTTY | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .sys(|| "opening the container's /dev/ptmx (a terminal needs a devpts at /dev/pts)".into())?;
    let m = master.as_raw_fd();
    let unlock: libc::c_int = 0;
    // SAFETY: TIOCSPTLCK reads one int from a valid pointer (unlockpt).
    Errno::result(unsafe { libc::ioctl(m, libc::TIOCSPTLCK, &unlock) })
        .sys(|| "unlocking the pty".into())?;
    let mut number: libc::c_uint = 0;
    // SAFETY: TIOCGPTN writes one unsigned int to a valid pointer (ptsname).
    Errno::result(unsafe { libc::ioctl(m, libc::TIOCGPTN, &mut number) })
        .sys(|| "reading the pty's number".into())?;
    // The slave through the master (no path lookup that could land elsewhere).
    // SAFETY: TIOCGPTPEER returns a new fd we own.
    let slave =
        Errno::result(unsafe { libc::ioctl(m, libc::TIOCGPTPEER, libc::O_RDWR | libc::O_NOCTTY) })
            .sys(|| "opening the pty's slave".into())?;
    for target in 0..3 {
        // SAFETY: plain dup2; the targets lose O_CLOEXEC, as fds 0-2 should.
        Errno::result(unsafe { libc::dup2(slave, target) })
            .sys(|| format!("dup2 of the pty's slave to fd {target}"))?;
    }
    if slave > 2 {
        // SAFETY: our own copy, now duplicated to 0-2.
        unsafe { libc::close(slave) };
    }
    // SAFETY: TIOCSCTTY on fd 0 with arg 0 (do not steal); we lead a session of our own.
    Errno::result(unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) })
        .sys(|| "making the pty the controlling terminal".into())?;
    if console {
        crate::rootfs::bind_console(&format!("/dev/pts/{number}"))?;
    }
    Ok(master)
}

fn set_hostnames(plan: &ChildPlan<'_>) -> Result<()> {
    if let Some(h) = plan.hostname {
        nix::unistd::sethostname(h).sys(|| format!("sethostname {h:?}"))?;
    }
    if let Some(d) = plan.domainname {
        // SAFETY: pointer and length describe `d`.
        Errno::result(unsafe { libc::setdomainname(d.as_ptr().cast(), d.len()) })
            .sys(|| format!("setdomainname {d:?}"))?;
    }
    Ok(())
}

/// The container process (init or exec'd) up to execve. Returns only on failure.
fn container_process(plan: &ChildPlan<'_>, chan: &Channel) -> Result<Infallible> {
    match chan.recv(None)? {
        Some(Msg::Go) => {}
        None => return Err(Error::Setup("the agent went away before Go".into())),
        Some(other) => return Err(Error::Setup(format!("expected Go, got {other:?}"))),
    }
    let mut marks = ChildMarks::default();
    if plan.new_namespaces.contains(CloneFlags::CLONE_NEWUSER) {
        // Our ids are still the agent's (host root, unmapped in the new namespace):
        // become the namespace's root now that the agent has written the maps.
        // SAFETY: plain syscalls.
        Errno::result(unsafe { libc::setresgid(0, 0, 0) })
            .sys(|| "setresgid(0) in the user namespace (is 0 mapped?)".into())?;
        Errno::result(unsafe { libc::setresuid(0, 0, 0) })
            .sys(|| "setresuid(0) in the user namespace (is 0 mapped?)".into())?;
    }
    if plan.new_cgroup_ns {
        nix::sched::unshare(CloneFlags::CLONE_NEWCGROUP)
            .sys(|| "unshare cgroup namespace".into())?;
    }
    let terminal = matches!(plan.stdio, Stdio::Terminal);
    // A session of its own (the init always; exec'd processes when they get a terminal),
    // so the terminal can become controlling and signals to the agent's group miss it.
    if plan.rootfs.is_some() || terminal {
        nix::unistd::setsid().sys(|| "setsid".into())?;
    }
    marks.mark(ChildStep::Namespaces);
    install_stdio(plan.stdio)?;
    set_hostnames(plan)?;
    marks.mark(ChildStep::Stdio);
    if let Some(rootfs) = plan.rootfs {
        // umask 0 so device nodes and mount points get exactly the modes asked for.
        // SAFETY: plain syscall.
        let old = unsafe { libc::umask(0) };
        rootfs.prepare()?;
        marks.mark(ChildStep::Mounts);
        rootfs.enter()?;
        marks.mark(ChildStep::PivotRoot);
        // In the container's root, before `finish` may make it read-only (as runc).
        if terminal {
            chan.send(&Msg::Terminal(open_container_terminal(true)?))?;
        }
        rootfs.finish()?;
        marks.mark(ChildStep::RootfsFinish);
        // SAFETY: plain syscall.
        unsafe { libc::umask(old) };
    } else if terminal {
        // An exec'd process: the joined mount namespace's root is the container's.
        chan.send(&Msg::Terminal(open_container_terminal(false)?))?;
    }
    let process = plan.process;
    process.apply_limits()?;
    let program = process.find_program()?;
    marks.mark(ChildStep::Limits);
    // Without no_new_privs, installing a filter needs CAP_SYS_ADMIN, which set_identity
    // usually drops: then install it now (as runc does), and the profile must allow the
    // few calls that follow. With no_new_privs, as late as possible (below).
    let early_seccomp = !process.no_new_privileges;
    // An exec'd process reports its steps before its execve closes the channel, and before
    // any filter of the container's could forbid the send.
    let mut reported = false;
    if early_seccomp && let Some(prog) = plan.seccomp {
        if !plan.hold {
            chan.send(&Msg::Marks(marks))?;
            reported = true;
        }
        crate::seccomp::install(prog).map_err(|e| Error::Seccomp(e.to_string()))?;
    }
    process.set_identity()?;
    process.finish()?;
    marks.mark(ChildStep::Identity);
    if plan.hold {
        chan.send(&Msg::Ready(marks))?;
        match chan.recv(None)? {
            Some(Msg::Start) => {}
            // Deleted before start (or the agent died): leave quietly.
            // SAFETY: leaving the child.
            None => unsafe { libc::_exit(0) },
            Some(other) => return Err(Error::Setup(format!("expected Start, got {other:?}"))),
        }
    }
    if !plan.hold && !reported {
        chan.send(&Msg::Marks(marks))?;
    }
    // Last: the filter may forbid the calls above.
    if !early_seccomp && let Some(prog) = plan.seccomp {
        crate::seccomp::install(prog).map_err(|e| Error::Seccomp(e.to_string()))?;
    }
    Err(process.exec(&program))
}
