//! Kubernetes pods in husk VMs through containerd's CRI plugin (what the kubelet drives): a
//! private Debian containerd 1.6 with the CRI plugin, runtime handler `husk`
//! (`io.containerd.husk.v2`), a CNI bridge network in containerd's own network namespace,
//! images imported from OCI tarballs (nothing is pulled), and a CRI client. See
//! `husk_tests::cri`.
//!
//! One test, sharing its pods across the checks (each husk pod boots a VM):
//! - pod 1 with two containers: both run in the same VM (same guest boot id, not the
//!   host's) under the guest kernel (`-husk`, not the host's release); ExecSync returns
//!   stdout, stderr and the exit code; a container's output lands in its CRI log file
//!   (`<time> stdout F <line>`); the pod's IP (PodSandboxStatus) is configured in the guest;
//!   the pod's DNS config is the containers' resolv.conf (in a VM: the guest's copy the
//!   agent wrote, not a virtio-fs file); UpdateContainerResources changes a running
//!   container's memory limit in its cgroup, which the container sees at /sys/fs/cgroup
//!   (a private cgroup namespace in the cgroup v2 guest);
//! - pod 2 reaches pod 1's IP over TCP (busybox nc);
//! - VM templates (`template = "auto"`, a private `template_dir`; virtio-fs mode): pod 1's
//!   shim builds the template of its VM's shape from a boot of its own devices and restores
//!   it, pod 2 restores the same template; the restored NIC takes each pod's MAC, so the TCP
//!   check above also checks networking after a restore. `HUSK_CRI_TEMPLATE=off` runs the
//!   test with cold boots;
//! - SIGKILL of pod 2's shim: containerd reports its container EXITED, and
//!   StopPodSandbox/RemovePodSandbox clean up;
//! - StopContainer/RemoveContainer and StopPodSandbox/RemovePodSandbox of pod 1;
//! - then no shim process, mount, network namespace, pod cgroup, tap or CNI cache file is
//!   left, and the CRI plugin knows only the two imported images (nothing was pulled).
//!
//! Each step's time is printed. Skips without root, containerd, the CNI plugins, /dev/kvm
//! or the guest image. `HUSK_CRI_HANDLER=runc` runs the same test with containerd's runc
//! shim (to check the harness; the VM-specific checks become host-kernel checks).
//! `HUSK_TEST_CONSOLE=1` appends the guests' consoles and agent logs to a file in the test
//! dir, shown on failure with containerd's log.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use husk_tests::cri::{
    BUSYBOX_IMAGE, CriHarness, HUSK_HANDLER, HUSK_SHIM, PAUSE_IMAGE, Pod, RUNC_HANDLER, RUNC_SHIM,
    cri_missing_reason, fib_trie_has_local, parse_cri_log, pod_dns, tap_devices,
};
use husk_tests::host::skip_without_kvm;
use husk_tests::husk_cli::Husk;
use husk_tests::podman::find_virtiofsd;
use husk_tests::{BusyboxImage, GuestImage, workspace};
use k8s_cri::v1::{ContainerState, ExecSyncResponse, LinuxContainerResources};

const NAME: &str = "cri_pods_run_in_husk_vms";
/// The TCP port pod 1's server container listens on.
const PORT: &str = "7777";
const GREETING: &str = "husk-pod1-hello";
/// The sleeper's memory limit after UpdateContainerResources.
const UPDATED_MEMORY_LIMIT: i64 = 96 << 20;

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn host_file(path: &str) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("reading {path}: {e}"))
        .trim()
        .to_owned()
}

fn host_release() -> String {
    let out = std::process::Command::new("uname")
        .arg("-r")
        .output()
        .expect("uname -r");
    text(&out.stdout).trim().to_owned()
}

/// Prints how long each step took (not asserted).
struct Steps {
    last: Instant,
    first: Instant,
}

impl Steps {
    fn new() -> Self {
        let now = Instant::now();
        Self {
            last: now,
            first: now,
        }
    }

    fn done(&mut self, what: &str) {
        let now = Instant::now();
        eprintln!(
            "[{:7.1} s] {what}: {:.2} s",
            (now - self.first).as_secs_f64(),
            (now - self.last).as_secs_f64()
        );
        self.last = now;
    }
}

#[test]
fn cri_pods_run_in_husk_vms() {
    let handler = std::env::var("HUSK_CRI_HANDLER").unwrap_or_else(|_| HUSK_HANDLER.into());
    let vm = match handler.as_str() {
        HUSK_HANDLER => true,
        RUNC_HANDLER => false,
        other => panic!("HUSK_CRI_HANDLER={other:?}: expected {HUSK_HANDLER} or {RUNC_HANDLER}"),
    };
    if let Some(reason) = cri_missing_reason() {
        eprintln!("SKIPPED {NAME}: {reason}");
        return;
    }
    let work = tempfile::Builder::new()
        .prefix("husk-cri-test-")
        .tempdir()
        .expect("temp dir");
    let console = work.path().join("console.log");
    let mut env: Vec<(&str, PathBuf)> = Vec::new();
    let mut shim_dirs: Vec<PathBuf> = Vec::new();
    let mut templates = false;
    if vm {
        if skip_without_kvm(NAME) {
            return;
        }
        let image = match GuestImage::locate_or_build() {
            Ok(i) => i,
            Err(e) => {
                eprintln!(
                    "SKIPPED {NAME}: no guest image ({e:#}); build it with guest-image/build.sh"
                );
                return;
            }
        };
        let shim = workspace::binary(HUSK_SHIM).expect("building the shim");
        shim_dirs.push(shim.parent().expect("shim folder").to_path_buf());
        let mut extra = match find_virtiofsd() {
            Some(v) => format!(
                "rootfs_mode = \"virtiofs\"\nvirtiofsd = {:?}\n",
                v.display().to_string()
            ),
            None => "rootfs_mode = \"block\"\n".into(),
        };
        templates = extra.contains("virtiofs")
            && std::env::var("HUSK_CRI_TEMPLATE").as_deref() != Ok("off");
        if templates {
            extra.push_str(&format!(
                "template = \"auto\"\ntemplate_dir = {:?}\n",
                work.path().join("templates").display().to_string()
            ));
        } else {
            extra.push_str("template = \"off\"\n");
        }
        eprintln!("VM templates: {}", if templates { "on" } else { "off" });
        if std::env::var_os("HUSK_TEST_CONSOLE").is_some() {
            extra.push_str(&format!(
                "guest_console = {:?}\nkernel_cmdline = \"husk.agent_log=info\"\n",
                console.display().to_string()
            ));
        }
        let config = work.path().join("husk.toml");
        std::fs::write(&config, Husk::guest_config(&image, &extra)).expect("husk.toml");
        eprintln!("husk config {}", config.display());
        env.push(("HUSK_CONFIG", config));
    } else {
        eprintln!(
            "HUSK_CRI_HANDLER=runc: checking the harness with containerd's runc shim; the \
             VM-specific checks (guest kernel, a boot id differing from the host's) become \
             checks that the containers run on the host kernel"
        );
    }
    let shim_name = if vm { HUSK_SHIM } else { RUNC_SHIM };

    let mut steps = Steps::new();
    let busybox = BusyboxImage::build().expect("busybox rootfs");
    let shim_dir_refs: Vec<&Path> = shim_dirs.iter().map(PathBuf::as_path).collect();
    let env_refs: Vec<(&str, &Path)> = env.iter().map(|(k, v)| (*k, v.as_path())).collect();
    let h = CriHarness::start(&shim_dir_refs, &env_refs, &busybox.root_dir())
        .expect("starting containerd with the CRI plugin");
    steps.done("containerd with CRI up, images imported");

    let fail = |what: &str, detail: &str| -> ! { h.fail_with_logs(what, detail, &console) };
    let check = |cond: bool, what: &str, detail: String| {
        if !cond {
            fail(what, &detail)
        }
    };
    let ok = |r: anyhow::Result<()>, what: &str| {
        if let Err(e) = r {
            fail(what, &format!("{e:#}"))
        }
    };
    let exec = |id: &str, cmd: &[&str]| -> ExecSyncResponse {
        h.cri()
            .exec_sync(id, cmd, 300)
            .unwrap_or_else(|e| fail(&format!("ExecSync {cmd:?} in {id}"), &format!("{e:#}")))
    };
    let exec_out = |id: &str, cmd: &[&str]| -> String {
        let r = exec(id, cmd);
        if r.exit_code != 0 {
            fail(
                &format!("ExecSync {cmd:?} in {id}"),
                &format!(
                    "exit code {}, stdout {:?}, stderr {:?}",
                    r.exit_code,
                    text(&r.stdout),
                    text(&r.stderr)
                ),
            );
        }
        text(&r.stdout)
    };
    let run_container = |pod: &Pod, name: &str, cmd: &[&str], steps: &mut Steps| -> String {
        let id = h
            .create_container(pod, name, cmd)
            .unwrap_or_else(|e| fail(&format!("CreateContainer {name}"), &format!("{e:#}")));
        steps.done(&format!("CreateContainer {name}"));
        ok(
            h.cri().start_container(&id),
            &format!("StartContainer {name}"),
        );
        steps.done(&format!("StartContainer {name}"));
        id
    };

    // Pod 1: a sleeper and a TCP server that also writes to stdout and stderr.
    let pod1 = h
        .run_pod("pod1", &handler)
        .unwrap_or_else(|e| fail("RunPodSandbox pod1", &format!("{e:#}")));
    steps.done(&format!("RunPodSandbox pod1 ({handler})"));
    let sleeper = run_container(&pod1, "sleeper", &["sleep", "1000"], &mut steps);
    let server_cmd = format!(
        "echo husk-log-out; echo husk-log-err >&2; \
         while true; do echo {GREETING} | busybox nc -l -p {PORT}; done"
    );
    let server = run_container(&pod1, "server", &["sh", "-c", &server_cmd], &mut steps);

    // Same VM: one kernel boot for both containers, not the host's.
    let boot_ids: Vec<String> = [&sleeper, &server]
        .iter()
        .map(|id| {
            exec_out(id, &["cat", "/proc/sys/kernel/random/boot_id"])
                .trim()
                .to_owned()
        })
        .collect();
    steps.done("ExecSync boot_id in both containers");
    if vm {
        // The pod's VMM is a jailed process below its shim.
        let shim = h
            .pod_shim(shim_name, &pod1)
            .unwrap_or_else(|| fail("pod 1's shim", "no shim process serves it"));
        let vmms = husk_tests::jail::jailed_vmms_below(shim);
        check(
            vmms.len() == 1,
            "pod 1's VMM is jailed",
            format!("jailed VMMs below shim {shim}: {vmms:?}"),
        );
        let root = husk_tests::jail::assert_jailed(vmms[0]);
        steps.done(&format!(
            "pod 1's VMM {} jailed, its root {root:?}",
            vmms[0]
        ));
    }
    let host_boot_id = host_file("/proc/sys/kernel/random/boot_id");
    check(
        !boot_ids[0].is_empty() && boot_ids[0] == boot_ids[1],
        "pod 1's containers run under different kernels",
        format!("boot ids {boot_ids:?}"),
    );
    let release = exec_out(&sleeper, &["uname", "-r"]).trim().to_owned();
    if vm {
        check(
            boot_ids[0] != host_boot_id,
            "pod 1's containers run on the host's kernel",
            format!("boot id {host_boot_id} as the host's"),
        );
        check(
            release.ends_with("-husk") && release != host_release(),
            "pod 1 does not run under the guest kernel",
            format!(
                "uname -r {release:?}, expected one ending in -husk; host is {:?}",
                host_release()
            ),
        );
    } else {
        assert_eq!(
            boot_ids[0], host_boot_id,
            "runc containers share the host's boot id"
        );
        assert_eq!(
            release,
            host_release(),
            "runc containers run the host's kernel"
        );
    }
    eprintln!("pod 1: kernel {release}, boot id {}", boot_ids[0]);

    // ExecSync: stdout, stderr and the exit code come back separately.
    let r = exec(
        &sleeper,
        &["sh", "-c", "echo exec-out; echo exec-err >&2; exit 3"],
    );
    steps.done("ExecSync with exit code 3");
    let got = (r.exit_code, text(&r.stdout), text(&r.stderr));
    check(
        got == (3, "exec-out\n".into(), "exec-err\n".into()),
        "ExecSync exit code, stdout, stderr",
        format!("{got:?}, expected (3, \"exec-out\\n\", \"exec-err\\n\")"),
    );

    // The server's output, in the CRI log file containerd writes from the shim's stdio.
    let log_path = pod1.log_path("server");
    let deadline = Instant::now() + Duration::from_secs(60);
    let want = [
        ("stdout".to_string(), "husk-log-out".to_string()),
        ("stderr".to_string(), "husk-log-err".to_string()),
    ];
    loop {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        let lines = parse_cri_log(&log)
            .unwrap_or_else(|e| fail("the server's CRI log", &format!("{e:#}: {log:?}")));
        if want.iter().all(|w| lines.contains(w)) {
            break;
        }
        if Instant::now() >= deadline {
            fail(
                "the server's CRI log",
                &format!("{} lacks {want:?} after 60 s: {log:?}", log_path.display()),
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    steps.done("log lines in the CRI log file");

    // The pod's IP is configured where its containers run.
    let ip1 = h
        .pod_ip(&pod1)
        .unwrap_or_else(|e| fail("PodSandboxStatus pod1", &format!("{e:#}")));
    let prefix = h.network().subnet.trim_end_matches("0/24").to_owned();
    check(
        ip1.starts_with(&prefix),
        "pod 1's IP",
        format!("{ip1} is outside the test network {}", h.network().subnet),
    );
    let fib = exec_out(&sleeper, &["cat", "/proc/net/fib_trie"]);
    check(
        fib_trie_has_local(&fib, &ip1),
        "pod 1's IP inside the pod",
        format!("{ip1} is not a local address in /proc/net/fib_trie:\n{fib}"),
    );
    steps.done(&format!("pod 1's IP {ip1} configured inside"));

    // UpdateContainerResources on the running sleeper, then one ExecSync reads back the
    // memory limit (cgroup v2 in the guest; v1 for runc on a v1 host), the pod's DNS
    // settings and where /etc/resolv.conf comes from.
    ok(
        h.cri().update_container_resources(
            &sleeper,
            LinuxContainerResources {
                memory_limit_in_bytes: UPDATED_MEMORY_LIMIT,
                cpu_shares: 2,
                ..Default::default()
            },
        ),
        "UpdateContainerResources of the sleeper",
    );
    steps.done("UpdateContainerResources");
    let probe = exec_out(
        &sleeper,
        &[
            "sh",
            "-c",
            "cat /sys/fs/cgroup/memory.max 2>/dev/null || \
             cat /sys/fs/cgroup/memory/memory.limit_in_bytes; \
             echo ---; cat /etc/resolv.conf; echo ---; \
             grep ' /etc/resolv.conf ' /proc/self/mountinfo; echo ---; \
             cat /proc/self/cgroup",
        ],
    );
    let parts: Vec<&str> = probe.split("---\n").collect();
    let [limit, resolv, mount, cgroup] = parts[..] else {
        fail(
            "the sleeper's probe",
            &format!("unexpected output {probe:?}"),
        );
    };
    check(
        limit.trim() == UPDATED_MEMORY_LIMIT.to_string(),
        "the memory limit after UpdateContainerResources",
        format!("{limit:?}, expected {UPDATED_MEMORY_LIMIT}"),
    );
    let dns = pod_dns("pod1");
    let words: Vec<Vec<&str>> = resolv
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    let has = |key: &str, values: &[String]| {
        words.iter().any(|w| {
            w.first() == Some(&key)
                && w[1..] == values.iter().map(String::as_str).collect::<Vec<_>>()[..]
        })
    };
    check(
        has("nameserver", &dns.servers)
            && has("search", &dns.searches)
            && has("options", &dns.options),
        "the pod's DNS config in the container's resolv.conf",
        format!("{resolv:?}, expected {dns:?}"),
    );
    if vm {
        // The guest is cgroup v2: a private cgroup namespace whatever the host's mode.
        check(
            cgroup.trim() == "0::/",
            "the container's cgroup namespace in the VM",
            format!("/proc/self/cgroup is {cgroup:?}, expected 0::/ (a private namespace)"),
        );
        check(
            !mount.contains("virtiofs"),
            "the container's resolv.conf in the VM",
            format!("a virtio-fs file, not the guest's copy of the pod's DNS: {mount:?}"),
        );
    }
    steps.done("memory limit, resolv.conf read back");

    // Pod 2 reaches pod 1 over TCP.
    let pod2 = h
        .run_pod("pod2", &handler)
        .unwrap_or_else(|e| fail("RunPodSandbox pod2", &format!("{e:#}")));
    steps.done(&format!("RunPodSandbox pod2 ({handler})"));
    let client = run_container(&pod2, "client", &["sleep", "1000"], &mut steps);
    let ip2 = h
        .pod_ip(&pod2)
        .unwrap_or_else(|e| fail("PodSandboxStatus pod2", &format!("{e:#}")));
    check(ip1 != ip2, "pod IPs", format!("both pods got {ip1}"));
    // The server restarts nc between connections: retry a few times.
    let mut attempts = Vec::new();
    while attempts.len() < 5 {
        let r = exec(&client, &["busybox", "nc", "-w", "10", &ip1, PORT]);
        if r.exit_code == 0 && text(&r.stdout) == format!("{GREETING}\n") {
            break;
        }
        attempts.push(format!(
            "exit {}, stdout {:?}, stderr {:?}",
            r.exit_code,
            text(&r.stdout),
            text(&r.stderr)
        ));
        std::thread::sleep(Duration::from_secs(1));
    }
    if attempts.len() == 5 {
        fail(
            &format!("pod 2 ({ip2}) connecting to pod 1 at {ip1}:{PORT}"),
            &format!("{attempts:#?}"),
        );
    }
    steps.done(&format!("TCP from pod 2 ({ip2}) to pod 1 ({ip1})"));
    if templates {
        let log = h.log();
        let built = log.matches("template built").count();
        let restored = log.matches("VM restored from its template").count();
        check(
            built == 1 && restored == 2,
            "pod VMs restored from one template",
            format!("{built} template builds and {restored} restores in containerd's log"),
        );
        steps.done("both pods restored from the template pod 1 built");
    }

    // containerd restarts under two running pods (a service manager's restart): the
    // shims and VMs live on; listing, status and ExecSync work through the new
    // containerd, and everything below (kill, stop, remove, nothing left) runs after it.
    h.restart_containerd()
        .unwrap_or_else(|e| fail("restarting containerd", &format!("{e:#}")));
    let pods = h
        .cri()
        .list_pod_sandboxes()
        .unwrap_or_else(|e| fail("ListPodSandbox after the restart", &format!("{e:#}")));
    let ready = pods
        .iter()
        .filter(|p| p.state == k8s_cri::v1::PodSandboxState::SandboxReady as i32)
        .count();
    check(
        ready == 2,
        "pods after the containerd restart",
        format!("{ready} ready of {pods:?}"),
    );
    let status = h
        .cri()
        .container_status(&sleeper)
        .unwrap_or_else(|e| fail("ContainerStatus after the restart", &format!("{e:#}")));
    check(
        status.state == ContainerState::ContainerRunning as i32,
        "the sleeper after the containerd restart",
        format!("state {}", status.state),
    );
    let echoed = exec_out(&sleeper, &["echo", "after-restart"]);
    check(
        echoed == "after-restart\n",
        "ExecSync after the containerd restart",
        format!("{echoed:?}"),
    );
    steps.done("containerd restarted: pods listed, sleeper running, ExecSync");

    // The leftover checks used at the end see what running pods hold.
    let live = h.leftovers(shim_name);
    // runc puts each container in a cgroup below the pod's parent; the husk shim moves
    // itself (with the VMM and so the guest's memory) into the sandbox's.
    let kinds = [
        shim_name,
        "mount ",
        "network namespace ",
        "CNI cache ",
        "shim socket ",
        "cgroup ",
    ];
    for kind in kinds {
        check(
            live.iter().any(|l| l.starts_with(kind)),
            "the leftover check with two pods running",
            format!("it finds no {kind:?}: {live:#?}"),
        );
    }
    if vm {
        let pid = h
            .pod_shim(shim_name, &pod1)
            .unwrap_or_else(|| fail("pod 1's shim", "not found"));
        let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        let in_pod = format!("/pod1/{}", pod1.id);
        check(
            cgroups.lines().all(|l| l.ends_with(&in_pod)),
            "pod 1's shim (with its VM) in the sandbox's cgroup",
            format!("/proc/{pid}/cgroup does not end in {in_pod} everywhere:\n{cgroups}"),
        );
    }
    for ns in h.netns_files() {
        eprintln!(
            "taps in pod network namespace {}: {:?}",
            ns.display(),
            tap_devices(Some(&ns))
        );
    }

    // SIGKILL of pod 2's shim: containerd sees the container exit, and the pod can still be
    // stopped and removed.
    let pid = h.pod_shim(shim_name, &pod2).unwrap_or_else(|| {
        fail(
            "pod 2's shim",
            &format!(
                "no {shim_name} with -id {} among {:?}",
                pod2.id,
                h.shims(shim_name)
            ),
        )
    });
    // SAFETY: SIGKILL to the shim process found above, started by the test's containerd.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let status = h.cri().container_status(&client).unwrap_or_else(|e| {
            fail(
                "ContainerStatus after the shim's SIGKILL",
                &format!("{e:#}"),
            )
        });
        if status.state == ContainerState::ContainerExited as i32 {
            eprintln!(
                "pod 2's container after its shim's SIGKILL: EXITED, exit code {}, reason {:?}",
                status.exit_code, status.reason
            );
            break;
        }
        if Instant::now() >= deadline {
            fail(
                "ContainerStatus after the shim's SIGKILL",
                &format!("still {:?} after 120 s", status.state),
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    steps.done("pod 2's container EXITED after SIGKILL of its shim");
    ok(h.cri().stop_pod_sandbox(&pod2.id), "StopPodSandbox pod2");
    steps.done("StopPodSandbox pod2");
    ok(
        h.cri().remove_pod_sandbox(&pod2.id),
        "RemovePodSandbox pod2",
    );
    steps.done("RemovePodSandbox pod2");

    // Pod 1, the orderly way.
    for (name, id) in [("sleeper", &sleeper), ("server", &server)] {
        ok(
            h.cri().stop_container(id, 2),
            &format!("StopContainer {name}"),
        );
        steps.done(&format!("StopContainer {name}"));
        let status = h
            .cri()
            .container_status(id)
            .unwrap_or_else(|e| fail("ContainerStatus after StopContainer", &format!("{e:#}")));
        check(
            status.state == ContainerState::ContainerExited as i32,
            &format!("{name} after StopContainer"),
            format!("state {} (not EXITED)", status.state),
        );
        ok(
            h.cri().remove_container(id),
            &format!("RemoveContainer {name}"),
        );
        steps.done(&format!("RemoveContainer {name}"));
    }
    ok(h.cri().stop_pod_sandbox(&pod1.id), "StopPodSandbox pod1");
    steps.done("StopPodSandbox pod1");
    ok(
        h.cri().remove_pod_sandbox(&pod1.id),
        "RemovePodSandbox pod1",
    );
    steps.done("RemovePodSandbox pod1");
    let pods = h
        .cri()
        .list_pod_sandboxes()
        .unwrap_or_else(|e| fail("ListPodSandbox", &format!("{e:#}")));
    assert!(pods.is_empty(), "pods left after removal: {pods:?}");

    // Nothing left behind (the shims exit shortly after their last task is deleted).
    // containerd 1.6's runc shim leaves the socket of a shim that was killed (its
    // `delete` removes the container, not the socket); not so the husk shim.
    let killed_socket = format!("(-id {})", pod2.id);
    let known = |l: &String| !vm && l.starts_with("shim socket ") && l.ends_with(&killed_socket);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (known_left, left): (Vec<String>, Vec<String>) =
            h.leftovers(shim_name).into_iter().partition(known);
        for l in &known_left {
            eprintln!("known runc shim leftover, removed by the harness: {l}");
        }
        if left.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            fail(
                "120 s after removing every pod",
                &format!("still left: {left:#?}"),
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    steps.done("nothing left");
    // Nothing was pulled: the CRI plugin knows the two imported images only (containerd's
    // network namespace has no route out, so a pull would have failed RunPodSandbox).
    let tags = h
        .cri()
        .list_image_tags()
        .unwrap_or_else(|e| fail("ListImages", &format!("{e:#}")));
    let mut imported = vec![BUSYBOX_IMAGE.to_string(), PAUSE_IMAGE.to_string()];
    imported.sort();
    check(
        tags == imported,
        "images known to the CRI plugin",
        format!("{tags:?}, expected only the imported {imported:?}"),
    );
}
