#!/usr/bin/env bash
# Fuzzes the VMM's guest-facing parsers: builds the cargo-fuzz targets of vmm/fuzz/ (nightly,
# AddressSanitizer) and runs each for SECONDS_PER_TARGET (default 60), starting from the
# committed seeds (vmm/fuzz/corpus/<target>/) and fixed-bug inputs (vmm/fuzz/regressions/).
# Fails if any target crashes, hangs (a run over 10 s) or leaks; prints executions per second.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]
#
# Nothing is written into the checkout. Build output goes to $CARGO_TARGET_DIR if set, else
# $HUSK_FUZZ_WORK/target; the corpus the fuzzer grows (kept between runs, so nightly runs build
# on each other) and crash inputs go to $HUSK_FUZZ_WORK (default /tmp/husk-fuzz). To keep a
# crash as a regression test, copy its input to vmm/fuzz/regressions/<target>/ (it is then
# replayed by `cargo test -p husk-vmm --test fuzz_corpus`).
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

fuzz_dir=vmm/fuzz
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

if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo "+$toolchain" fuzz list --fuzz-dir "$fuzz_dir")
fi

start=$(date +%s)
nice -n 10 cargo "+$toolchain" fuzz build --fuzz-dir "$fuzz_dir"
echo "fuzz: built ${#targets[@]} targets in $(($(date +%s) - start)) s (target dir $CARGO_TARGET_DIR)"

bin_dir="$CARGO_TARGET_DIR/$triple/release"
failed=()
summary=()
for t in "${targets[@]}"; do
    corpus="$work/corpus/$t"
    artifacts="$work/artifacts/$t"
    log="$work/logs/$t.log"
    mkdir -p "$corpus" "$artifacts" "$(dirname "$log")"
    seeds=("$fuzz_dir/corpus/$t")
    [ -d "$fuzz_dir/regressions/$t" ] && seeds+=("$fuzz_dir/regressions/$t")
    echo "fuzz: $t for $secs s (log $log)"
    rc=0
    # The first corpus directory is the one libFuzzer adds new inputs to: the scratch one.
    ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_odr_violation=0" \
        nice -n 10 "$bin_dir/$t" "$corpus" "${seeds[@]}" \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -max_len=8192 \
        -print_final_stats=1 -artifact_prefix="$artifacts/" >"$log" 2>&1 || rc=$?
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
