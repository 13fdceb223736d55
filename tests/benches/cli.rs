//! `husk` CLI figures, printed (no timed asserts):
//! - `husk run` of `/bin/true` from a prepared busybox bundle, end to end (the VM boots,
//!   the container runs, the VM is gone and the state deleted when `run` returns), in the
//!   default virtio-fs rootfs mode and in the read-only block image mode, next to
//!   `runc run` of the same bundle, with the ratio;
//! - host memory per running container (`husk run -d` of `sleep`): resident memory of the
//!   monitor, its jailed VMM process and virtiofsd, excluding guest RAM (the
//!   mapping named `husk-guest-ram`, see vmm/src/memory.rs).
//!
//! `cargo bench -p husk-tests --bench cli`. Knobs: `HUSK_BENCH_RUNS` (default 3),
//! `HUSK_RUNC` (default `runc` on PATH).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use husk_tests::GuestImage;
use husk_tests::husk_cli::{Bundle, Husk, spec};
use husk_tests::podman::find_virtiofsd;
use husk_tests::proc_stats::{self, process_tree};
use husk_tests::timing::Stats;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Times `runs` runs of `make(i)`, which must exit 0.
fn time_runs(what: &str, runs: u64, make: impl Fn(u64) -> Command) -> Stats {
    let mut times = Vec::new();
    for i in 0..runs {
        let mut cmd = make(i);
        let t = Instant::now();
        let out = cmd
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        times.push(t.elapsed());
        assert!(
            out.status.success(),
            "{what} run {i} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let s = Stats::of(times).expect("at least one run");
    println!("{}", s.line(what, "runs"));
    s
}

/// Starts a `sleep` container with `husk run -d` and prints the RSS of its host processes.
fn memory_per_container(husk: &Husk, mode: &str) {
    let b = Bundle::busybox(husk.dir(), "sleeper", &spec(&["sleep", "100000"], true))
        .expect("sleeper bundle");
    let id = "mem";
    let started = husk
        .spawn_to_files("mem", &["run", "--detach", "--bundle", b.path(), id])
        .expect("husk run -d");
    assert_eq!(
        started.code,
        Some(0),
        "husk run -d failed: {}\n{}",
        started.stderr(),
        husk.monitor_log(id)
    );
    let state: serde_json::Value = serde_json::from_slice(
        &std::fs::read(husk.root().join(id).join("state.json")).expect("state.json"),
    )
    .expect("state.json is JSON");
    let monitor = state["monitor"]["pid"].as_u64().expect("monitor pid") as u32;
    let ram_bytes = state["memory_mib"]
        .as_u64()
        .expect("memory_mib in state.json")
        << 20;
    let mut pids = process_tree(monitor);
    if let Some(v) = state["virtiofsd"]["pid"].as_u64() {
        for p in process_tree(v as u32) {
            if !pids.contains(&p) {
                pids.push(p);
            }
        }
    }
    let total = proc_stats::memory_excluding_guest_ram(&pids, ram_bytes, &format!("{mode}: "));
    let parts = if state["virtiofsd"]["pid"].is_u64() {
        "monitor + jailed VMM + virtiofsd"
    } else {
        "monitor + jailed VMM"
    };
    println!(
        "host memory per running container ({mode}): {:.1} MiB RSS excluding guest RAM \
         ({parts})",
        total as f64 / 1024.0
    );
    let _ = husk.output(&["delete", "--force", id]);
}

fn runc_path() -> Option<PathBuf> {
    let name = std::env::var_os("HUSK_RUNC").unwrap_or_else(|| "runc".into());
    let p = Path::new(&name);
    if p.is_absolute() {
        return p.is_file().then(|| p.to_path_buf());
    }
    std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|d| d.join(p))
        .find(|c| c.is_file())
}

fn main() {
    let runs = env_u64("HUSK_BENCH_RUNS", 3).max(1);
    if !Path::new("/dev/kvm").exists() {
        println!("husk CLI figures skipped: /dev/kvm is missing");
        return;
    }
    let guest = GuestImage::locate_or_build().expect("guest image");
    let virtiofsd = find_virtiofsd();
    let block = Husk::new(&Husk::guest_config(&guest, "rootfs_mode = \"block\""))
        .expect("husk setup (block)");
    let fs = virtiofsd.as_ref().map(|v| {
        let extra = format!(
            "rootfs_mode = \"virtiofs\"\nvirtiofsd = {:?}\n",
            v.display().to_string()
        );
        Husk::new(&Husk::guest_config(&guest, &extra)).expect("husk setup (virtiofs)")
    });
    let bundle = Bundle::busybox(block.dir(), "true", &spec(&["true"], true)).expect("true bundle");

    let runc = runc_path().map(|runc| {
        let root = block.dir().join("runc-root");
        time_runs("runc run /bin/true", runs, |i| {
            let mut c = Command::new(&runc);
            c.arg("--root").arg(&root).args([
                "run",
                "--bundle",
                bundle.path(),
                &format!("runc{i}"),
            ]);
            c
        })
    });
    if runc.is_none() {
        println!("runc not found (HUSK_RUNC or PATH): no baseline");
    }
    let mut husk_figures = Vec::new();
    if let Some(fs) = &fs {
        husk_figures.push((
            "virtiofs",
            time_runs("husk run /bin/true (virtiofs rootfs)", runs, |i| {
                fs.command(&["run", "--bundle", bundle.path(), &format!("fs{i}")])
            }),
        ));
    } else {
        println!("virtiofsd not found: virtio-fs figures skipped");
    }
    husk_figures.push((
        "block",
        time_runs("husk run /bin/true (block rootfs)", runs, |i| {
            block.command(&["run", "--bundle", bundle.path(), &format!("blk{i}")])
        }),
    ));
    if let Some(runc) = &runc {
        for (mode, s) in &husk_figures {
            println!(
                "ratio husk ({mode}) / runc, p50: {:.0}x",
                s.p50.as_secs_f64() / runc.p50.as_secs_f64()
            );
        }
    }

    if let Some(fs) = &fs {
        memory_per_container(fs, "virtiofs");
    }
    memory_per_container(&block, "block");
}
