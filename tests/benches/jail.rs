//! What the VMM's confinement as a jailed process costs (docs/security.md): CPU and wall
//! time to start a process and confine it (namespaces, the supervisor's fork, the jail's
//! tmpfs, binds and device nodes of a typical VM, pivot_root, dropping root), against
//! starting the same process unconfined and against starting a thread (the VMM was a
//! thread of the monitor or shim before). The variants are alternated in one run; the
//! figures are p50s, the comparison a difference and a ratio. Then the memory a jailed
//! process adds: the supervisor's PSS and the jailed process's PSS against an unconfined
//! one's.
//!
//! `cargo bench -p husk-tests --bench jail [-- ROUNDS]` (as root)

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use husk_jailer::{Bind, BindKind, JailSpec};

const CHILD_ENV: &str = "HUSK_JAIL_BENCH_CHILD";
const SPEC_ENV: &str = "HUSK_JAIL_BENCH_SPEC";
const HOLD_ENV: &str = "HUSK_JAIL_BENCH_HOLD";

fn p50(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

/// The child side: confine (or not), then exit, or hold until stdin closes.
fn child(mode: &str) -> ! {
    if mode == "jail" {
        let spec: JailSpec = serde_json::from_str(&std::env::var(SPEC_ENV).unwrap()).unwrap();
        let jailed = husk_jailer::enter::enter(&spec, &[]).unwrap();
        jailed.drop_privileges().unwrap();
    }
    if std::env::var_os(HOLD_ENV).is_some() {
        println!("ready");
        let _ = std::io::stdin().read_to_end(&mut Vec::new());
    }
    std::process::exit(0)
}

/// A jail like a virtio-fs container VM's: kernel and initramfs read-only, the run
/// folder writable, a console file, /dev/kvm.
fn vm_like_spec(dir: &Path) -> JailSpec {
    for f in ["vmlinux", "initramfs.cpio", "console.log"] {
        std::fs::write(dir.join(f), b"x").unwrap();
    }
    std::fs::create_dir_all(dir.join("run")).unwrap();
    // The launcher makes the jail folder; here the bench does.
    std::fs::create_dir_all(dir.join("jail")).unwrap();
    let kvm = if Path::new("/dev/kvm").exists() {
        "/dev/kvm"
    } else {
        "/dev/null"
    };
    let bind = |p: &str, kind| Bind {
        path: dir.join(p),
        kind,
    };
    JailSpec {
        root: dir.join("jail"),
        uid: 65534,
        gid: 65534,
        binds: vec![
            bind("console.log", BindKind::Output),
            bind("initramfs.cpio", BindKind::ReadOnly),
            bind("run", BindKind::Writable),
            bind("vmlinux", BindKind::ReadOnly),
        ],
        devices: vec![PathBuf::from(kvm)],
        max_open_files: husk_jailer::spec::DEFAULT_MAX_OPEN_FILES,
    }
}

fn command(mode: &str, spec: &str) -> Command {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.env(CHILD_ENV, mode).env(SPEC_ENV, spec);
    c
}

/// Starts the child and waits for it; its CPU (the supervisor's and the jailed process's,
/// which the supervisor reaped) and the wall time.
fn timed_process(mode: &str, spec: &str) -> (Duration, Duration) {
    let t0 = Instant::now();
    // Reaped below by wait4, which also returns its resource usage.
    #[allow(clippy::zombie_processes)]
    let child = command(mode, spec)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut status = 0;
    // SAFETY: an all-zero rusage is valid; wait4 fills it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waiting for our own child with valid out-pointers.
    let r = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut ru) };
    let wall = t0.elapsed();
    assert!(
        r > 0 && libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "{mode} child failed: {status:#x}"
    );
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    (tv(ru.ru_utime) + tv(ru.ru_stime), wall)
}

fn process_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn timed_thread() -> (Duration, Duration) {
    let (c0, t0) = (process_cpu(), Instant::now());
    std::thread::Builder::new()
        .name("vmm".into())
        .spawn(|| ())
        .unwrap()
        .join()
        .unwrap();
    (process_cpu() - c0, t0.elapsed())
}

fn pss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Pss:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Starts a holding child; returns the PSS of the process and, jailed, of its supervisor.
fn held(mode: &str, spec: &str) -> (u64, Option<u64>) {
    let mut child = command(mode, spec)
        .env(HOLD_ENV, "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready");
    let pid = child.id();
    let figures = if mode == "jail" {
        let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap();
        let jailed: u32 = children.split_whitespace().next().unwrap().parse().unwrap();
        (pss_kib(jailed), Some(pss_kib(pid)))
    } else {
        (pss_kib(pid), None)
    };
    drop(child.stdin.take());
    child.wait().unwrap();
    figures
}

fn main() {
    if let Ok(mode) = std::env::var(CHILD_ENV) {
        child(&mode);
    }
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED jail bench: entering namespaces and dropping root needs root");
        return;
    }
    let rounds: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(30);
    let tmp = tempfile::tempdir().unwrap();
    let spec = serde_json::to_string(&vm_like_spec(tmp.path())).unwrap();
    let (mut thread, mut plain, mut jailed) = (Vec::new(), Vec::new(), Vec::new());
    // One of each first, unmeasured (page cache, binary).
    timed_process("plain", &spec);
    timed_process("jail", &spec);
    for _ in 0..rounds {
        thread.push(timed_thread());
        plain.push(timed_process("plain", &spec));
        jailed.push(timed_process("jail", &spec));
    }
    let split = |v: &[(Duration, Duration)]| -> (Duration, Duration) {
        (
            p50(v.iter().map(|x| x.0).collect()),
            p50(v.iter().map(|x| x.1).collect()),
        )
    };
    let (t_cpu, t_wall) = split(&thread);
    let (p_cpu, p_wall) = split(&plain);
    let (j_cpu, j_wall) = split(&jailed);
    println!("VMM start, p50 of {rounds} alternated rounds (CPU = user + system):");
    println!(
        "  a thread (the VMM before)           CPU {:>10}  wall {:>10}",
        ms(t_cpu),
        ms(t_wall)
    );
    println!(
        "  a process, unconfined               CPU {:>10}  wall {:>10}",
        ms(p_cpu),
        ms(p_wall)
    );
    println!(
        "  a process, jailed and unprivileged  CPU {:>10}  wall {:>10}",
        ms(j_cpu),
        ms(j_wall)
    );
    println!(
        "  the jail adds to a process start:   CPU {} (x{:.2}), wall {} (x{:.2})",
        ms(j_cpu.saturating_sub(p_cpu)),
        j_cpu.as_secs_f64() / p_cpu.as_secs_f64().max(1e-9),
        ms(j_wall.saturating_sub(p_wall)),
        j_wall.as_secs_f64() / p_wall.as_secs_f64().max(1e-9),
    );
    let (plain_pss, _) = held("plain", &spec);
    let (jailed_pss, supervisor_pss) = held("jail", &spec);
    println!("Memory (PSS) of a holding process:");
    println!(
        "  unconfined {plain_pss} KiB; jailed {jailed_pss} KiB, plus its supervisor {} KiB",
        supervisor_pss.unwrap_or(0)
    );
}
