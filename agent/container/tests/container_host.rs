//! Real containers on the host (root needed): busybox rootfs, real namespaces, mounts,
//! credentials. A small reaper here plays the agent's: it alone calls waitpid(-1).
//!
//! Tests that check "nothing left behind" (no child process, no mount) take an exclusive
//! lock; the others share it, so they run in parallel with each other only.

use std::collections::HashMap;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use husk_container::{Container, CreateOptions, Error, Spawner, Status, Stdio, spec};
use nix::errno::Errno;
use nix::sys::signal::Signal;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use serde_json::{Value, json};

// ---------- test reaper (the agent's Reaper contract: lock held around start) ----------

#[derive(Default)]
struct TestReaper {
    waiters: Mutex<HashMap<Pid, Sender<WaitStatus>>>,
}

impl TestReaper {
    fn get() -> &'static Arc<TestReaper> {
        static REAPER: OnceLock<Arc<TestReaper>> = OnceLock::new();
        REAPER.get_or_init(|| {
            let r = Arc::new(TestReaper::default());
            let r2 = r.clone();
            std::thread::spawn(move || {
                loop {
                    {
                        let mut w = r2.waiters.lock().unwrap_or_else(|p| p.into_inner());
                        loop {
                            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                                Ok(WaitStatus::StillAlive) | Err(_) => break,
                                Ok(status) => {
                                    if let Some(pid) = status.pid()
                                        && let Some(tx) = w.remove(&pid)
                                    {
                                        let _ = tx.send(status);
                                    }
                                }
                            }
                        }
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
            });
            r
        })
    }
}

impl Spawner for TestReaper {
    type Handle = Receiver<WaitStatus>;
    fn spawn<F: FnOnce() -> husk_container::Result<Pid>>(
        &self,
        start: F,
    ) -> husk_container::Result<(Pid, Receiver<WaitStatus>)> {
        let mut w = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        let pid = start()?;
        let (tx, rx) = mpsc::channel();
        w.insert(pid, tx);
        Ok((pid, rx))
    }
}

fn wait_status(rx: &Receiver<WaitStatus>) -> WaitStatus {
    rx.recv_timeout(Duration::from_secs(20))
        .expect("exit status within 20 s")
}

// ---------- fixtures ----------

static EXCLUSIVE: RwLock<()> = RwLock::new(());

const APPLETS: &[&str] = &[
    "sh",
    "cat",
    "echo",
    "ls",
    "id",
    "hostname",
    "sleep",
    "touch",
    "readlink",
    "grep",
    "wc",
    "head",
    "test",
    "true",
    "domainname",
    "tty",
    "stty",
];

/// A busybox rootfs in a temp dir: bin/ with applet links, etc/passwd and group, dirs.
struct Rootfs {
    dir: tempfile::TempDir,
}

impl Rootfs {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("rootfs");
        for d in ["bin", "etc", "proc", "dev", "tmp", "secret"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("copy busybox");
        for a in APPLETS {
            std::os::unix::fs::symlink("busybox", root.join("bin").join(a)).unwrap();
        }
        std::fs::write(
            root.join("etc/passwd"),
            "root:x:0:0:root:/:/bin/sh\nu:x:1000:1000::/tmp:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(root.join("etc/group"), "root:x:0:\nu:x:1000:\n").unwrap();
        std::fs::write(root.join("secret/key"), "hunter2").unwrap();
        Rootfs { dir }
    }

    fn bundle(&self) -> &Path {
        self.dir.path()
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("rootfs")
    }
}

const ALL_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SYS_ADMIN",
    "CAP_NET_ADMIN",
    "CAP_SYS_CHROOT",
    "CAP_MKNOD",
    "CAP_SETPCAP",
];

fn base_spec(script: &str) -> Value {
    json!({
        "ociVersion": "1.0.2",
        "root": {"path": "rootfs"},
        "hostname": "box",
        "process": {
            "user": {"uid": 0, "gid": 0},
            "cwd": "/",
            "args": ["sh", "-c", script],
            "env": ["PATH=/bin", "FOO=bar"],
            "capabilities": {
                "bounding": ALL_CAPS, "effective": ALL_CAPS, "permitted": ALL_CAPS,
            },
        },
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["mode=1777"]},
        ],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "uts"}, {"type": "ipc"}],
        },
    })
}

#[derive(Debug)]
struct Run {
    container: Container,
    exit: Receiver<WaitStatus>,
    output: std::fs::File,
}

fn pipe() -> (std::fs::File, OwnedFd) {
    let (r, w) = nix::unistd::pipe().unwrap();
    (std::fs::File::from(r), w)
}

fn stdio_to(w: &OwnedFd) -> Stdio {
    let null = std::fs::File::open("/dev/null").unwrap();
    Stdio::Fds {
        stdin: null.into(),
        stdout: w.try_clone().unwrap(),
        stderr: w.try_clone().unwrap(),
    }
}

fn create(rootfs: &Rootfs, id: &str, spec: &Value) -> Result<Run, Error> {
    let spec = spec::parse(&spec.to_string())?;
    let (output, w) = pipe();
    let (container, exit) = Container::create(
        CreateOptions {
            id: id.into(),
            bundle: rootfs.bundle().to_owned(),
            spec,
            stdio: stdio_to(&w),
            cgroup: None,
        },
        TestReaper::get().as_ref(),
    )?;
    Ok(Run {
        container,
        exit,
        output,
    })
}

/// Creates, starts, waits; returns the exit status and everything the process printed.
fn run(spec: &Value) -> (WaitStatus, String) {
    run_in(&Rootfs::new(), spec)
}

fn run_in(rootfs: &Rootfs, spec: &Value) -> (WaitStatus, String) {
    let mut r = create(rootfs, "run", spec).expect("create");
    r.container.start().expect("start");
    let status = wait_status(&r.exit);
    let mut out = String::new();
    r.output.read_to_string(&mut out).unwrap();
    r.container.delete().expect("delete");
    (status, out)
}

fn ns_link(pid: Pid, kind: &str) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).unwrap()
}

// ---------- tests ----------

#[test]
fn init_is_pid1_in_its_own_namespaces_and_rootfs() {
    let _g = EXCLUSIVE.read().unwrap();
    std::fs::write("/tmp/husk-container-host-marker", "x").unwrap();
    let (status, out) = run(&base_spec(
        "echo pid=$$; hostname; test -e /tmp/husk-container-host-marker && echo host-visible; \
         test -e /usr && echo usr-visible; ls /; grep NoNewPrivs /proc/self/status; exit 3",
    ));
    assert!(
        matches!(status, WaitStatus::Exited(_, 3)),
        "{status:?} {out}"
    );
    assert!(out.contains("pid=1\n"), "{out}");
    assert!(out.contains("box\n"), "{out}");
    assert!(
        !out.contains("host-visible") && !out.contains("usr-visible"),
        "{out}"
    );
    assert!(
        out.contains("secret"),
        "container root is the rootfs: {out}"
    );
    assert!(out.contains("NoNewPrivs:\t0"), "{out}");
}

#[test]
fn held_init_runs_nothing_until_start() {
    let _g = EXCLUSIVE.read().unwrap();
    let rootfs = Rootfs::new();
    let mut r = create(&rootfs, "held", &base_spec("echo started; exit 0")).expect("create");
    let pid = r.container.pid();
    assert_eq!(r.container.status(), Status::Created);
    // Still the library's code, not busybox, and nothing printed.
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    assert_eq!(exe, std::env::current_exe().unwrap());
    assert_ne!(ns_link(pid, "mnt"), ns_link(Pid::this(), "mnt"));
    assert_ne!(ns_link(pid, "pid"), ns_link(Pid::this(), "pid"));
    let mut fds = [nix::poll::PollFd::new(
        std::os::fd::AsFd::as_fd(&r.output),
        nix::poll::PollFlags::POLLIN,
    )];
    assert_eq!(
        nix::poll::poll(&mut fds, 200u16).unwrap(),
        0,
        "output before start"
    );
    r.container.start().expect("start");
    assert!(matches!(wait_status(&r.exit), WaitStatus::Exited(p, 0) if p == pid));
    let mut out = String::new();
    r.output.read_to_string(&mut out).unwrap();
    assert_eq!(out, "started\n");
    assert_eq!(r.container.status(), Status::Stopped);
    assert!(r.container.start().is_err(), "start twice");
    r.container.delete().unwrap();
}

#[test]
fn restrictions_apply_user_caps_rlimits_nnp_env_cwd() {
    let _g = EXCLUSIVE.read().unwrap();
    let mut spec = base_spec(
        "id -u; id -g; id -G; pwd; echo FOO=$FOO; ulimit -n; ulimit -Hn; \
         grep -E 'CapEff|CapPrm|CapBnd|NoNewPrivs' /proc/self/status",
    );
    spec["process"]["user"] = json!({"uid": 1000, "gid": 1000, "additionalGids": [10, 20]});
    spec["process"]["cwd"] = json!("/tmp");
    spec["process"]["noNewPrivileges"] = json!(true);
    spec["process"]["rlimits"] = json!([{"type": "RLIMIT_NOFILE", "soft": 123, "hard": 456}]);
    spec["process"]["capabilities"] = json!({
        "bounding": ["CAP_KILL", "CAP_CHOWN"], "effective": ["CAP_KILL"], "permitted": ["CAP_KILL"],
        "inheritable": ["CAP_KILL"], "ambient": ["CAP_KILL"],
    });
    let (status, out) = run(&spec);
    assert!(
        matches!(status, WaitStatus::Exited(_, 0)),
        "{status:?} {out}"
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        &lines[..7],
        [
            "1000",
            "1000",
            "1000 10 20",
            "/tmp",
            "FOO=bar",
            "123",
            "456"
        ],
        "{out}"
    );
    // CAP_KILL is bit 5, CAP_CHOWN bit 0. A non-root process keeps capabilities across
    // execve only through the ambient set.
    assert!(out.contains("CapPrm:\t0000000000000020"), "{out}");
    assert!(out.contains("CapEff:\t0000000000000020"), "{out}");
    assert!(out.contains("CapBnd:\t0000000000000021"), "{out}");
    assert!(out.contains("NoNewPrivs:\t1"), "{out}");
}

#[test]
fn readonly_root_masked_and_readonly_paths_sysctl_devices() {
    let _g = EXCLUSIVE.read().unwrap();
    let mut spec = base_spec(
        "touch /newfile && echo root-writable; touch /tmp/ok && echo tmp-writable; \
         cat /secret/key; ls /secret; echo maskme=$(cat /maskme | wc -c); \
         echo x > /proc/sys/kernel/hostname || echo sys-ro; cat /proc/sys/kernel/domainname; \
         ls -l /dev/null /dev/zero; readlink /dev/fd; echo hi > /dev/null && echo devnull-ok",
    );
    spec["root"]["readonly"] = json!(true);
    let rootfs = Rootfs::new();
    std::fs::write(rootfs.root().join("maskme"), "visible").unwrap();
    spec["linux"]["maskedPaths"] = json!(["/secret", "/maskme", "/does/not/exist"]);
    spec["linux"]["readonlyPaths"] = json!(["/proc/sys"]);
    spec["linux"]["sysctl"] = json!({"kernel.domainname": "example.org"});
    let (status, out) = run_in(&rootfs, &spec);
    assert!(
        matches!(status, WaitStatus::Exited(_, 0)),
        "{status:?} {out}"
    );
    assert!(!out.contains("root-writable"), "{out}");
    assert!(out.contains("tmp-writable"), "{out}");
    assert!(!out.contains("hunter2"), "masked dir readable: {out}");
    assert!(out.contains("maskme=0\n"), "{out}");
    assert!(out.contains("sys-ro"), "{out}");
    assert!(out.contains("example.org"), "{out}");
    assert!(
        out.contains("crw-rw-rw-") && out.contains("1,   3") && out.contains("1,   5"),
        "{out}"
    );
    assert!(
        out.contains("/proc/self/fd\n") && out.contains("devnull-ok"),
        "{out}"
    );
    // The masks hid, not removed: the rootfs on the host is intact.
    assert!(!rootfs.root().join("newfile").exists());
    assert_eq!(
        std::fs::read_to_string(rootfs.root().join("maskme")).unwrap(),
        "visible"
    );
    assert_eq!(
        std::fs::read_to_string(rootfs.root().join("secret/key")).unwrap(),
        "hunter2"
    );
}

#[test]
fn exit_codes_and_signals_are_reported_exactly() {
    let _g = EXCLUSIVE.read().unwrap();
    let (status, _) = run(&base_spec("exit 42"));
    assert!(matches!(status, WaitStatus::Exited(_, 42)), "{status:?}");

    let rootfs = Rootfs::new();
    let mut r = create(&rootfs, "sig", &base_spec("sleep 100")).unwrap();
    r.container.start().unwrap();
    r.container.signal(Signal::SIGKILL, false).unwrap();
    assert!(matches!(
        wait_status(&r.exit),
        WaitStatus::Signaled(_, Signal::SIGKILL, _)
    ));
    r.container.delete().unwrap();

    // A PID-namespace init only gets signals it handles: trap TERM, signal all.
    let rootfs = Rootfs::new();
    let mut r = create(
        &rootfs,
        "trap",
        &base_spec("trap 'exit 7' TERM; echo ready; while :; do sleep 0.05; done"),
    )
    .unwrap();
    r.container.start().unwrap();
    let mut buf = [0u8; 6];
    r.output.read_exact(&mut buf).unwrap();
    r.container.signal(Signal::SIGTERM, true).unwrap();
    assert!(matches!(wait_status(&r.exit), WaitStatus::Exited(_, 7)));
    r.container.delete().unwrap();
}

#[test]
fn exec_joins_the_containers_namespaces() {
    let _g = EXCLUSIVE.read().unwrap();
    let rootfs = Rootfs::new();
    let mut spec = base_spec("sleep 100");
    spec["linux"]["namespaces"] = json!([{"type": "pid"}, {"type": "mount"}, {"type": "uts"}, {"type": "ipc"}, {"type": "network"}]);
    let mut r = create(&rootfs, "execd", &spec).unwrap();
    let busy = base_spec("");
    let mut process: oci_spec::runtime::Process =
        serde_json::from_value(busy["process"].clone()).unwrap();
    assert!(
        r.container
            .exec(&process, stdio_to(&pipe().1), TestReaper::get().as_ref())
            .is_err(),
        "exec before start"
    );
    // Where the creation, the start and the exec below spent their time, step by step.
    let names = |steps: &[husk_container::Step]| -> Vec<&'static str> {
        steps.iter().map(|s| s.name).collect()
    };
    assert_eq!(
        names(&r.container.take_create_steps()),
        [
            "plan (spec, seccomp filter)",
            "spawn (fork, clone)",
            "id maps, cgroup join",
            "child: namespaces",
            "child: stdio",
            "child: mounts",
            "child: pivot_root",
            "child: rootfs finish",
            "child: rlimits, program lookup",
            "child: ids, capabilities",
            "ready"
        ]
    );
    assert_eq!(
        names(&r.container.start().unwrap()),
        ["start message", "execve"]
    );
    let pid = r.container.pid();
    process.set_args(Some(vec![
        "sh".into(), "-c".into(),
        "for n in pid mnt uts ipc net; do readlink /proc/self/ns/$n; done; hostname; echo $FOO; exit 5".into(),
    ]));
    let (mut out_r, out_w) = pipe();
    let (mut handle, exit) = r
        .container
        .exec(&process, stdio_to(&out_w), TestReaper::get().as_ref())
        .expect("exec");
    drop(out_w);
    let steps = handle.take_steps();
    assert_eq!(
        names(&steps),
        [
            "plan, spawn (namespaces joined, fork, clone)",
            "cgroup join",
            "child: namespaces",
            "child: stdio",
            "child: rlimits, program lookup",
            "child: ids, capabilities",
            "execve"
        ]
    );
    assert!(steps.iter().map(|s| s.micros).sum::<u64>() > 0);
    assert!(matches!(wait_status(&exit), WaitStatus::Exited(p, 5) if p == handle.pid()));
    let mut out = String::new();
    out_r.read_to_string(&mut out).unwrap();
    let expected: Vec<String> = ["pid", "mnt", "uts", "ipc", "net"]
        .iter()
        .map(|k| ns_link(pid, k).to_string_lossy().into_owned())
        .collect();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[..5],
        expected.iter().map(String::as_str).collect::<Vec<_>>()[..],
        "{out}"
    );
    assert_eq!(&lines[5..], ["box", "bar"], "{out}");
    // A missing program fails the exec and leaves nothing running.
    process.set_args(Some(vec!["nonexistent".into()]));
    let err = r
        .container
        .exec(&process, stdio_to(&pipe().1), TestReaper::get().as_ref())
        .unwrap_err();
    assert!(err.to_string().contains("nonexistent"), "{err}");
    r.container.delete().unwrap();
    assert!(matches!(
        wait_status(&r.exit),
        WaitStatus::Signaled(_, Signal::SIGKILL, _)
    ));
}

#[test]
fn two_containers_share_a_network_namespace_by_path() {
    let _g = EXCLUSIVE.read().unwrap();
    let (ra, rb) = (Rootfs::new(), Rootfs::new());
    let mut spec = base_spec("sleep 100");
    spec["linux"]["namespaces"] = json!([{"type": "pid"}, {"type": "mount"}, {"type": "network"}]);
    spec.as_object_mut().unwrap().remove("hostname");
    let a = create(&ra, "pod-a", &spec).unwrap();
    let a_pid = a.container.pid();
    spec["linux"]["namespaces"] = json!([{"type": "pid"}, {"type": "mount"},
        {"type": "network", "path": format!("/proc/{a_pid}/ns/net")}]);
    let b = create(&rb, "pod-b", &spec).unwrap();
    let b_pid = b.container.pid();
    assert_eq!(ns_link(a_pid, "net"), ns_link(b_pid, "net"));
    assert_ne!(ns_link(a_pid, "net"), ns_link(Pid::this(), "net"));
    assert_ne!(ns_link(a_pid, "pid"), ns_link(b_pid, "pid"));
    assert_ne!(ns_link(a_pid, "mnt"), ns_link(b_pid, "mnt"));
    b.container.delete().unwrap();
    a.container.delete().unwrap();
}

#[test]
fn user_namespace_with_id_maps() {
    let _g = EXCLUSIVE.read().unwrap();
    let mut spec = base_spec("id -u; grep -E '^Uid' /proc/self/status; cat /proc/self/uid_map");
    spec["linux"]["namespaces"] =
        json!([{"type": "user"}, {"type": "pid"}, {"type": "mount"}, {"type": "uts"}]);
    spec["linux"]["uidMappings"] = json!([{"containerID": 0, "hostID": 200000, "size": 65536}]);
    spec["linux"]["gidMappings"] = json!([{"containerID": 0, "hostID": 200000, "size": 65536}]);
    let (status, out) = run(&spec);
    assert!(
        matches!(status, WaitStatus::Exited(_, 0)),
        "{status:?} {out}"
    );
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("0"), "{out}");
    assert!(out.contains("200000") && out.contains("65536"), "{out}");
}

/// runc's default spec lists ambient capabilities without inheritable ones; the kernel
/// refuses to raise those, and runc (so we too) goes on without them.
#[test]
fn ambient_caps_without_inheritable_are_skipped() {
    let _g = EXCLUSIVE.read().unwrap();
    let rootfs = Rootfs::new();
    let mut spec = base_spec("echo started");
    let caps = json!(["CAP_KILL", "CAP_NET_BIND_SERVICE"]);
    spec["process"]["capabilities"] =
        json!({"bounding": caps, "effective": caps, "permitted": caps, "ambient": caps});
    let mut r = create(&rootfs, "ambient", &spec).unwrap();
    r.container.start().unwrap();
    assert!(matches!(wait_status(&r.exit), WaitStatus::Exited(_, 0)));
    let mut out = String::new();
    r.output.read_to_string(&mut out).unwrap();
    assert!(out.contains("started"), "{out}");
}

/// podman's default: no no_new_privs and no CAP_SYS_ADMIN in the final sets. The filter
/// must then go in before the capabilities are dropped (installing it needs the cap).
#[test]
fn seccomp_filter_without_no_new_privs_or_cap_sys_admin() {
    let _g = EXCLUSIVE.read().unwrap();
    let rootfs = Rootfs::new();
    let mut spec = base_spec("mkdir /tmp/a || echo denied");
    let caps = json!(["CAP_CHOWN", "CAP_SETUID", "CAP_SETGID", "CAP_KILL"]);
    spec["process"]["capabilities"] =
        json!({"bounding": caps, "effective": caps, "permitted": caps});
    spec["process"]["noNewPrivileges"] = json!(false);
    spec["linux"]["seccomp"] = json!({"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]});
    let mut r = create(&rootfs, "seccomp-caps", &spec).unwrap();
    r.container.start().unwrap();
    assert!(matches!(wait_status(&r.exit), WaitStatus::Exited(_, 0)));
    let mut out = String::new();
    r.output.read_to_string(&mut out).unwrap();
    assert!(out.contains("denied"), "{out}");
}

#[test]
fn seccomp_filter_applies_to_init_and_exec() {
    let _g = EXCLUSIVE.read().unwrap();
    let rootfs = Rootfs::new();
    let mut spec = base_spec("mkdir /tmp/a && echo made; sleep 100");
    spec["linux"]["seccomp"] = json!({"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]});
    let mut r = create(&rootfs, "seccomp", &spec).unwrap();
    r.container.start().unwrap();
    let mut process: oci_spec::runtime::Process =
        serde_json::from_value(spec["process"].clone()).unwrap();
    process.set_args(Some(vec![
        "sh".into(),
        "-c".into(),
        "mkdir /tmp/b || echo exec-denied".into(),
    ]));
    let (mut out_r, out_w) = pipe();
    let (_h, exit) = r
        .container
        .exec(&process, stdio_to(&out_w), TestReaper::get().as_ref())
        .unwrap();
    drop(out_w);
    assert!(matches!(wait_status(&exit), WaitStatus::Exited(_, 0)));
    let mut out = String::new();
    out_r.read_to_string(&mut out).unwrap();
    assert!(out.contains("exec-denied"), "{out}");
    r.container.signal(Signal::SIGKILL, true).unwrap();
    assert!(matches!(
        wait_status(&r.exit),
        WaitStatus::Signaled(_, Signal::SIGKILL, _)
    ));
    let mut out = String::new();
    r.output.read_to_string(&mut out).unwrap();
    assert!(
        out.contains("Operation not permitted") && !out.contains("made"),
        "{out}"
    );
    assert_eq!(r.container.status(), Status::Stopped);
    r.container.delete().unwrap();
}

/// Reads a pty master until what it yielded (\r removed) ends with `end`, or until its
/// slave side is closed for good (EIO) when `end` is empty.
fn read_terminal(master: &mut std::fs::File, end: &str) -> String {
    let mut out = String::new();
    let mut buf = [0u8; 1024];
    while end.is_empty() || !out.ends_with(end) {
        match master.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.push_str(&String::from_utf8_lossy(&buf[..n]).replace('\r', "")),
            Err(e) if e.raw_os_error() == Some(libc::EIO) => break,
            Err(e) => panic!("reading the terminal: {e}"),
        }
    }
    out
}

/// As with runc: the init's terminal is a pty of the container's own devpts, bound at
/// /dev/console (before the root is made read-only); an exec'd process gets the next one.
#[test]
fn terminal_comes_from_the_containers_devpts() {
    let _g = EXCLUSIVE.read().unwrap();
    let rootfs = Rootfs::new();
    let mut spec = base_spec(
        "tty; test /dev/console -ef /dev/pts/0 && echo console-is-pts0; stty size; sleep 100",
    );
    spec["process"]["terminal"] = json!(true);
    spec["root"]["readonly"] = json!(true);
    spec["mounts"].as_array_mut().unwrap().push(json!({
        "destination": "/dev/pts", "type": "devpts", "source": "devpts",
        "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"],
    }));
    let parsed = spec::parse(&spec.to_string()).unwrap();
    let (mut container, exit) = Container::create(
        CreateOptions {
            id: "tty".into(),
            bundle: rootfs.bundle().to_owned(),
            spec: parsed,
            stdio: Stdio::Terminal,
            cgroup: None,
        },
        TestReaper::get().as_ref(),
    )
    .expect("create");
    let master = container.take_terminal().expect("the init's terminal");
    assert!(container.take_terminal().is_none(), "handed over once");
    let size = libc::winsize {
        ws_row: 33,
        ws_col: 77,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize.
    assert_eq!(
        unsafe {
            libc::ioctl(
                std::os::fd::AsRawFd::as_raw_fd(&master),
                libc::TIOCSWINSZ,
                &size,
            )
        },
        0
    );
    container.start().expect("start");

    let mut process: oci_spec::runtime::Process =
        serde_json::from_value(spec["process"].clone()).unwrap();
    process.set_args(Some(vec!["tty".into()]));
    let (mut handle, exec_exit) = container
        .exec(&process, Stdio::Terminal, TestReaper::get().as_ref())
        .expect("exec with a terminal");
    let mut exec_master = std::fs::File::from(handle.take_terminal().expect("the exec's terminal"));
    assert!(matches!(wait_status(&exec_exit), WaitStatus::Exited(_, 0)));
    assert_eq!(read_terminal(&mut exec_master, ""), "/dev/pts/1\n");

    let mut master = std::fs::File::from(master);
    let out = read_terminal(&mut master, "77\n");
    assert_eq!(out, "/dev/pts/0\nconsole-is-pts0\n33 77\n");
    container.signal(Signal::SIGKILL, true).unwrap();
    wait_status(&exit);
    container.delete().unwrap();
}

// ---------- bad input leaves nothing behind ----------

fn children_of_this_process() -> Vec<i32> {
    let me = std::process::id().to_string();
    let mut kids = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Fields after the ")" of comm: state, ppid, ...
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        if rest.split_whitespace().nth(1) == Some(me.as_str()) {
            kids.push(pid);
        }
    }
    kids
}

/// Runs `f` (expected to fail creating a container) and checks that afterwards no child
/// process exists (once the reaper collected the zombies) and the mount table is unchanged.
fn assert_nothing_left(f: impl FnOnce() -> Error) -> String {
    let _g = EXCLUSIVE.write().unwrap_or_else(|p| p.into_inner());
    TestReaper::get();
    let mounts_before = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let err = f().to_string();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let kids = children_of_this_process();
        if kids.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "left behind: {kids:?} after {err}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        std::fs::read_to_string("/proc/self/mountinfo").unwrap(),
        mounts_before,
        "{err}"
    );
    err
}

#[test]
fn missing_rootfs_is_refused() {
    let err = assert_nothing_left(|| {
        let rootfs = Rootfs::new();
        std::fs::remove_dir_all(rootfs.root()).unwrap();
        create(&rootfs, "norootfs", &base_spec("true")).unwrap_err()
    });
    assert!(err.contains("root.path"), "{err}");
}

#[test]
fn symlink_escaping_mount_destination_is_refused() {
    let outside = tempfile::tempdir().unwrap();
    let err = assert_nothing_left(|| {
        let rootfs = Rootfs::new();
        std::os::unix::fs::symlink("../../../../../../../../..", rootfs.root().join("up")).unwrap();
        let mut spec = base_spec("true");
        let dest = format!("/up{}", outside.path().display());
        spec["mounts"]
            .as_array_mut()
            .unwrap()
            .push(json!({"destination": dest, "type": "tmpfs", "source": "tmpfs"}));
        create(&rootfs, "escape", &spec).unwrap_err()
    });
    assert!(err.contains("escapes the container rootfs"), "{err}");
    assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
}

#[test]
fn unsupported_namespace_and_malformed_spec_name_the_field() {
    let err = assert_nothing_left(|| {
        let rootfs = Rootfs::new();
        let mut spec = base_spec("true");
        spec["linux"]["namespaces"]
            .as_array_mut()
            .unwrap()
            .push(json!({"type": "time"}));
        create(&rootfs, "timens", &spec).unwrap_err()
    });
    assert!(err.contains("linux.namespaces[4].type"), "{err}");
    let err = assert_nothing_left(|| {
        let rootfs = Rootfs::new();
        let mut spec = base_spec("true");
        spec["linux"]["namespaces"]
            .as_array_mut()
            .unwrap()
            .push(json!({"type": "bogus"}));
        create(&rootfs, "bogus", &spec).unwrap_err()
    });
    assert!(
        err.contains("linux.namespaces[4].type") && err.contains("bogus"),
        "{err}"
    );
    let err = assert_nothing_left(|| {
        let rootfs = Rootfs::new();
        let path = rootfs.bundle().join("config.json");
        std::fs::write(&path, r#"{"process": {"user": {"uid": "zero"}}}"#).unwrap();
        spec::load(&path).unwrap_err()
    });
    assert!(err.contains("process.user.uid"), "{err}");
}

#[test]
fn setup_failures_in_the_child_leave_nothing() {
    // Missing program: found during create, in the container's view.
    let err = assert_nothing_left(|| {
        let rootfs = Rootfs::new();
        let mut spec = base_spec("true");
        spec["process"]["args"] = json!(["/bin/nope"]);
        create(&rootfs, "noprog", &spec).unwrap_err()
    });
    assert!(
        err.contains("/bin/nope") && err.contains("not found"),
        "{err}"
    );
    // A bind mount whose source does not exist fails inside the new mount namespace.
    let err = assert_nothing_left(|| {
        let rootfs = Rootfs::new();
        let mut spec = base_spec("true");
        spec["mounts"]
            .as_array_mut()
            .unwrap()
            .push(json!({"destination": "/data", "type": "bind",
            "source": "/nonexistent/source", "options": ["rbind"]}));
        create(&rootfs, "badbind", &spec).unwrap_err()
    });
    assert!(err.contains("/data"), "{err}");
    // Joining a namespace path that does not exist.
    let err = assert_nothing_left(|| {
        let rootfs = Rootfs::new();
        let mut spec = base_spec("true");
        spec["linux"]["namespaces"]
            .as_array_mut()
            .unwrap()
            .push(json!({"type": "network", "path": "/proc/999999999/ns/net"}));
        create(&rootfs, "badns", &spec).unwrap_err()
    });
    assert!(err.contains("net namespace"), "{err}");
    // A bad id.
    let err = assert_nothing_left(|| {
        let rootfs = Rootfs::new();
        create(&rootfs, "../evil", &base_spec("true")).unwrap_err()
    });
    assert!(err.contains("invalid container id"), "{err}");
    let _ = Errno::ENOENT;
}

// ---------- signals and rlimits as runc gives them ----------

/// `Sig<field>:` of /proc/<pid>/status as a mask.
fn sig_mask(pid: Pid, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:\t")))
        .unwrap_or_else(|| panic!("no {field} in {status}"));
    u64::from_str_radix(line.trim(), 16).unwrap()
}

/// Whether `pid` is blocked in wait4 or rt_sigsuspend (how shells wait for a child).
fn in_wait_syscall(pid: Pid) -> bool {
    let Ok(line) = std::fs::read_to_string(format!("/proc/{pid}/syscall")) else {
        return false;
    };
    let nr = line
        .split_whitespace()
        .next()
        .and_then(|n| n.parse::<i64>().ok());
    nr == Some(libc::SYS_wait4) || nr == Some(libc::SYS_rt_sigsuspend)
}

/// The trap of a PID-namespace init runs for TERM, USR1 and USR2 sent to the init alone
/// (`kill ID SIG`, not --all), while the shell waits for a background child; the init
/// then exits. Nothing is blocked or ignored in the container process.
#[test]
fn trapped_signals_run_the_trap_and_end_the_init() {
    let _g = EXCLUSIVE.read().unwrap();
    for (sig, name) in [
        (Signal::SIGTERM, "TERM"),
        (Signal::SIGUSR1, "USR1"),
        (Signal::SIGUSR2, "USR2"),
    ] {
        let rootfs = Rootfs::new();
        let script = format!("trap 'touch /{name}' {name}; echo ready; sleep 10 & wait $!");
        let mut r = create(&rootfs, "traps", &base_spec(&script)).unwrap();
        let pid = r.container.pid();
        // The held init (still our code): no mask, no ignored signal inherited.
        assert_eq!(
            sig_mask(pid, "SigBlk"),
            0,
            "{name}: held init blocks signals"
        );
        assert_eq!(
            sig_mask(pid, "SigIgn") & 0xffff,
            0,
            "{name}: held init ignores signals"
        );
        r.container.start().unwrap();
        let mut buf = [0u8; 6];
        r.output.read_exact(&mut buf).unwrap();
        let bit = 1u64 << (sig as i32 - 1);
        // busybox sh has installed its trap: the signal is caught, neither blocked nor
        // ignored.
        let deadline = Instant::now() + Duration::from_secs(5);
        while sig_mask(pid, "SigCgt") & bit == 0 {
            assert!(Instant::now() < deadline, "{name}: trap never installed");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(sig_mask(pid, "SigBlk") & bit, 0, "{name} blocked");
        assert_eq!(sig_mask(pid, "SigIgn") & bit, 0, "{name} ignored");
        // Only a signal that arrives while the shell waits interrupts `wait`; one that
        // comes earlier runs the trap between commands and the wait then lasts the whole
        // sleep (as under runc), so wait until the shell sleeps in wait4 or sigsuspend.
        while !in_wait_syscall(pid) {
            assert!(Instant::now() < deadline, "{name}: the shell never waited");
            std::thread::sleep(Duration::from_millis(10));
        }
        let sent = Instant::now();
        r.container.signal(sig, false).unwrap();
        let status = wait_status(&r.exit);
        // Well before the background sleep would have ended the script by itself.
        assert!(
            sent.elapsed() < Duration::from_secs(8),
            "{name}: init exited only after {:?}: {status:?}",
            sent.elapsed()
        );
        assert!(
            matches!(status, WaitStatus::Exited(p, _) if p == pid),
            "{name}: {status:?}"
        );
        assert!(
            rootfs.root().join(name).exists(),
            "{name}: trap did not run"
        );
        assert_eq!(r.container.status(), Status::Stopped, "{name}");
        r.container.delete().unwrap();
    }
}

/// Soft and hard limits are each the spec's, raising or lowering the inherited ones.
#[test]
fn rlimits_set_soft_and_hard_exactly() {
    let _g = EXCLUSIVE.read().unwrap();
    let mut spec = base_spec("ulimit -n; ulimit -Hn; cat /proc/self/limits");
    spec["process"]["rlimits"] = json!([
        {"type": "RLIMIT_NOFILE", "soft": 3000, "hard": 4000},
        {"type": "RLIMIT_CORE", "soft": 1024, "hard": 4096},
        {"type": "RLIMIT_NPROC", "soft": 500, "hard": 600},
        {"type": "RLIMIT_STACK", "soft": 4194304, "hard": 8388608},
        {"type": "RLIMIT_MEMLOCK", "soft": 65536, "hard": 131072},
        {"type": "RLIMIT_MSGQUEUE", "soft": 8192, "hard": 16384},
    ]);
    let (status, out) = run(&spec);
    assert!(
        matches!(status, WaitStatus::Exited(_, 0)),
        "{status:?} {out}"
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(&lines[..2], ["3000", "4000"], "{out}");
    let limit = |name: &str| -> (String, String) {
        let line = lines
            .iter()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no {name}: {out}"));
        let f: Vec<&str> = line[name.len()..].split_whitespace().collect();
        (f[0].to_owned(), f[1].to_owned())
    };
    for (name, soft, hard) in [
        ("Max open files", "3000", "4000"),
        ("Max core file size", "1024", "4096"),
        ("Max processes", "500", "600"),
        ("Max stack size", "4194304", "8388608"),
        ("Max locked memory", "65536", "131072"),
        ("Max msgqueue size", "8192", "16384"),
    ] {
        assert_eq!(limit(name), (soft.into(), hard.into()), "{name}: {out}");
    }
}
