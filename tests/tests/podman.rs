//! podman 4.3 with husk as its OCI runtime (`podman --runtime …`), on an image made by
//! `podman import` of a busybox rootfs, with podman's default seccomp profile and the
//! default virtio-fs rootfs, restoring its VMs from a template made first by `husk template
//! create` (one boot; the containers' VMs are restores):
//! - `run` with a volume (`-v`): output and exit code, then `logs` and `rm`;
//! - `run -d`, `exec`, `stop` (TERM reaches the init's trap), `logs`, `rm`;
//! - `run -t`.
//!
//! After each, nothing of husk's is left (state dir, monitor, virtiofsd). Skips when
//! podman, /dev/kvm, virtiofsd or the guest image is missing.

use std::path::Path;
use std::time::{Duration, Instant};

use husk_tests::host::skip_without_kvm;
use husk_tests::husk_cli::{Husk, pid_alive};
use husk_tests::podman::{IMAGE, Podman, find_virtiofsd, podman_unavailable_reason};
use husk_tests::{BusyboxImage, GuestImage};

const TEST: &str = "podman_drives_husk";

/// How long a step that podman or the guest finishes asynchronously may take (podman's
/// cleanup through conmon's exit command, the container reaching a point).
const STEP: Duration = Duration::from_secs(60);

fn setup() -> Option<(Podman, BusyboxImage)> {
    if let Some(reason) = podman_unavailable_reason() {
        eprintln!("SKIPPED {TEST}: {reason}");
        return None;
    }
    if skip_without_kvm(TEST) {
        return None;
    }
    let Some(virtiofsd) = find_virtiofsd() else {
        eprintln!("SKIPPED {TEST}: virtiofsd not installed (scripts/install-deps.sh)");
        return None;
    };
    let image = match GuestImage::locate_or_build() {
        Ok(i) => i,
        Err(e) => {
            eprintln!("SKIPPED {TEST}: no guest image: {e:#}");
            return None;
        }
    };
    let extra = format!(
        "rootfs_mode = \"virtiofs\"\nvirtiofsd = {:?}\n",
        virtiofsd.display().to_string()
    );
    let rootfs = BusyboxImage::build().expect("busybox rootfs");
    let podman = Podman::new(&Husk::guest_config(&image, &extra), &rootfs.root_dir())
        .expect("podman setup and image import");
    let o = podman
        .husk()
        .output(&["template", "create"])
        .expect("husk template create");
    assert!(
        o.status.success(),
        "husk template create: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    Some((podman, rootfs))
}

/// Waits for podman's asynchronous cleanup, then asserts husk left nothing.
fn assert_nothing_left(podman: &Podman, after: &str) {
    let deadline = Instant::now() + STEP;
    let mut left = podman.husk_leftovers();
    while !left.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        left = podman.husk_leftovers();
    }
    assert!(
        left.is_empty(),
        "after {after}, husk left: {left:#?}{}",
        podman.diagnostics()
    );
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `podman run` relays stdout and stderr and exits with the container's code; `logs` has
/// both streams; `rm` removes husk's state.
fn run_exit_code_and_logs(podman: &Podman) {
    // A volume (`-v`), as users pass one.
    let volume = tempfile::tempdir().expect("volume dir");
    std::fs::write(volume.path().join("hello.txt"), "from-volume\n").unwrap();
    let bind = format!("{}:/mnt/vol", volume.path().display());
    let o = podman
        .output(&[
            "run",
            "--pull",
            "never",
            "--name",
            "once",
            "--network",
            "none",
            "-v",
            &bind,
            IMAGE,
            "sh",
            "-c",
            "echo out-line; cat /mnt/vol/hello.txt; echo err-line >&2; exit 3",
        ])
        .expect("podman run");
    let stderr = text(&o.stderr);
    assert_eq!(
        o.status.code(),
        Some(3),
        "podman run: {stderr}{}",
        podman.diagnostics()
    );
    assert_eq!(
        text(&o.stdout),
        "out-line\nfrom-volume\n",
        "stderr: {stderr}"
    );
    assert!(stderr.contains("err-line"), "{stderr}");

    let state = podman
        .ok(&[
            "inspect",
            "--format",
            "{{.State.Status}} {{.State.ExitCode}}",
            "once",
        ])
        .expect("inspect once");
    assert_eq!(state.trim(), "exited 3");
    let logs = podman.output(&["logs", "once"]).expect("podman logs");
    assert!(logs.status.success(), "logs: {}", text(&logs.stderr));
    assert_eq!(text(&logs.stdout), "out-line\nfrom-volume\n");
    assert!(text(&logs.stderr).contains("err-line"), "{logs:?}");

    podman.ok(&["rm", "once"]).expect("podman rm once");
    assert_nothing_left(podman, "run + rm");
}

/// `run -d`, `exec`, `stop` (TERM to the init, which traps it and exits 0), `logs`, `rm`.
fn detached_exec_stop_rm(podman: &Podman) {
    let id = podman
        .ok(&[
            "run",
            "--pull",
            "never",
            "-d",
            "--name",
            "life",
            "--network",
            "none",
            IMAGE,
            "sh",
            "-c",
            // `wait` returns when a trapped signal arrives (POSIX), whatever the child does.
            "trap 'echo got-term; exit 0' TERM; touch /trap-set; echo started; sleep 100000 & wait",
        ])
        .expect("podman run -d");
    let id = id.trim().to_owned();
    assert_eq!(
        podman
            .ok(&["inspect", "--format", "{{.State.Running}}", "life"])
            .expect("inspect life")
            .trim(),
        "true"
    );
    // husk's view of the same container: running, with a live monitor and virtiofsd.
    let state_file = podman.husk_root().join(&id).join("state.json");
    let state: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&state_file).unwrap_or_else(|e| panic!("{}: {e}", state_file.display())),
    )
    .expect("husk state.json");
    // Stopping before the shell installed its trap would be a SIGKILL (a pid namespace's
    // init ignores an unhandled TERM): wait for its marker, which lands in the container's
    // rootfs on the host through virtio-fs.
    let marker =
        Path::new(state["rootfs"].as_str().expect("rootfs in state.json")).join("trap-set");
    let deadline = Instant::now() + STEP;
    while !marker.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        marker.exists(),
        "the container wrote {} (virtio-fs write-through){}",
        marker.display(),
        podman.diagnostics()
    );
    let monitor = state["monitor"]["pid"].as_i64().expect("monitor pid");
    let virtiofsd = state["virtiofsd"]["pid"].as_i64().expect("virtiofsd pid");
    assert!(pid_alive(monitor), "monitor {monitor} runs: {state}");
    assert!(pid_alive(virtiofsd), "virtiofsd {virtiofsd} runs: {state}");
    let conmon_pid = podman
        .ok(&["inspect", "--format", "{{.State.Pid}}", "life"])
        .expect("inspect pid");
    assert_eq!(
        conmon_pid.trim(),
        monitor.to_string(),
        "podman's container pid is husk's monitor"
    );

    let o = podman
        .output(&["exec", "life", "sh", "-c", "echo exec-out; exit 4"])
        .expect("podman exec");
    assert_eq!(
        o.status.code(),
        Some(4),
        "podman exec: {}{}",
        text(&o.stderr),
        podman.diagnostics()
    );
    assert_eq!(text(&o.stdout), "exec-out\n");
    // The early line reaches conmon's log while the container runs (conmon passes pipes as
    // the monitor's stdio; the monitor's relay must not hold the pipe's lock while it
    // waits for more output).
    let deadline = Instant::now() + STEP;
    let mut logs = String::new();
    while !logs.contains("started") && Instant::now() < deadline {
        logs = podman.ok(&["logs", "life"]).expect("podman logs");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        logs,
        "started\n",
        "podman logs of the running container{}",
        podman.diagnostics()
    );

    // A stop timeout long enough that only TERM is involved: exit 0 proves the trap ran.
    podman
        .ok(&["stop", "--time", "30", "life"])
        .expect("podman stop");
    let state = podman
        .ok(&[
            "inspect",
            "--format",
            "{{.State.Status}} {{.State.ExitCode}}",
            "life",
        ])
        .expect("inspect after stop");
    assert!(
        !pid_alive(monitor),
        "monitor {monitor} ended with the container"
    );
    assert!(
        !pid_alive(virtiofsd),
        "virtiofsd {virtiofsd} ended with the container"
    );
    assert_eq!(
        state.trim(),
        "exited 0",
        "TERM reached the init's trap{}",
        podman.diagnostics()
    );
    // Once the init exited: the monitor drains its output before it exits.
    let logs = podman.ok(&["logs", "life"]).expect("podman logs");
    assert_eq!(logs, "started\ngot-term\n", "logs after stop");

    podman.ok(&["rm", "life"]).expect("podman rm life");
    assert_nothing_left(podman, "run -d + stop + rm");
}

/// `run -t`: the container gets a terminal (conmon's console socket gets husk's pty).
fn run_with_a_terminal(podman: &Podman) {
    let o = podman
        .output(&[
            "run",
            "--pull",
            "never",
            "--rm",
            "-t",
            "--network",
            "none",
            IMAGE,
            "sh",
            "-c",
            "tty && echo tty-ok; exit 5",
        ])
        .expect("podman run -t");
    let stdout = text(&o.stdout);
    assert_eq!(
        o.status.code(),
        Some(5),
        "podman run -t: {}{}",
        text(&o.stderr),
        podman.diagnostics()
    );
    // `tty` succeeds only on a terminal and, as with runc, names the container's own
    // first pty; the guest pty's line discipline turns \n into \r\n.
    assert!(stdout.contains("/dev/pts/0\r\ntty-ok\r\n"), "{stdout:?}");
    assert_nothing_left(podman, "run -t --rm");
}

#[test]
fn podman_drives_husk() {
    let Some((podman, _rootfs)) = setup() else {
        return;
    };
    run_exit_code_and_logs(&podman);
    detached_exec_stop_rm(&podman);
    run_with_a_terminal(&podman);
}
