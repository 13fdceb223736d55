//! Kubernetes pod figures through containerd's CRI plugin, printed (no timed asserts):
//! - pod start latency: RunPodSandbox + CreateContainer + StartContainer of one `sleep`
//!   container, p50/min/max over `HUSK_BENCH_PODS` pods (default 3) started one after the
//!   other, with the `husk` handler and with `runc` for comparison, and the ratio;
//! - host memory per husk pod: resident memory of the pod's shim process
//!   (containerd-shim-husk-v2) and its children (the jailed VMM process, virtiofsd),
//!   excluding guest RAM (the mappings named `husk-guest-ram`, see vmm/src/memory.rs);
//! - host CPU per idle husk pod: CPU time of that process tree over 10 s while the
//!   container sleeps, in percent of one core.
//!
//! Each pod is stopped and removed after it is measured. Then the parallel case:
//! `HUSK_BENCH_PARALLEL` pods (default 8; 0 skips it) started at the same moment, each from
//! its own thread and CRI client, with `runc` and with `husk` (whose VMs restore the
//! template the sequential pods used):
//! - pods per minute: N / wall time from the first RunPodSandbox sent to the last
//!   StartContainer returned, and the husk / runc ratio;
//! - host memory per husk pod while all N run: the per-pod figure above (excluding guest
//!   RAM), plus guest RAM's PSS per pod (guest RAM pages the host holds, shared ones split
//!   between their mappers) and the drop of the host's MemAvailable per pod (everything
//!   else the host runs meanwhile counts too);
//! - host CPU per idle husk pod while all N sleep.
//!
//! Then cold against warm: `HUSK_BENCH_POD_PAIRS` pairs (default 5; 0 skips it) of husk
//! pods started one after the other, alternately with `template = "off"` (the VM boots)
//! and `template = "auto"` (it restores the template of its shape), p50 of each and the
//! ratio. Shims read the configuration when they start, so each pod gets the mode written
//! just before it.
//!
//! The harness is `husk_tests::cri` (a private containerd 1.6 with a CNI bridge network and
//! imported images).
//!
//! `cargo bench -p husk-tests --bench pods`. Knobs: `HUSK_BENCH_PODS` (default 3),
//! `HUSK_BENCH_PARALLEL` (default 8), `HUSK_BENCH_POD_PAIRS` (default 5).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use husk_tests::cri::{
    CriHarness, HUSK_HANDLER, HUSK_SHIM, Pod, RUNC_HANDLER, StartedPod, cri_missing_reason,
};
use husk_tests::host::kvm_unavailable_reason;
use husk_tests::husk_cli::Husk;
use husk_tests::podman::find_virtiofsd;
use husk_tests::proc_stats::{self, process_tree};
use husk_tests::timing::{Stats, ms};
use husk_tests::{BusyboxImage, GuestImage, workspace};

/// Guest RAM of a pod VM whose spec sets no limit (set in the bench's husk config, so the
/// fallback that finds guest RAM by its size knows it).
const MEMORY_MIB: u64 = 128;
/// How long an idle pod's CPU use is sampled.
const IDLE_WINDOW: Duration = Duration::from_secs(10);

/// Host CPU used by an idle pod (shim with its VMM, and virtiofsd) over `IDLE_WINDOW`, in
/// percent of one core: what a running pod costs the node while its containers sleep.
fn idle_cpu_percent(h: &CriHarness, pod: &Pod) -> Option<f64> {
    let shim = h.pod_shim(HUSK_SHIM, pod)?;
    let total = |pids: &[u32]| -> u64 {
        pids.iter()
            .filter_map(|p| proc_stats::cpu_time_us(*p).ok())
            .map(|(u, s)| u + s)
            .sum()
    };
    let pids = process_tree(shim);
    // Let the just-started container settle first.
    std::thread::sleep(Duration::from_secs(2));
    let before = total(&pids);
    std::thread::sleep(IDLE_WINDOW);
    let used = total(&pids).saturating_sub(before);
    Some(used as f64 / IDLE_WINDOW.as_micros() as f64 * 100.0)
}

fn shim_memory(h: &CriHarness, pod: &Pod) -> Option<u64> {
    let Some(shim) = h.pod_shim(HUSK_SHIM, pod) else {
        println!(
            "  no {HUSK_SHIM} with -id {} found (shims: {:?}): no memory figure",
            pod.id,
            h.shims(HUSK_SHIM)
        );
        return None;
    };
    let total = proc_stats::memory_excluding_guest_ram(&process_tree(shim), MEMORY_MIB << 20, "");
    Some(total)
}

/// RunPodSandbox + CreateContainer + StartContainer of one `sleep` pod named `name`;
/// returns the pod and the start latency.
fn start_pod(h: &CriHarness, name: &str, handler: &str) -> (Pod, Duration) {
    let t = Instant::now();
    let pod = h
        .run_pod(name, handler)
        .unwrap_or_else(|e| panic!("RunPodSandbox {name}: {e:#}\n{}", h.log_tail(40)));
    let id = h
        .create_container(&pod, "sleeper", &["sleep", "100000"])
        .unwrap_or_else(|e| panic!("CreateContainer in {name}: {e:#}\n{}", h.log_tail(40)));
    h.cri()
        .start_container(&id)
        .unwrap_or_else(|e| panic!("StartContainer in {name}: {e:#}\n{}", h.log_tail(40)));
    (pod, t.elapsed())
}

/// StopPodSandbox + RemovePodSandbox of `pod`; returns how long that took.
fn remove_pod(h: &CriHarness, pod: &Pod, name: &str) -> Duration {
    let t = Instant::now();
    h.cri()
        .stop_pod_sandbox(&pod.id)
        .and_then(|()| h.cri().remove_pod_sandbox(&pod.id))
        .unwrap_or_else(|e| panic!("removing {name}: {e:#}\n{}", h.log_tail(40)));
    t.elapsed()
}

/// A husk pod's start latency (the pod is removed afterwards).
fn husk_pod_start(h: &CriHarness, name: &str) -> Duration {
    let (pod, elapsed) = start_pod(h, name, HUSK_HANDLER);
    remove_pod(h, &pod, name);
    elapsed
}

/// `pairs` husk pods booted cold and as many restored from the template, alternated; prints
/// the p50 of each and the ratio.
fn cold_against_template(h: &CriHarness, config: &Path, base: &str, pairs: u64) {
    let set_mode = |mode: &str| {
        std::fs::write(config, format!("{base}template = \"{mode}\"\n"))
            .unwrap_or_else(|e| panic!("writing {}: {e}", config.display()));
    };
    let (mut cold, mut warm) = (Vec::new(), Vec::new());
    for i in 0..pairs {
        set_mode("off");
        cold.push(husk_pod_start(h, &format!("cold-{i}")));
        set_mode("auto");
        warm.push(husk_pod_start(h, &format!("warm-{i}")));
    }
    set_mode("auto");
    let (Some(cold), Some(warm)) = (Stats::of(cold), Stats::of(warm)) else {
        return;
    };
    let what = "husk: RunPodSandbox + CreateContainer + StartContainer";
    println!("{}", cold.line(&format!("{what}, cold boot"), "pods"));
    println!("{}", warm.line(&format!("{what}, from a template"), "pods"));
    println!(
        "ratio cold / template pod start, p50: {:.1}x",
        cold.p50.as_secs_f64() / warm.p50.as_secs_f64()
    );
}

/// Starts `pods` pods with `handler` one after the other, each with one `sleep` container;
/// prints and returns the start latency. With `measure_memory`, prints the host memory of
/// each husk pod while it runs. Each pod is removed before the next starts.
fn start_pods(h: &CriHarness, handler: &str, pods: u64, measure_memory: bool) -> Stats {
    let mut times = Vec::new();
    let mut teardown = Vec::new();
    let mut memory = Vec::new();
    let mut idle_cpu: Vec<f64> = Vec::new();
    for i in 0..pods {
        let name = format!("{handler}-{i}");
        let (pod, elapsed) = start_pod(h, &name, handler);
        println!(
            "  {name}: pod + container running after {:.1} ms",
            ms(elapsed)
        );
        times.push(elapsed);
        if measure_memory {
            memory.extend(shim_memory(h, &pod));
            if let Some(cpu) = idle_cpu_percent(h, &pod) {
                println!(
                    "  {name}: idle pod uses {cpu:.1}% of a host core over {} s",
                    IDLE_WINDOW.as_secs()
                );
                idle_cpu.push(cpu);
            }
        }
        teardown.push(remove_pod(h, &pod, &name));
    }
    let s = Stats::of(times).expect("at least one pod");
    println!(
        "{}",
        s.line(
            &format!("{handler}: RunPodSandbox + CreateContainer + StartContainer"),
            "pods"
        )
    );
    if let Some(t) = Stats::of(teardown) {
        println!(
            "{}",
            t.line(
                &format!("{handler}: StopPodSandbox + RemovePodSandbox"),
                "pods"
            )
        );
    }
    if !idle_cpu.is_empty() {
        idle_cpu.sort_by(f64::total_cmp);
        println!(
            "host CPU per idle husk pod: {:.1}% of a core, median of {}",
            idle_cpu[idle_cpu.len() / 2],
            idle_cpu.len()
        );
    }
    if !memory.is_empty() {
        memory.sort();
        println!(
            "host memory per running husk pod: {:.1} MiB RSS excluding guest RAM, median of {} \
             (shim + jailed VMM{})",
            memory[memory.len() / 2] as f64 / 1024.0,
            memory.len(),
            if find_virtiofsd().is_some() {
                " + virtiofsd"
            } else {
                ""
            }
        );
    }
    s
}

fn main() {
    let pods = std::env::var("HUSK_BENCH_PODS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3u64)
        .max(1);
    if let Some(reason) = cri_missing_reason() {
        println!("pod figures skipped: {reason}");
        return;
    }
    let work = tempfile::Builder::new()
        .prefix("husk-bench-pods-")
        .tempdir()
        .expect("temp dir");
    // The husk handler needs /dev/kvm, the guest image and the shim; runc always runs.
    let husk_setup: Result<(PathBuf, PathBuf, String), String> = (|| {
        if let Some(reason) = kvm_unavailable_reason() {
            return Err(reason);
        }
        let image = GuestImage::locate_or_build().map_err(|e| format!("no guest image: {e:#}"))?;
        let shim = workspace::binary(HUSK_SHIM).map_err(|e| format!("{e:#}"))?;
        let extra = match find_virtiofsd() {
            Some(v) => format!(
                "rootfs_mode = \"virtiofs\"\nvirtiofsd = {:?}\nmemory_mib = {MEMORY_MIB}\n",
                v.display().to_string()
            ),
            None => format!("rootfs_mode = \"block\"\nmemory_mib = {MEMORY_MIB}\n"),
        };
        let config = work.path().join("husk.toml");
        let text = Husk::guest_config(&image, &extra);
        std::fs::write(&config, &text).map_err(|e| format!("writing {}: {e}", config.display()))?;
        let dir = shim.parent().map(Path::to_path_buf).unwrap_or_default();
        Ok((dir, config, text))
    })();
    let busybox = BusyboxImage::build().expect("busybox rootfs");
    let (shim_dirs, env): (Vec<&Path>, Vec<(&str, &Path)>) = match &husk_setup {
        Ok((dir, config, _)) => (vec![dir.as_path()], vec![("HUSK_CONFIG", config.as_path())]),
        Err(_) => (Vec::new(), Vec::new()),
    };
    let h = CriHarness::start(&shim_dirs, &env, &busybox.root_dir())
        .expect("starting containerd with the CRI plugin");

    let runc = start_pods(&h, RUNC_HANDLER, pods, false);
    match &husk_setup {
        Ok(_) => {
            let husk = start_pods(&h, HUSK_HANDLER, pods, true);
            println!(
                "ratio husk / runc pod start, p50: {:.0}x",
                husk.p50.as_secs_f64() / runc.p50.as_secs_f64()
            );
        }
        Err(reason) => println!("husk pod figures skipped: {reason}"),
    }
    let pairs = std::env::var("HUSK_BENCH_POD_PAIRS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5u64);
    if let Ok((_, config, text)) = &husk_setup
        && pairs > 0
    {
        cold_against_template(&h, config, text, pairs);
    }

    let parallel = std::env::var("HUSK_BENCH_PARALLEL")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8usize);
    if parallel == 0 {
        return;
    }
    let runc = start_pods_concurrently(&h, RUNC_HANDLER, parallel, false);
    if husk_setup.is_ok() {
        let husk = start_pods_concurrently(&h, HUSK_HANDLER, parallel, true);
        println!(
            "ratio runc / husk pods per minute at {parallel} concurrent pods: {:.1}x",
            runc / husk
        );
    }
}

/// Starts `n` pods with `handler` at the same moment (one thread and CRI client each), each
/// with one `sleep` container; prints the pods per minute and each pod's start latency, and
/// with `measure_memory` the host memory and idle CPU per husk pod while all `n` run. Then
/// removes them all. Returns the pods per minute.
fn start_pods_concurrently(h: &CriHarness, handler: &str, n: usize, measure_memory: bool) -> f64 {
    let names: Vec<String> = (0..n).map(|i| format!("{handler}-par-{i}")).collect();
    let available_before = mem_available_kib();
    let command = |_: &str| vec!["sleep".to_string(), "100000".to_string()];
    let results = h
        .run_pods_concurrently(&names, handler, "sleeper", &command)
        .unwrap_or_else(|e| panic!("preparing {n} {handler} pods: {e:#}"));
    let pods: Vec<StartedPod> = results
        .into_iter()
        .map(|r| r.unwrap_or_else(|e| panic!("{handler}: {e:#}\n{}", h.log_tail(60))))
        .collect();
    let first = pods
        .iter()
        .map(|p| p.began)
        .min()
        .expect("at least one pod");
    let last = pods
        .iter()
        .map(|p| p.ended)
        .max()
        .expect("at least one pod");
    let wall = last - first;
    for p in &pods {
        println!(
            "  {}: running after {:.1} ms (RunPodSandbox {:.1} ms, CreateContainer {:.1} ms, \
             StartContainer {:.1} ms)",
            p.pod.name,
            ms(p.ended - p.began),
            ms(p.run_pod),
            ms(p.create),
            ms(p.start)
        );
    }
    let latency = Stats::of(pods.iter().map(|p| p.ended - p.began).collect()).expect("pods");
    println!(
        "{}",
        latency.line(
            &format!("{handler}, {n} at once: RunPodSandbox + CreateContainer + StartContainer"),
            "pods"
        )
    );
    let per_minute = n as f64 / wall.as_secs_f64() * 60.0;
    println!(
        "{handler}: {per_minute:.1} pods per minute ({n} pods started at once, all running \
         {:.1} s after the first RunPodSandbox)",
        wall.as_secs_f64()
    );
    if measure_memory {
        measure_running_pods(h, &pods, available_before);
    }
    let t = Instant::now();
    for p in &pods {
        h.cri()
            .stop_pod_sandbox(&p.pod.id)
            .and_then(|()| h.cri().remove_pod_sandbox(&p.pod.id))
            .unwrap_or_else(|e| panic!("removing {}: {e:#}\n{}", p.pod.name, h.log_tail(40)));
    }
    println!(
        "{handler}: {n} pods stopped and removed one after the other in {:.1} ms",
        ms(t.elapsed())
    );
    per_minute
}

/// Host memory and idle CPU per pod while all of `pods` (husk) run; `available_before` is
/// MemAvailable before they started.
fn measure_running_pods(h: &CriHarness, pods: &[StartedPod], available_before: Option<u64>) {
    // Let the just-started containers settle first.
    std::thread::sleep(Duration::from_secs(2));
    let available_after = mem_available_kib();
    let mut memory = Vec::new();
    let mut guest_pss = Vec::new();
    let mut trees = Vec::new();
    for p in pods {
        let Some(shim) = h.pod_shim(HUSK_SHIM, &p.pod) else {
            println!("  no {HUSK_SHIM} with -id {}: no figures", p.pod.id);
            continue;
        };
        let tree = process_tree(shim);
        let label = format!("{}: ", p.pod.name);
        memory.push(proc_stats::memory_excluding_guest_ram(
            &tree,
            MEMORY_MIB << 20,
            &label,
        ));
        guest_pss.push(guest_ram_pss_kib(&tree));
        trees.push(tree);
    }
    let n = pods.len();
    let median = |v: &mut Vec<u64>| -> f64 {
        v.sort();
        v.get(v.len() / 2).copied().unwrap_or(0) as f64 / 1024.0
    };
    if !memory.is_empty() {
        println!(
            "host memory per running husk pod, {n} running: {:.1} MiB RSS excluding guest RAM, \
             median of {}",
            median(&mut memory),
            memory.len()
        );
        println!(
            "guest RAM PSS per running husk pod, {n} running: {:.1} MiB (of {MEMORY_MIB} MiB \
             guest RAM), median of {}",
            median(&mut guest_pss),
            guest_pss.len()
        );
    }
    if let (Some(before), Some(after)) = (available_before, available_after) {
        println!(
            "host MemAvailable drop per husk pod, {n} running: {:.1} MiB (whole host, noisy)",
            before.saturating_sub(after) as f64 / 1024.0 / n as f64
        );
    }
    let total = |trees: &[Vec<u32>]| -> u64 {
        trees
            .iter()
            .flatten()
            .filter_map(|p| proc_stats::cpu_time_us(*p).ok())
            .map(|(u, s)| u + s)
            .sum()
    };
    let before = total(&trees);
    std::thread::sleep(IDLE_WINDOW);
    let used = total(&trees).saturating_sub(before);
    if !trees.is_empty() {
        println!(
            "host CPU per idle husk pod, {n} running: {:.1}% of a core over {} s",
            used as f64 / IDLE_WINDOW.as_micros() as f64 * 100.0 / trees.len() as f64,
            IDLE_WINDOW.as_secs()
        );
    }
}

/// Guest RAM's proportional set size in `pids`, in KiB: each guest RAM page the host holds,
/// split between the processes mapping it (the shim's VMM and virtiofsd map the same memfd).
fn guest_ram_pss_kib(pids: &[u32]) -> u64 {
    pids.iter()
        .map(|&pid| {
            let ranges = proc_stats::guest_ram_ranges(pid, MEMORY_MIB << 20);
            let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
            // parse_smaps sums the `Rss:` lines per mapping: hand it the `Pss:` lines instead.
            let pss: String = smaps
                .lines()
                .filter(|l| !l.starts_with("Rss:"))
                .map(|l| match l.strip_prefix("Pss:") {
                    Some(rest) => format!("Rss:{rest}\n"),
                    None => format!("{l}\n"),
                })
                .collect();
            proc_stats::parse_smaps(&pss, &ranges).guest_ram_kib
        })
        .sum()
}

/// The host's MemAvailable in KiB.
fn mem_available_kib() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}
