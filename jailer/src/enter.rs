//! Entering the jail: new namespaces, a supervisor left outside them, and a root holding
//! only what the [`JailSpec`] names.

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, unshare};
use nix::sys::signal::{SigSet, SigmaskHow, Signal, kill};
use nix::sys::stat::{Mode, SFlag, mknod};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid, chdir, fork, pivot_root};

use crate::privileges;
use crate::spec::{Bind, BindKind, JailSpec};

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("{what}: {source}")]
    Sys {
        what: String,
        #[source]
        source: nix::Error,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the jail's supervisor ended before the VMM was confined")]
    SupervisorGone,
}

fn sys(what: impl Into<String>) -> impl FnOnce(nix::Error) -> JailError {
    let what = what.into();
    move |source| JailError::Sys { what, source }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> JailError {
    let what = what.into();
    move |source| JailError::Io { what, source }
}

/// The VMM inside its jail (PID 1 of its PID namespace, root still): it opens what the VM
/// needs, then calls [`Jailed::drop_privileges`] before starting any thread.
pub struct Jailed {
    spec: JailSpec,
    /// Read end of a pipe whose write end only the supervisor holds: it hangs up when the
    /// supervisor is gone.
    supervisor: OwnedFd,
}

impl Jailed {
    /// Gives up root for good (see [`privileges::drop_to`]). The parent-death signal, which
    /// a credential change clears, is armed again.
    pub fn drop_privileges(&self) -> std::io::Result<()> {
        privileges::drop_to(self.spec.uid, self.spec.gid, self.spec.max_open_files)?;
        arm_parent_death_signal(&self.supervisor).map_err(|e| std::io::Error::other(e.to_string()))
    }
}

/// Signals the supervisor passes on to the VMM; SIGCHLD tells it the VMM ended.
const RELAYED: [Signal; 4] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
];

/// Enters the jail. Returns in the jailed process only: the calling process stays outside
/// as the supervisor, relays [`RELAYED`] signals, and exits with the VMM's status (128+n
/// for a signal). `close_outside` are descriptors the supervisor must not keep open (the
/// result pipe, whose end-of-file tells the launcher the VMM is gone).
///
/// Must be called while the process has one thread.
pub fn enter(spec: &JailSpec, close_outside: &[RawFd]) -> Result<Jailed, JailError> {
    // A network namespace of its own although the VMM uses no network: abstract Unix
    // sockets are scoped by it, and a device worker may connect Unix sockets (vsock
    // connections to host ports), which would otherwise reach any host service listening
    // on one (CVE-2020-15257 was containerd's shim API reached that way). A pod's tap is
    // opened by a thread that enters the pod's namespace first (`Tap::open_in_netns`).
    unshare(
        CloneFlags::CLONE_NEWNS
            | CloneFlags::CLONE_NEWPID
            | CloneFlags::CLONE_NEWIPC
            | CloneFlags::CLONE_NEWUTS
            | CloneFlags::CLONE_NEWNET,
    )
    .map_err(sys("unshare(mount, PID, IPC, UTS, network namespaces)"))?;
    let (alive_r, alive_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(sys("pipe2"))?;
    let mut handled = SigSet::empty();
    for s in RELAYED {
        handled.add(s);
    }
    handled.add(Signal::SIGCHLD);
    // Blocked before the fork, so that none arriving in between is lost.
    let previous = handled
        .thread_swap_mask(SigmaskHow::SIG_BLOCK)
        .map_err(sys("blocking signals"))?;
    // SAFETY: the process is single-threaded (the caller's contract), so the child may
    // run any code.
    match unsafe { fork() }.map_err(sys("fork into the PID namespace"))? {
        ForkResult::Parent { child } => {
            drop(alive_r);
            for fd in close_outside {
                // SAFETY: closing a descriptor the caller named as the supervisor's to drop.
                unsafe { libc::close(*fd) };
            }
            supervise(child, &handled, alive_w)
        }
        ForkResult::Child => {
            drop(alive_w);
            previous
                .thread_set_mask()
                .map_err(sys("restoring the signal mask"))?;
            arm_parent_death_signal(&alive_r)?;
            build_root(spec)?;
            Ok(Jailed {
                spec: spec.clone(),
                supervisor: alive_r,
            })
        }
    }
}

/// The supervisor: waits for the VMM, relaying signals to it, and exits as it did.
fn supervise(child: Pid, handled: &SigSet, _alive: OwnedFd) -> ! {
    loop {
        match handled.wait() {
            Ok(Signal::SIGCHLD) => match waitpid(child, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(_, code)) => std::process::exit(code),
                Ok(WaitStatus::Signaled(_, s, _)) => std::process::exit(128 + s as i32),
                Ok(_) => {}
                Err(_) => std::process::exit(1),
            },
            Ok(s) => {
                let _ = kill(child, s);
            }
            Err(_) => {}
        }
    }
}

/// SIGKILL when the supervisor dies; if it already has, stop here.
fn arm_parent_death_signal(supervisor: &OwnedFd) -> Result<(), JailError> {
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) } != 0 {
        return Err(JailError::Io {
            what: "prctl(PR_SET_PDEATHSIG)".into(),
            source: std::io::Error::last_os_error(),
        });
    }
    let mut fds = [nix::poll::PollFd::new(
        supervisor.as_fd(),
        nix::poll::PollFlags::POLLIN,
    )];
    match nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO) {
        Ok(0) => Ok(()),
        Ok(_) => Err(JailError::SupervisorGone),
        Err(e) => Err(sys("poll on the supervisor's pipe")(e)),
    }
}

/// Mounts the jail's tmpfs, binds and device nodes, and makes it the root.
fn build_root(spec: &JailSpec) -> Result<(), JailError> {
    // Nothing below may propagate back to the host.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(sys("making / private"))?;
    mount(
        Some("husk-jail"),
        &spec.root,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("mode=0755,size=64k,nr_inodes=256"),
    )
    .map_err(sys(format!(
        "mounting the jail's tmpfs on {}",
        spec.root.display()
    )))?;
    for b in &spec.binds {
        bind(spec, b)?;
    }
    for dev in &spec.devices {
        device_node(spec, dev)?;
    }
    chdir(&spec.root).map_err(sys("entering the jail folder"))?;
    // The old root is stacked on top of the new one, then detached.
    pivot_root(".", ".").map_err(sys("pivot_root into the jail"))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(sys("detaching the host's root"))?;
    chdir("/").map_err(sys("chdir /"))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(sys("making the jail's root read-only"))?;
    Ok(())
}

/// Creates the folders leading to `target` on the jail's tmpfs.
fn parents(target: &Path) -> Result<(), JailError> {
    if let Some(parent) = target.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)
            .map_err(io(format!("creating {} in the jail", parent.display())))?;
    }
    Ok(())
}

fn bind(spec: &JailSpec, b: &Bind) -> Result<(), JailError> {
    let meta = std::fs::metadata(&b.path).map_err(io(format!("{}", b.path.display())))?;
    let target = spec.inside(&b.path);
    parents(&target)?;
    // Inside a folder bound earlier, the target is the host's own file: nothing to create.
    if std::fs::symlink_metadata(&target).is_err() {
        if meta.is_dir() {
            std::fs::DirBuilder::new()
                .mode(0o755)
                .create(&target)
                .map_err(io(format!("creating {} in the jail", target.display())))?;
        } else {
            File::options()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&target)
                .map_err(io(format!("creating {} in the jail", target.display())))?;
        }
    }
    // Not recursive: mounts below a bound folder (a container's shared rootfs) stay out.
    mount(
        Some(&b.path),
        &target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(sys(format!("binding {} into the jail", b.path.display())))?;
    let mut flags = MsFlags::MS_BIND
        | MsFlags::MS_REMOUNT
        | MsFlags::MS_NOSUID
        | MsFlags::MS_NODEV
        | MsFlags::MS_NOEXEC;
    if b.kind == BindKind::ReadOnly {
        flags |= MsFlags::MS_RDONLY;
    }
    mount(None::<&str>, &target, None::<&str>, flags, None::<&str>)
        .map_err(sys(format!("restricting {} in the jail", b.path.display())))?;
    Ok(())
}

fn device_node(spec: &JailSpec, dev: &Path) -> Result<(), JailError> {
    let st = nix::sys::stat::stat(dev).map_err(sys(format!("{}", dev.display())))?;
    if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFCHR {
        return Err(JailError::Io {
            what: format!("{}", dev.display()),
            source: std::io::Error::other("not a character device"),
        });
    }
    let target = spec.inside(dev);
    parents(&target)?;
    mknod(
        &target,
        SFlag::S_IFCHR,
        Mode::from_bits_truncate(0o600),
        st.st_rdev,
    )
    .map_err(sys(format!("creating {} in the jail", dev.display())))
}
