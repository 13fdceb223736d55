#!/usr/bin/env bash
# Installs what husk needs on a Debian 12 host. Idempotent: packages already present are skipped
# without touching the network.
#
#   scripts/install-deps.sh          build + test dependencies
#   scripts/install-deps.sh --bench  also the peer baseline used by benchmarks (QEMU) and perf
#                                    (scripts/tick-cost.sh)
set -euo pipefail

packages=(
  # guest kernel build (guest-image/build.sh)
  linux-source-6.1 build-essential flex bison bc libelf-dev cpio xz-utils
  # guest rootfs for tests and the demo
  busybox-static e2fsprogs
  # building virtiofsd (the virtio-fs backend, below)
  libseccomp-dev libcap-ng-dev
  # the containerd shim's tests (tests/tests/containerd_*.rs) start their own containerd;
  # the CRI test gives pods a CNI bridge network and talks CRI through the k8s-cri crate,
  # whose build runs protoc; the network tests inspect namespaces with ip and tc (iproute2)
  containerd containernetworking-plugins protobuf-compiler iproute2
  # tests/tests/podman.rs drives podman with husk as its runtime; without recommends apt
  # still pulls conmon, runc (or crun), containers-common with policy.json and
  # containernetworking-plugins (the tests use --network none)
  podman
)
if [[ "${1:-}" == "--bench" ]]; then
  packages+=(qemu-system-x86 linux-perf)
fi

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "install-deps: installing ${missing[*]}" >&2
  if [[ $(id -u) -ne 0 ]]; then sudo=sudo; else sudo=; fi
  $sudo apt-get update -q >&2
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
fi

if ! command -v cargo >/dev/null; then
  echo "install-deps: cargo not found: install a stable Rust toolchain (rustup) first" >&2
  exit 1
fi
if [[ ! -e /dev/kvm ]]; then
  echo "install-deps: warning: /dev/kvm is missing; VMs cannot boot on this host (VM tests will skip)" >&2
fi

# virtiofsd serves host directories to guests over vhost-user (husk-vmm --fs). Any virtiofsd on
# PATH will do; otherwise the Rust daemon is built from crates.io (needs the -dev packages above).
if ! command -v virtiofsd >/dev/null; then
  echo "install-deps: installing virtiofsd (cargo install virtiofsd --locked; a few minutes)" >&2
  cargo install virtiofsd --locked >&2
fi
if command -v virtiofsd >/dev/null; then
  echo "install-deps: virtiofsd: $(command -v virtiofsd)" >&2
else
  echo "install-deps: virtiofsd installed in $(dirname "$(command -v cargo)") but that is not on PATH;" \
    "add it, or the virtio-fs tests skip" >&2
fi
