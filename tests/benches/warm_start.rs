//! Cold boot against warm start from a template, measured in one run, alternated, and
//! reported as ratios (no timed asserts):
//! - husk-vmm: boot to a responding agent vs `--restore` of a snapshot to a responding agent
//!   (the snapshot is taken once from a booted VM);
//! - host memory (PSS, guest RAM included) of `HUSK_BENCH_CLONES` (default 3) VMs each
//!   booted to its agent against as many restored from one snapshot, all alive at once
//!   (restored VMs share the snapshot's unchanged pages);
//! - `husk run /bin/true` end to end, in each rootfs mode (virtio-fs: the template's share
//!   bound to the container's virtiofsd; block: the template's empty disk slot filled with
//!   the container's image), with `template = "off"` vs `template = "auto"` and a template
//!   made by `husk template create`, plus the time that create took.
//!
//! `cargo bench -p husk-tests --bench warm_start`. `HUSK_BENCH_RUNS` (default 3) runs of
//! each kind; `HUSK_BENCH_PARTS` (default `vmm,virtiofs,block`) picks the parts.

use std::process::Stdio;
use std::time::{Duration, Instant};

use husk_tests::husk_cli::{Bundle, Husk, spec};
use husk_tests::podman::find_virtiofsd;
use husk_tests::timing::{Stats, ms};
use husk_tests::{GuestImage, VmOptions, VmProcess};

const AGENT_TIMEOUT: Duration = Duration::from_secs(300);

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn ratio(cold: &Stats, warm: &Stats) -> f64 {
    cold.p50.as_secs_f64() / warm.p50.as_secs_f64()
}

/// Waits for the agent of `vm` (killed when dropped); returns the time to the agent and
/// the VMM's CPU time (user + system) before vCPU 0 first entered the guest.
fn to_agent(rt: &tokio::runtime::Runtime, vm: VmProcess) -> (Duration, Duration) {
    let elapsed = rt.block_on(async {
        let agent = vm
            .agent(AGENT_TIMEOUT)
            .await
            .unwrap_or_else(|e| panic!("agent answers: {e:#}{}", vm.diagnostics()));
        agent.check().await.expect("Check");
        vm.started().elapsed()
    });
    let entry = vm
        .metric("vcpu_first_entry")
        .expect("vcpu_first_entry metric");
    let us = |k: &str| entry[k].as_u64().unwrap_or(0);
    (
        elapsed,
        Duration::from_micros(us("cpu_user_us") + us("cpu_sys_us")),
    )
}

fn vmm_figures(image: &GuestImage, runs: u64) {
    let rt = husk_tests::runtime().expect("tokio runtime");
    let opts = VmOptions {
        vcpus: 1,
        memory_mib: 128,
        ..VmOptions::default()
    };
    let dir = tempfile::tempdir().expect("snapshot dir");
    let snap = dir.path().join("snapshot");
    let mut source = VmProcess::boot(image, &opts).expect("husk-vmm");
    rt.block_on(async { source.agent(AGENT_TIMEOUT).await.expect("agent") });
    let t = Instant::now();
    let figures = source.snapshot(&snap).expect("snapshot");
    println!(
        "husk-vmm snapshot of a 128 MiB VM: {:.0} ms ({} MiB written)",
        ms(t.elapsed()),
        figures["memory_written_bytes"].as_u64().unwrap_or(0) >> 20
    );
    let (mut cold, mut warm) = (Vec::new(), Vec::new());
    let (mut cold_cpu, mut warm_cpu) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let (t, cpu) = to_agent(&rt, VmProcess::boot(image, &opts).expect("boot"));
        cold.push(t);
        cold_cpu.push(cpu);
        let (t, cpu) = to_agent(&rt, VmProcess::restore(&snap, &opts).expect("restore"));
        warm.push(t);
        warm_cpu.push(cpu);
    }
    let cold = Stats::of(cold).expect("runs");
    let warm = Stats::of(warm).expect("runs");
    println!("{}", cold.line("husk-vmm boot to agent", "runs"));
    println!("{}", warm.line("husk-vmm restore to agent", "runs"));
    let cold_cpu = Stats::of(cold_cpu).expect("runs");
    let warm_cpu = Stats::of(warm_cpu).expect("runs");
    println!(
        "{}",
        cold_cpu.line("husk-vmm CPU before the first vCPU entry, boot", "runs")
    );
    println!(
        "{}",
        warm_cpu.line("husk-vmm CPU before the first vCPU entry, restore", "runs")
    );
    println!(
        "ratio boot / restore to agent, p50: {:.0}x",
        ratio(&cold, &warm)
    );

    let clones = env_u64("HUSK_BENCH_CLONES", 3).max(1);
    let alive = |make: &dyn Fn() -> VmProcess| -> (u64, Vec<VmProcess>) {
        let mut vms = Vec::new();
        for _ in 0..clones {
            let vm = make();
            rt.block_on(async { vm.agent(AGENT_TIMEOUT).await.expect("agent") });
            vms.push(vm);
        }
        let kib = vms.iter().map(|vm| pss_kib(vm.pid())).sum();
        (kib, vms)
    };
    let (booted, vms) = alive(&|| VmProcess::boot(image, &opts).expect("boot"));
    drop(vms);
    let (restored, vms) = alive(&|| VmProcess::restore(&snap, &opts).expect("restore"));
    drop(vms);
    println!(
        "PSS of {clones} VMs of 128 MiB at their agent: booted {:.1} MiB, restored from one snapshot {:.1} MiB (ratio {:.1}x)",
        booted as f64 / 1024.0,
        restored as f64 / 1024.0,
        booted as f64 / restored.max(1) as f64
    );
}

/// Proportional set size of `pid` (shared pages split between their users), in KiB.
fn pss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn cli_figures(image: &GuestImage, runs: u64, mode: &str) {
    let base = if mode == "virtiofs" {
        let Some(virtiofsd) = find_virtiofsd() else {
            println!("virtiofsd not found: husk run figures in virtio-fs mode skipped");
            return;
        };
        format!(
            "rootfs_mode = \"virtiofs\"\nvirtiofsd = {:?}\n",
            virtiofsd.display().to_string()
        )
    } else {
        format!("rootfs_mode = \"{mode}\"\n")
    };
    let husk = Husk::new(&Husk::guest_config(image, &base)).expect("husk setup");
    let config = |template: &str| {
        std::fs::write(
            husk.dir().join("config.toml"),
            Husk::guest_config(image, &format!("{base}template = \"{template}\"\n")),
        )
        .expect("config.toml");
    };
    let t = Instant::now();
    let o = husk
        .output(&["template", "create"])
        .expect("template create");
    assert!(
        o.status.success(),
        "template create: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    println!(
        "husk template create ({mode}): {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let bundle = Bundle::busybox(husk.dir(), "true", &spec(&["true"], true)).expect("bundle");
    let run = |id: &str| {
        let t = Instant::now();
        let o = husk
            .command(&["run", "--bundle", bundle.path(), id])
            .stdin(Stdio::null())
            .output()
            .expect("husk run");
        assert!(
            o.status.success(),
            "husk run {id}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        t.elapsed()
    };
    let (mut cold, mut warm) = (Vec::new(), Vec::new());
    for i in 0..runs {
        config("off");
        cold.push(run(&format!("cold{i}")));
        config("auto");
        warm.push(run(&format!("warm{i}")));
    }
    let cold = Stats::of(cold).expect("runs");
    let warm = Stats::of(warm).expect("runs");
    println!(
        "{}",
        cold.line(&format!("husk run /bin/true ({mode}), cold boot"), "runs")
    );
    println!(
        "{}",
        warm.line(
            &format!("husk run /bin/true ({mode}), from a template"),
            "runs"
        )
    );
    println!(
        "ratio cold / template husk run ({mode}), p50: {:.1}x",
        ratio(&cold, &warm)
    );
}

fn main() {
    let runs = env_u64("HUSK_BENCH_RUNS", 3).max(1);
    if !std::path::Path::new("/dev/kvm").exists() {
        println!("warm-start figures skipped: /dev/kvm is missing");
        return;
    }
    let image = GuestImage::locate_or_build().expect("guest image");
    let parts = std::env::var("HUSK_BENCH_PARTS").unwrap_or_else(|_| "vmm,virtiofs,block".into());
    for part in parts.split(',') {
        match part {
            "vmm" => vmm_figures(&image, runs),
            "virtiofs" | "block" => cli_figures(&image, runs, part),
            other => panic!("HUSK_BENCH_PARTS: unknown part {other:?} (vmm, virtiofs, block)"),
        }
    }
}
