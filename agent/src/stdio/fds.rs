//! The file descriptors behind the streams: pipes, ptys, /dev/null, and the few raw
//! syscalls the pumps need (splice, poll, shutdown).

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::Arc;

use nix::fcntl::{FcntlArg, OFlag, fcntl};
use tokio::io::unix::AsyncFd;

/// Pipe capacity asked for (best effort). Bigger than Linux's 64 KiB default so that fewer
/// wake-ups move the same bytes and more output waits for a late attach without blocking
/// the process. The pages are only allocated while data sits in the pipe.
pub const PIPE_SIZE: i32 = 1 << 20;

/// A pipe: `(read end, write end)`, both close-on-exec. The agent's end is made
/// non-blocking by [`set_nonblocking`]; the process's end stays blocking (O_NONBLOCK is
/// per open file description, so the two ends are independent).
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    // Best effort: EPERM past /proc/sys/fs/pipe-max-size or the user's pipe quota.
    let _ = fcntl(&r, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE));
    Ok((r, w))
}

pub fn set_nonblocking(fd: &impl AsFd) -> io::Result<()> {
    let flags = OFlag::from_bits_retain(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

/// /dev/null for reading (stdin) or writing (stdout, stderr), close-on-exec.
pub fn dev_null(write: bool) -> io::Result<OwnedFd> {
    let file = File::options()
        .read(!write)
        .write(write)
        .open("/dev/null")?;
    Ok(file.into())
}

/// A new pty: `(master, slave)`, both close-on-exec, the master non-blocking (tests stand
/// in for a container process that opened one).
#[cfg(test)]
pub fn pty() -> io::Result<(OwnedFd, OwnedFd)> {
    let pty = nix::pty::openpty(None, None)?;
    for fd in [&pty.master, &pty.slave] {
        fcntl(fd, FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC))?;
    }
    set_nonblocking(&pty.master)?;
    Ok((pty.master, pty.slave))
}

/// Sets the window size of the pty whose master is `master`; the kernel sends SIGWINCH
/// to the terminal's foreground process group.
pub fn set_window_size(master: &impl AsFd, rows: u16, cols: u16) -> io::Result<()> {
    let size = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from a pointer that is valid for the call.
    let rc = unsafe { libc::ioctl(master.as_fd().as_raw_fd(), libc::TIOCSWINSZ, &size) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Writes the terminal's end-of-file character (VEOF, normally ^D) into the pty's input:
/// in canonical mode a reader at the start of a line then reads end-of-file.
pub fn send_terminal_eof(master: &impl AsFd) -> io::Result<()> {
    let termios = nix::sys::termios::tcgetattr(master)?;
    let eof = termios.control_chars[nix::sys::termios::SpecialCharacterIndices::VEOF as usize];
    let n = nix::unistd::write(master, &[eof])?;
    if n != 1 {
        return Err(io::Error::new(
            io::ErrorKind::WouldBlock,
            "the terminal's input buffer is full",
        ));
    }
    Ok(())
}

/// An fd shared with the registry (the pty master, which `resize` needs while a
/// connection pumps it).
#[derive(Clone)]
pub struct SharedFd(pub Arc<OwnedFd>);

impl AsRawFd for SharedFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl AsFd for SharedFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

/// Fd holders whose `as_raw_fd` names the same open fd for as long as they live.
pub trait StableFd: AsRawFd + AsFd {}
impl StableFd for OwnedFd {}
impl StableFd for SharedFd {}

/// Registers `fd` with the runtime's reactor (inside the runtime only).
pub fn register<T: StableFd>(fd: T) -> io::Result<AsyncFd<T>> {
    // SAFETY: a `StableFd` owns (or shares ownership of) its fd, so the fd stays open and
    // the same until the AsyncFd is dropped.
    Ok(unsafe { AsyncFd::register(fd) }?)
}

/// One non-blocking `splice(2)` of up to `len` bytes from `src` to `dst` (one must be a
/// pipe). `WouldBlock` means `src` is empty or `dst` full: see [`ready_now`].
pub fn splice(src: BorrowedFd<'_>, dst: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
    let flags = libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE;
    // SAFETY: both fds are borrowed for the call; no offsets (null) for pipes and sockets.
    let n = unsafe {
        libc::splice(
            src.as_raw_fd(),
            std::ptr::null_mut(),
            dst.as_raw_fd(),
            std::ptr::null_mut(),
            len,
            flags,
        )
    };
    // A negative return is -1 with errno set; anything else is a byte count.
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// Whether `src` is readable (or at end-of-file) and `dst` writable right now, by a
/// zero-timeout poll. Tells which side made a splice return `WouldBlock`.
pub fn ready_now(src: BorrowedFd<'_>, dst: BorrowedFd<'_>) -> io::Result<(bool, bool)> {
    let mut fds = [
        libc::pollfd {
            fd: src.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: dst.as_raw_fd(),
            events: libc::POLLOUT,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: `fds` is a valid array of two pollfds for the duration of the call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, 0) };
        if rc >= 0 {
            break;
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
    // HUP/ERR count as ready: the next call reports end-of-file or the error.
    let any = libc::POLLHUP | libc::POLLERR | libc::POLLNVAL;
    Ok((
        fds[0].revents & (libc::POLLIN | any) != 0,
        fds[1].revents & (libc::POLLOUT | any) != 0,
    ))
}

pub fn read(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    Ok(nix::unistd::read(fd, buf)?)
}

pub fn write(fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
    Ok(nix::unistd::write(fd, buf)?)
}

/// Shuts down one or both directions of a socket. A peer that is already gone is not an
/// error worth reporting.
pub fn shutdown(socket: BorrowedFd<'_>, how: nix::sys::socket::Shutdown) {
    if let Err(e) = nix::sys::socket::shutdown(socket.as_raw_fd(), how)
        && e != nix::errno::Errno::ENOTCONN
    {
        tracing::debug!("stdio: shutdown({how:?}): {e}");
    }
}
