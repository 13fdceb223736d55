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

type Harness = fn(&[u8]);

/// The targets of `runtime/fuzz/`, as its `fuzz_targets/*.rs` run them.
const TARGETS: &[(&str, Harness)] = &[("agent", agent), ("spec", husk_runtime::fuzzing::spec)];

fn agent(data: &[u8]) {
    if let Some(stats) = husk_protocol::fuzzing::agent(data).stats {
        let _ = husk_shim::stats::to_metrics(&stats);
    }
}

fn seeds() -> Vec<(&'static str, &'static str, Vec<u8>)> {
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

fn harness(target: &str) -> Harness {
    TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .map(|(_, f)| *f)
        .unwrap_or_else(|| panic!("no harness for fuzz directory {target:?}"))
}

/// Every file under `<fuzz>/<kind>/<target>/`, as (target, path).
fn inputs(kind: &str) -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    let Ok(dirs) = std::fs::read_dir(fuzz_dir().join(kind)) else {
        return out;
    };
    for dir in dirs {
        let dir = dir.expect("read_dir").path();
        let Some(target) = dir.file_name().and_then(|n| n.to_str()).map(str::to_owned) else {
            continue;
        };
        if !dir.is_dir() {
            continue;
        }
        for f in std::fs::read_dir(&dir).expect("read_dir") {
            let f = f.expect("read_dir").path();
            if f.is_file() {
                out.push((target.clone(), f));
            }
        }
    }
    out.sort();
    out
}

/// Runs every input of `<fuzz>/<kind>/`; fails on a panic or a run over 5 s (the agent
/// harness's own bound on a call that waits on nothing).
fn replay(kind: &str, min_inputs: usize) {
    let all = inputs(kind);
    assert!(
        all.len() >= min_inputs,
        "{kind}: {} inputs, expected at least {min_inputs}",
        all.len()
    );
    let mut failures = Vec::new();
    for (target, path) in &all {
        let data = std::fs::read(path).expect("reading an input");
        let start = Instant::now();
        let result = std::panic::catch_unwind(|| harness(target)(&data));
        let took = start.elapsed();
        if result.is_err() {
            failures.push(format!("{}: panicked", path.display()));
        } else if took > Duration::from_secs(5) {
            failures.push(format!("{}: took {took:?}", path.display()));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn seed_corpus_replays_cleanly() {
    replay("corpus", seeds().len());
}

#[test]
fn regression_inputs_replay_cleanly() {
    replay("regressions", 0);
}

/// The committed seeds are the generated ones.
#[test]
fn seed_corpus_is_up_to_date() {
    for (target, name, data) in seeds() {
        let path = fuzz_dir().join("corpus").join(target).join(name);
        let committed = std::fs::read(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (run the ignored test write_seed_corpus)",
                path.display()
            )
        });
        assert!(
            committed == data,
            "{} differs from its generator (run the ignored test write_seed_corpus)",
            path.display()
        );
    }
}

#[test]
#[ignore = "rewrites the committed seed corpus"]
fn write_seed_corpus() {
    for (target, name, data) in seeds() {
        let dir = fuzz_dir().join("corpus").join(target);
        std::fs::create_dir_all(&dir).expect("corpus folder");
        std::fs::write(dir.join(name), data).expect("writing a seed");
    }
}
