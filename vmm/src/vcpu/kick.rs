//! Getting a vCPU thread out of KVM_RUN on request (to pause it for a snapshot, or to sample
//! it for `--profile`).
//!
//! The kick is a real-time signal whose handler sets `immediate_exit` in the thread's own
//! `kvm_run`: a signal that lands just before the thread enters KVM_RUN would otherwise be
//! lost and the vCPU could stay in the guest (e.g. halted) indefinitely.

use std::cell::Cell;
use std::sync::Once;

use kvm_bindings::kvm_run;
use kvm_ioctls::VcpuFd;

thread_local! {
    // Const-initialised and without a destructor, so reading it in a signal handler is safe.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The signal used to kick vCPU threads.
pub fn signal() -> libc::c_int {
    libc::SIGRTMIN() + 1
}

extern "C" fn on_kick(_: libc::c_int) {
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: the pointer is this thread's own kvm_run mapping, registered by
        // `register` and valid while the vCPU (owned by this thread) lives.
        unsafe { (*run).immediate_exit = 1 };
    }
}

/// Installs the kick handler (once per process).
pub fn install_handler() -> std::io::Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction with a plain handler and an empty mask is valid; the
        // handler only touches a thread-local pointer.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_kick as *const () as usize;
            // Restart other system calls a kick interrupts (the profiler kicks up to thousands
            // of times a second); KVM_RUN still returns EINTR, which is never restarted.
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(signal(), &sa, std::ptr::null_mut()) != 0 {
                result = Err(std::io::Error::last_os_error());
            }
        }
    });
    result
}

/// Registers the calling thread's vCPU, so a kick reaches its `kvm_run`.
pub fn register(vcpu: &mut VcpuFd) {
    let run: *mut kvm_run = vcpu.get_kvm_run();
    KVM_RUN.with(|c| c.set(run));
}

/// Forgets the calling thread's vCPU (before it is dropped).
pub fn unregister() {
    KVM_RUN.with(|c| c.set(std::ptr::null_mut()));
}

/// Kicks the thread `thread` out of KVM_RUN.
pub fn kick(thread: libc::pthread_t) -> std::io::Result<()> {
    // SAFETY: pthread_kill on a thread id of a live vCPU thread (the caller keeps it).
    let rc = unsafe { libc::pthread_kill(thread, signal()) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    Ok(())
}
