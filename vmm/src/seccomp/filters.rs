//! The syscalls each confined thread kind may make, as seccompiler rules.
//!
//! Lists come from tracing every VMM thread through boots, container runs, snapshots and
//! restores in each rootfs mode (see docs/security.md), then cut to what the code needs.
//! Everything else traps (see [`super::sigsys`]).

use std::collections::BTreeMap;

use seccompiler::{
    SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
    TargetArch,
};
use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iowr_nr};

use super::ThreadKind;

const KVMIO: u32 = 0xAE;
ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_bindings::kvm_regs);
ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_bindings::kvm_sregs);
ioctl_iowr_nr!(KVM_GET_MSRS, KVMIO, 0x88, kvm_bindings::kvm_msrs);
ioctl_ior_nr!(KVM_GET_FPU, KVMIO, 0x8c, kvm_bindings::kvm_fpu);
ioctl_ior_nr!(KVM_GET_LAPIC, KVMIO, 0x8e, kvm_bindings::kvm_lapic_state);
ioctl_iowr_nr!(KVM_GET_CPUID2, KVMIO, 0x91, kvm_bindings::kvm_cpuid2);
ioctl_ior_nr!(KVM_GET_MP_STATE, KVMIO, 0x98, kvm_bindings::kvm_mp_state);
ioctl_ior_nr!(
    KVM_GET_VCPU_EVENTS,
    KVMIO,
    0x9f,
    kvm_bindings::kvm_vcpu_events
);
ioctl_ior_nr!(KVM_GET_DEBUGREGS, KVMIO, 0xa1, kvm_bindings::kvm_debugregs);
ioctl_ior_nr!(KVM_GET_XSAVE, KVMIO, 0xa4, kvm_bindings::kvm_xsave);
ioctl_ior_nr!(KVM_GET_XCRS, KVMIO, 0xa6, kvm_bindings::kvm_xcrs);
ioctl_io_nr!(KVM_GET_TSC_KHZ, KVMIO, 0xa3);
ioctl_io_nr!(KVM_GET_STATS_FD, KVMIO, 0xce);
ioctl_iowr_nr!(KVM_GET_IRQCHIP, KVMIO, 0x62, kvm_bindings::kvm_irqchip);
ioctl_ior_nr!(KVM_GET_CLOCK, KVMIO, 0x7c, kvm_bindings::kvm_clock_data);
ioctl_ior_nr!(KVM_GET_PIT2, KVMIO, 0x9f, kvm_bindings::kvm_pit_state2);

/// The vCPU ioctls: running the guest, and reading the vCPU's own state for a snapshot,
/// a crash report or the profiler. No KVM_SET_* (restore happens before the thread is
/// confined), no VM or system ioctls: a vCPU thread cannot add memory or devices.
fn vcpu_ioctls() -> Vec<u64> {
    vec![
        KVM_RUN(),
        KVM_GET_REGS(),
        KVM_GET_SREGS(),
        KVM_GET_MSRS(),
        KVM_GET_FPU(),
        KVM_GET_LAPIC(),
        KVM_GET_CPUID2(),
        KVM_GET_MP_STATE(),
        KVM_GET_VCPU_EVENTS(),
        KVM_GET_DEBUGREGS(),
        KVM_GET_XSAVE(),
        KVM_GET_XCRS(),
        KVM_GET_TSC_KHZ(),
        KVM_GET_STATS_FD(),
    ]
}

/// Sockets a device worker accepts from the vsock listener are switched to non-blocking.
fn worker_ioctls() -> Vec<u64> {
    vec![libc::FIONBIO, libc::FIOCLEX]
}

/// The main thread reads the VM's own state for a snapshot (the vCPUs save theirs) and
/// switches API connections to blocking; no KVM_SET_*, no new vCPUs, memory or devices.
fn main_ioctls() -> Vec<u64> {
    vec![
        KVM_GET_IRQCHIP(),
        KVM_GET_CLOCK(),
        KVM_GET_PIT2(),
        libc::FIONBIO,
        libc::FIOCLEX,
    ]
}

/// What every Rust thread of the VMM needs to run at all: memory, locks and channels,
/// time, logging to an already open fd, and ending.
const RUNTIME: &[libc::c_long] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_futex,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_mremap,
    libc::SYS_brk,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_getrandom,
    libc::SYS_getrusage,
    libc::SYS_restart_syscall,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// Polling the device's eventfds and moving its bytes: queue notifications, the tap,
/// block images (read, write, flush), the vsock listener and its connections, the
/// vhost-user socket. No open, no socket creation other than AF_UNIX (vsock connections
/// the guest opens to host ports), no exec, no mount.
const DEVICE_IO: &[libc::c_long] = &[
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_eventfd2,
    libc::SYS_fcntl,
    libc::SYS_readv,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_lseek,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_accept4,
    libc::SYS_connect,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_poll,
    libc::SYS_ppoll,
];

/// What a vCPU thread does besides KVM ioctls: MMIO and port handlers write eventfds,
/// the console and the metrics file; a DRIVER_OK write activates a device (eventfds for
/// its worker, a vhost-user exchange with virtiofsd), a reset stops one.
const VCPU_EXTRA: &[libc::c_long] = &[
    libc::SYS_eventfd2,
    libc::SYS_fcntl,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_pread64,
    libc::SYS_epoll_ctl,
    libc::SYS_poll,
    libc::SYS_ppoll,
];

/// The main thread once the VM runs: waiting for a stop (eventfd, signalfd, the API
/// socket), answering API requests, writing a snapshot into the folder a request names
/// (create, write, truncate, sync, rename, remove), pausing and ending vCPU threads, and
/// releasing the VM. It may open files (snapshots and `--profile` output go where the
/// host asks; the jail decides what exists), but not exec, mount, create sockets, start
/// threads or processes, or change credentials.
const MAIN: &[libc::c_long] = &[
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_epoll_ctl,
    libc::SYS_accept4,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    libc::SYS_setsockopt,
    libc::SYS_getsockopt,
    libc::SYS_fcntl,
    libc::SYS_open,
    libc::SYS_openat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_fstat,
    libc::SYS_lseek,
    libc::SYS_readv,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_pwritev,
    libc::SYS_ftruncate,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_mkdir,
    libc::SYS_mkdirat,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
];

/// Starting threads, and the new thread's own start-up before it confines itself
/// (naming itself, installing its filter).
const SPAWN: &[libc::c_long] = &[
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_prctl,
    libc::SYS_seccomp,
];

/// `socket` only for AF_UNIX stream sockets (the vsock device's host connections).
fn unix_socket_rule() -> Vec<SeccompRule> {
    vec![rule(vec![cond(0, SeccompCmpOp::Eq, libc::AF_UNIX as u64)])]
}

fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> SeccompCondition {
    // Infallible for arguments 0..=5, which is all this module uses.
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value)
        .expect("seccomp condition on a syscall argument 0..=5")
}

fn rule(conditions: Vec<SeccompCondition>) -> SeccompRule {
    SeccompRule::new(conditions).expect("a seccomp rule with at least one condition")
}

fn ioctl_rules(requests: &[u64]) -> Vec<SeccompRule> {
    requests
        .iter()
        .map(|&r| rule(vec![cond(1, SeccompCmpOp::Eq, r)]))
        .collect()
}

/// The syscall → rules map of one thread kind (an empty rule list allows the syscall
/// whatever its arguments).
pub(super) fn rules(kind: ThreadKind) -> BTreeMap<i64, Vec<SeccompRule>> {
    let mut map: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    let mut allow = |calls: &[libc::c_long]| {
        for &nr in calls {
            map.entry(nr).or_default();
        }
    };
    allow(RUNTIME);
    match kind {
        ThreadKind::Vcpu => {
            allow(VCPU_EXTRA);
            map.insert(libc::SYS_ioctl, ioctl_rules(&vcpu_ioctls()));
        }
        ThreadKind::DeviceWorker => {
            allow(DEVICE_IO);
            map.insert(libc::SYS_ioctl, ioctl_rules(&worker_ioctls()));
            map.insert(libc::SYS_socket, unix_socket_rule());
        }
        ThreadKind::Main => {
            allow(MAIN);
            map.insert(libc::SYS_ioctl, ioctl_rules(&main_ioctls()));
            // Kicks of this process's own vCPU threads only.
            map.insert(
                libc::SYS_tgkill,
                vec![rule(vec![cond(
                    0,
                    SeccompCmpOp::Eq,
                    std::process::id() as u64,
                )])],
            );
        }
        ThreadKind::Spawner => {
            // Workers start here and inherit this filter before adding their own, so it
            // must allow everything a worker does.
            allow(DEVICE_IO);
            allow(SPAWN);
            // Refused by the stacked spawner_open_refusal filter, not allowed.
            allow(&[libc::SYS_open, libc::SYS_openat]);
            map.insert(libc::SYS_ioctl, ioctl_rules(&worker_ioctls()));
            map.insert(libc::SYS_socket, unix_socket_rule());
        }
    }
    map
}

/// Stacked on the spawner's filter (whose list has `openat`): opening a file fails with
/// EACCES instead of trapping. glibc's malloc reads /sys/devices/system/cpu/online when a
/// process's ninth arena is made, which happens in a new thread before it confines itself,
/// under this filter; it copes with the failure. Stacked filters take the strictest
/// answer, so a worker's own filter turns the same open into a trap again.
pub(super) fn spawner_open_refusal() -> Result<SeccompFilter, seccompiler::BackendError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    rules.insert(libc::SYS_open, vec![]);
    rules.insert(libc::SYS_openat, vec![]);
    SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EACCES as u32),
        TargetArch::x86_64,
    )
}

/// The filter of one thread kind: listed syscalls are allowed, all others trap.
pub(super) fn filter(kind: ThreadKind) -> Result<SeccompFilter, seccompiler::BackendError> {
    SeccompFilter::new(
        rules(kind),
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_are_the_kernels() {
        // From <linux/kvm.h> as compiled for x86_64 (strace prints these names for them).
        assert_eq!(KVM_RUN(), 0xAE80);
        assert_eq!(KVM_GET_REGS(), 0x8090_AE81);
        assert_eq!(KVM_GET_SREGS(), 0x8138_AE83);
        assert_eq!(KVM_GET_MSRS(), 0xC008_AE88);
        assert_eq!(KVM_GET_XSAVE(), 0x9000_AEA4);
        assert_eq!(KVM_GET_STATS_FD(), 0xAECE);
        assert_eq!(KVM_GET_IRQCHIP(), 0xC208_AE62);
        assert_eq!(KVM_GET_CLOCK(), 0x8030_AE7C);
        assert_eq!(KVM_GET_PIT2(), 0x8070_AE9F);
    }

    #[test]
    fn a_spawner_allows_everything_its_workers_do() {
        // A worker inherits the spawner's filter: anything it needs that the spawner's
        // filter denies would trap although the worker's own filter allows it.
        let spawner = rules(ThreadKind::Spawner);
        for (nr, worker_rules) in rules(ThreadKind::DeviceWorker) {
            let theirs = spawner
                .get(&nr)
                .unwrap_or_else(|| panic!("syscall {nr} allowed for workers, not for spawner"));
            assert!(
                theirs.is_empty() || theirs.len() >= worker_rules.len(),
                "syscall {nr}: the spawner allows fewer argument values than a worker"
            );
        }
    }

    #[test]
    fn no_kind_may_open_files_exec_or_mount() {
        // The spawner's opens are refused by a second filter (spawner_open_refusal).
        spawner_open_refusal().expect("compiles");
        for kind in [ThreadKind::Vcpu, ThreadKind::DeviceWorker] {
            let r = rules(kind);
            for nr in [
                libc::SYS_open,
                libc::SYS_openat,
                libc::SYS_openat2,
                libc::SYS_execve,
                libc::SYS_execveat,
                libc::SYS_mount,
                libc::SYS_ptrace,
                libc::SYS_setuid,
                libc::SYS_kill,
                libc::SYS_tgkill,
                libc::SYS_rt_sigaction,
                libc::SYS_bpf,
            ] {
                assert!(!r.contains_key(&nr), "{kind:?} allows syscall {nr}");
            }
            filter(kind).expect("compiles");
        }
        for kind in [ThreadKind::Spawner, ThreadKind::Main] {
            let r = rules(kind);
            for nr in [
                libc::SYS_execve,
                libc::SYS_execveat,
                libc::SYS_mount,
                libc::SYS_ptrace,
                libc::SYS_kill,
                libc::SYS_setuid,
                libc::SYS_bpf,
            ] {
                assert!(!r.contains_key(&nr), "{kind:?} allows syscall {nr}");
            }
            filter(kind).expect("compiles");
        }
        let main = rules(ThreadKind::Main);
        for nr in [
            libc::SYS_clone,
            libc::SYS_clone3,
            libc::SYS_fork,
            libc::SYS_socket,
            libc::SYS_prctl,
            libc::SYS_seccomp,
        ] {
            assert!(
                !main.contains_key(&nr),
                "the main thread allows syscall {nr}"
            );
        }
        assert!(!rules(ThreadKind::Vcpu).contains_key(&libc::SYS_clone3));
        assert!(!rules(ThreadKind::DeviceWorker).contains_key(&libc::SYS_clone));
    }
}
