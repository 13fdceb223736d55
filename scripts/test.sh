#!/usr/bin/env bash
# Runs husk's whole test suite on this host: installs what is missing, builds the guest image
# (cached after the first run), checks formatting and lints, runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh

# Kernel + initramfs; the VM tests read these paths (and would build them themselves otherwise).
eval "$(guest-image/build.sh all)"
export HUSK_KERNEL HUSK_INITRAMFS

# CI runs the short version of the long tests; HUSK_NIGHTLY=1 runs the long one.
if [ "${HUSK_NIGHTLY:-0}" = 1 ]; then
    export HUSK_LEAK_CYCLES="${HUSK_LEAK_CYCLES:-50}"
    export HUSK_STDIO_LINES="${HUSK_STDIO_LINES:-12500000}" # 101 MB through husk run
    export HUSK_FAULT_ROUNDS="${HUSK_FAULT_ROUNDS:-24}" # kill -9 rounds, CLI and containerd each
else
    export HUSK_LEAK_CYCLES="${HUSK_LEAK_CYCLES:-10}"
    export HUSK_STDIO_LINES="${HUSK_STDIO_LINES:-500000}" # 3.4 MB
fi

cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings
cargo build --workspace --bins
cargo test --workspace

# Nightly: every fuzz target for 10 minutes (needs the nightly toolchain; scripts/fuzz.sh
# installs cargo-fuzz). CI replays the corpus and regressions in `cargo test` above.
if [ "${HUSK_NIGHTLY:-0}" = 1 ]; then
    scripts/fuzz.sh "${HUSK_FUZZ_SECONDS:-600}"
    # The CRI test restores its pods from a VM template; nightly also runs it cold.
    HUSK_CRI_TEMPLATE=off cargo test -p husk-tests --test containerd_cri
fi
