//! containerd runs containers in husk VMs through `containerd-shim-husk-v2`: a private
//! Debian containerd (own config, root, state and socket), an image imported from an OCI
//! tarball built from the busybox rootfs, and `ctr` as the client.
//!
//! - `ctr run --rm -t` on a terminal: the output comes back through the container's own
//!   pty (`/dev/pts/0`) sized like ctr's terminal, the exit code is the container's, and the
//!   container ran under the guest kernel (release ending in `-husk`, not the host's);
//! - `ctr run -d` with a memory limit, `ctr task exec` (output and exit code), an exec
//!   that outgrows the limit (OOM-killed: 137 and a TaskOOM event), `ctr task ps` (guest
//!   pids), `ctr task metrics` (the guest cgroup's pids and memory), `ctr task
//!   pause`/`resume` (PAUSED, then RUNNING), `ctr task kill`, `ctr task delete`: afterwards
//!   no shim and no rootfs mount is left;
//! - the task events containerd received (`ctr events`), in the order it requires: create,
//!   start, exec-added/exec-started/exit of each exec, oom, paused, resumed, exit, delete;
//! - `ctr run --rm` of a container that prints `HUSK_STDIO_LINES` lines of `seq` and exits
//!   at once: stdout is complete, byte for byte;
//! - SIGKILL of a running container's shim: containerd reports the task's exit and cleans
//!   up through the shim's `delete` (task gone, run folder and mounts removed).
//!
//! - block mode with `template = "auto"`: two `ctr run --rm` restore one template whose
//!   empty disk slot each fills with its own image.
//!
//! Seven VMs boot and two are restored, one after the other. Skips without /dev/kvm, root, containerd or the
//! guest image. The rootfs goes over virtio-fs when virtiofsd is installed, else as a block
//! image. `HUSK_TEST_CONSOLE=1` writes the guest console and agent logs to the test dir.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use husk_tests::containerd::{Containerd, build_oci_image, find_on_path, skip_without_containerd};
use husk_tests::containerd_events::EventLog;
use husk_tests::cri::mounts_under;
use husk_tests::{BusyboxImage, GuestImage, workspace};

const IMAGE: &str = "docker.io/husk/busybox:test";
const RUNTIME: &str = "io.containerd.husk.v2";
const SHIM: &str = "containerd-shim-husk-v2";
/// A VM boots in 15-60 s on the loaded nested-PVM host; a `ctr run` is boot plus a little.
const RUN_TIMEOUT: Duration = Duration::from_secs(600);
/// d1's memory limit: room for its shell and `sleep`, not for `tail /dev/zero`.
const D1_MEMORY_LIMIT: &str = "16777216";

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn host_release() -> String {
    let out = std::process::Command::new("uname")
        .arg("-r")
        .output()
        .expect("uname -r");
    text(&out.stdout).trim().to_owned()
}

fn virtiofsd_installed() -> bool {
    find_on_path("virtiofsd").is_some()
        || std::env::var_os("HOME")
            .is_some_and(|h| Path::new(&h).join(".cargo/bin/virtiofsd").is_file())
}

/// Shim processes of container `id` in the test namespace.
fn shims_of(id: &str) -> Vec<u32> {
    husk_tests::containerd::shims_of(SHIM, husk_tests::containerd::NAMESPACE, id)
}

#[test]
fn ctr_runs_containers_in_husk_vms() {
    const NAME: &str = "ctr_runs_containers_in_husk_vms";
    if skip_without_containerd(NAME) {
        return;
    }
    let Some(image) = GuestImage::or_skip(NAME) else {
        return;
    };
    let started = Instant::now();
    let shim = workspace::binary(SHIM).expect("building the shim");
    let busybox = BusyboxImage::build().expect("busybox rootfs");
    let work = tempfile::Builder::new()
        .prefix("husk-ctr-test-")
        .tempdir()
        .expect("temp dir");

    let mode = if virtiofsd_installed() {
        "virtiofs"
    } else {
        "block"
    };
    let mut config = format!(
        // Cold boots: the CRI test covers the shim's templates.
        "kernel = {:?}\ninitramfs = {:?}\nrootfs_mode = {mode:?}\nboot_timeout_secs = 300\ntemplate = \"off\"\n",
        image.kernel.display().to_string(),
        image.initramfs.display().to_string(),
    );
    if std::env::var_os("HUSK_TEST_CONSOLE").is_some() {
        config.push_str(&format!(
            "guest_console = {:?}\nkernel_cmdline = \"husk.agent_log=info\"\n",
            work.path().join("console.log").display().to_string()
        ));
    }
    let config_path = work.path().join("husk.toml");
    std::fs::write(&config_path, config).expect("husk.toml");
    eprintln!("rootfs over {mode}; config {}", config_path.display());

    let shim_dir: PathBuf = shim.parent().expect("shim folder").to_path_buf();
    let ctrd = Containerd::start(&[&shim_dir], &[("HUSK_CONFIG", &config_path)])
        .expect("starting containerd");
    let events = EventLog::start(&ctrd).expect("ctr events");
    let console = work.path().join("console.log");
    let fail = |what: &str, detail: &str| -> ! {
        let console = std::fs::read_to_string(&console).unwrap_or_default();
        let tail: Vec<&str> = console.lines().rev().take(40).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        panic!(
            "{what}: {detail}\n--- containerd log (with the shim's) ---\n{}\n--- guest console (HUSK_TEST_CONSOLE=1) ---\n{}",
            ctrd.log_tail(60),
            tail.join("\n")
        )
    };

    let check_true = |cond: bool, what: &str, detail: &str| {
        if !cond {
            fail(what, detail)
        }
    };

    let tarball = work.path().join("image.tar");
    build_oci_image(&busybox.root_dir(), IMAGE, work.path(), &tarball)
        .unwrap_or_else(|e| fail("building the OCI image", &format!("{e:#}")));
    let out = ctrd
        .ctr(&["images", "import", tarball.to_str().expect("UTF-8 path")])
        .expect("ctr images import");
    if !out.status.success() {
        fail("ctr images import", &text(&out.stderr));
    }

    // 1. ctr run --rm -t: output through the container's terminal, the terminal's size
    // (ResizePty from ctr's console), the exit code, and the guest's kernel.
    let out = ctrd
        .ctr_on_terminal(
            RUN_TIMEOUT,
            (30, 100),
            &[
                "run",
                "--rm",
                "-t",
                "--runtime",
                RUNTIME,
                IMAGE,
                "rm1",
                "sh",
                "-c",
                "uname -r; tty; stty size; echo out-ok; exit 3",
            ],
        )
        .expect("ctr run -t");
    let stdout = text(&out.stdout).replace('\r', "");
    if out.status.code() != Some(3) {
        fail(
            "ctr run --rm -t exit code",
            &format!(
                "{} (expected 3); terminal {stdout:?}, stderr {:?}",
                out.status,
                text(&out.stderr)
            ),
        );
    }
    // The terminal may echo a NUL (as `^@`) before the first line.
    let lines: Vec<&str> = stdout
        .lines()
        .map(|l| l.trim().trim_start_matches("^@").trim_matches('\0'))
        .collect();
    let at = lines
        .iter()
        .position(|l| l.ends_with("-husk"))
        .unwrap_or_else(|| {
            panic!(
                "no guest kernel release (-husk) in the terminal output {stdout:?}; host is {:?}",
                host_release()
            )
        });
    assert_ne!(
        lines[at],
        host_release(),
        "the container ran on the host kernel"
    );
    assert_eq!(
        lines.get(at + 1..at + 4),
        Some(&["/dev/pts/0", "30 100", "out-ok"][..]),
        "tty, stty size and echo in {stdout:?}"
    );
    eprintln!(
        "ctr run --rm -t: {}, its own pty of 30x100, exit 3, after {:?}",
        lines[at],
        started.elapsed()
    );

    // 1b. `ctr run --rm` without a terminal, of a container that writes a lot and exits at
    // once: every byte arrives (HUSK_STDIO_LINES of seq, 3.4 MB by default, 101 MB
    // nightly), through the shim's stdio relay and containerd's fifos.
    let lines = husk_tests::stdio::lines();
    let t = Instant::now();
    let out = ctrd
        .ctr_timeout(
            RUN_TIMEOUT + Duration::from_secs(lines / 10_000),
            &[
                "run",
                "--rm",
                "--runtime",
                RUNTIME,
                IMAGE,
                "seq1",
                "seq",
                "1",
                &lines.to_string(),
            ],
        )
        .expect("ctr run --rm seq");
    if !out.status.success() {
        fail("ctr run --rm seq", &text(&out.stderr));
    }
    husk_tests::stdio::assert_same_bytes(
        "ctr run stdout",
        &out.stdout,
        &husk_tests::stdio::seq_output(lines),
    );
    eprintln!(
        "ctr run --rm: {} bytes of seq output complete, {:?}",
        out.stdout.len(),
        t.elapsed()
    );

    // 2. A detached container: exec, kill, delete.
    let out = ctrd
        .ctr_timeout(
            RUN_TIMEOUT,
            &[
                "run",
                "-d",
                "--runtime",
                RUNTIME,
                "--memory-limit",
                D1_MEMORY_LIMIT,
                IMAGE,
                "d1",
                "sh",
                "-c",
                "sleep 1000",
            ],
        )
        .expect("ctr run -d");
    if !out.status.success() {
        fail("ctr run -d", &text(&out.stderr));
    }
    // `ctr task exec --exec-id <id> d1 sh -c <script>`.
    let exec_in_d1 = |exec_id: &str, script: &str| {
        ctrd.ctr_timeout(
            RUN_TIMEOUT,
            &[
                "task",
                "exec",
                "--exec-id",
                exec_id,
                "d1",
                "sh",
                "-c",
                script,
            ],
        )
        .unwrap_or_else(|e| panic!("ctr task exec {exec_id}: {e:#}"))
    };
    let out = exec_in_d1("e1", "echo exec-ok; exit 5");
    if out.status.code() != Some(5) || text(&out.stdout).trim() != "exec-ok" {
        fail(
            "ctr task exec",
            &format!(
                "{}; stdout {:?}, stderr {:?}",
                out.status,
                text(&out.stdout),
                text(&out.stderr)
            ),
        );
    }

    // An exec that outgrows the container's memory limit: `tail` buffers /dev/zero until
    // the guest kernel's OOM killer ends it (137), and the shim publishes TaskOOM.
    let out = exec_in_d1("e2", husk_tests::rootfs::HOG);
    if out.status.code() != Some(137) {
        fail(
            "ctr task exec over the memory limit",
            &format!(
                "{} (expected 137); stderr {:?}",
                out.status,
                text(&out.stderr)
            ),
        );
    }
    let oom = events.wait_for(Duration::from_secs(60), |e| {
        e.topic == "/tasks/oom" && e.container() == Some("d1")
    });
    if !oom {
        fail(
            "TaskOOM",
            &format!("no /tasks/oom event for d1 within 60 s:\n{}", events.text()),
        );
    }

    // Pids, Stats, Pause/Resume of the running task.
    let ctr_ok = |args: &[&str]| -> String {
        let out = ctrd
            .ctr(args)
            .unwrap_or_else(|e| panic!("ctr {args:?}: {e:#}"));
        if !out.status.success() {
            fail(&format!("ctr {args:?}"), &text(&out.stderr));
        }
        text(&out.stdout)
    };
    let status_of_d1 = || -> String {
        ctr_ok(&["task", "ls"])
            .lines()
            .find(|l| l.starts_with("d1 "))
            .and_then(|l| l.split_whitespace().nth(2))
            .unwrap_or_default()
            .to_owned()
    };
    // After `ctr task kill -s KILL ID`: the task must show STOPPED within 180 s.
    let wait_stopped = |id: &str| {
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let listing = ctr_ok(&["task", "ls"]);
            if listing
                .lines()
                .any(|l| l.starts_with(&format!("{id} ")) && l.contains("STOPPED"))
            {
                return;
            }
            if Instant::now() >= deadline {
                fail(
                    &format!("after ctr task kill -s KILL {id}"),
                    &format!("task not stopped within 180 s: {listing}"),
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    };
    let ps = ctr_ok(&["task", "ps", "d1"]);
    let pids: Vec<u32> = ps
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect();
    check_true(
        !pids.is_empty(),
        "ctr task ps",
        &format!("no guest pid listed: {ps:?}"),
    );
    let metrics = ctr_ok(&["task", "metrics", "--format", "json", "d1"]);
    let metrics: serde_json::Value = serde_json::from_str(&metrics)
        .unwrap_or_else(|e| panic!("ctr task metrics: {e}: {metrics:?}"));
    let current = metrics.pointer("/pids/current").and_then(|v| v.as_u64());
    let memory = metrics.pointer("/memory/usage").and_then(|v| v.as_u64());
    check_true(
        current.is_some_and(|c| c >= 1) && memory.is_some_and(|m| m > 0),
        "ctr task metrics",
        &format!("pids.current {current:?}, memory.usage {memory:?} in {metrics}"),
    );
    ctr_ok(&["task", "pause", "d1"]);
    let paused = status_of_d1();
    ctr_ok(&["task", "resume", "d1"]);
    let resumed = status_of_d1();
    check_true(
        paused == "PAUSED" && resumed == "RUNNING",
        "ctr task pause/resume",
        &format!("status {paused:?} after pause, {resumed:?} after resume"),
    );
    eprintln!(
        "ctr task ps: guest pids {pids:?}; metrics: {current:?} pids, {memory:?} bytes; \
         pause/resume: {paused} -> {resumed}"
    );

    let out = ctrd
        .ctr(&["task", "kill", "-s", "KILL", "d1"])
        .expect("ctr task kill");
    if !out.status.success() {
        fail("ctr task kill", &text(&out.stderr));
    }
    wait_stopped("d1");
    let out = ctrd
        .ctr(&["task", "delete", "d1"])
        .expect("ctr task delete");
    if !out.status.success() || !text(&out.stderr).contains("137") {
        fail(
            "ctr task delete",
            &format!(
                "{}; stderr {:?} (expected exit code 137 reported)",
                out.status,
                text(&out.stderr)
            ),
        );
    }
    let out = ctrd
        .ctr(&["containers", "delete", "d1"])
        .expect("ctr containers delete");
    if !out.status.success() {
        fail("ctr containers delete", &text(&out.stderr));
    }
    // The task events of d1, in order. TaskOOM comes from the agent's memory.events
    // watch, independently of the exit: it only has to fall within e2's life.
    let labels = events.task_labels("d1");
    let oom_at = labels.iter().position(|l| l == "/tasks/oom");
    let without_oom: Vec<&str> = labels
        .iter()
        .map(String::as_str)
        .filter(|l| *l != "/tasks/oom")
        .collect();
    let expected = [
        "/tasks/create",
        "/tasks/start",
        "/tasks/exec-added e1",
        "/tasks/exec-started e1",
        "/tasks/exit e1",
        "/tasks/exec-added e2",
        "/tasks/exec-started e2",
        "/tasks/exit e2",
        "/tasks/paused",
        "/tasks/resumed",
        "/tasks/exit d1",
        "/tasks/delete",
    ];
    let e2_started = labels.iter().position(|l| l == "/tasks/exec-started e2");
    let paused = labels.iter().position(|l| l == "/tasks/paused");
    check_true(
        without_oom == expected
            && labels.iter().filter(|l| *l == "/tasks/oom").count() == 1
            && oom_at > e2_started
            && oom_at < paused,
        "task events of d1",
        &format!("got {labels:?}, expected {expected:?} with one /tasks/oom during e2"),
    );
    let exit_statuses: Vec<(String, u64)> = events
        .events()
        .iter()
        .filter(|e| e.topic == "/tasks/exit" && e.container() == Some("d1"))
        .map(|e| {
            (
                e.body["id"].as_str().unwrap_or_default().to_owned(),
                e.body["exit_status"].as_u64().unwrap_or_default(),
            )
        })
        .collect();
    check_true(
        exit_statuses
            == [
                ("e1".to_owned(), 5),
                ("e2".to_owned(), 137),
                ("d1".to_owned(), 137),
            ],
        "exit statuses in the TaskExit events of d1",
        &format!("{exit_statuses:?}"),
    );
    eprintln!("task events of d1: {labels:?}");

    // `ctr run -d ID sh -c "sleep 1000"` in a husk VM.
    let run_sleeper = |id: &str| {
        ctrd.ctr_timeout(
            RUN_TIMEOUT,
            &[
                "run",
                "-d",
                "--runtime",
                RUNTIME,
                IMAGE,
                id,
                "sh",
                "-c",
                "sleep 1000",
            ],
        )
        .expect("ctr run -d")
    };
    // 3. The shim of a running container is killed: containerd runs the shim's `delete`,
    // which cleans up; the VM died with the shim.
    let out = run_sleeper("k1");
    if !out.status.success() {
        fail("ctr run -d k1", &text(&out.stderr));
    }
    let pids = shims_of("k1");
    let [shim_pid] = pids[..] else {
        fail(
            "the shim of k1",
            &format!("expected one shim process, found {pids:?}"),
        );
    };
    // SAFETY: sending SIGKILL to the shim process found above.
    unsafe { libc::kill(shim_pid as i32, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = ctrd.ctr(&["task", "ls"]).expect("ctr task ls");
        let listing = text(&out.stdout);
        if !listing.lines().any(|l| l.starts_with("k1 ")) {
            break;
        }
        if Instant::now() >= deadline {
            fail(
                "after killing the shim",
                &format!("task k1 still listed after 60 s: {listing}"),
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    // containerd reports the exit of the dead shim's task itself.
    let k1_exit = events.wait_for(Duration::from_secs(30), |e| {
        e.topic == "/tasks/exit" && e.container() == Some("k1")
    });
    check_true(
        k1_exit,
        "TaskExit of k1 after its shim was killed",
        &format!("no /tasks/exit for k1:\n{}", events.text()),
    );
    eprintln!("task events of k1: {:?}", events.task_labels("k1"));
    // containerd runs the shim's `delete` for the dead shim; the task can leave the list
    // before that cleanup has finished.
    let run_dir = Path::new("/run/husk-shim").join(shim_pid.to_string());
    let deadline = Instant::now() + Duration::from_secs(30);
    while run_dir.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        !run_dir.exists(),
        "{} left 30 s after the shim was killed",
        run_dir.display()
    );
    let out = ctrd
        .ctr(&["containers", "delete", "k1"])
        .expect("ctr containers delete");
    if !out.status.success() {
        fail("ctr containers delete k1", &text(&out.stderr));
    }

    // 3b. The shim is killed while its VM boots (after the shared folder is mounted and the
    // VMM started): containerd's cleanup leaves no run folder and no mount of it.
    let (b1_shim, b1_run) = std::thread::scope(|s| {
        let run = s.spawn(|| run_sleeper("b1"));
        let deadline = Instant::now() + Duration::from_secs(120);
        let booting = loop {
            if let [pid] = shims_of("b1")[..] {
                let dir = Path::new("/run/husk-shim").join(pid.to_string());
                if dir.join("vm.sock").exists() {
                    break Some((pid, dir));
                }
            }
            if Instant::now() >= deadline || run.is_finished() {
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let Some((pid, dir)) = booting else {
            let out = run.join();
            fail(
                "the shim of b1 during its boot",
                &format!("no shim with a started VMM within 120 s; ctr run: {out:?}"),
            );
        };
        // SAFETY: SIGKILL to the shim process found above.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        let out = run.join().expect("ctr run thread");
        check_true(
            !out.status.success(),
            "ctr run of b1 whose shim was killed",
            &format!("succeeded: {}", text(&out.stdout)),
        );
        (pid, dir)
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while b1_run.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    let left = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(&*b1_run.to_string_lossy()))
        .count();
    check_true(
        !b1_run.exists() && left == 0,
        "cleanup after the shim of b1 was killed during the boot",
        &format!(
            "{} exists: {}, {left} mounts under it",
            b1_run.display(),
            b1_run.exists()
        ),
    );
    let _ = ctrd.ctr(&["containers", "delete", "b1"]);
    eprintln!("shim {b1_shim} killed during its VM's boot: run folder and mounts cleaned up");

    // 4. containerd restarts under a running task (a service manager's restart): the shim
    // and its VM live on, and exec, kill and delete work through the new containerd.
    let out = run_sleeper("r1");
    if !out.status.success() {
        fail("ctr run -d r1", &text(&out.stderr));
    }
    let before = shims_of("r1");
    ctrd.restart()
        .unwrap_or_else(|e| fail("restarting containerd", &format!("{e:#}")));
    check_true(
        before.len() == 1 && shims_of("r1") == before,
        "the shim of r1 across the containerd restart",
        &format!("before {before:?}, after {:?}", shims_of("r1")),
    );
    let out = ctrd
        .ctr_timeout(
            RUN_TIMEOUT,
            &[
                "task",
                "exec",
                "--exec-id",
                "after",
                "r1",
                "sh",
                "-c",
                "echo after-restart",
            ],
        )
        .expect("ctr task exec after the restart");
    check_true(
        out.status.success() && text(&out.stdout).trim() == "after-restart",
        "ctr task exec after the containerd restart",
        &format!(
            "{}; stdout {:?}, stderr {:?}",
            out.status,
            text(&out.stdout),
            text(&out.stderr)
        ),
    );
    ctr_ok(&["task", "kill", "-s", "KILL", "r1"]);
    wait_stopped("r1");
    ctr_ok(&["task", "delete", "r1"]);
    ctr_ok(&["containers", "delete", "r1"]);
    eprintln!("containerd restart: shim {before:?} kept its task; exec, kill, delete after it");

    // 5. Block mode from a template: the first `ctr run` builds the template (its disk
    // slot empty) and restores it with its own image in the slot, the second restores it.
    // Shims read the configuration when they start.
    let templates = work.path().join("templates");
    let block_config = format!(
        "kernel = {:?}\ninitramfs = {:?}\nrootfs_mode = \"block\"\nboot_timeout_secs = 300\ntemplate = \"auto\"\ntemplate_dir = {:?}\nlog_level = \"info\"\n",
        image.kernel.display().to_string(),
        image.initramfs.display().to_string(),
        templates.display().to_string(),
    );
    std::fs::write(&config_path, block_config).expect("husk.toml");
    for id in ["blk1", "blk2"] {
        let t = Instant::now();
        let out = ctrd
            .ctr_timeout(
                RUN_TIMEOUT,
                &[
                    "run",
                    "--rm",
                    "--runtime",
                    RUNTIME,
                    IMAGE,
                    id,
                    "sh",
                    "-c",
                    "cat /proc/sys/kernel/random/uuid; mount | grep -c ' / '",
                ],
            )
            .expect("ctr run in block mode");
        check_true(
            out.status.success() && text(&out.stdout).lines().count() == 2,
            &format!("ctr run --rm {id} (block mode, template)"),
            &format!(
                "{}; stdout {:?}, stderr {:?}",
                out.status,
                text(&out.stdout),
                text(&out.stderr)
            ),
        );
        eprintln!("ctr run --rm {id} in block mode: {:?}", t.elapsed());
    }
    let log = std::fs::read_to_string(ctrd.dir().join("containerd.log")).unwrap_or_default();
    let restores = log.matches("VM restored from its template").count();
    check_true(
        log.contains("template built") && restores >= 2,
        "both block-mode VMs restored from one template",
        &format!("{restores} restores in containerd's log"),
    );
    let manifests: Vec<String> = std::fs::read_dir(&templates)
        .map(|d| {
            d.flatten()
                .filter_map(|e| std::fs::read_to_string(e.path().join("manifest.json")).ok())
                .collect()
        })
        .unwrap_or_default();
    check_true(
        manifests.len() == 1 && manifests[0].contains("\"blk:rootfs,ro\""),
        "one block-slot template",
        &format!("{manifests:?}"),
    );

    // Nothing left behind: the shims exit after Shutdown, the rootfs mounts are gone.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(shims_of("d1").is_empty()
        && shims_of("rm1").is_empty()
        && shims_of("seq1").is_empty()
        && shims_of("k1").is_empty()
        && shims_of("b1").is_empty()
        && shims_of("r1").is_empty()
        && shims_of("blk1").is_empty()
        && shims_of("blk2").is_empty())
    {
        if Instant::now() >= deadline {
            fail(
                "shims still running 30 s after delete",
                &format!(
                    "d1 {:?}, rm1 {:?}, k1 {:?}, r1 {:?}",
                    shims_of("d1"),
                    shims_of("rm1"),
                    shims_of("k1"),
                    shims_of("r1")
                ),
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let left = mounts_under(ctrd.dir());
    assert!(
        left.is_empty(),
        "mounts left under containerd's dir: {left:?}"
    );
    eprintln!("whole test {:?}", started.elapsed());
}
