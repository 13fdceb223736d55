#!/usr/bin/env bash
# Builds husk's guest kernel (vmlinux) and initramfs into a content-addressed cache.
#
#   guest-image/build.sh [all|kernel|initramfs]      (default: all)
#
# Progress goes to stderr. Stdout carries only the results, one per line, at the end:
#   HUSK_KERNEL=/abs/path/vmlinux
#   HUSK_INITRAMFS=/abs/path/initramfs.cpio
#
# Environment:
#   HUSK_CACHE_DIR   cache root (default ~/.cache/husk); this script uses <root>/guest-image/
#   HUSK_AGENT_BIN   static binary to install as /init instead of building husk-agent
#   HUSK_BUILD_JOBS  make -j for the kernel (default 2)
#
# See guest-image/README.md for the cache layout and what each input changes.
set -euo pipefail

script_path=$(readlink -f "${BASH_SOURCE[0]}")
guest_dir=$(dirname "$script_path")
repo_root=$(dirname "$guest_dir")
cache_root="${HUSK_CACHE_DIR:-$HOME/.cache/husk}/guest-image"
what=${1:-all}

log() { printf '[%s] %s\n' "$1" "$2" >&2; }
die() {
  printf 'guest-image/build.sh: error: %s\n' "$*" >&2
  exit 1
}

case "$what" in
  all | kernel | initramfs) ;;
  -h | --help)
    sed -n '2,15p' "$script_path" | sed 's/^# \{0,1\}//' >&2
    exit 0
    ;;
  *) die "unknown target '$what' (expected all, kernel or initramfs)" ;;
esac

# Prints the tail of a failed step's log and where the whole log is kept.
fail_with_log() {
  local msg=$1 logfile=$2
  printf '\nguest-image/build.sh: %s; last lines of %s:\n' "$msg" "$logfile" >&2
  tail -n 40 "$logfile" | sed 's/^/  | /' >&2
  printf 'guest-image/build.sh: full log: %s\n' "$logfile" >&2
  exit 1
}

check_prereqs() {
  local missing=() pkg
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
  done
  if ((${#missing[@]})); then
    die "missing package(s): ${missing[*]} (run scripts/install-deps.sh, or apt-get install ${missing[*]})"
  fi
}

# Keeps the newest $2 entries of cache directory $1, so old keys do not pile up.
prune_cache() {
  local dir=$1 keep=$2
  # shellcheck disable=SC2012 # names are hex keys
  ls -1t "$dir" 2>/dev/null | tail -n +"$((keep + 1))" | while read -r old; do
    rm -rf -- "${dir:?}/$old"
  done
}

# One lock per artifact, taken only on a cache miss, so packing an initramfs never waits for
# a kernel compile. Held until the script exits; a concurrent invocation waits, then finds
# the cache entry.
lock_for() {
  local name=$1 fd
  mkdir -p "$cache_root"
  exec {fd}>"$cache_root/.lock-$name"
  if ! flock -n "$fd"; then
    log "$name" "waiting for another build.sh (lock $cache_root/.lock-$name)"
    flock "$fd"
  fi
  # Under the lock, a leftover temp dir is from a build that died: reclaim its space.
  rm -rf "$cache_root"/tmp."$name".* 2>/dev/null || true
}

# --- kernel part begin ---
# Everything between these markers is hashed into the kernel cache key, together with
# the linux-source-6.1 version and every file under guest-image/kernel/.
linux_tarball=/usr/src/linux-source-6.1.tar.xz

kernel_key() {
  local version
  version=$(dpkg-query -W -f='${Version}' linux-source-6.1)
  {
    printf 'linux-source-6.1 %s\n' "$version"
    (cd "$guest_dir" && find kernel -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum)
    sed -n '/^# --- kernel part begin ---$/,/^# --- kernel part end ---$/p' "$script_path"
  } | sha256sum | cut -c1-16
}

# Checks that every symbol a fragment sets ended up with exactly that value in .config
# (a dependency or a select can silently override a fragment).
verify_kernel_config() {
  local config=$1 frag line sym bad=0
  for frag in "$guest_dir"/kernel/config/*.conf; do
    while IFS= read -r line || [[ -n $line ]]; do
      if [[ $line =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
        sym=${BASH_REMATCH[1]}
        if ! grep -qxF -- "$line" "$config"; then
          printf 'kernel config: %s sets %s but .config has: %s\n' "${frag##*/}" "$line" \
            "$(grep -E "^(# )?${sym}[= ]" "$config" || echo '(absent: unmet dependency)')" >&2
          bad=1
        fi
      elif [[ $line =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
        sym=${BASH_REMATCH[1]}
        if grep -qE "^$sym=" "$config"; then
          printf 'kernel config: %s disables %s but .config has: %s\n' "${frag##*/}" "$sym" \
            "$(grep -E "^$sym=" "$config")" >&2
          bad=1
        fi
      fi
    done <"$frag"
  done
  return "$bad"
}

# Runs make, logging everything, and shows a live object count on stderr.
make_with_progress() {
  local src=$1 logfile=$2 estimate=$3 jobs=$4 count=0 last=0 now line tty=0 rc
  [[ -t 2 ]] && tty=1
  exec 8>>"$logfile"
  set +e
  nice -n 10 make -C "$src" ARCH=x86_64 -j"$jobs" vmlinux 2>&1 | while IFS= read -r line; do
    printf '%s\n' "$line" >&8
    case "$line" in
      "  CC "* | "  AS "*)
        count=$((count + 1))
        now=$SECONDS
        if ((tty)); then
          printf '\r[kernel] compiling %d/~%d objects' "$count" "$estimate" >&2
        elif ((now - last >= 20)); then
          printf '[kernel] compiling %d/~%d objects\n' "$count" "$estimate" >&2
          last=$now
        fi
        ;;
    esac
  done
  rc=${PIPESTATUS[0]}
  set -e
  exec 8>&-
  ((tty)) && printf '\n' >&2
  return "$rc"
}

build_kernel() {
  check_prereqs linux-source-6.1 flex bison bc libelf-dev gcc make xz-utils libc6-dev
  [[ -f $linux_tarball ]] || die "$linux_tarball not found (package linux-source-6.1)"

  local key out
  key=$(kernel_key)
  out="$cache_root/kernel/$key"
  # Entries appear atomically, so a hit needs no lock; after taking it, check again in
  # case a concurrent run just built this key.
  if [[ ! -f $out/vmlinux ]]; then
    lock_for kernel
  fi
  if [[ -f $out/vmlinux ]]; then
    log kernel "cached ($key)"
    kernel_path="$out/vmlinux"
    return
  fi

  local start=$SECONDS tmp src logfile estimate
  mkdir -p "$cache_root/kernel"
  tmp=$(mktemp -d "$cache_root/tmp.kernel.XXXXXX")
  src="$tmp/src"
  logfile="$cache_root/kernel-build.log"
  : >"$logfile"
  log kernel "building $key (log: $logfile)"

  log kernel "unpacking $(basename "$linux_tarball")"
  mkdir -p "$src"
  tar -xf "$linux_tarball" -C "$src" --strip-components=1 >>"$logfile" 2>&1 ||
    fail_with_log "unpacking $linux_tarball failed" "$logfile"

  local patch
  for patch in "$guest_dir"/kernel/patches/*.patch; do
    [[ -e $patch ]] || continue
    log kernel "applying ${patch##*/}"
    patch -d "$src" -p1 --forward --batch <"$patch" >>"$logfile" 2>&1 ||
      fail_with_log "patch ${patch##*/} does not apply" "$logfile"
  done

  log kernel "configuring (tinyconfig + kernel/config/*.conf)"
  {
    make -C "$src" ARCH=x86_64 tinyconfig &&
      "$src/scripts/kconfig/merge_config.sh" -m -O "$src" "$src/.config" "$guest_dir"/kernel/config/*.conf &&
      make -C "$src" ARCH=x86_64 olddefconfig
  } >>"$logfile" 2>&1 || fail_with_log "kernel configuration failed" "$logfile"
  verify_kernel_config "$src/.config" ||
    die "kernel config does not match the fragments (see above); fix guest-image/kernel/config/"

  # Object count of the last build, for the progress display.
  estimate=$(cat "$cache_root/kernel/.objects" 2>/dev/null || echo 1100)
  make_with_progress "$src" "$logfile" "$estimate" "${HUSK_BUILD_JOBS:-2}" ||
    fail_with_log "kernel build failed" "$logfile"
  grep -cE '^  (CC|AS) ' "$logfile" >"$cache_root/kernel/.objects" || true

  mkdir -p "$tmp/out"
  cp "$src/vmlinux" "$tmp/out/vmlinux"
  cp "$src/.config" "$tmp/out/config"
  cp "$src/System.map" "$tmp/out/System.map"
  mv -T "$tmp/out" "$out"
  rm -rf "$tmp"
  prune_cache "$cache_root/kernel" 3
  log kernel "done in $((SECONDS - start)) s: $out/vmlinux ($(du -h "$out/vmlinux" | cut -f1))"
  kernel_path="$out/vmlinux"
}
# --- kernel part end ---

# --- initramfs part begin ---
# Hashed into the initramfs cache key together with the /init binary.
agent_binary() {
  if [[ -n ${HUSK_AGENT_BIN:-} ]]; then
    [[ -f $HUSK_AGENT_BIN ]] || die "HUSK_AGENT_BIN=$HUSK_AGENT_BIN is not a file"
    readlink -f "$HUSK_AGENT_BIN"
    return
  fi
  command -v cargo >/dev/null || die "cargo not found (install a Rust toolchain, see scripts/install-deps.sh)"
  local target_dir="$repo_root/target/agent-static" logfile="$cache_root/agent-build.log"
  log initramfs "building husk-agent (static, profile agent)"
  (cd "$repo_root" &&
    RUSTFLAGS='-C target-feature=+crt-static' cargo build --profile agent -p husk-agent \
      --target x86_64-unknown-linux-gnu --target-dir "$target_dir") >"$logfile" 2>&1 ||
    fail_with_log "husk-agent build failed" "$logfile"
  printf '%s\n' "$target_dir/x86_64-unknown-linux-gnu/agent/husk-agent"
}

build_initramfs() {
  check_prereqs cpio
  local bin key out
  bin=$(agent_binary)
  # /init runs before anything is mounted: a dynamic binary cannot start.
  if LC_ALL=C readelf -lW "$bin" 2>/dev/null | grep -q 'Requesting program interpreter'; then
    die "$bin is dynamically linked; /init must be static"
  fi
  key=$({
    sha256sum <"$bin"
    sed -n '/^# --- initramfs part begin ---$/,/^# --- initramfs part end ---$/p' "$script_path"
  } | sha256sum | cut -c1-16)
  out="$cache_root/initramfs/$key"
  if [[ ! -f $out/initramfs.cpio ]]; then
    lock_for initramfs
  fi
  if [[ -f $out/initramfs.cpio ]]; then
    log initramfs "cached ($key)"
    initramfs_path="$out/initramfs.cpio"
    return
  fi

  log initramfs "packing $key from $bin"
  local tmp root
  mkdir -p "$cache_root/initramfs"
  tmp=$(mktemp -d "$cache_root/tmp.initramfs.XXXXXX")
  root="$tmp/root"
  mkdir -p "$root"/{dev,proc,sys,tmp,run}
  chmod 0755 "$root" "$root"/{dev,proc,sys,run}
  chmod 1777 "$root/tmp"
  install -m 0755 "$bin" "$root/init"
  # The kernel opens /dev/console for init's stdio before anything mounts /dev.
  if [[ $(id -u) -eq 0 ]]; then
    mknod -m 0600 "$root/dev/console" c 5 1
  else
    log initramfs "warning: not root, /dev/console omitted (init starts without stdio)"
  fi
  find "$root" -exec touch -h -d @0 {} +
  mkdir -p "$tmp/out"
  (cd "$root" && find . -mindepth 1 -print0 | LC_ALL=C sort -z |
    cpio --null -o -H newc --reproducible -R 0:0 --quiet) >"$tmp/out/initramfs.cpio" ||
    die "cpio failed while packing the initramfs"
  mv -T "$tmp/out" "$out"
  rm -rf "$tmp"
  prune_cache "$cache_root/initramfs" 5
  log initramfs "done: $out/initramfs.cpio ($(du -h "$out/initramfs.cpio" | cut -f1))"
  initramfs_path="$out/initramfs.cpio"
}
# --- initramfs part end ---

kernel_path=
initramfs_path=
if [[ $what == all || $what == kernel ]]; then
  build_kernel
fi
if [[ $what == all || $what == initramfs ]]; then
  build_initramfs
fi

[[ -n $kernel_path ]] && printf 'HUSK_KERNEL=%s\n' "$kernel_path"
[[ -n $initramfs_path ]] && printf 'HUSK_INITRAMFS=%s\n' "$initramfs_path"
exit 0
