#!/usr/bin/env bash
# Runs husk's whole test suite on this host: installs what is missing, builds the guest image
# (cached after the first run), checks formatting and lints, runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh

# Kernel + initramfs; the VM tests read these paths (and would build them themselves otherwise).
eval "$(guest-image/build.sh all)"
export HUSK_KERNEL HUSK_INITRAMFS

cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings
cargo build --workspace --bins
cargo test --workspace
