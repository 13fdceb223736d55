#!/usr/bin/env bash
# Fuzzes what the host reads from a guest or a bundle: builds the cargo-fuzz targets of
# vmm/fuzz/ (the VMM's devices, MMIO registers, snapshots) and runtime/fuzz/ (agent replies and
# the VMM handshake, config.json to guest spec and VM size) with nightly and AddressSanitizer,
# and runs each for SECONDS_PER_TARGET (default 60), starting from the committed seeds
# (<fuzz dir>/corpus/<target>/), fixed-bug inputs (<fuzz dir>/regressions/) and a dictionary
# (<fuzz dir>/dicts/<target>.dict) where there is one. Fails if any target crashes, hangs (a
# run over 10 s) or leaks; prints executions per second.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]
#
# Nothing is written into the checkout. Build output goes to $CARGO_TARGET_DIR if set, else
# $HUSK_FUZZ_WORK/target; the corpus the fuzzer grows (kept between runs, so nightly runs build
# on each other) and crash inputs go to $HUSK_FUZZ_WORK (default /tmp/husk-fuzz). To keep a
# crash as a regression test, copy its input to vmm/fuzz/regressions/<target>/ (it is then
# replayed by `cargo test -p husk-vmm --test fuzz_corpus`; runtime/fuzz's by
# `cargo test -p containerd-shim-husk-v2 --test fuzz_corpus`).
set -euo pipefail
cd "$(dirname "$0")/.."

secs="${1:-60}"
shift || true
case "$secs" in
    '' | *[!0-9]*)
        echo "usage: $0 [SECONDS_PER_TARGET] [TARGET...]" >&2
        exit 2
        ;;
esac

fuzz_dirs=(vmm/fuzz runtime/fuzz)
work="${HUSK_FUZZ_WORK:-/tmp/husk-fuzz}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$work/target}"
toolchain="${HUSK_FUZZ_TOOLCHAIN:-nightly}"
triple="$(rustc -vV | sed -n 's/^host: //p')"

if ! rustup run "$toolchain" rustc --version >/dev/null 2>&1; then
    echo "fuzz: installing the $toolchain toolchain" >&2
    rustup toolchain install "$toolchain" --profile minimal
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz" >&2
    cargo "+$toolchain" install cargo-fuzz --locked
fi

# Every target, as "<fuzz dir> <target>".
all=()
for d in "${fuzz_dirs[@]}"; do
    while read -r t; do all+=("$d $t"); done < <(cargo "+$toolchain" fuzz list --fuzz-dir "$d")
done
if [ "$#" -gt 0 ]; then
    targets=()
    for want in "$@"; do
        found=
        for e in "${all[@]}"; do [ "${e#* }" = "$want" ] && targets+=("$e") && found=1; done
        [ -n "$found" ] || { echo "fuzz: no target $want (have: ${all[*]#* })" >&2; exit 2; }
    done
else
    targets=("${all[@]}")
fi

start=$(date +%s)
for d in "${fuzz_dirs[@]}"; do
    nice -n 10 cargo "+$toolchain" fuzz build --fuzz-dir "$d"
done
echo "fuzz: built ${#all[@]} targets in $(($(date +%s) - start)) s (target dir $CARGO_TARGET_DIR)"

bin_dir="$CARGO_TARGET_DIR/$triple/release"
failed=()
summary=()
for entry in "${targets[@]}"; do
    fuzz_dir="${entry% *}"
    t="${entry#* }"
    corpus="$work/corpus/$t"
    artifacts="$work/artifacts/$t"
    log="$work/logs/$t.log"
    mkdir -p "$corpus" "$artifacts" "$(dirname "$log")"
    seeds=("$fuzz_dir/corpus/$t")
    [ -d "$fuzz_dir/regressions/$t" ] && seeds+=("$fuzz_dir/regressions/$t")
    dict=()
    [ -f "$fuzz_dir/dicts/$t.dict" ] && dict=("-dict=$fuzz_dir/dicts/$t.dict")
    echo "fuzz: $t for $secs s (log $log)"
    rc=0
    # The first corpus directory is the one libFuzzer adds new inputs to: the scratch one.
    ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_odr_violation=0" \
        nice -n 10 "$bin_dir/$t" "$corpus" "${seeds[@]}" \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -max_len=8192 \
        -print_final_stats=1 -artifact_prefix="$artifacts/" "${dict[@]}" >"$log" 2>&1 || rc=$?
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n1)
    if [ -z "$rate" ]; then
        # No final stats after a crash: take the last status line.
        runs=$(grep -o '^#[0-9]*' "$log" | tail -n1 | tr -d '#')
        rate=$(grep -o 'exec/s: [0-9]*' "$log" | tail -n1 | sed 's/exec\/s: //')
    fi
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -n1 | sed 's/cov: //')
    if [ "$rc" -eq 0 ]; then
        status=ok
    else
        status="FAILED (exit $rc)"
        failed+=("$t")
        [ "$rc" -gt 128 ] && echo "fuzz: $t: killed by signal $((rc - 128))" >&2
        { grep -E '^(SUMMARY|==[0-9]+== ERROR)|panicked at|^ALARM|Test unit written to' "$log" || true; } |
            sed -n "1,8s/^/fuzz: $t: /p" >&2
    fi
    summary+=("$(printf '%-8s %-18s %10s runs %7s exec/s  cov %s' "$t" "$status" "${runs:-?}" "${rate:-?}" "${cov:-?}")")
done

echo "fuzz: results ($secs s per target)"
printf '  %s\n' "${summary[@]}"
if [ "${#failed[@]}" -gt 0 ]; then
    echo "fuzz: ${#failed[@]} target(s) failed: ${failed[*]}; crash inputs in $work/artifacts/" >&2
    exit 1
fi
