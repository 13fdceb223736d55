#!/usr/bin/env bash
# What the guest's timer tick costs on this host. Runs a container whose only process spins
# in user mode (busybox sh `while :; do :; done`, no syscalls) in a husk VM, then counts for
# SECS seconds, with perf and KVM's kvm:kvm_emulate_insn tracepoint, the guest-kernel
# instructions KVM emulates on that vCPU and how many timer interrupts the guest took. On a
# nested-PVM host the guest kernel runs in KVM's instruction emulator, so while a vCPU is
# busy nearly all of those instructions are the tick's; on hardware KVM nothing is emulated
# and the script says so. See docs/performance.md ("The guest's timer tick").
#
#   scripts/tick-cost.sh [SECS] [VMLINUX...]
#
# SECS defaults to 5; VMLINUX defaults to the guest image's kernel (guest-image/build.sh),
# each with its System.map and config beside it (as the guest-image cache keeps them). Give
# two kernels to compare tick rates (e.g. an older cache entry); they are measured in turn.
# Needs root, /dev/kvm, perf and busybox-static (scripts/install-deps.sh --bench).
set -euo pipefail
cd "$(dirname "$0")/.."

secs=${1:-5}
shift || true
die() {
  echo "tick-cost: $*" >&2
  exit 1
}
[[ $secs =~ ^[0-9]+$ && $secs -gt 0 ]] || die "SECS must be a positive number of seconds, not '$secs'"
((EUID == 0)) || die "needs root (husk runs VMs as root; perf reads KVM's tracepoints)"
[[ -c /dev/kvm ]] || die "no /dev/kvm"
command -v perf >/dev/null || die "perf not found (scripts/install-deps.sh --bench installs linux-perf)"
[[ -x /bin/busybox ]] || die "/bin/busybox not found (apt install busybox-static)"
tracefs=/sys/kernel/tracing
[[ -d $tracefs/events ]] || mount -t tracefs nodev "$tracefs" 2>/dev/null ||
  die "cannot mount tracefs on $tracefs"
[[ -d $tracefs/events/kvm/kvm_emulate_insn ]] ||
  die "the host kernel has no kvm:kvm_emulate_insn tracepoint"

eval "$(guest-image/build.sh all | grep -E '^HUSK_(KERNEL|INITRAMFS)=')"
(($# > 0)) || set -- "$HUSK_KERNEL"
cargo build --release --bin husk >&2
husk=$PWD/target/release/husk

work=$(mktemp -d /tmp/husk-tick.XXXXXX)
id=tick-$$
cleanup() {
  "$husk" --root "$work/state" delete --force "$id" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

bundle=$work/bundle
mkdir -p "$bundle/rootfs/bin" "$bundle/rootfs/proc" "$bundle/rootfs/dev" "$bundle/rootfs/tmp"
cp /bin/busybox "$bundle/rootfs/bin/busybox"
ln -s busybox "$bundle/rootfs/bin/sh"
(cd "$bundle" && "$husk" spec)
sed -i -e 's/"terminal": true/"terminal": false/' \
  -e 's|^\( *\)"sh"$|\1"sh", "-c", "while :; do :; done"|' "$bundle/config.json"

header_done=
for vmlinux in "$@"; do
  dir=$(dirname "$vmlinux")
  [[ -f $vmlinux && -f $dir/System.map && -f $dir/config ]] ||
    die "$vmlinux: needs System.map and config beside it"
  hz=$(sed -n 's/^CONFIG_HZ=//p' "$dir/config")
  entry=$(awk '$3 == "asm_sysvec_apic_timer_interrupt" { print $1 }' "$dir/System.map")
  [[ -n $entry ]] || die "$dir/System.map has no asm_sysvec_apic_timer_interrupt"
  cat >"$work/husk.toml" <<EOF
kernel = "$vmlinux"
initramfs = "$HUSK_INITRAMFS"
template = "off"
EOF
  HUSK_CONFIG=$work/husk.toml "$husk" --root "$work/state" run --detach --bundle "$bundle" "$id" \
    </dev/null >/dev/null 2>"$work/run.log" || die "husk run failed: $(cat "$work/run.log")"
  # The VMM runs jailed under the container's state folder (a supervisor and the VMM
  # itself match); the vCPU thread is named vcpu0.
  vcpu=
  for pid in $(pgrep -f -- "$work/state/$id/jail"); do
    for t in /proc/"$pid"/task/*; do
      [[ $(cat "$t/comm" 2>/dev/null) == vcpu0 ]] && vcpu=${t##*/}
    done
  done
  [[ -n $vcpu ]] || die "no vcpu0 thread in the VMM of $id"
  sleep 2 # the container's exec is done; from here only the loop and the tick run
  counts=$(perf stat -x, -e kvm:kvm_emulate_insn -e kvm:kvm_emulate_insn --filter "rip == 0x$entry" \
    -t "$vcpu" -- sleep "$secs" 2>&1 >/dev/null | grep kvm_emulate_insn | cut -d, -f1)
  read -r emulated interrupts <<<"$(echo $counts)"
  # Printed late: the guest-image build's log (stderr) may still be arriving before that.
  if [[ -z $header_done ]]; then
    printf '%-44s %4s %12s %14s %14s\n' kernel HZ "interrupts/s" "emulated/s" "per interrupt"
    header_done=1
  fi
  "$husk" --root "$work/state" delete --force "$id" >/dev/null
  if ((emulated == 0)); then
    printf '%-44s %4s  no guest-kernel instruction was emulated: this host runs the guest kernel natively\n' \
      "${vmlinux#"$HOME"/.cache/husk/}" "$hz"
    continue
  fi
  printf '%-44s %4s %12d %14d %14d\n' "${vmlinux#"$HOME"/.cache/husk/}" "$hz" \
    $((interrupts / secs)) $((emulated / secs)) $((emulated / (interrupts > 0 ? interrupts : 1)))
done
