//! `husk` CLI figures, printed (no timed asserts):
//! - `husk run` of `/bin/true` from a prepared busybox bundle, end to end (the VM boots,
//!   the container runs, the VM is gone and the state deleted when `run` returns), in the
//!   default virtio-fs rootfs mode and in the read-only block image mode, next to
//!   `runc run` of the same bundle, with the ratio;
//! - host memory per running container (`husk run -d` of `sleep`): resident memory of the
//!   monitor (which runs the VMM in-process) and virtiofsd, excluding guest RAM (the
//!   mapping named `husk-guest-ram`, see vmm/src/memory.rs).
//!
//! `cargo bench -p husk-tests --bench cli`. Knobs: `HUSK_BENCH_RUNS` (default 3),
//! `HUSK_RUNC` (default `runc` on PATH).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use husk_tests::GuestImage;
use husk_tests::husk_cli::{Bundle, Husk, spec};
use husk_tests::podman::find_virtiofsd;
use husk_tests::proc_stats;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Stats {
    p50: Duration,
    min: Duration,
    max: Duration,
    runs: usize,
}

fn stats(mut times: Vec<Duration>) -> Stats {
    times.sort();
    Stats {
        p50: times[times.len() / 2],
        min: times[0],
        max: times[times.len() - 1],
        runs: times.len(),
    }
}

fn print(what: &str, s: &Stats) {
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "{what}: p50 {:.1} ms  min {:.1} ms  max {:.1} ms  ({} runs)",
        ms(s.p50),
        ms(s.min),
        ms(s.max),
        s.runs
    );
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
    let s = stats(times);
    print(what, &s);
    s
}

/// Host address ranges of guest RAM in `pid`: the mappings named `husk-guest-ram`, or, on
/// hosts without anonymous mapping names, the nameless anonymous mappings exactly
/// `ram_bytes` long (guest RAM below the MMIO gap is one mapping).
fn guest_ram_ranges(pid: u32, ram_bytes: u64) -> Vec<(u64, u64)> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    let parse = |l: &str| -> Option<(u64, u64)> {
        let (a, b) = l.split_whitespace().next()?.split_once('-')?;
        let (a, b) = (
            u64::from_str_radix(a, 16).ok()?,
            u64::from_str_radix(b, 16).ok()?,
        );
        Some((a, b - a))
    };
    let named: Vec<_> = maps
        .lines()
        .filter(|l| l.contains("husk-guest-ram"))
        .filter_map(parse)
        .collect();
    if !named.is_empty() {
        return named;
    }
    maps.lines()
        // address, perms, offset, device, inode: no path
        .filter(|l| l.split_whitespace().count() == 5)
        .filter_map(parse)
        .filter(|&(_, len)| len == ram_bytes)
        .collect()
}

/// `pid` and all its descendants (virtiofsd forks a sandboxed child).
fn process_tree(pid: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        // The field after the state, past the parenthesised command name.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, r)| r.split_whitespace().nth(1)?.parse().ok());
        if let Some(ppid) = ppid {
            parents.push((p, ppid));
        }
    }
    let mut tree = vec![pid];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        tree.extend(
            parents
                .iter()
                .filter(|(_, pp)| *pp == parent)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    tree
}

fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "?".into())
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
    let mut total = 0;
    let mut guest_ram_seen = false;
    for pid in pids {
        let ranges = guest_ram_ranges(pid, ram_bytes);
        guest_ram_seen |= !ranges.is_empty();
        let Ok(rss) = proc_stats::rss(pid, &ranges) else {
            continue;
        };
        println!(
            "  {mode}: pid {pid} {}: RSS {} KiB, of which guest RAM {} KiB -> {} KiB",
            comm(pid),
            rss.total_kib,
            rss.guest_ram_kib,
            rss.excluding_guest_ram_kib()
        );
        total += rss.excluding_guest_ram_kib();
    }
    if !guest_ram_seen {
        println!("  {mode}: guest RAM not found in the mappings: the figure below includes it");
    }
    let parts = if state["virtiofsd"]["pid"].is_u64() {
        "monitor with in-process VMM + virtiofsd"
    } else {
        "monitor with in-process VMM"
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
