//! What a VM restored from a snapshot must do before anything else runs in it: become
//! unique (fresh randomness) and current (wall clock), as `Restored` asks.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;

/// Bounds on the host's entropy: enough to reseed (256 bits), small enough to be cheap.
pub const MIN_ENTROPY: usize = 32;
pub const MAX_ENTROPY: usize = 512;

// <linux/random.h>
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203; // _IOW('R', 0x03, int[2])
const RNDRESEEDCRNG: libc::c_ulong = 0x5207; // _IO('R', 0x07)

/// Why the guest could not be made unique or current.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("{0} bytes of entropy; between {MIN_ENTROPY} and {MAX_ENTROPY} are needed")]
    EntropySize(usize),
    #[error("{what}: {source}")]
    Os {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

fn os(what: &'static str) -> impl FnOnce(std::io::Error) -> RestoreError {
    move |source| RestoreError::Os { what, source }
}

/// Credits `entropy` to the input pool and reseeds the CRNG from it, so the next random
/// bytes any process (or the kernel) draws differ from every other clone's.
pub fn reseed(entropy: &[u8]) -> Result<(), RestoreError> {
    if !(MIN_ENTROPY..=MAX_ENTROPY).contains(&entropy.len()) {
        return Err(RestoreError::EntropySize(entropy.len()));
    }
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info = Vec::with_capacity(8 + entropy.len());
    info.extend_from_slice(&((entropy.len() * 8) as i32).to_ne_bytes());
    info.extend_from_slice(&(entropy.len() as i32).to_ne_bytes());
    info.extend_from_slice(entropy);
    // A u32 array follows: pad to a whole number of them.
    info.resize(info.len().next_multiple_of(4), 0);
    let urandom = OpenOptions::new()
        .write(true)
        .open("/dev/urandom")
        .map_err(os("opening /dev/urandom"))?;
    // SAFETY: the ioctls read a rand_pool_info of the size built above / take no argument.
    unsafe {
        if libc::ioctl(urandom.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) != 0 {
            return Err(os("RNDADDENTROPY")(std::io::Error::last_os_error()));
        }
        if libc::ioctl(urandom.as_raw_fd(), RNDRESEEDCRNG) != 0 {
            return Err(os("RNDRESEEDCRNG")(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// Sets CLOCK_REALTIME to `ns` since the epoch; returns the clock read right after.
pub fn set_wall_clock(ns: i64) -> Result<i64, RestoreError> {
    let ts = libc::timespec {
        tv_sec: ns.div_euclid(1_000_000_000),
        tv_nsec: ns.rem_euclid(1_000_000_000),
    };
    // SAFETY: plain syscalls on a valid timespec.
    unsafe {
        if libc::clock_settime(libc::CLOCK_REALTIME, &ts) != 0 {
            return Err(os("clock_settime")(std::io::Error::last_os_error()));
        }
        let mut now: libc::timespec = std::mem::zeroed();
        if libc::clock_gettime(libc::CLOCK_REALTIME, &mut now) != 0 {
            return Err(os("clock_gettime")(std::io::Error::last_os_error()));
        }
        Ok(now.tv_sec * 1_000_000_000 + now.tv_nsec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entropy_outside_the_bounds_is_refused_before_any_syscall() {
        for n in [0, MIN_ENTROPY - 1, MAX_ENTROPY + 1] {
            let e = reseed(&vec![7u8; n]).unwrap_err();
            assert!(matches!(e, RestoreError::EntropySize(m) if m == n), "{e}");
        }
    }

    #[test]
    fn the_ioctl_numbers_are_linuxs() {
        // _IOW('R', 3, int[2]): dir write (1) << 30 | size 8 << 16 | 'R' << 8 | 3.
        assert_eq!(RNDADDENTROPY, (1 << 30) | (8 << 16) | (0x52 << 8) | 3);
        assert_eq!(RNDRESEEDCRNG, (0x52 << 8) | 7);
    }
}
