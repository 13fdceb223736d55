//! `HUSK_VMM_BUILD_ID`: a hash of the VMM's sources and the workspace's locked dependency
//! versions. A snapshot records the VMM that took it; VM templates are keyed by it, so every
//! binary built from the same VMM (the `husk` CLI, the containerd shim, `husk-vmm`) can
//! restore the same templates, and a changed VMM never restores an old one.

use std::path::{Path, PathBuf};

/// FNV-1a, 64 bits: stable across Rust releases, unlike std's hasher.
fn fnv(hash: &mut u64, bytes: &[u8]) {
    for &b in bytes {
        *hash ^= u64::from(b);
        *hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
}

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            files(&p, out);
        } else {
            out.push(p);
        }
    }
}

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let mut inputs = Vec::new();
    files(&manifest.join("src"), &mut inputs);
    inputs.push(manifest.join("Cargo.toml"));
    inputs.push(manifest.join("../Cargo.lock"));
    inputs.sort();
    let mut hash = 0xcbf2_9ce4_8422_2325_u64;
    for p in &inputs {
        let rel = p.strip_prefix(&manifest).unwrap_or(p);
        fnv(&mut hash, rel.to_string_lossy().as_bytes());
        fnv(&mut hash, &std::fs::read(p).unwrap_or_default());
    }
    println!("cargo:rerun-if-changed=src");
    println!("cargo:rerun-if-changed=Cargo.toml");
    println!("cargo:rerun-if-changed=../Cargo.lock");
    println!("cargo:rustc-env=HUSK_VMM_BUILD_ID={hash:016x}");
}
