//! What seccomp confinement of the VMM's threads costs (docs/security.md): compiling the
//! filters and starting the spawner once per VM, and starting a device worker confined
//! (through the spawner, from a confined vCPU-like thread) against starting it plain.
//! The two worker starts are alternated in one run and reported as a ratio.
//!
//! `cargo bench -p husk-tests --bench seccomp [-- ROUNDS]`

use std::sync::Arc;
use std::time::{Duration, Instant};

use husk_vmm::seccomp::{self, Filters, Spawner, ThreadKind};

fn cpu_now() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn p50(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let rounds: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(200);

    // Per VM: compile every filter (plus the SIGSYS handler, once) and start the spawner.
    let rss_before = rss_kib();
    let mut setup_wall = Vec::with_capacity(rounds);
    let mut setup_cpu = Vec::with_capacity(rounds);
    let mut keep = Vec::new();
    for _ in 0..rounds {
        let (w, c) = (Instant::now(), cpu_now());
        let filters = Filters::new().expect("filters compile");
        let spawner = Spawner::start(Arc::clone(&filters)).expect("spawner starts");
        setup_wall.push(w.elapsed());
        setup_cpu.push(cpu_now() - c);
        if keep.len() < 10 {
            keep.push((filters, spawner));
        } // others end with their last handle
    }
    let rss_after = rss_kib();
    println!(
        "per VM (filters + spawner): p50 {:?} wall, {:?} CPU; RSS +{} KiB for 10 VMs' filters and spawners",
        p50(setup_wall),
        p50(setup_cpu),
        rss_after.saturating_sub(rss_before)
    );

    // Per device activation: a worker start from an unconfined thread with no context
    // (an unconfined VMM) against one from a thread confined as a vCPU (through the
    // spawner, the worker confining itself), alternated.
    let (filters, spawner) = keep.pop().expect("one kept");
    let plain = starter(None);
    let confined = starter(Some((filters, spawner)));
    let (mut plain_t, mut confined_t) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        plain_t.push(plain.time());
        confined_t.push(confined.time());
    }
    let (p, c) = (p50(plain_t), p50(confined_t));
    println!(
        "per worker start: plain p50 {p:?}, confined p50 {c:?}, confined/plain {:.2}",
        c.as_secs_f64() / p.as_secs_f64()
    );
}

/// A thread that starts and joins one device worker per request and says how long it took.
struct Starter {
    go: std::sync::mpsc::SyncSender<()>,
    took: std::sync::mpsc::Receiver<Duration>,
}

impl Starter {
    fn time(&self) -> Duration {
        self.go.send(()).expect("starter alive");
        self.took.recv().expect("starter answers")
    }
}

fn starter(confine: Option<(Arc<Filters>, Spawner)>) -> Starter {
    let (go, requests) = std::sync::mpsc::sync_channel::<()>(0);
    let (answer, took) = std::sync::mpsc::sync_channel(0);
    std::thread::spawn(move || {
        let _guard = confine.map(|(filters, spawner)| {
            filters
                .confine_current(ThreadKind::Vcpu)
                .expect("vCPU filter");
            seccomp::enter(filters, Some(spawner))
        });
        for () in requests {
            let t = Instant::now();
            seccomp::spawn_worker("bench-worker", || {})
                .expect("worker starts")
                .join()
                .expect("worker ends");
            if answer.send(t.elapsed()).is_err() {
                break;
            }
        }
    });
    Starter { go, took }
}
