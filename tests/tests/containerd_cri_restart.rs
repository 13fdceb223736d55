//! containerd restarts in the middle of CRI calls on husk pods (issue 18; Kata #5246 leaks
//! a shim and its VM here), with a kubelet's recovery afterwards, and the CRI log file
//! keeps every byte of a container's output.
//!
//! 1. RunPodSandbox of a pod, and containerd restarted (SIGTERM, started again on the
//!    same state, as a service manager does) while the pod's shim boots its VM (and builds
//!    the VM template, on a fresh node). The call fails or returns; afterwards the kubelet
//!    stops and removes every sandbox it did not get READY, and retries with attempt 1,
//!    which must give a working pod. Then nothing of the interrupted attempt is left: no
//!    shim, VMM, virtiofsd, mount, network namespace, tap, cgroup or CNI cache file.
//! 2. StartContainer in that pod (where the shim creates the task in the VM), with
//!    containerd restarted during the call. Afterwards the kubelet removes what is not
//!    running and makes it again (attempt 1): a container runs, ExecSync answers, the pod
//!    kept its shim.
//! 3. A container that writes `HUSK_STDIO_LINES` lines of `seq` (3.4 MB; 101 MB nightly)
//!    and exits at once: its CRI log file holds every line, in order.
//! 4. The pod is stopped and removed; nothing is left.
//!
//! Skips without root, containerd, the CNI plugins, /dev/kvm or the guest image.
//! `HUSK_TEST_CONSOLE=1` appends the guests' consoles and agent logs to a file in the test
//! dir, shown on failure.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use husk_tests::cri::{
    CriHarness, HUSK_HANDLER, HUSK_SHIM, Pod, cri_missing_reason, husk_shim_setup, parse_cri_log,
};
use husk_tests::podman::find_virtiofsd;
use husk_tests::{BusyboxImage, GuestImage};
use k8s_cri::v1::{ContainerState, PodSandboxState};

const NAME: &str = "containerd_restarts_mid_call_leak_nothing";
/// How long the clean-up's effects (shims exiting after their last task) may take.
const SETTLE: Duration = Duration::from_secs(120);

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Waits until `ready` holds (polling), at most `timeout`.
fn wait_for(timeout: Duration, mut ready: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while !ready() {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    true
}

/// What the kubelet does with sandboxes after a restart that cut RunPodSandbox short: it
/// never got an id, so it stops and removes every sandbox, READY or not (the call may have
/// completed inside containerd before it stopped). Returns the ids removed, with whether
/// each was READY.
fn remove_every_sandbox(h: &CriHarness) -> anyhow::Result<Vec<(String, bool)>> {
    let mut removed = Vec::new();
    for s in h.cri().list_pod_sandboxes()? {
        h.cri().stop_pod_sandbox(&s.id)?;
        h.cri().remove_pod_sandbox(&s.id)?;
        removed.push((s.id, s.state == PodSandboxState::SandboxReady as i32));
    }
    Ok(removed)
}

/// A CRI call that containerd's restart interrupted.
struct Interrupted<T> {
    result: anyhow::Result<T>,
    /// How long the call took.
    took: Duration,
    /// When containerd was restarted, since the test began.
    restarted_at: Duration,
}

impl<T> Interrupted<T> {
    fn describe(&self, call: &str, ok: impl Fn(&T) -> String) -> String {
        format!(
            "containerd restarted at +{:.1} s during {call}, which returned after {:.1} s: {}",
            self.restarted_at.as_secs_f64(),
            self.took.as_secs_f64(),
            match &self.result {
                Ok(v) => ok(v),
                Err(e) => format!("{e:#}"),
            }
        )
    }
}

/// Runs `call` on a thread of its own and restarts containerd once `moment` (on this
/// thread) returns; `t0` is when the test began.
fn restart_during<T: Send>(
    h: &CriHarness,
    t0: Instant,
    call: impl FnOnce() -> anyhow::Result<T> + Send,
    moment: impl FnOnce(),
) -> anyhow::Result<Interrupted<T>> {
    std::thread::scope(|s| {
        let thread = s.spawn(|| {
            let t = Instant::now();
            (call(), t.elapsed())
        });
        moment();
        let restarted_at = t0.elapsed();
        let restarted = h.restart_containerd();
        let (result, took) = thread
            .join()
            .map_err(|_| anyhow::anyhow!("the call's thread panicked"))?;
        restarted?;
        Ok(Interrupted {
            result,
            took,
            restarted_at,
        })
    })
}

/// Waits until nothing of `h`'s pods is left; returns what is left otherwise.
fn settle(h: &CriHarness) -> Vec<String> {
    let mut left = Vec::new();
    wait_for(SETTLE, || {
        left = h.leftovers(HUSK_SHIM);
        left.is_empty()
    });
    left
}

#[test]
fn containerd_restarts_mid_call_leak_nothing() {
    if let Some(reason) = cri_missing_reason() {
        eprintln!("SKIPPED {NAME}: {reason}");
        return;
    }
    let Some(image) = GuestImage::or_skip(NAME) else {
        return;
    };
    let work = tempfile::Builder::new()
        .prefix("husk-cri-restart-")
        .tempdir()
        .expect("temp dir");
    let console = work.path().join("console.log");
    // Templates as on a real node (the first pod builds one) where virtio-fs is there.
    let extra = match find_virtiofsd() {
        Some(v) => format!(
            "rootfs_mode = \"virtiofs\"\nvirtiofsd = {:?}\ntemplate = \"auto\"\ntemplate_dir = {:?}\n",
            v.display().to_string(),
            work.path().join("templates").display().to_string()
        ),
        None => "rootfs_mode = \"block\"\ntemplate = \"off\"\n".into(),
    };
    let (config, shim_dir) =
        husk_shim_setup(work.path(), &image, &extra, &console).expect("husk config and shim");
    let t0 = Instant::now();
    let step = |what: &str| eprintln!("[{:6.1} s] {what}", t0.elapsed().as_secs_f64());
    let busybox = BusyboxImage::build().expect("busybox rootfs");
    let h = CriHarness::start(
        &[shim_dir.as_path()],
        &[("HUSK_CONFIG", config.as_path())],
        &busybox.root_dir(),
    )
    .expect("starting containerd with the CRI plugin");
    step("containerd with CRI up, images imported");

    let fail = |what: &str, detail: &str| -> ! { h.fail_with_logs(what, detail, &console) };
    let check = |cond: bool, what: &str, detail: String| {
        if !cond {
            fail(what, &detail)
        }
    };

    // 1. Restart during RunPodSandbox: once the pod's shim runs, a moment into its boot.
    let mut config_a = h.pod_config("restart-a").expect("pod config");
    let client = h.connect_client().expect("CRI client");
    let mut shim_started = true;
    let interrupted = restart_during(
        &h,
        t0,
        || client.run_pod_sandbox(&config_a, HUSK_HANDLER),
        || {
            shim_started = wait_for(Duration::from_secs(60), || !h.shims(HUSK_SHIM).is_empty());
            std::thread::sleep(Duration::from_secs(3));
        },
    )
    .unwrap_or_else(|e| fail("restarting containerd", &format!("{e:#}")));
    if !shim_started {
        fail("RunPodSandbox", "no husk shim started within 60 s");
    }
    step(&interrupted.describe("RunPodSandbox", |id| format!("pod {id}")));
    let removed = remove_every_sandbox(&h)
        .unwrap_or_else(|e| fail("removing the sandboxes", &format!("{e:#}")));
    let left = settle(&h);
    check(
        left.is_empty(),
        "after a restart during RunPodSandbox and the kubelet's clean-up",
        format!("left: {left:#?} (sandboxes removed, with whether READY: {removed:?})"),
    );
    step("nothing left of the interrupted RunPodSandbox");

    // The kubelet's retry.
    config_a.metadata.as_mut().expect("pod metadata").attempt = 1;
    let id = h
        .cri()
        .run_pod_sandbox(&config_a, HUSK_HANDLER)
        .unwrap_or_else(|e| fail("RunPodSandbox attempt 1", &format!("{e:#}")));
    let pod = Pod {
        id,
        name: "restart-a".into(),
        log_dir: PathBuf::from(&config_a.log_directory),
        config: config_a,
    };
    let shim_pid = h
        .pod_shim(HUSK_SHIM, &pod)
        .unwrap_or_else(|| fail("the pod's shim", "not found"));
    step("RunPodSandbox attempt 1: pod ready");

    // 2. Restart during StartContainer: CRI's CreateContainer only records the container;
    // the task (the shim's Create, the container made in the VM) comes with StartContainer.
    let sleeper = CriHarness::container_config("sleeper", &["sleep", "100000"]);
    let first = h
        .cri()
        .create_container(&pod.id, &sleeper, &pod.config)
        .unwrap_or_else(|e| fail("CreateContainer", &format!("{e:#}")));
    let interrupted = restart_during(
        &h,
        t0,
        || client.start_container(&first),
        || std::thread::sleep(Duration::from_millis(1000)),
    )
    .unwrap_or_else(|e| fail("restarting containerd", &format!("{e:#}")));
    step(&interrupted.describe("StartContainer", |()| "started".to_owned()));
    let status = h
        .cri()
        .pod_sandbox_status(&pod.id)
        .unwrap_or_else(|e| fail("PodSandboxStatus after the restart", &format!("{e:#}")));
    check(
        status.status.as_ref().map(|s| s.state) == Some(PodSandboxState::SandboxReady as i32),
        "the pod after a restart during StartContainer",
        format!("{:?}", status.status.map(|s| s.state)),
    );
    // The kubelet's sync: a container that is not running is removed and made again; one
    // that runs (its start completed inside containerd) is kept.
    let mut running = None;
    let listed = h
        .cri()
        .list_containers()
        .unwrap_or_else(|e| fail("ListContainers", &format!("{e:#}")));
    for c in &listed {
        if c.state == ContainerState::ContainerRunning as i32 {
            running = Some(c.id.clone());
        } else {
            h.cri()
                .remove_container(&c.id)
                .unwrap_or_else(|e| fail("RemoveContainer", &format!("{e:#}")));
        }
    }
    step(&format!(
        "after the restart: {} container(s) listed, {}",
        listed.len(),
        if running.is_some() {
            "the sleeper is running"
        } else {
            "none running: removed, made again"
        }
    ));
    let cid = running.unwrap_or_else(|| {
        let mut sleeper = sleeper.clone();
        sleeper.metadata.as_mut().expect("metadata").attempt = 1;
        h.cri()
            .create_container(&pod.id, &sleeper, &pod.config)
            .and_then(|cid| h.cri().start_container(&cid).map(|()| cid))
            .unwrap_or_else(|e| {
                fail(
                    "CreateContainer + StartContainer attempt 1",
                    &format!("{e:#}"),
                )
            })
    });
    let r = h
        .cri()
        .exec_sync(&cid, &["echo", "after-restart"], 300)
        .unwrap_or_else(|e| fail("ExecSync after the restart", &format!("{e:#}")));
    check(
        r.exit_code == 0 && text(&r.stdout) == "after-restart\n",
        "ExecSync after the restart",
        format!("exit {}, stdout {:?}", r.exit_code, text(&r.stdout)),
    );
    check(
        h.pod_shim(HUSK_SHIM, &pod) == Some(shim_pid),
        "the pod's shim across the restart",
        format!("{:?}, was {shim_pid}", h.pod_shim(HUSK_SHIM, &pod)),
    );
    step("a sleeper runs, ExecSync answers; same shim");

    // 3. Every byte of a big, short-lived output in the CRI log file.
    let lines = husk_tests::stdio::lines();
    let seq = CriHarness::container_config("seq", &["seq", "1", &lines.to_string()]);
    let seq_id = h
        .cri()
        .create_container(&pod.id, &seq, &pod.config)
        .and_then(|cid| h.cri().start_container(&cid).map(|()| cid))
        .unwrap_or_else(|e| fail("the seq container", &format!("{e:#}")));
    let t = Instant::now();
    let exited = wait_for(Duration::from_secs(120 + lines / 10_000), || {
        h.cri()
            .container_status(&seq_id)
            .is_ok_and(|s| s.state == ContainerState::ContainerExited as i32)
    });
    check(exited, "the seq container", "did not exit".into());
    let status = h
        .cri()
        .container_status(&seq_id)
        .unwrap_or_else(|e| fail("ContainerStatus seq", &format!("{e:#}")));
    check(
        status.exit_code == 0,
        "the seq container's exit code",
        format!("{}", status.exit_code),
    );
    let log_path = pod.log_dir.join("seq.log");
    let log = std::fs::read_to_string(&log_path).unwrap_or_else(|e| {
        fail(
            "reading the CRI log",
            &format!("{}: {e}", log_path.display()),
        )
    });
    let parsed =
        parse_cri_log(&log).unwrap_or_else(|e| fail("parsing the CRI log", &format!("{e:#}")));
    let mut got = Vec::with_capacity(log.len());
    for (stream, line) in &parsed {
        check(
            stream == "stdout",
            "the seq container's log",
            format!("a {stream} line: {line:?}"),
        );
        got.extend_from_slice(line.as_bytes());
        got.push(b'\n');
    }
    husk_tests::stdio::assert_same_bytes(
        "the CRI log's stdout lines",
        &got,
        &husk_tests::stdio::seq_output(lines),
    );
    step(&format!(
        "CRI log file: {} lines of seq complete ({} bytes of log), {:.1} s",
        parsed.len(),
        log.len(),
        t.elapsed().as_secs_f64()
    ));

    // 4. Remove everything; nothing left.
    for c in [&cid, &seq_id] {
        let _ = h.cri().stop_container(c, 2);
        h.cri()
            .remove_container(c)
            .unwrap_or_else(|e| fail("RemoveContainer", &format!("{e:#}")));
    }
    h.cri()
        .stop_pod_sandbox(&pod.id)
        .and_then(|()| h.cri().remove_pod_sandbox(&pod.id))
        .unwrap_or_else(|e| fail("removing the pod", &format!("{e:#}")));
    let left = settle(&h);
    check(
        left.is_empty(),
        "after removing the pod",
        format!("left: {left:#?}"),
    );
    step("pod removed, nothing left");
}
