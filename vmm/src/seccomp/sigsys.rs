//! What happens when a confined thread makes a syscall outside its filter: the filter
//! traps (SIGSYS), and this handler names the syscall on stderr and ends the whole process
//! at once. A thread that leaves its filter is a VMM bug or a guest exploiting one; nothing
//! of that process is trusted to go on (its VM, or in the shim its pod, stops).
//!
//! The handler only calls `write` and `exit_group`, which every filter allows.

use std::sync::Once;

/// Exit status of a process ended by the handler: as if killed by SIGSYS.
pub const EXIT_STATUS: i32 = 128 + libc::SIGSYS;

/// Offset of `si_syscall` in the x86_64 `siginfo_t` of a SIGSYS (`_sigsys`: the call
/// address, then the syscall number).
const SI_SYSCALL_OFFSET: usize = 24;

static INSTALL: Once = Once::new();

thread_local! {
    // Const-initialised and without a destructor, so reading it in the handler is safe:
    // the confined thread's name, for the report.
    static THREAD_NAME: std::cell::Cell<[u8; 16]> = const { std::cell::Cell::new([0; 16]) };
}

/// Records the calling thread's name for a later report (called when it is confined).
pub(super) fn remember_thread_name() {
    let mut name = [0u8; 16];
    if let Some(n) = std::thread::current().name() {
        let n = n.as_bytes();
        let len = n.len().min(name.len());
        name[..len].copy_from_slice(&n[..len]);
    }
    THREAD_NAME.with(|c| c.set(name));
}

/// Installs the handler once per process (SIGSYS is used for nothing else here).
pub fn install() -> std::io::Result<()> {
    let mut result = Ok(());
    INSTALL.call_once(|| {
        // SAFETY: a zeroed sigaction with an SA_SIGINFO handler and an empty mask is valid;
        // the handler is async-signal-safe (write, _exit, no allocation).
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_sigsys as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) != 0 {
                result = Err(std::io::Error::last_os_error());
            }
        }
    });
    result
}

/// `husk-vmm: seccomp: syscall N is outside this VMM thread's filter (thread T); ending
/// the process` without allocating; for ioctl (whose filter looks at the request) with
/// `request 0x…`.
fn message(nr: i32, ioctl_request: u64, thread: &[u8], buf: &mut [u8; 160]) -> usize {
    let mut len = 0;
    let mut put = |bytes: &[u8], len: &mut usize| {
        let n = bytes.len().min(buf.len() - *len);
        buf[*len..*len + n].copy_from_slice(&bytes[..n]);
        *len += n;
    };
    put(b"husk-vmm: seccomp: syscall ", &mut len);
    let mut digits = [0u8; 12];
    let mut i = digits.len();
    let negative = nr < 0;
    let mut v = i64::from(nr).unsigned_abs();
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    if negative {
        i -= 1;
        digits[i] = b'-';
    }
    put(&digits[i..], &mut len);
    if i64::from(nr) == libc::SYS_ioctl {
        put(b" (ioctl request 0x", &mut len);
        let mut hex = [0u8; 16];
        let mut j = hex.len();
        let mut v = ioctl_request;
        loop {
            j -= 1;
            hex[j] = b"0123456789abcdef"[(v & 0xf) as usize];
            v >>= 4;
            if v == 0 {
                break;
            }
        }
        put(&hex[j..], &mut len);
        put(b")", &mut len);
    }
    put(b" is outside this VMM thread's filter (thread ", &mut len);
    let end = thread.iter().position(|&b| b == 0).unwrap_or(thread.len());
    put(&thread[..end], &mut len);
    put(b"); ending the process\n", &mut len);
    len
}

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t for an SA_SIGINFO handler; for SIGSYS
    // from seccomp the syscall number sits at SI_SYSCALL_OFFSET.
    let nr = unsafe {
        std::ptr::read_unaligned((info as *const u8).add(SI_SYSCALL_OFFSET) as *const i32)
    };
    // SAFETY: an SA_SIGINFO handler's third argument is the interrupted ucontext_t; the
    // syscall's second argument is in RSI there.
    let request = unsafe {
        (*(ctx as *const libc::ucontext_t)).uc_mcontext.gregs[libc::REG_RSI as usize] as u64
    };
    let mut buf = [0u8; 160];
    let thread = THREAD_NAME.with(|c| c.get());
    let len = message(nr, request, &thread, &mut buf);
    // SAFETY: write and _exit are async-signal-safe; buf outlives the call.
    unsafe {
        libc::write(libc::STDERR_FILENO, buf.as_ptr().cast(), len);
        libc::_exit(EXIT_STATUS);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_names_the_syscall() {
        let mut buf = [0u8; 160];
        let n = message(257, 0, b"vcpu0\0\0", &mut buf);
        assert_eq!(
            std::str::from_utf8(&buf[..n]).unwrap(),
            "husk-vmm: seccomp: syscall 257 is outside this VMM thread's filter (thread vcpu0); ending the process\n"
        );
        let n = message(-1, 0, b"", &mut buf);
        assert!(
            std::str::from_utf8(&buf[..n])
                .unwrap()
                .contains("syscall -1 ")
        );
        let n = message(16, 0xAE41, b"x", &mut buf);
        assert!(
            std::str::from_utf8(&buf[..n])
                .unwrap()
                .contains("syscall 16 (ioctl request 0xae41) is outside"),
        );
    }
}
