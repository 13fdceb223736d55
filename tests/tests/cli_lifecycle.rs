//! The `husk` CLI driven like runc's callers drive runc, on one container (one VM boot):
//! create → state created → duplicate create refused → start → running → exec → ps →
//! pause/resume → update → events --stats → kill → stopped → delete (twice), with the pid
//! file, host-side hooks, and the host cgroup with the spec's CPU and pids limits. Its
//! init traps USR1, USR2 and TERM as a shell script does (each trap must run, and TERM's
//! ends the container, as with runc), and has rlimits whose soft and hard values differ
//! (each must be exactly what the spec says).

use std::time::Duration;

use husk_tests::GuestImage;
use husk_tests::host::{cgroup_folders, cgroup_value, skip_without_kvm};
use husk_tests::husk_cli::{Bundle, Husk, pid_alive, spec};
use serde_json::json;

/// The read-only image mode needs no virtiofsd; cli_virtiofs covers the default mode.
const BLOCK_MODE: &str = "rootfs_mode = \"block\"";

const STEP: Duration = Duration::from_secs(120);

#[test]
fn full_lifecycle_in_one_vm() {
    if skip_without_kvm("full_lifecycle_in_one_vm") {
        return;
    }
    let image = match GuestImage::locate_or_build() {
        Ok(i) => i,
        Err(e) => {
            eprintln!("SKIPPED full_lifecycle_in_one_vm: no guest image: {e:#}");
            return;
        }
    };
    let husk = Husk::new(&Husk::guest_config(&image, BLOCK_MODE)).expect("husk test setup");
    let hook_log = husk.dir().join("hooks.log");
    let hook = |name: &str| json!({"path": "/bin/sh", "args": ["sh", "-c", format!("echo {name} $(cat) >> {}", hook_log.display())]});
    let mut config = spec(
        &[
            "sh",
            "-c",
            // Traps run once the shell's `wait` is interrupted (a foreground sleep would
            // hold them back until it ends).
            "trap 'echo got-USR1' USR1; trap 'echo got-USR2' USR2; \
             trap 'echo got-TERM; exit 0' TERM; \
             echo init-out; read line; echo init-got-$line; \
             while :; do sleep 1000 & wait $!; done",
        ],
        true,
    );
    // Soft below hard, for several types: a runtime that sets both to the hard value (or
    // drops the soft one) shows here.
    config["process"]["rlimits"] = json!([
        {"type": "RLIMIT_NOFILE", "soft": 3000, "hard": 4000},
        {"type": "RLIMIT_NPROC", "soft": 500, "hard": 600},
        {"type": "RLIMIT_CORE", "soft": 0, "hard": 1048576},
        {"type": "RLIMIT_STACK", "soft": 4194304, "hard": 16777216},
    ]);
    // A host cgroup with CPU and pids limits (a quota of two CPUs, so a slow guest is not
    // throttled; the annotation keeps the VM at one vCPU, which the quota would raise).
    let cgroup = format!("husk-test-life-{}", std::process::id());
    config["linux"]["cgroupsPath"] = json!(format!("/{cgroup}"));
    config["linux"]["resources"] = json!({
        "cpu": {"shares": 512, "quota": 200000, "period": 100000},
        "pids": {"limit": 256},
    });
    config["annotations"] = json!({"io.husk.vcpus": "1"});
    config["hooks"] = json!({
        "createRuntime": [hook("createRuntime")],
        "poststart": [hook("poststart")],
        "poststop": [hook("poststop")],
    });
    let bundle = Bundle::busybox(husk.dir(), "bundle", &config).expect("bundle");
    let pid_file = husk.dir().join("life.pid");
    let pid_file_s = pid_file.to_str().expect("utf-8 path");

    // create, its stdout a pipe as conmon passes it (the monitor inherits it)
    let created = husk
        .spawn_stdout_to_pipe(
            "create",
            &[
                "create",
                "--bundle",
                bundle.path(),
                "--pid-file",
                pid_file_s,
                "life",
            ],
        )
        .expect("husk create");
    assert_eq!(
        created.code,
        Some(0),
        "create failed: {}\n{}",
        created.stderr(),
        husk.monitor_log("life")
    );
    let st = husk.state("life").expect("state after create");
    assert_eq!(st["status"], "created", "{st}");
    assert_eq!(st["id"], "life");
    assert_eq!(st["ociVersion"], "1.0.2");
    let pid: i64 = std::fs::read_to_string(&pid_file)
        .expect("pid file written")
        .trim()
        .parse()
        .expect("pid file holds a number");
    assert_eq!(st["pid"], pid, "state pid is the pid file's");
    assert!(pid_alive(pid), "monitor {pid} runs");
    assert!(st["bundle"].as_str().unwrap().ends_with("/bundle"), "{st}");
    let hooks = std::fs::read_to_string(&hook_log).expect("createRuntime hook ran");
    assert!(hooks.starts_with("createRuntime {"), "{hooks}");
    assert!(
        hooks.contains("\"id\":\"life\""),
        "hook got the state JSON: {hooks}"
    );

    // the host enforces the spec's CPU and pids limits on the monitor (and so the VMM)
    let folders = cgroup_folders(&cgroup);
    assert!(!folders.is_empty(), "no host cgroup {cgroup}");
    let in_cgroup = folders.iter().any(|d| {
        std::fs::read_to_string(d.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .any(|l| l.trim() == pid.to_string())
    });
    assert!(in_cgroup, "monitor {pid} is not in {folders:?}");
    // its VMM runs jailed (own namespaces and root, uid 65534, no capabilities)
    let vmms = husk_tests::jail::jailed_vmms_below(pid as u32);
    assert_eq!(vmms.len(), 1, "jailed VMMs below monitor {pid}: {vmms:?}");
    let root = husk_tests::jail::assert_jailed(vmms[0]);
    println!("VMM {} jailed; its root holds {root:?}", vmms[0]);
    let shares = cgroup_value(&folders, &["cpu.shares"]);
    let weight = cgroup_value(&folders, &["cpu.weight"]);
    assert!(
        shares.as_deref() == Some("512") || weight.as_deref() == Some("20"),
        "shares {shares:?} weight {weight:?}"
    );
    let quota = cgroup_value(&folders, &["cpu.cfs_quota_us", "cpu.max"]);
    assert!(
        matches!(quota.as_deref(), Some("200000") | Some("200000 100000")),
        "{quota:?}"
    );
    assert_eq!(
        cgroup_value(&folders, &["pids.max"]).as_deref(),
        Some("256")
    );

    // a second create with the same id is refused without booting anything
    let dup = husk
        .spawn_to_files("dup", &["create", "--bundle", bundle.path(), "life"])
        .expect("duplicate create");
    assert_eq!(dup.code, Some(1));
    assert!(dup.stderr().contains("already exists"), "{}", dup.stderr());

    // start
    let o = husk.output(&["start", "life"]).expect("start");
    assert!(
        o.status.success(),
        "start: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(husk.state("life").unwrap()["status"], "running");
    let hooks = std::fs::read_to_string(&hook_log).unwrap();
    assert!(hooks.contains("poststart {"), "{hooks}");
    let o = husk.output(&["start", "life"]).expect("second start");
    assert!(
        !o.status.success(),
        "starting a running container must fail"
    );

    // exec, with its own exit code and output
    let o = husk
        .output(&[
            "exec",
            "--env",
            "X=42",
            "life",
            "sh",
            "-c",
            "echo exec-out-$X; exit 5",
        ])
        .expect("exec");
    assert_eq!(
        o.status.code(),
        Some(5),
        "exec: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&o.stdout), "exec-out-42\n");

    // the init's rlimits, soft and hard, as the spec says
    let o = husk
        .output(&["exec", "life", "cat", "/proc/1/limits"])
        .expect("exec cat limits");
    let limits = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{limits} {}",
        String::from_utf8_lossy(&o.stderr)
    );
    for (name, soft, hard) in [
        ("Max open files", "3000", "4000"),
        ("Max processes", "500", "600"),
        ("Max core file size", "0", "1048576"),
        ("Max stack size", "4194304", "16777216"),
    ] {
        let line = limits
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no {name:?} in {limits}"));
        let fields: Vec<&str> = line[name.len()..].split_whitespace().collect();
        assert_eq!(&fields[..2], [soft, hard], "{line}");
    }

    // exec of a missing command fails at once, with the agent's message shown once
    let o = husk
        .output(&["exec", "life", "/nonexistent-cmd"])
        .expect("exec of a missing command");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{stderr}");
    let line = stderr
        .lines()
        .find(|l| l.starts_with("husk: "))
        .unwrap_or_else(|| panic!("no husk: error line in {stderr}"));
    assert!(
        line.starts_with("husk: exec in life: ")
            && line.contains(r#"executable "/nonexistent-cmd" not found in the container (PATH"#),
        "{line}"
    );
    assert_eq!(line.matches("not found").count(), 1, "{line}");
    assert!(
        !line.contains("Status {") && !line.contains("vm.sock"),
        "{line}"
    );

    // ps
    let o = husk
        .output(&["ps", "--format", "json", "life"])
        .expect("ps");
    assert!(
        o.status.success(),
        "ps: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let pids: Vec<u32> = serde_json::from_slice(&o.stdout).expect("ps json");
    assert!(!pids.is_empty(), "the init is listed");

    // pause / resume
    let o = husk.output(&["pause", "life"]).expect("pause");
    assert!(
        o.status.success(),
        "pause: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(husk.state("life").unwrap()["status"], "paused");
    let o = husk.output(&["resume", "life"]).expect("resume");
    assert!(
        o.status.success(),
        "resume: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(husk.state("life").unwrap()["status"], "running");

    // update and events --stats reach the container's cgroup in the guest
    let o = husk
        .output(&["update", "--pids-limit", "50", "--memory", "64m", "life"])
        .expect("update");
    assert!(
        o.status.success(),
        "update: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = husk.output(&["events", "--stats", "life"]).expect("events");
    assert!(
        o.status.success(),
        "events: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let ev: serde_json::Value = serde_json::from_slice(&o.stdout).expect("stats event JSON");
    assert_eq!(ev["type"], "stats");
    assert_eq!(ev["id"], "life");
    assert_eq!(ev["data"]["pids"]["limit"], 50, "{ev}");
    assert_eq!(ev["data"]["memory"]["usage"]["limit"], 64 << 20, "{ev}");

    // the init's output reached the reader of the monitor's stdout pipe while the init
    // still runs (a relay that splices from its socket into the pipe would hold the pipe's
    // lock, and with it these lines, until the container exits)
    let deadline = std::time::Instant::now() + STEP;
    // Both lines: the second comes only after stdin's end-of-file made it through the
    // monitor and the agent, which takes a while in a loaded guest.
    while !created.stdout().contains("init-got-") && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        created.stdout().contains("init-out"),
        "{:?}",
        created.stdout()
    );
    // stdin was /dev/null: `read` hit end-of-file at once
    assert!(
        created.stdout().contains("init-got-\n"),
        "{:?}",
        created.stdout()
    );

    // trapped signals: USR1 and USR2 run their traps and the container goes on; TERM runs
    // its trap, which ends the container (`kill` with no signal sends TERM, as runc's)
    for (args, line) in [
        (&["kill", "life", "USR1"][..], "got-USR1"),
        (&["kill", "life", "SIGUSR2"][..], "got-USR2"),
        (&["kill", "life"][..], "got-TERM"),
    ] {
        let o = husk.output(args).expect("kill");
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let deadline = std::time::Instant::now() + STEP;
        while !created.stdout().contains(line) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(
            created.stdout().contains(line),
            "{args:?}: the trap did not run: {:?}",
            created.stdout()
        );
        if line != "got-TERM" {
            assert_eq!(husk.state("life").expect("state")["status"], "running");
        }
    }
    let st = husk
        .wait_status("life", "stopped", STEP)
        .expect("stopped after its TERM trap exited");
    assert_eq!(st["pid"], 0);
    let deadline = std::time::Instant::now() + STEP;
    while pid_alive(pid) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!pid_alive(pid), "monitor {pid} exited with the container");
    let o = husk.output(&["kill", "life"]).expect("kill stopped");
    assert!(!o.status.success(), "killing a stopped container fails");

    // delete removes everything; again it fails, and with --force it is a no-op
    let o = husk.output(&["delete", "life"]).expect("delete");
    assert!(
        o.status.success(),
        "delete: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        !husk.root().join("life").exists(),
        "state directory removed"
    );
    let hooks = std::fs::read_to_string(&hook_log).unwrap();
    assert!(hooks.contains("poststop {"), "{hooks}");
    assert!(hooks.contains("\"status\":\"stopped\""), "{hooks}");
    let o = husk.output(&["state", "life"]).expect("state after delete");
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("does not exist"));
    assert!(
        cgroup_folders(&cgroup).is_empty(),
        "host cgroup {cgroup} left after delete"
    );
    let o = husk.output(&["delete", "life"]).expect("second delete");
    assert_eq!(o.status.code(), Some(1));
    let o = husk
        .output(&["delete", "--force", "life"])
        .expect("forced delete");
    assert!(o.status.success());
    let o = husk.output(&["list", "--format", "json"]).expect("list");
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "[]");
}
