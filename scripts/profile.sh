#!/usr/bin/env bash
# Where a guest boot's time goes: boots the guest image once with `husk-vmm --profile`, waits
# until the agent answers, powers the VM off, then prints the top kernel symbols (samples, %)
# and the KVM exit counts, and renders a flame graph if inferno is installed
# (`cargo install inferno`).
#
#   scripts/profile.sh [OUT_DIR]               one profiled boot (default OUT_DIR: ./profile-out)
#   scripts/profile.sh --overhead N [OUT_DIR]  also N boots with and N without --profile,
#                                              alternated, and the ratio of their boot times
#
# Environment: PROFILE_HZ (samples per second and vCPU, default husk-vmm's 199), PROFILE_TOP (rows of
# the top table, default 25), PROFILE_VCPUS (default 1), CARGO_TARGET_DIR (where to build).
# The guest image comes from guest-image/build.sh (cached in ~/.cache/husk).
set -euo pipefail
cd "$(dirname "$0")/.."

overhead=0
if [[ ${1:-} == --overhead ]]; then
  overhead=${2:?--overhead needs a count}
  shift 2
fi
out_dir=${1:-profile-out}
mkdir -p "$out_dir"
out_dir=$(cd "$out_dir" && pwd)
profile=$out_dir/boot.folded

eval "$(guest-image/build.sh all)"
export HUSK_KERNEL HUSK_INITRAMFS
cargo build --release --quiet -p husk-vmm -p husk-tests \
  --bin husk-vmm --bin husk-profile-report --bin husk-profile-boot
bin=${CARGO_TARGET_DIR:-$PWD/target}/release

common=(--vcpus "${PROFILE_VCPUS:-1}")
if [[ -n ${PROFILE_HZ:-} ]]; then
  common+=(--hz "$PROFILE_HZ")
fi
"$bin/husk-profile-boot" --out "$profile" "${common[@]}"
"$bin/husk-profile-report" --top "${PROFILE_TOP:-25}" "$profile" | tee "$out_dir/report.txt"

if command -v inferno-flamegraph >/dev/null; then
  inferno-flamegraph --title "husk guest boot ($(basename "$HUSK_KERNEL"))" \
    <"$profile" >"$out_dir/boot.svg"
  echo "flame graph: $out_dir/boot.svg" >&2
else
  echo "no inferno-flamegraph (cargo install inferno): no flame graph" >&2
fi

if ((overhead > 0)); then
  echo "measuring the profiler's overhead: $overhead boots each way, alternated" >&2
  "$bin/husk-profile-boot" --out "$out_dir/overhead.folded" "${common[@]}" \
    --overhead "$overhead" | tee "$out_dir/overhead.txt"
fi
echo "profile: $profile, exit counts: $profile.exits.txt" >&2
