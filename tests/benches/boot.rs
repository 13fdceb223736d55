//! Boot benchmark: husk-vmm against QEMU's microvm on the same kernel and initramfs.
//!
//! Prints, over several boots (HUSK_BENCH_BOOTS, default 5):
//! - husk: wall time from spawning `husk-vmm` to the agent's first ttrpc answer over hybrid
//!   vsock, and to the agent's boot-timer write; the VMM's own CPU time before the first vCPU
//!   entry; the VMM's resident memory excluding guest RAM while the guest is idle.
//! - QEMU (`qemu-system-x86_64 -M microvm`, Debian's package), the peer baseline: wall time
//!   from spawning QEMU to the agent's ready line on the serial console. QEMU has no vsock path
//!   to the host here (no vhost-vsock on this kind of host), so the agent announces itself on
//!   the console instead (`husk.ready=console`); for husk the ready line is not needed.
//!
//! Run: `scripts/install-deps.sh --bench && cargo bench -p husk-tests --bench boot`.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use husk_tests::{GuestImage, VmOptions, VmProcess, proc_stats};
use husk_vmm::cpu_template::TemplateChoice;

const AGENT_TIMEOUT: Duration = Duration::from_secs(180);
const MEMORY_MIB: u32 = 128;

struct HuskBoot {
    agent_answer: Duration,
    agent_started: Duration,
    cpu_before_vcpu: Duration,
    rss_kib: u64,
}

fn husk_boot(image: &GuestImage, rt: &tokio::runtime::Runtime) -> Result<HuskBoot> {
    let mut vm = VmProcess::boot(
        image,
        &VmOptions {
            memory_mib: MEMORY_MIB,
            ..VmOptions::default()
        },
    )?;
    let agent = rt.block_on(vm.agent(AGENT_TIMEOUT))?;
    rt.block_on(agent.check())?;
    let agent_answer = vm.started().elapsed();
    // Let the guest settle so the VMM's memory is what an idle VM costs.
    std::thread::sleep(Duration::from_millis(200));
    let rss = proc_stats::rss(vm.pid(), &vm.guest_ram_ranges()?)?;
    rt.block_on(agent.destroy_sandbox())?;
    let status = vm.wait_exit(Duration::from_secs(60))?;
    if !status.success() {
        bail!("husk-vmm exited with {status}: {}", vm.diagnostics());
    }
    let entry = vm.metric("vcpu_first_entry")?;
    let cpu_us =
        entry["cpu_user_us"].as_u64().unwrap_or(0) + entry["cpu_sys_us"].as_u64().unwrap_or(0);
    let started_us = vm.metric("boot_timer")?["wall_us"].as_u64().unwrap_or(0);
    Ok(HuskBoot {
        agent_answer,
        agent_started: Duration::from_micros(started_us),
        cpu_before_vcpu: Duration::from_micros(cpu_us),
        rss_kib: rss.excluding_guest_ram_kib(),
    })
}

/// QEMU microvm on the same image and the same guest command line husk uses on this host.
fn qemu_boot(image: &GuestImage, qemu: &str) -> Result<Duration> {
    let template = TemplateChoice::Auto.resolve(husk_vmm::host::probe());
    let memory = template.memory_mib(MEMORY_MIB.into());
    let cmdline = format!(
        "console=ttyS0 quiet reboot=k panic=-1 {} husk.ready=console",
        template.cmdline()
    );
    let started = Instant::now();
    let mut child = Command::new(qemu)
        .args([
            "-M",
            "microvm,x-option-roms=off,isa-serial=on,rtc=off",
            "-enable-kvm",
            "-cpu",
            // QEMU aborts setting IA32_ARCH_CAPABILITIES on nested-PVM hosts.
            "host,-arch-capabilities",
            "-smp",
            "1",
            "-m",
        ])
        .arg(format!("{memory}M"))
        .args([
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-serial",
            "stdio",
        ])
        .arg("-kernel")
        .arg(&image.kernel)
        .arg("-initrd")
        .arg(&image.initramfs)
        .arg("-append")
        .arg(&cmdline)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {qemu}"))?;
    let stdout = child.stdout.take().context("QEMU stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.contains("husk-agent: ready") {
                let _ = tx.send(started.elapsed());
                return;
            }
        }
    });
    let result = rx.recv_timeout(AGENT_TIMEOUT);
    let _ = child.kill();
    let _ = child.wait();
    result.context("QEMU guest never printed the agent's ready line")
}

fn stats(name: &str, mut v: Vec<Duration>) -> String {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    format!(
        "{name:<44} p50 {:>8.1} ms   min {:>8.1} ms   max {:>8.1} ms",
        ms(v[v.len() / 2]),
        ms(v[0]),
        ms(v[v.len() - 1])
    )
}

fn main() -> Result<()> {
    // `cargo bench` passes --bench; `cargo test --benches` would pass nothing: run only on bench.
    if !std::env::args().any(|a| a == "--bench") {
        return Ok(());
    }
    if let Some(reason) = husk_tests::host::kvm_unavailable_reason() {
        println!("boot benchmark skipped: {reason}");
        return Ok(());
    }
    let boots: usize = std::env::var("HUSK_BENCH_BOOTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(5);
    let image = GuestImage::locate_or_build()?;
    let rt = husk_tests::runtime()?;

    let mut husk = Vec::new();
    for i in 0..boots {
        let b = husk_boot(&image, &rt).with_context(|| format!("husk boot {i}"))?;
        eprintln!(
            "husk boot {i}: agent answered {:?}, agent started {:?}",
            b.agent_answer, b.agent_started
        );
        husk.push(b);
    }
    let qemu = which("qemu-system-x86_64");
    let mut qemu_times = Vec::new();
    if let Some(q) = &qemu {
        for i in 0..boots {
            let t = qemu_boot(&image, q).with_context(|| format!("QEMU boot {i}"))?;
            eprintln!("qemu boot {i}: agent ready {t:?}");
            qemu_times.push(t);
        }
    }

    println!("boot benchmark: {boots} boots each, 1 vCPU, {MEMORY_MIB} MiB");
    println!(
        "{}",
        stats(
            "husk: start -> agent's first answer",
            husk.iter().map(|b| b.agent_answer).collect()
        )
    );
    println!(
        "{}",
        stats(
            "husk: start -> agent started (boot timer)",
            husk.iter().map(|b| b.agent_started).collect()
        )
    );
    if qemu_times.is_empty() {
        println!(
            "qemu microvm: skipped, qemu-system-x86_64 not installed (scripts/install-deps.sh --bench)"
        );
    } else {
        let husk_p50 = {
            let mut v: Vec<Duration> = husk.iter().map(|b| b.agent_answer).collect();
            v.sort();
            v[v.len() / 2]
        };
        let mut q = qemu_times.clone();
        q.sort();
        let qemu_p50 = q[q.len() / 2];
        println!(
            "{}",
            stats("qemu microvm: start -> agent ready", qemu_times)
        );
        println!(
            "husk/qemu time-to-agent ratio (p50): {:.2}",
            husk_p50.as_secs_f64() / qemu_p50.as_secs_f64()
        );
    }
    println!(
        "{}",
        stats(
            "husk-vmm CPU time before first vCPU entry",
            husk.iter().map(|b| b.cpu_before_vcpu).collect()
        )
    );
    let mut rss: Vec<u64> = husk.iter().map(|b| b.rss_kib).collect();
    rss.sort();
    println!(
        "husk-vmm RSS excluding guest RAM: p50 {} KiB   min {} KiB   max {} KiB",
        rss[rss.len() / 2],
        rss[0],
        rss[rss.len() - 1]
    );
    Ok(())
}

fn which(name: &str) -> Option<String> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| format!("{d}/{name}"))
        .find(|p| std::path::Path::new(p).is_file())
}
