//! Terminals: a host pty pair for a container with `process.terminal`, and handing its
//! master to the caller over `--console-socket` (SCM_RIGHTS), as runc does. The message
//! carries the pty's name as data, like runc's `utils.SendRawFd`.

use std::io::IoSlice;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use nix::pty::{OpenptyResult, openpty};
use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
use nix::sys::termios::{SetArg, cfmakeraw, tcgetattr, tcsetattr};

#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("opening a pty: {0}")]
    Openpty(#[source] nix::Error),
    #[error("setting the pty to raw mode: {0}")]
    Raw(#[source] nix::Error),
    #[error("connecting to console socket {path}: {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("sending the pty master over console socket {path}: {source}")]
    Send {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
}

/// A host pty pair: the master goes to the caller, the monitor relays the slave.
pub struct Pty {
    pub master: OwnedFd,
    pub slave: OwnedFd,
    pub name: String,
}

/// Opens a pty pair; the slave is put in raw mode because the guest's own pty does the
/// line discipline (echo, ^C): doing it twice would echo every key twice.
pub fn open_pty() -> Result<Pty, ConsoleError> {
    let OpenptyResult { master, slave } = openpty(None, None).map_err(ConsoleError::Openpty)?;
    let name = std::fs::read_link(format!("/proc/self/fd/{}", slave.as_raw_fd()))
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "/dev/pts/?".into());
    let mut t = tcgetattr(&slave).map_err(ConsoleError::Raw)?;
    cfmakeraw(&mut t);
    tcsetattr(&slave, SetArg::TCSANOW, &t).map_err(ConsoleError::Raw)?;
    Ok(Pty {
        master,
        slave,
        name,
    })
}

/// Sends `fd` with `name` as the message data over the Unix socket at `socket`.
pub fn send_fd(socket: &Path, name: &str, fd: &OwnedFd) -> Result<(), ConsoleError> {
    let stream = UnixStream::connect(socket).map_err(|source| ConsoleError::Connect {
        path: socket.to_path_buf(),
        source,
    })?;
    let fds = [fd.as_raw_fd()];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    let iov = [IoSlice::new(name.as_bytes())];
    sendmsg::<()>(stream.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None).map_err(|source| {
        ConsoleError::Send {
            path: socket.to_path_buf(),
            source,
        }
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{ControlMessageOwned, recvmsg};
    use std::io::{IoSliceMut, Read, Write};
    use std::os::fd::FromRawFd;
    use std::os::unix::net::UnixListener;

    #[test]
    fn master_travels_over_the_socket_and_works() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let pty = open_pty().unwrap();
        assert!(pty.name.starts_with("/dev/pts/"), "{}", pty.name);
        send_fd(&path, &pty.name, &pty.master).unwrap();

        let (conn, _) = listener.accept().unwrap();
        let mut buf = [0u8; 64];
        let mut iov = [IoSliceMut::new(&mut buf)];
        let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
        let msg = recvmsg::<()>(
            conn.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::empty(),
        )
        .unwrap();
        let mut received = None;
        for c in msg.cmsgs().unwrap() {
            if let ControlMessageOwned::ScmRights(fds) = c {
                received = fds.first().copied();
            }
        }
        let n = msg.bytes;
        assert_eq!(std::str::from_utf8(&buf[..n]).unwrap(), pty.name);
        let fd = received.expect("an fd arrived");
        // SAFETY: the fd was just received and is owned by nobody else.
        let mut master = unsafe { std::fs::File::from_raw_fd(fd) };
        master.write_all(b"hi").unwrap();
        let mut slave = std::fs::File::from(pty.slave);
        let mut got = [0u8; 2];
        slave.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hi", "raw mode passes bytes unchanged");
    }
}
