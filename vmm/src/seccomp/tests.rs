//! Each thread kind is ended by a syscall outside its filter and keeps working inside it.
//!
//! A filter cannot be removed from a thread, and a trap ends the whole process, so every
//! case runs in a child: this test binary again, running only [`probe`] with the case in
//! `HUSK_SECCOMP_PROBE`.

use std::os::unix::process::ExitStatusExt;
use std::process::Command;

use super::*;

const PROBE_ENV: &str = "HUSK_SECCOMP_PROBE";
/// A folder the probe may write (removed by the parent).
const PROBE_DIR_ENV: &str = "HUSK_SECCOMP_PROBE_DIR";

/// Runs `case` in a child process; returns its exit status (128+N for death by signal N)
/// and stderr.
fn run_probe(case: &str) -> (i32, String) {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/husk-seccomp")
        .expect("a temporary folder");
    let out = Command::new(exe)
        .args([
            "--ignored",
            "--exact",
            "seccomp::tests::probe",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(PROBE_ENV, case)
        .env(PROBE_DIR_ENV, dir.as_path())
        .output()
        .expect("running the probe child");
    (
        out.status
            .code()
            .or(out.status.signal().map(|n| 128 + n))
            .unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_trapped(case: &str, syscall: libc::c_long) {
    let (code, stderr) = run_probe(case);
    assert_eq!(
        code,
        sigsys::EXIT_STATUS,
        "case {case}: expected the SIGSYS exit; stderr: {stderr}"
    );
    // glibc blocks every signal around clone: the kernel then kills the thread's process
    // with SIGSYS directly and the handler cannot name the call.
    if syscall != libc::SYS_clone3 {
        assert!(
            stderr.contains(&format!("seccomp: syscall {syscall} "))
                && stderr.contains("is outside this VMM thread's filter"),
            "case {case}: {stderr}"
        );
    }
}

fn assert_survives(case: &str) {
    let (code, stderr) = run_probe(case);
    assert_eq!(code, 0, "case {case}: {stderr}");
    assert!(stderr.contains("probe done"), "case {case}: {stderr}");
}

#[test]
fn a_vcpu_thread_cannot_open_a_host_file() {
    assert_trapped("vcpu-open", libc::SYS_openat);
}

#[test]
fn a_vcpu_thread_cannot_start_a_thread_itself() {
    assert_trapped("vcpu-clone", libc::SYS_clone3);
}

#[test]
fn a_vcpu_thread_cannot_issue_vm_ioctls() {
    // KVM_CREATE_VCPU on whatever fd: the filter looks at the request, not the fd.
    assert_trapped("vcpu-vm-ioctl", libc::SYS_ioctl);
    let (_, stderr) = run_probe("vcpu-vm-ioctl");
    assert!(stderr.contains("ioctl request 0xae41"), "{stderr}");
}

#[test]
fn a_device_worker_cannot_open_a_host_file() {
    // Started by the spawner, whose filter only refuses opens: the worker's own traps.
    assert_trapped("worker-open", libc::SYS_openat);
}

#[test]
fn a_device_worker_cannot_open_an_inet_socket() {
    assert_trapped("worker-inet", libc::SYS_socket);
}

#[test]
fn a_device_worker_cannot_exec() {
    assert_trapped("worker-exec", libc::SYS_execve);
}

#[test]
fn the_spawner_cannot_open_a_host_file() {
    // Refused rather than trapped (glibc's malloc may try one while a worker starts).
    assert_survives("spawner-open-refused");
}

#[test]
fn the_spawner_cannot_exec() {
    assert_trapped("spawner-exec", libc::SYS_execve);
}

#[test]
fn the_main_thread_cannot_exec() {
    assert_trapped("main-exec", libc::SYS_execve);
}

#[test]
fn the_main_thread_cannot_open_an_inet_socket() {
    assert_trapped("main-inet", libc::SYS_socket);
}

#[test]
fn the_main_thread_cannot_start_a_thread() {
    assert_trapped("main-clone", libc::SYS_clone3);
}

#[test]
fn the_main_thread_cannot_issue_vm_ioctls_that_change_the_vm() {
    assert_trapped("main-vm-ioctl", libc::SYS_ioctl);
}

#[test]
fn the_main_thread_writes_a_snapshot_and_kicks_its_own_threads() {
    assert_survives("main-snapshot-io");
}

#[test]
fn a_worker_started_from_a_confined_vcpu_does_device_io() {
    assert_survives("worker-io");
}

/// The child side of every case above; does nothing useful on its own.
#[test]
#[ignore = "run by this module's tests in a child process (HUSK_SECCOMP_PROBE)"]
fn probe() {
    let case = std::env::var(PROBE_ENV).expect("run by this module's tests, which set the case");
    let filters = Filters::new().expect("filters compile");
    let (kind, action) = case.split_once('-').expect("KIND-ACTION");
    let action = action.to_string();
    let thread = match kind {
        "vcpu" => std::thread::spawn(move || {
            filters.confine_current(ThreadKind::Vcpu).unwrap();
            act(&action);
        }),
        "spawner" => std::thread::spawn(move || {
            filters.confine_current(ThreadKind::Spawner).unwrap();
            act(&action);
        }),
        // The real path: a confined vCPU thread starts the worker through the spawner.
        "worker" => std::thread::spawn(move || {
            let spawner = Spawner::start(Arc::clone(&filters)).unwrap();
            filters.confine_current(ThreadKind::Vcpu).unwrap();
            let _guard = enter(filters, Some(spawner));
            let worker = spawn_worker("probe-worker", move || act(&action)).unwrap();
            worker.join().unwrap();
        }),
        "main" => std::thread::spawn(move || {
            filters.confine_current(ThreadKind::Main).unwrap();
            act(&action);
        }),
        other => panic!("unknown kind {other}"),
    };
    thread.join().unwrap();
    eprintln!("probe done");
}

fn act(action: &str) {
    // SAFETY: plain syscalls on fds this function owns; a trapped one ends the process.
    unsafe {
        match action {
            "open" => {
                libc::open(c"/etc/hostname".as_ptr(), libc::O_RDONLY);
            }
            "open-refused" => {
                let fd = libc::open(c"/etc/hostname".as_ptr(), libc::O_RDONLY);
                let errno = *libc::__errno_location();
                assert_eq!((fd, errno), (-1, libc::EACCES), "open is refused");
                return;
            }
            "clone" => {
                let _ = std::thread::spawn(|| {}).join();
            }
            "vm-ioctl" => {
                libc::ioctl(0, 0xAE41 as _, 0); // KVM_CREATE_VCPU
            }
            "inet" => {
                libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
            }
            "exec" => {
                let argv = [c"/bin/true".as_ptr(), std::ptr::null()];
                libc::execve(argv[0], argv.as_ptr(), std::ptr::null());
            }
            "io" => {
                let efd = libc::eventfd(0, libc::EFD_NONBLOCK);
                assert!(efd >= 0);
                let one = 1u64;
                assert_eq!(libc::write(efd, (&one as *const u64).cast(), 8), 8);
                let mut got = 0u64;
                assert_eq!(libc::read(efd, (&mut got as *mut u64).cast(), 8), 8);
                libc::close(efd);
                let unix = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
                assert!(unix >= 0, "AF_UNIX sockets are allowed");
                libc::close(unix);
                let epfd = libc::epoll_create1(libc::EPOLL_CLOEXEC);
                assert!(epfd >= 0);
                libc::close(epfd);
                tracing::warn!("logging still works");
                return;
            }
            "snapshot-io" => {
                // What Machine::snapshot and the end of vm::run do, through std as they do.
                let dir = std::path::PathBuf::from(std::env::var_os(PROBE_DIR_ENV).unwrap())
                    .join("snapshot");
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .create(&dir)
                    .unwrap();
                let tmp = dir.join("state.tmp");
                assert!(!dir.join("state").exists());
                let f = std::fs::File::create(&tmp).unwrap();
                std::os::unix::fs::FileExt::write_all_at(&f, b"state", 4096).unwrap();
                f.set_len(8192).unwrap();
                f.sync_all().unwrap();
                drop(f);
                std::fs::rename(&tmp, dir.join("state")).unwrap();
                std::fs::remove_file(dir.join("state")).unwrap();
                let own = libc::syscall(libc::SYS_gettid) as libc::pid_t;
                assert_eq!(
                    libc::syscall(libc::SYS_tgkill, libc::getpid(), own, 0),
                    0,
                    "tgkill of an own thread"
                );
                tracing::warn!("logging still works");
                return;
            }
            other => panic!("unknown action {other}"),
        }
    }
    eprintln!("survived {action}");
    std::process::exit(1);
}
