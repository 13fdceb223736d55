//! The agent <-> container-child channel: a SOCK_SEQPACKET socketpair (one datagram per
//! message, EOF when the other side is gone). The child's end is close-on-exec, so a
//! successful execve shows up in the agent as EOF.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{AddressFamily, MsgFlags, SockFlag, SockType, recv, send, socketpair};
use nix::unistd::Pid;

use crate::error::{Error, Result, SysContext};

/// Longest message (error texts are cut to fit).
const MAX_MSG: usize = 4096;

#[derive(Debug, PartialEq, Eq)]
pub enum Msg {
    /// Stage 1 -> agent: the container process's pid (in the agent's pid namespace).
    Pid(Pid),
    /// Child -> agent: set up, waiting for Start (init only).
    Ready,
    /// Child -> agent: setup failed; the child exits after sending this.
    Fail(String),
    /// Agent -> child: id maps written and cgroup joined, go on.
    Go,
    /// Agent -> init: exec the user's program.
    Start,
}

impl Msg {
    fn encode(&self) -> Vec<u8> {
        match self {
            Msg::Pid(pid) => {
                let mut v = vec![b'P'];
                v.extend_from_slice(&pid.as_raw().to_le_bytes());
                v
            }
            Msg::Ready => vec![b'R'],
            Msg::Go => vec![b'G'],
            Msg::Start => vec![b'S'],
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

    fn decode(buf: &[u8]) -> Option<Msg> {
        let (&tag, rest) = buf.split_first()?;
        Some(match tag {
            b'P' => Msg::Pid(Pid::from_raw(i32::from_le_bytes(rest.try_into().ok()?))),
            b'R' if rest.is_empty() => Msg::Ready,
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
        loop {
            match send(self.0.as_raw_fd(), &buf, MsgFlags::MSG_NOSIGNAL) {
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
            match recv(self.0.as_raw_fd(), &mut buf, MsgFlags::empty()) {
                Ok(0) => return Ok(None),
                Ok(n) => {
                    return Msg::decode(&buf[..n]).map(Some).ok_or_else(|| {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_eof_is_none() {
        let (a, b) = pair().unwrap();
        for m in [
            Msg::Pid(Pid::from_raw(4242)),
            Msg::Ready,
            Msg::Go,
            Msg::Start,
            Msg::Fail("x: y".into()),
        ] {
            a.send(&m).unwrap();
            assert_eq!(b.recv(Some(Duration::from_secs(1))).unwrap(), Some(m));
        }
        assert!(
            b.recv(Some(Duration::from_millis(20))).is_err(),
            "timeout expected"
        );
        drop(a);
        assert_eq!(b.recv(None).unwrap(), None);
    }
}
