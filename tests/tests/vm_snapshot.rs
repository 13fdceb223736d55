//! Snapshot and restore of a real micro-VM: boot to the agent, snapshot, then two clones
//! restored from the same files, each answering on vsock and made unique by `Restored`.
//!
//! One boot and two restores serve every assertion: a boot costs ~15 s on nested-PVM hosts.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use husk_protocol::agent::ServingStatus;
use husk_tests::host::skip_without_kvm;
use husk_tests::{GuestImage, VmOptions, VmProcess};

const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
const RESTORE_TIMEOUT: Duration = Duration::from_secs(60);

fn host_realtime_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("host clock after 1970")
        .as_nanos() as i64
}

fn entropy() -> Vec<u8> {
    let mut buf = vec![0u8; 64];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut buf))
        .expect("host entropy");
    buf
}

/// What one clone reports: its boot id, a random UUID and its wall clock's distance from
/// the host's after `Restored`.
struct Clone {
    boot_id: String,
    uuid_before: String,
    uuid_after: String,
    clock_skew_ms: i64,
    agent_after: Duration,
}

async fn inspect_clone(vm: &VmProcess) -> Clone {
    let agent = vm
        .agent(RESTORE_TIMEOUT)
        .await
        .expect("the restored agent answers over vsock");
    let agent_after = vm.started().elapsed();
    let health = agent
        .check()
        .await
        .unwrap_or_else(|e| panic!("Check: {e}{}", vm.diagnostics()));
    assert_eq!(health.status.enum_value(), Ok(ServingStatus::SERVING));
    let before = agent.get_guest_details().await.expect("GetGuestDetails");
    let host_now = host_realtime_ns();
    let guest_now = agent.restored(entropy(), host_now).await.expect("Restored");
    let after = agent.get_guest_details().await.expect("GetGuestDetails");
    agent.destroy_sandbox().await.expect("DestroySandbox");
    Clone {
        boot_id: after.boot_id,
        uuid_before: before.random_uuid,
        uuid_after: after.random_uuid,
        clock_skew_ms: (guest_now - host_realtime_ns()) / 1_000_000,
        agent_after,
    }
}

#[test]
fn a_snapshot_restores_twice_into_unique_clones_that_answer() {
    if skip_without_kvm("a_snapshot_restores_twice_into_unique_clones_that_answer") {
        return;
    }
    let image = GuestImage::locate_or_build().expect("guest image");
    let opts = VmOptions {
        vcpus: 1,
        memory_mib: 128,
        ..VmOptions::default()
    };
    let snap = tempfile::tempdir().expect("snapshot dir");
    let snap_dir = snap.path().join("template");
    let rt = husk_tests::runtime().expect("tokio runtime");

    let mut source = VmProcess::boot(&image, &opts).expect("starting husk-vmm");
    let source_boot_id = rt.block_on(async {
        let agent = source.agent(BOOT_TIMEOUT).await.expect("agent answers");
        agent
            .get_guest_details()
            .await
            .expect("GetGuestDetails")
            .boot_id
    });
    let booted_after = source.started().elapsed();
    let t = Instant::now();
    let figures = source.snapshot(&snap_dir).expect("snapshot");
    eprintln!(
        "boot to agent {booted_after:?}; snapshot {:?} (VMM: {figures})",
        t.elapsed()
    );
    assert!(snap_dir.join("state").is_file() && snap_dir.join("memory").is_file());
    let written = figures["memory_written_bytes"].as_u64().expect("figures");
    let total = figures["memory_bytes"].as_u64().expect("figures");
    assert!(
        written > 0 && written < total,
        "zero pages are holes: {written} of {total}"
    );

    let mut clones = Vec::new();
    for _ in 0..2 {
        let mut vm = VmProcess::restore(&snap_dir, &opts).expect("starting husk-vmm --restore");
        let clone = rt.block_on(inspect_clone(&vm));
        let status = vm
            .wait_exit(Duration::from_secs(60))
            .expect("the clone powers off after DestroySandbox");
        assert!(
            status.success(),
            "clone exit {status}: {}",
            vm.diagnostics()
        );
        assert!(
            vm.metric("restored").is_ok(),
            "the VMM reports the restore: {}",
            vm.diagnostics()
        );
        eprintln!(
            "clone: agent answered {:?} after the VMM started",
            clone.agent_after
        );
        clones.push(clone);
    }

    for c in &clones {
        assert_eq!(
            c.boot_id, source_boot_id,
            "a clone is the same boot, continued"
        );
        assert!(
            c.clock_skew_ms.abs() < 1000,
            "the clone's wall clock is within 1 s of the host's: {} ms",
            c.clock_skew_ms
        );
        assert_ne!(c.uuid_before, c.uuid_after);
    }
    assert_ne!(
        clones[0].uuid_after, clones[1].uuid_after,
        "reseeded clones draw different random numbers"
    );
}
