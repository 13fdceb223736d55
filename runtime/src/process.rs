//! Host processes recorded in the state (the monitor, virtiofsd), identified by pid plus
//! start time so that a recycled pid is never mistaken for them.

use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

/// A process as recorded when it started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessIdentity {
    pub pid: i32,
    /// Field 22 of /proc/<pid>/stat: clock ticks after boot.
    pub start_time: u64,
}

/// What /proc says about a pid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    pub state: char,
    pub start_time: u64,
}

/// Parses the text of /proc/<pid>/stat. The command name (field 2) may hold spaces and
/// parentheses, so fields are counted from the last ')'.
pub fn parse_stat(text: &str) -> Option<ProcStat> {
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); starttime is field 22.
    let state = fields.first()?.chars().next()?;
    let start_time = fields.get(22 - 3)?.parse().ok()?;
    Some(ProcStat { state, start_time })
}

/// /proc/<pid>/stat of a live pid, None if there is no such process.
pub fn stat(pid: i32) -> Option<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

impl ProcessIdentity {
    /// The identity of a running process.
    pub fn of(pid: i32) -> Option<Self> {
        stat(pid).map(|s| Self {
            pid,
            start_time: s.start_time,
        })
    }

    /// The calling process.
    pub fn current() -> Option<Self> {
        Self::of(std::process::id() as i32)
    }

    /// Whether this very process still runs (a zombie counts as gone: it has exited, only its
    /// parent has not collected it yet).
    pub fn is_alive(&self) -> bool {
        matches!(stat(self.pid), Some(s) if s.start_time == self.start_time && s.state != 'Z')
    }

    /// Sends `signal` if the process is still this one. Returns whether it was sent.
    pub fn signal(&self, signal: Signal) -> bool {
        self.is_alive() && kill(Pid::from_raw(self.pid), signal).is_ok()
    }

    /// Polls until the process is gone or `timeout` passes; returns whether it is gone.
    pub fn wait_gone(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if !self.is_alive() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL, then waits (bounded) for the process to disappear.
    pub fn kill_and_wait(&self, timeout: Duration) -> bool {
        self.signal(Signal::SIGKILL);
        self.wait_gone(timeout)
    }
}

/// Resolves when child `pid` of this process has exited, with how it ended, without reaping
/// it (its `std::process::Child` still collects the status, so the pid cannot be reused
/// meanwhile). A pidfd becomes readable when the process ends; `waitid(WNOWAIT)` then
/// reads the status and leaves the zombie.
pub async fn child_exited(pid: i32) -> std::io::Result<String> {
    use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid};
    use std::os::fd::{AsFd, FromRawFd, OwnedFd};

    // SAFETY: pidfd_open(2) takes a pid and flags and returns a new fd or -1.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the fd was just returned to us and is owned by nothing else.
    let pidfd = unsafe { OwnedFd::from_raw_fd(raw as i32) };
    // SAFETY: the AsyncFd owns the OwnedFd, which stays open and the same until it drops.
    let watched = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE)
    }
    .map_err(std::io::Error::from)?;
    let _ready = watched.readable().await?;
    let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT | WaitPidFlag::WNOHANG;
    Ok(match waitid(Id::PIDFd(watched.get_ref().as_fd()), flags) {
        Ok(WaitStatus::Exited(_, code)) => format!("exited with status {code}"),
        Ok(WaitStatus::Signaled(_, sig, _)) => format!("was killed by {sig}"),
        Ok(other) => format!("ended ({other:?})"),
        Err(e) => format!("ended (its status is unreadable: {e})"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_odd_command_names() {
        let text = "1234 (a b) c)) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 200 18446744073709551615";
        let s = parse_stat(text).unwrap();
        assert_eq!(s.state, 'S');
        assert_eq!(s.start_time, 987654);
        assert!(parse_stat("garbage").is_none());
        assert!(parse_stat("1 (x) S 1").is_none());
    }

    #[test]
    fn current_process_is_alive_and_a_changed_start_time_is_not() {
        let me = ProcessIdentity::current().unwrap();
        assert!(me.is_alive());
        let other = ProcessIdentity {
            start_time: me.start_time + 1,
            ..me
        };
        assert!(!other.is_alive());
        assert!(!other.signal(Signal::SIGCONT));
    }

    #[test]
    fn exited_child_is_gone() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let id = ProcessIdentity::of(child.id() as i32);
        child.wait().unwrap();
        if let Some(id) = id {
            assert!(!id.is_alive());
        }
    }

    #[test]
    fn child_exited_reports_a_kill_and_leaves_the_status_to_the_child_handle() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut child = std::process::Command::new("sleep")
            .arg("100")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let watch = rt.block_on(async {
            let watch = tokio::spawn(child_exited(pid));
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert!(!watch.is_finished(), "sleep still runs");
            kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap();
            tokio::time::timeout(Duration::from_secs(5), watch).await
        });
        let how = watch.expect("the exit was seen").unwrap().unwrap();
        assert_eq!(how, "was killed by SIGKILL");
        // Not reaped by the watch: the Child handle still gets the status.
        let status = child.wait().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9)
        );
    }
}
