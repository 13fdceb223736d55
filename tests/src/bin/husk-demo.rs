//! Boots a husk micro-VM on the default guest image, prints what its agent reports about the
//! guest (JSON on stdout), then powers the VM off.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use husk_tests::{GuestImage, VmOptions, VmProcess};

fn main() -> Result<()> {
    if let Some(reason) = husk_tests::host::kvm_unavailable_reason() {
        bail!("cannot boot a VM on this host: {reason}");
    }
    let image = GuestImage::locate_or_build()?;
    eprintln!(
        "husk-demo: booting {} with {}",
        image.kernel.display(),
        image.initramfs.display()
    );
    let mut vm = VmProcess::boot(&image, &VmOptions::default())?;
    let rt = husk_tests::runtime()?;
    let (details, answered_after) = rt.block_on(async {
        let agent = vm.agent(Duration::from_secs(180)).await?;
        let answered_after = vm.started().elapsed();
        let details = agent.get_guest_details().await?;
        agent.destroy_sandbox().await?;
        anyhow::Ok((details, answered_after))
    })?;
    let stop = Instant::now();
    let status = vm.wait_exit(Duration::from_secs(60))?;
    if !status.success() {
        bail!("husk-vmm exited with {status}: {}", vm.diagnostics());
    }
    let agent_started_ms = vm
        .metric("boot_timer")
        .ok()
        .and_then(|e| e["wall_us"].as_u64())
        .map(|us| us / 1000);
    let out = serde_json::json!({
        "kernel_release": details.kernel_release,
        "memory_total_bytes": details.memory_total_bytes,
        "online_cpus": details.online_cpus,
        "agent_version": details.agent_version,
        "boot_id": details.boot_id,
        "guest_uptime_ms": details.uptime_ns / 1_000_000,
        "agent_started_ms": agent_started_ms,
        "agent_answered_ms": answered_after.as_millis() as u64,
        "poweroff_ms": stop.elapsed().as_millis() as u64,
    });
    println!(
        "{}",
        serde_json::to_string_pretty(&out).context("formatting the guest details")?
    );
    Ok(())
}
