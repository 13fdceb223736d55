//! Kubernetes pod figures through containerd's CRI plugin, printed (no timed asserts):
//! - pod start latency: RunPodSandbox + CreateContainer + StartContainer of one `sleep`
//!   container, p50/min/max over `HUSK_BENCH_PODS` pods (default 3) started one after the
//!   other, with the `husk` handler and with `runc` for comparison, and the ratio;
//! - host memory per husk pod: resident memory of the pod's shim process
//!   (containerd-shim-husk-v2, which runs the VMM in-process) and its children (virtiofsd),
//!   excluding guest RAM (the mappings named `husk-guest-ram`, see vmm/src/memory.rs);
//! - host CPU per idle husk pod: CPU time of that process tree over 10 s while the
//!   container sleeps, in percent of one core.
//!
//! Each pod is stopped and removed after it is measured. The harness is `husk_tests::cri`
//! (a private containerd 1.6 with a CNI bridge network and imported images).
//!
//! `cargo bench -p husk-tests --bench pods`. Knobs: `HUSK_BENCH_PODS` (default 3).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use husk_tests::cri::{CriHarness, HUSK_HANDLER, HUSK_SHIM, Pod, RUNC_HANDLER, cri_missing_reason};
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
        let t = Instant::now();
        let pod = h
            .run_pod(&name, handler)
            .unwrap_or_else(|e| panic!("RunPodSandbox {name}: {e:#}\n{}", h.log_tail(40)));
        let id = h
            .create_container(&pod, "sleeper", &["sleep", "100000"])
            .unwrap_or_else(|e| panic!("CreateContainer in {name}: {e:#}\n{}", h.log_tail(40)));
        h.cri()
            .start_container(&id)
            .unwrap_or_else(|e| panic!("StartContainer in {name}: {e:#}\n{}", h.log_tail(40)));
        let elapsed = t.elapsed();
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
        let t = Instant::now();
        h.cri()
            .stop_pod_sandbox(&pod.id)
            .and_then(|()| h.cri().remove_pod_sandbox(&pod.id))
            .unwrap_or_else(|e| panic!("removing {name}: {e:#}\n{}", h.log_tail(40)));
        teardown.push(t.elapsed());
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
             (shim with in-process VMM{})",
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
    let husk_setup: Result<(PathBuf, PathBuf), String> = (|| {
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
        std::fs::write(&config, Husk::guest_config(&image, &extra))
            .map_err(|e| format!("writing {}: {e}", config.display()))?;
        let dir = shim.parent().map(Path::to_path_buf).unwrap_or_default();
        Ok((dir, config))
    })();
    let busybox = BusyboxImage::build().expect("busybox rootfs");
    let (shim_dirs, env): (Vec<&Path>, Vec<(&str, &Path)>) = match &husk_setup {
        Ok((dir, config)) => (vec![dir.as_path()], vec![("HUSK_CONFIG", config.as_path())]),
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
}
