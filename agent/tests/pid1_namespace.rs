//! The PID-1 path on the host, without a VM: `unshare` gives the agent a fresh PID and mount
//! namespace, so it runs its guest setup (mounts over /dev, /proc, /sys, /run, /tmp and
//! /sys/fs/cgroup, private to that namespace), serves, and on DestroySandbox kills, syncs,
//! unmounts and calls reboot(2) — which, from the init of a child PID namespace, only ends
//! that namespace (the kernel reports it as death by SIGHUP), never the host.
//!
//! Needs root and util-linux `unshare`; skips, saying which is missing, without them.

use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use husk_protocol::agent::ServingStatus;
use husk_protocol::client::{Target, connect_with_retry};

#[tokio::test]
async fn pid1_mode_serves_then_reboots_its_namespace() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: needs root (PID and mount namespaces, mounts)");
        return;
    }
    if Command::new("unshare").arg("--version").output().is_err() {
        eprintln!("SKIPPED: util-linux unshare(1) not found");
        return;
    }
    // Not under /tmp or /run, where the agent mounts fresh tmpfs (the target folder may be
    // there too: CI clones into /tmp).
    let dir = tempfile::tempdir_in("/var/tmp").expect("temp dir in /var/tmp");
    let socket = dir.path().join("agent.sock");
    let log = dir.path().join("agent.log");
    let mut child = Command::new("unshare")
        .args([
            "--pid",
            "--fork",
            "--mount",
            "--propagation",
            "private",
            "--kill-child",
        ])
        .arg(env!("CARGO_BIN_EXE_husk-agent"))
        .arg("--listen")
        .arg(format!("unix://{}", socket.display()))
        .arg("--log-level=debug")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("spawn unshare");

    let client = connect_with_retry(
        &Target::unix(&socket),
        Instant::now() + Duration::from_secs(20),
    )
    .await
    .expect("agent as PID 1 reachable");
    let check = client.check().await.expect("Check");
    assert_eq!(check.status.enum_value(), Ok(ServingStatus::SERVING));
    let details = client.get_guest_details().await.expect("GetGuestDetails");
    // Its /proc is a fresh mount, of the same kernel.
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").expect("boot_id");
    assert_eq!(details.boot_id, boot_id.trim());

    client
        .destroy_sandbox()
        .await
        .expect("DestroySandbox reply");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "namespace still alive");
        std::thread::sleep(Duration::from_millis(20));
    };
    let log = std::fs::read_to_string(&log).unwrap_or_default();
    // unshare re-raises its child's fatal signal; SIGHUP means reboot(RB_AUTOBOOT).
    assert_eq!(
        status.signal(),
        Some(libc::SIGHUP),
        "{status}; agent log:\n{log}"
    );
    assert!(log.contains("powering off"), "agent log:\n{log}");
}
