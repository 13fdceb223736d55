//! Boots a real husk micro-VM from the guest image and talks to its agent over hybrid vsock.
//!
//! One VM serves every assertion here: booting costs seconds on nested-PVM hosts, and each
//! assertion reads a different effect of the same boot.

use std::time::Duration;

use husk_protocol::agent::ServingStatus;
use husk_tests::host::skip_without_kvm;
use husk_tests::{GuestImage, VmOptions, VmProcess};

const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

fn host_boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .expect("reading the host's boot id")
        .trim()
        .to_owned()
}

#[test]
fn vm_boots_to_agent_answers_and_powers_off_cleanly() {
    if skip_without_kvm("vm_boots_to_agent_answers_and_powers_off_cleanly") {
        return;
    }
    let image = GuestImage::locate_or_build().expect("guest image");
    // Two vCPUs so that the MP table and secondary-CPU bring-up are exercised too.
    let opts = VmOptions {
        vcpus: 2,
        memory_mib: 256,
        ..VmOptions::default()
    };
    let mut vm = VmProcess::boot(&image, &opts).expect("starting husk-vmm");

    let rt = husk_tests::runtime().expect("tokio runtime");
    rt.block_on(async {
        let agent = vm
            .agent(BOOT_TIMEOUT)
            .await
            .expect("agent answers over hybrid vsock");

        let health = agent.check().await.expect("Check");
        assert_eq!(health.status.enum_value(), Ok(ServingStatus::SERVING));
        assert_eq!(health.agent_version, env!("CARGO_PKG_VERSION"));

        let details = agent.get_guest_details().await.expect("GetGuestDetails");
        // The guest runs our own kernel, not the host's.
        assert!(
            details.kernel_release.starts_with("6.1.") && details.kernel_release.ends_with("-husk"),
            "unexpected guest kernel release {:?}",
            details.kernel_release
        );
        assert_eq!(details.online_cpus, 2, "both vCPUs came online");
        let mib = details.memory_total_bytes >> 20;
        assert!(
            (200..=256).contains(&mib),
            "guest sees {mib} MiB of a 256 MiB VM"
        );
        assert_ne!(
            details.boot_id,
            host_boot_id(),
            "boot id is the guest's own"
        );
        assert_eq!(details.boot_id.len(), 36, "boot id {:?}", details.boot_id);
        assert!(details.uptime_ns > 0);

        agent.destroy_sandbox().await.expect("DestroySandbox");
    });

    let status = vm
        .wait_exit(Duration::from_secs(60))
        .expect("husk-vmm exits after DestroySandbox");
    assert!(
        status.success(),
        "husk-vmm exit {status}: {}",
        vm.diagnostics()
    );

    // The agent poked the boot timer before it served, and the VMM recorded both moments.
    let first_entry = vm.metric("vcpu_first_entry").expect("vcpu_first_entry");
    let boot_timer = vm.metric("boot_timer").expect("boot_timer");
    let entry_us = first_entry["wall_us"].as_u64().expect("wall_us");
    let agent_us = boot_timer["wall_us"].as_u64().expect("wall_us");
    assert!(
        entry_us < agent_us,
        "vCPU entry {entry_us} µs, agent {agent_us} µs"
    );
}
