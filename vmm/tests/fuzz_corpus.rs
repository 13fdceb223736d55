//! Replays the fuzz seed corpus (`vmm/fuzz/corpus/<target>/`) and the inputs of fixed bugs
//! (`vmm/fuzz/regressions/<target>/`) through the harnesses of `husk_vmm::fuzzing`, on the
//! stable toolchain, so `cargo test` catches a regression without cargo-fuzz.
//!
//! `cargo test -p husk-vmm --test fuzz_corpus -- --ignored write_seed_corpus` rewrites
//! the seed corpus from `husk_vmm::fuzzing::seeds()` (after a change of the input format).
//!
//! `vmm/fuzz/known-bugs/<target>/` holds reproducers of bugs found and not fixed yet; they
//! are not replayed by default (a hung worker thread would spin for the rest of the test
//! process). `known_bugs_still_reproduce` (ignored) checks they still fail; once a bug is
//! fixed, its input moves to `regressions/`.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use husk_vmm::fuzzing::{Harness, TARGETS, corpus, seeds};

/// Panics seen anywhere in the process, device worker threads included (a worker's panic
/// does not reach the harness: the device only sees its worker return nothing).
static PANICS: AtomicUsize = AtomicUsize::new(0);
/// The tests below share the hook and the counter, so they run one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn count_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            default(info);
        }));
    });
}

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

fn harness(target: &str) -> Harness {
    TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .map(|(_, f)| *f)
        .unwrap_or_else(|| panic!("no harness for fuzz directory {target:?}"))
}

/// Runs one input through its harness; `Err` says how it failed (a panic anywhere, device
/// worker threads included, or a slow run).
fn run_one(target: &str, path: &Path) -> Result<(), String> {
    let f = harness(target);
    let data = std::fs::read(path).expect("read input");
    let before = PANICS.load(Ordering::SeqCst);
    let start = Instant::now();
    let result = std::panic::catch_unwind(|| f(&data));
    let took = start.elapsed();
    if result.is_err() || PANICS.load(Ordering::SeqCst) != before {
        Err(format!("{}: panicked", path.display()))
    } else if took > Duration::from_secs(1) {
        Err(format!("{}: took {took:?}", path.display()))
    } else {
        Ok(())
    }
}

/// Replays every input of `<fuzz>/<kind>/`; fails if any fails.
fn replay(kind: &str, min_inputs: usize) {
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    count_panics();
    corpus::replay(&fuzz_dir(), kind, min_inputs, run_one);
}

#[test]
fn seed_corpus_replays_cleanly() {
    replay("corpus", seeds().len());
}

#[test]
fn regression_inputs_replay_cleanly() {
    replay("regressions", 0);
}

#[test]
#[ignore = "replays open bugs; a hung worker keeps spinning until the process exits"]
fn known_bugs_still_reproduce() {
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    count_panics();
    let fixed: Vec<String> = corpus::inputs(&fuzz_dir(), "known-bugs")
        .iter()
        .filter(|(target, path)| run_one(target, path).is_ok())
        .map(|(_, path)| format!("{} passes now: move it to regressions/", path.display()))
        .collect();
    assert!(fixed.is_empty(), "{}", fixed.join("\n"));
}

/// Each target has seeds, and the committed seeds are the generated ones.
#[test]
fn seed_corpus_is_up_to_date() {
    let targets: Vec<&str> = TARGETS.iter().map(|(name, _)| *name).collect();
    corpus::check_seeds(&fuzz_dir(), &targets, &seeds());
}

/// Writes `fuzzing::seeds()` to `vmm/fuzz/corpus/`.
#[test]
#[ignore = "rewrites the committed seed corpus"]
fn write_seed_corpus() {
    corpus::write_seeds(&fuzz_dir(), &seeds());
}
