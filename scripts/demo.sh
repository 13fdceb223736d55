#!/usr/bin/env bash
# husk's main job, end to end on its defaults: install what is missing, build the guest image
# and the `husk` CLI, then run a busybox container in its own micro-VM the way runc callers do
# (`husk run` on an OCI bundle) and remove it again. Extra arguments replace the container's
# command, e.g. `scripts/demo.sh cat /proc/meminfo`.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
# Builds (or finds in ~/.cache/husk) the guest kernel and initramfs; husk takes the newest.
guest-image/build.sh all >/dev/null
cargo build --release --bin husk
husk=$PWD/target/release/husk

work=$(mktemp -d /tmp/husk-demo.XXXXXX)
trap 'rm -rf "$work"' EXIT
bundle=$work/bundle
mkdir -p "$bundle/rootfs/bin" "$bundle/rootfs/proc" "$bundle/rootfs/dev" "$bundle/rootfs/tmp"
cp /bin/busybox "$bundle/rootfs/bin/busybox"
for applet in sh echo uname cat grep head ls ps; do
  ln -s busybox "$bundle/rootfs/bin/$applet"
done
(cd "$bundle" && "$husk" spec)

# The default spec runs an interactive `sh` on a terminal: run a command with plain stdio.
json_string() { # a JSON string literal, escaped again for a sed replacement
  local j=${1//\\/\\\\}
  j=${j//\"/\\\"}
  j="\"$j\""
  j=${j//\\/\\\\}
  j=${j//&/\\&}
  printf '%s' "${j//|/\\|}"
}
if (($# == 0)); then
  set -- sh -c 'echo hello from $(uname -sr), PID $$ in a husk micro-VM; grep MemTotal /proc/meminfo'
fi
args=
for a in "$@"; do
  args+="${args:+, }$(json_string "$a")"
done
sed -i -e 's/"terminal": true/"terminal": false/' \
  -e "s|^\( *\)\"sh\"$|\1$args|" "$bundle/config.json"

echo "husk run --bundle $bundle demo" >&2
status=0
"$husk" --root "$work/state" run --bundle "$bundle" "demo-$$" || status=$?
echo "container exited with status $status" >&2
exit "$status"
