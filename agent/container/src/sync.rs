//! The agent <-> container-child channel: a SOCK_SEQPACKET socketpair (one datagram per
//! message, EOF when the other side is gone). The child's end is close-on-exec, so a
//! successful execve shows up in the agent as EOF. One message carries an fd
//! (SCM_RIGHTS): the master of the terminal the child opened in the container.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{
    AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, recvmsg,
    sendmsg, socketpair,
};
use nix::unistd::Pid;

use crate::error::{Error, Result, SysContext};
use crate::timing::ChildMarks;

/// Longest message (error texts are cut to fit).
const MAX_MSG: usize = 4096;

#[derive(Debug)]
pub enum Msg {
    /// Stage 1 -> agent: the container process's pid (in the agent's pid namespace).
    Pid(Pid),
    /// Child -> agent: set up, waiting for Start (init only), with its setup steps.
    Ready(ChildMarks),
    /// Child -> agent, right before its execve (exec'd processes): its setup steps.
    Marks(ChildMarks),
    /// Child -> agent: setup failed; the child exits after sending this.
    Fail(String),
    /// Agent -> child: id maps written and cgroup joined, go on.
    Go,
    /// Agent -> init: exec the user's program.
    Start,
    /// Child -> agent: the master of the pty whose slave became the child's stdio.
    Terminal(OwnedFd),
}

impl Msg {
    fn encode(&self) -> Vec<u8> {
        match self {
            Msg::Pid(pid) => {
                let mut v = vec![b'P'];
                v.extend_from_slice(&pid.as_raw().to_le_bytes());
                v
            }
            Msg::Ready(marks) => {
                let mut v = vec![b'R'];
                marks.encode(&mut v);
                v
            }
            Msg::Marks(marks) => {
                let mut v = vec![b'M'];
                marks.encode(&mut v);
                v
            }
            Msg::Go => vec![b'G'],
            Msg::Start => vec![b'S'],
            // The fd itself travels as SCM_RIGHTS.
            Msg::Terminal(_) => vec![b'T'],
            Msg::Fail(text) => {
                let mut v = vec![b'F'];
                let mut end = text.len().min(MAX_MSG - 1);
                while !text.is_char_boundary(end) {
                    end -= 1;
                }
                v.extend_from_slice(&text.as_bytes()[..end]);
                v
            }
        }
    }

    /// `fd`: the one fd that came with the datagram, if any; only `T` may carry one (any
    /// other is closed when dropped here).
    fn decode(buf: &[u8], fd: Option<OwnedFd>) -> Option<Msg> {
        let (&tag, rest) = buf.split_first()?;
        if tag == b'T' {
            return rest.is_empty().then_some(Msg::Terminal(fd?));
        }
        Some(match tag {
            b'P' => Msg::Pid(Pid::from_raw(i32::from_le_bytes(rest.try_into().ok()?))),
            b'R' => Msg::Ready(ChildMarks::decode(rest)?),
            b'M' => Msg::Marks(ChildMarks::decode(rest)?),
            b'G' if rest.is_empty() => Msg::Go,
            b'S' if rest.is_empty() => Msg::Start,
            b'F' => Msg::Fail(String::from_utf8_lossy(rest).into_owned()),
            _ => return None,
        })
    }
}

/// One end of the channel.
#[derive(Debug)]
pub struct Channel(OwnedFd);

/// (agent end, child end), both close-on-exec.
pub fn pair() -> Result<(Channel, Channel)> {
    let (a, b) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .sys(|| "creating the sync socketpair".into())?;
    Ok((Channel(a), Channel(b)))
}

impl Channel {
    pub fn send(&self, msg: &Msg) -> Result<()> {
        let buf = msg.encode();
        let iov = [IoSlice::new(&buf)];
        let fds: Vec<RawFd> = match msg {
            Msg::Terminal(fd) => vec![fd.as_raw_fd()],
            _ => Vec::new(),
        };
        let rights = [ControlMessage::ScmRights(&fds)];
        let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
        loop {
            match sendmsg::<()>(
                self.0.as_raw_fd(),
                &iov,
                cmsgs,
                MsgFlags::MSG_NOSIGNAL,
                None,
            ) {
                Ok(_) => return Ok(()),
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    return Err(Error::Sys {
                        what: format!("sending {msg:?} on the sync socket"),
                        source: e,
                    });
                }
            }
        }
    }

    /// Receives one message; None on EOF. `timeout` None waits forever.
    pub fn recv(&self, timeout: Option<Duration>) -> Result<Option<Msg>> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            if let Some(deadline) = deadline {
                let left = deadline.saturating_duration_since(Instant::now());
                let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
                let mut fds = [PollFd::new(self.0.as_fd(), PollFlags::POLLIN)];
                match poll(&mut fds, PollTimeout::from(ms)) {
                    Ok(0) if Instant::now() >= deadline => {
                        return Err(Error::Setup(
                            "the container process did not answer in time".into(),
                        ));
                    }
                    Ok(0) | Err(Errno::EINTR) => continue,
                    Ok(_) => {}
                    Err(e) => {
                        return Err(Error::Sys {
                            what: "poll on the sync socket".into(),
                            source: e,
                        });
                    }
                }
            }
            let mut buf = [0u8; MAX_MSG];
            match recv_with_fd(self.0.as_raw_fd(), &mut buf) {
                Ok((0, _)) => return Ok(None),
                Ok((n, fd)) => {
                    return Msg::decode(&buf[..n], fd).map(Some).ok_or_else(|| {
                        Error::Setup("malformed message on the sync socket".into())
                    });
                }
                Err(Errno::EINTR) => continue,
                // The peer went away with data unread on our side.
                Err(Errno::ECONNRESET) => return Ok(None),
                Err(e) => {
                    return Err(Error::Sys {
                        what: "receiving on the sync socket".into(),
                        source: e,
                    });
                }
            }
        }
    }

    pub fn raw(&self) -> i32 {
        self.0.as_raw_fd()
    }
}

/// One datagram and the first fd that came with it (close-on-exec); any further fds are
/// closed.
fn recv_with_fd(
    sock: RawFd,
    buf: &mut [u8],
) -> std::result::Result<(usize, Option<OwnedFd>), Errno> {
    let mut iov = [IoSliceMut::new(buf)];
    let mut space = nix::cmsg_space!([RawFd; 2]);
    let msg = recvmsg::<()>(sock, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)?;
    let mut fds: Vec<OwnedFd> = Vec::new();
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(raw) = cmsg {
            // SAFETY: the kernel just installed these fds in this process for us.
            fds.extend(
                raw.into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    Ok((msg.bytes, fds.into_iter().next()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_eof_is_none() {
        let (a, b) = pair().unwrap();
        for m in [
            Msg::Pid(Pid::from_raw(4242)),
            Msg::Ready(ChildMarks::default()),
            Msg::Marks({
                let mut m = ChildMarks::default();
                m.mark(crate::timing::ChildStep::Mounts);
                m
            }),
            Msg::Go,
            Msg::Start,
            Msg::Fail("x: y".into()),
        ] {
            a.send(&m).unwrap();
            let got = b.recv(Some(Duration::from_secs(1))).unwrap();
            assert_eq!(format!("{got:?}"), format!("{:?}", Some(m)));
        }
        assert!(
            b.recv(Some(Duration::from_millis(20))).is_err(),
            "timeout expected"
        );
        drop(a);
        assert!(b.recv(None).unwrap().is_none());
    }

    #[test]
    fn a_terminal_message_carries_its_fd() {
        let (a, b) = pair().unwrap();
        let (r, w) = nix::unistd::pipe().unwrap();
        a.send(&Msg::Terminal(w)).unwrap();
        let Some(Msg::Terminal(got)) = b.recv(Some(Duration::from_secs(1))).unwrap() else {
            panic!("expected a terminal message");
        };
        let flags = nix::fcntl::fcntl(&got, nix::fcntl::FcntlArg::F_GETFD).unwrap();
        assert_ne!(
            flags & libc::FD_CLOEXEC,
            0,
            "received fds are close-on-exec"
        );
        nix::unistd::write(&got, b"x").unwrap();
        let mut buf = [0u8; 1];
        assert_eq!(nix::unistd::read(&r, &mut buf).unwrap(), 1);
        assert_eq!(&buf, b"x");
    }
}
