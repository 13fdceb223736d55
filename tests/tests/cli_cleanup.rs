//! Nothing is left behind when the monitor (and with it the in-process VMM) is SIGKILLed:
//! `state` says stopped, `delete` removes the state directory and its sockets and the host
//! cgroup, and no husk process of the container remains. One VM boot.

use std::time::{Duration, Instant};

use husk_tests::GuestImage;
use husk_tests::host::{cgroup_folders, skip_without_kvm};
use husk_tests::husk_cli::{Bundle, Husk, pid_alive, spec};

/// The read-only image mode needs no virtiofsd; cli_virtiofs covers the default mode.
const BLOCK_MODE: &str = "rootfs_mode = \"block\"";

#[test]
fn delete_cleans_up_after_a_sigkilled_monitor() {
    let test = "delete_cleans_up_after_a_sigkilled_monitor";
    if skip_without_kvm(test) {
        return;
    }
    let image = match GuestImage::locate_or_build() {
        Ok(i) => i,
        Err(e) => {
            eprintln!("SKIPPED {test}: no guest image: {e:#}");
            return;
        }
    };
    let husk = Husk::new(&Husk::guest_config(&image, BLOCK_MODE)).expect("husk setup");
    // In a host cgroup of its own, which the dead monitor cannot remove itself.
    let cgroup = format!("husk-test-cleanup-{}", std::process::id());
    let mut config = spec(&["sleep", "1000"], true);
    config["linux"]["cgroupsPath"] = serde_json::json!(format!("/{cgroup}"));
    let b = Bundle::busybox(husk.dir(), "b", &config).unwrap();
    let created = husk
        .spawn_to_files("create", &["run", "--detach", "--bundle", b.path(), "k1"])
        .expect("husk run -d");
    assert_eq!(
        created.code,
        Some(0),
        "run -d failed: {}\n{}",
        created.stderr(),
        husk.monitor_log("k1")
    );
    let st = husk.state("k1").unwrap();
    assert_eq!(st["status"], "running", "{st}");
    let pid = st["pid"].as_i64().expect("pid");
    assert!(pid_alive(pid));
    let dir = husk.root().join("k1");
    assert!(
        dir.join("vm.sock").exists(),
        "the VM's socket is in the state dir"
    );

    // SAFETY: plain kill(2) of the monitor we just started.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    let deadline = Instant::now() + Duration::from_secs(30);
    while pid_alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!pid_alive(pid), "monitor {pid} died");
    let st = husk.state("k1").unwrap();
    assert_eq!(
        st["status"], "stopped",
        "a dead monitor means stopped: {st}"
    );
    assert_eq!(st["pid"], 0);

    let o = husk.output(&["delete", "k1"]).unwrap();
    assert!(
        o.status.success(),
        "delete: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!dir.exists(), "state dir, sockets and image removed");
    assert!(
        cgroup_folders(&cgroup).is_empty(),
        "host cgroup {cgroup} left after delete"
    );
    // No process still has the container's state dir (e.g. a VMM holding the image).
    let marker = dir.to_string_lossy().into_owned();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = entry.file_name().to_string_lossy().parse::<i64>() else {
            continue;
        };
        let cmdline = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        assert!(
            !(cmdline.contains("__monitor")
                && cmdline.contains(&husk.root().to_string_lossy().into_owned())),
            "leftover monitor {p}: {cmdline}"
        );
        assert!(
            !cmdline.contains(&marker),
            "leftover process {p}: {cmdline}"
        );
    }
    let o = husk.output(&["delete", "--force", "k1"]).unwrap();
    assert!(o.status.success(), "delete --force is idempotent");
}
