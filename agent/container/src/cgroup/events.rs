//! OOM-kill events of a cgroup, from `memory.events`.
//!
//! The kernel signals changes of `memory.events` as inotify IN_MODIFY events on the file, so a
//! watcher holds a non-blocking inotify fd: the agent's tokio loop waits for it to become
//! readable (`tokio::io::unix::AsyncFd`) and then calls [`OomWatcher::read_oom_kills`]. A
//! blocking [`OomWatcher::wait`] exists for threads. The counter is re-read on every wake-up,
//! so a missed or coalesced inotify event loses nothing.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::stats::parse_flat;
use super::{CgroupError, Result};

/// Watches one cgroup's `memory.events` for increases of `oom_kill`.
#[derive(Debug)]
pub struct OomWatcher {
    fd: OwnedFd,
    events: PathBuf,
    last_oom_kill: u64,
}

impl OomWatcher {
    /// Starts watching `<cgroup_dir>/memory.events`; kills before this call are not reported.
    pub fn new(cgroup_dir: &Path) -> Result<OomWatcher> {
        let events = cgroup_dir.join("memory.events");
        let err = |source| CgroupError::Watch {
            path: events.clone(),
            source,
        };
        if !events.exists() {
            return Err(CgroupError::ControllerMissing {
                controller: "memory".to_string(),
                setting: "OOM events".to_string(),
                path: cgroup_dir.to_path_buf(),
            });
        }
        // SAFETY: plain syscall; the fd is owned right after.
        let raw = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if raw < 0 {
            return Err(err(io::Error::last_os_error()));
        }
        // SAFETY: raw is a fresh fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let cpath = std::ffi::CString::new(events.as_os_str().as_encoded_bytes())
            .map_err(|_| err(io::Error::from(io::ErrorKind::InvalidInput)))?;
        // SAFETY: valid fd and NUL-terminated path.
        let wd = unsafe { libc::inotify_add_watch(raw, cpath.as_ptr(), libc::IN_MODIFY) };
        if wd < 0 {
            return Err(err(io::Error::last_os_error()));
        }
        let mut w = OomWatcher {
            fd,
            events,
            last_oom_kill: 0,
        };
        w.last_oom_kill = w.current_oom_kill()?.unwrap_or(0);
        Ok(w)
    }

    /// The `oom_kill` counter; `None` if the file has no such line (never for a kernel file,
    /// but a reader must not mistake a half-written test file for a reset counter).
    fn current_oom_kill(&self) -> Result<Option<u64>> {
        let text = super::read(&self.events)?;
        Ok(parse_flat(&text).get("oom_kill").copied())
    }

    /// Drains pending inotify events and returns how many OOM kills happened since the last
    /// call (0 if none). Never blocks. An `Err` whose source is NotFound means the cgroup is
    /// gone.
    pub fn read_oom_kills(&mut self) -> Result<u64> {
        let mut buf = [0u8; 4096];
        loop {
            // SAFETY: reading into a local buffer of the given length.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                break;
            }
        }
        let Some(now) = self.current_oom_kill()? else {
            return Ok(0);
        };
        // The counter only grows; a smaller value means a new cgroup at the same path.
        let new = now.saturating_sub(self.last_oom_kill);
        self.last_oom_kill = now;
        Ok(new)
    }

    /// Blocks until at least one OOM kill happened (returns how many) or `timeout` passed
    /// (returns 0). `None` waits forever.
    pub fn wait(&mut self, timeout: Option<Duration>) -> Result<u64> {
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        loop {
            let n = self.read_oom_kills()?;
            if n > 0 {
                return Ok(n);
            }
            let ms = match deadline {
                None => -1,
                Some(d) => {
                    let left = d.saturating_duration_since(std::time::Instant::now());
                    if left.is_zero() {
                        return Ok(0);
                    }
                    i32::try_from(left.as_millis().max(1)).unwrap_or(i32::MAX)
                }
            };
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let r = unsafe { libc::poll(&mut pfd, 1, ms) };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(CgroupError::Watch {
                        path: self.events.clone(),
                        source: e,
                    });
                }
            }
        }
    }

    /// The `memory.events` file watched.
    pub fn events_path(&self) -> &Path {
        &self.events
    }
}

impl AsFd for OomWatcher {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for OomWatcher {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}
