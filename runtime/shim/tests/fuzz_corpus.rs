//! Replays the host-side fuzz targets' seed corpus (`runtime/fuzz/corpus/<target>/`) and
//! the inputs of fixed bugs (`runtime/fuzz/regressions/<target>/`) through the same code
//! the cargo-fuzz targets run, on the stable toolchain: `agent` (the client reading a
//! hostile agent and VMM, stats turned into the shim's metrics) and `spec` (config.json to
//! the guest spec and the VM size).
//!
//! `cargo test -p containerd-shim-husk-v2 --test fuzz_corpus -- --ignored write_seed_corpus`
//! rewrites the seed corpus from the harnesses' `seeds()` (after a change of an input
//! format).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use husk_vmm::fuzzing::corpus::{self, Seed};

type Harness = fn(&[u8]);

/// The targets of `runtime/fuzz/`, as its `fuzz_targets/*.rs` run them.
const TARGETS: &[(&str, Harness)] = &[("agent", agent), ("spec", husk_runtime::fuzzing::spec)];

fn agent(data: &[u8]) {
    if let Some(stats) = husk_protocol::fuzzing::agent(data).stats {
        let _ = husk_shim::stats::to_metrics(&stats);
    }
}

fn seeds() -> Vec<Seed> {
    let agent = husk_protocol::fuzzing::seeds()
        .into_iter()
        .map(|(name, data)| ("agent", name, data));
    let spec = husk_runtime::fuzzing::seeds()
        .into_iter()
        .map(|(name, data)| ("spec", name, data));
    agent.chain(spec).collect()
}

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// Runs one input; `Err` on a panic or a run over 5 s (the agent harness's own bound on a
/// call that waits on nothing).
fn run_one(target: &str, path: &Path) -> Result<(), String> {
    let harness = TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .map(|(_, f)| *f)
        .ok_or_else(|| format!("no harness for fuzz directory {target:?}"))?;
    let data = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let start = Instant::now();
    let result = std::panic::catch_unwind(|| harness(&data));
    let took = start.elapsed();
    if result.is_err() {
        Err(format!("{}: panicked", path.display()))
    } else if took > Duration::from_secs(5) {
        Err(format!("{}: took {took:?}", path.display()))
    } else {
        Ok(())
    }
}

#[test]
fn seed_corpus_replays_cleanly() {
    corpus::replay(&fuzz_dir(), "corpus", seeds().len(), run_one);
}

#[test]
fn regression_inputs_replay_cleanly() {
    corpus::replay(&fuzz_dir(), "regressions", 0, run_one);
}

/// The committed seeds are the generated ones.
#[test]
fn seed_corpus_is_up_to_date() {
    let targets: Vec<&str> = TARGETS.iter().map(|(name, _)| *name).collect();
    corpus::check_seeds(&fuzz_dir(), &targets, &seeds());
}

#[test]
#[ignore = "rewrites the committed seed corpus"]
fn write_seed_corpus() {
    corpus::write_seeds(&fuzz_dir(), &seeds());
}
