//! The shim's parts that are reachable from outside its binary: what the fuzz targets in
//! `runtime/fuzz/` and the corpus replay (`tests/fuzz_corpus.rs`) run. The binary is
//! `src/main.rs`.

pub mod stats;
