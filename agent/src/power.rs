//! Powering the guest off: the last thing PID 1 does.
//!
//! The guest boots with `reboot=k`, so a reboot resets through the i8042 controller and
//! the VMM exits. PID 1 must never return or exit (the kernel would panic), so every path
//! here ends in `reboot(2)` or, if even that fails, in an endless pause.

use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::mount::{MntFlags, umount2};
use nix::sys::reboot::{RebootMode, reboot};
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

/// How long processes get to handle SIGTERM before SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(2);
/// How long to wait for SIGKILLed processes to disappear.
const KILL_GRACE: Duration = Duration::from_secs(1);
/// /proc/self/mounts is small in the guest; bound the read anyway.
const MAX_MOUNTS_TEXT: u64 = 256 * 1024;

/// Stops every other process, syncs, unmounts what it can and resets the VM.
pub fn poweroff() -> ! {
    tracing::debug!("powering off");
    stop_all_processes();
    nix::unistd::sync();
    unmount_all();
    nix::unistd::sync();
    reset()
}

/// Resets the VM at once (after a sync), e.g. from the panic hook.
pub fn reset() -> ! {
    nix::unistd::sync();
    // reboot() only comes back on failure (e.g. EPERM outside a VM).
    let Err(e) = reboot(RebootMode::RB_AUTOBOOT);
    tracing::error!("reboot(RB_AUTOBOOT): {e}");
    let Err(e) = reboot(RebootMode::RB_POWER_OFF);
    tracing::error!("reboot(RB_POWER_OFF): {e}");
    loop {
        // SAFETY: pause() has no preconditions; it only sleeps until a signal arrives.
        unsafe { libc::pause() };
    }
}

/// SIGTERM to everyone (kill(-1) spares PID 1 itself), reap until all are gone or the
/// grace time is over, then the same with SIGKILL.
fn stop_all_processes() {
    for (signal, grace) in [(Signal::SIGTERM, TERM_GRACE), (Signal::SIGKILL, KILL_GRACE)] {
        match kill(Pid::from_raw(-1), signal) {
            // No process left to signal.
            Err(Errno::ESRCH) => return,
            Err(e) => tracing::warn!("kill(-1, {signal}): {e}"),
            Ok(()) => {}
        }
        if reap_all_until(Instant::now() + grace) {
            return;
        }
        tracing::warn!("processes survived {signal} for {grace:?}");
    }
}

/// Reaps children until none is left (true) or the deadline passes (false).
fn reap_all_until(deadline: Instant) -> bool {
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Err(Errno::ECHILD) => return true,
            Ok(WaitStatus::StillAlive) => {
                if Instant::now() >= deadline {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => {
                tracing::warn!("waitpid(-1): {e}");
                return false;
            }
        }
    }
}

/// Unmounts everything but the root, most recent mount first. Failures are expected
/// (e.g. /dev while the console is open) and only logged at debug level: the sync before
/// the reset is what protects data.
fn unmount_all() {
    let text = match crate::init::read_small("/proc/self/mounts", MAX_MOUNTS_TEXT) {
        Ok(text) => text,
        Err(e) => {
            tracing::warn!("{e}");
            return;
        }
    };
    for target in mount_points(&text).iter().rev() {
        if target == "/" {
            continue;
        }
        if let Err(e) = umount2(target.as_str(), MntFlags::empty()) {
            tracing::debug!("umount {target}: {e}");
        }
    }
}

/// The mount points listed in /proc/self/mounts text, in order, with the kernel's octal
/// escapes (`\040` for a space, ...) decoded.
fn mount_points(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|line| line.split(' ').nth(1))
        .map(unescape_octal)
        .collect()
}

fn unescape_octal(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 4 <= bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let value = bytes[i + 1..i + 4]
                .iter()
                .fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'));
            if let Ok(byte) = u8::try_from(value) {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mount_points_with_escapes() {
        let text = "rootfs / rootfs rw 0 0\n\
                    proc /proc proc rw,nosuid 0 0\n\
                    tmpfs /run/my\\040dir tmpfs rw 0 0\n\
                    bogus\n\
                    tmpfs /x\\7 tmpfs rw 0 0\n";
        assert_eq!(
            mount_points(text),
            vec!["/", "/proc", "/run/my dir", "/x\\7"]
        );
    }
}
