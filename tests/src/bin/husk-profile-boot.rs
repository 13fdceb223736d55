//! Boots the guest image with `husk-vmm --profile`, waits until the agent answers, powers the
//! VM off (which makes the VMM write the profile), and says where the files are. With
//! `--overhead N`, boots N times with and N times without the profiler, alternating, and
//! prints the boot times and their ratio. Used by `scripts/profile.sh`.
//!
//! ```text
//! husk-profile-boot --out boot.folded [--hz N] [--vcpus 1] [--overhead N]
//! ```

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use husk_tests::timing::{Stats, ms};
use husk_tests::{GuestImage, VmOptions, VmProcess};

const BOOT_TIMEOUT: Duration = Duration::from_secs(300);

struct Args {
    out: PathBuf,
    hz: Option<u32>,
    vcpus: u8,
    overhead: usize,
}

fn usage() -> String {
    "usage: husk-profile-boot --out FILE [--hz N] [--vcpus N] [--overhead N]".to_string()
}

fn parse_args() -> Result<Args> {
    let mut out = None;
    let mut hz = None;
    let mut vcpus = 1;
    let mut overhead = 0;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().with_context(usage);
        match a.as_str() {
            "--out" => out = Some(PathBuf::from(value()?)),
            "--hz" => hz = Some(value()?.parse().context("--hz")?),
            "--vcpus" => vcpus = value()?.parse().context("--vcpus")?,
            "--overhead" => overhead = value()?.parse().context("--overhead")?,
            "-h" | "--help" => {
                println!("{}", usage());
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{}", usage()),
        }
    }
    Ok(Args {
        out: out.with_context(usage)?,
        hz,
        vcpus,
        overhead,
    })
}

/// What one boot measured.
struct Boot {
    /// From spawning husk-vmm to the agent's first answer (Check).
    to_agent: Duration,
    /// From spawning husk-vmm to the agent's boot-timer write, as the VMM recorded it.
    to_boot_timer: Option<Duration>,
    /// CPU time of the VMM process (all its threads: vCPU, sampler, devices) until the agent
    /// answered: unlike wall time, barely moved by other load on the host.
    cpu: Option<Duration>,
}

/// User plus system CPU time of process `pid`, from /proc/PID/stat.
fn process_cpu(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at the state, field 3.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = u64::try_from(hz).ok().filter(|&h| h > 0)?;
    Some(Duration::from_millis((utime + stime) * 1000 / hz))
}

fn boot_once(image: &GuestImage, args: &Args, profile: Option<&Path>) -> Result<Boot> {
    let opts = VmOptions {
        vcpus: args.vcpus,
        ..VmOptions::default()
    };
    let mut extra: Vec<OsString> = Vec::new();
    if let Some(p) = profile {
        extra.push("--profile".into());
        extra.push(p.into());
        if let Some(hz) = args.hz {
            extra.push("--profile-hz".into());
            extra.push(hz.to_string().into());
        }
    }
    let mut vm = VmProcess::boot_with_args(image, &opts, &extra)?;
    let rt = husk_tests::runtime()?;
    let pid = vm.pid();
    let (to_agent, cpu) = rt.block_on(async {
        let agent = vm.agent(BOOT_TIMEOUT).await?;
        agent.check().await.context("Check")?;
        let t = vm.started().elapsed();
        let cpu = process_cpu(pid);
        agent.destroy_sandbox().await.context("DestroySandbox")?;
        anyhow::Ok((t, cpu))
    })?;
    let status = vm.wait_exit(Duration::from_secs(60))?;
    if !status.success() {
        bail!("husk-vmm exited with {status}: {}", vm.diagnostics());
    }
    let to_boot_timer = vm
        .metric("boot_timer")
        .ok()
        .and_then(|e| e["wall_us"].as_u64())
        .map(Duration::from_micros);
    Ok(Boot {
        to_agent,
        to_boot_timer,
        cpu,
    })
}

fn main() -> Result<()> {
    let args = parse_args()?;
    if let Some(reason) = husk_tests::host::kvm_unavailable_reason() {
        bail!("cannot boot a VM on this host: {reason}");
    }
    let image = GuestImage::locate_or_build()?;
    if args.overhead == 0 {
        let t0 = Instant::now();
        let b = boot_once(&image, &args, Some(&args.out))?;
        eprintln!(
            "husk-profile-boot: agent answered after {:.0} ms (boot timer {:.0} ms); profile in \
             {} ({:.1} s in all)",
            ms(b.to_agent),
            b.to_boot_timer.map_or(0.0, ms),
            args.out.display(),
            t0.elapsed().as_secs_f64()
        );
        return Ok(());
    }
    let (mut with, mut without) = (Vec::new(), Vec::new());
    let mut ratios = Vec::new();
    let (mut with_bt, mut without_bt) = (Vec::new(), Vec::new());
    let (mut with_cpu, mut without_cpu) = (Vec::new(), Vec::new());
    for round in 0..args.overhead {
        // Alternate which goes first, so a trend in the host's load hits both alike.
        let order = if round % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for profiled in order {
            let b = boot_once(&image, &args, profiled.then_some(args.out.as_path()))?;
            let label = if profiled { "profiled" } else { "plain" };
            eprintln!(
                "round {}: {label:<8} agent {:>8.0} ms  boot timer {:>8.0} ms  VMM CPU {:>8.0} ms",
                round + 1,
                ms(b.to_agent),
                b.to_boot_timer.map_or(0.0, ms),
                b.cpu.map_or(0.0, ms)
            );
            let (a, bt, cpu) = if profiled {
                (&mut with, &mut with_bt, &mut with_cpu)
            } else {
                (&mut without, &mut without_bt, &mut without_cpu)
            };
            a.push(b.to_agent);
            bt.extend(b.to_boot_timer);
            cpu.extend(b.cpu);
        }
        if let (Some(w), Some(wo)) = (with.last(), without.last()) {
            ratios.push(w.as_secs_f64() / wo.as_secs_f64());
        }
    }
    // The host's load drifts; a round's two boots are close in time, so their ratio is the
    // steadier figure.
    ratios.sort_by(f64::total_cmp);
    let median_ratio = ratios.get(ratios.len() / 2).copied().unwrap_or(0.0);
    let report = |what: &str, w: Vec<Duration>, wo: Vec<Duration>| {
        if let (Some(w), Some(wo)) = (Stats::of(w), Stats::of(wo)) {
            println!("{}", wo.line(&format!("{what} without --profile"), "boots"));
            println!("{}", w.line(&format!("{what} with --profile   "), "boots"));
            println!(
                "{what}: ratio of p50s (with / without) {:.3}",
                w.p50.as_secs_f64() / wo.p50.as_secs_f64()
            );
        }
    };
    report("boot to agent answer", with, without);
    report("boot to boot-timer write", with_bt, without_bt);
    report("VMM CPU time to agent answer", with_cpu, without_cpu);
    let listed: Vec<String> = ratios.iter().map(|r| format!("{r:.3}")).collect();
    println!(
        "boot to agent answer: median of the per-round ratios {median_ratio:.3} ({})",
        listed.join(", ")
    );
    Ok(())
}
