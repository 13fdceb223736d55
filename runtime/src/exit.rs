//! Exit statuses: how a container's end becomes the monitor's (and `husk run`'s) exit code.
//!
//! A process that exited with code c gives c; one killed by signal n gives 128+n, as a
//! shell reports it. The monitor exits with that code rather than re-raising the signal on
//! itself: re-raising SIGSEGV or SIGABRT would dump the monitor's core, and conmon and
//! podman turn a signal death into 128+n anyway.

/// Exit code for a process that exited with `exit_code` or was killed by `signal` (0: none).
pub fn code(exit_code: i32, signal: u32) -> i32 {
    if signal != 0 {
        128 + (signal as i32 & 0x7f)
    } else {
        exit_code & 0xff
    }
}

/// husk's own failures (bad input, unknown container, VM trouble) exit with this.
pub const FAILURE: i32 = 1;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapping() {
        assert_eq!(code(0, 0), 0);
        assert_eq!(code(3, 0), 3);
        assert_eq!(code(0, 9), 137);
        assert_eq!(code(0, 15), 143);
        assert_eq!(code(256 + 7, 0), 7);
    }
}
