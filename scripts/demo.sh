#!/usr/bin/env bash
# husk's main job at this stage, end to end: install what is missing, build the VMM and the guest
# image, boot a micro-VM, ask its agent for the guest's details, then shut the VM down.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
eval "$(guest-image/build.sh all)"
export HUSK_KERNEL HUSK_INITRAMFS
cargo build --release --bin husk-vmm --bin husk-demo
exec target/release/husk-demo "$@"
