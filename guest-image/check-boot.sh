#!/usr/bin/env bash
# Debugging aid: boots the husk guest kernel under Debian's QEMU (microvm), independent
# of husk's own VMM, with a throw-away busybox initramfs, and reports wall time from
# QEMU's start to init's first line.
#
#   guest-image/check-boot.sh [--runs N] [--verbose] [--kernel PATH] [--smp N]
#                             [--append 'extra cmdline']
#
#   --runs N     boot N times (default 1) and print each time
#   --verbose    drop `quiet` from the command line (kernel log on the console)
#   --kernel P   vmlinux to boot (default: guest-image/build.sh kernel)
#   --minimal    initramfs with only a 1 KB /init that prints a line and restarts: the
#                kernel's own boot time, without busybox's 2 MB in the initramfs
#
# Needs qemu-system-x86 and busybox-static. `-cpu host,-arch-capabilities`: QEMU 7.2 cannot set
# MSR 0x10a (IA32_ARCH_CAPABILITIES) on nested PVM KVM and aborts otherwise. Exits non-zero if a boot does not reach the
# end of the init script within the timeout (HUSK_BOOT_TIMEOUT, default 180 s).
set -euo pipefail

guest_dir=$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")
runs=1
quiet=quiet
kernel=
smp=1
minimal=0
extra=
while (($#)); do
  case "$1" in
    --runs) runs=$2; shift 2 ;;
    --verbose) quiet=; shift ;;
    --minimal) minimal=1; shift ;;
    --kernel) kernel=$2; shift 2 ;;
    --smp) smp=$2; shift 2 ;;
    --append) extra=$2; shift 2 ;;
    *) echo "check-boot.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

command -v qemu-system-x86_64 >/dev/null || { echo "check-boot.sh: needs qemu-system-x86" >&2; exit 1; }
busybox=/bin/busybox
if [[ ! -x $busybox ]] || LC_ALL=C readelf -lW "$busybox" | grep -q 'program interpreter'; then
  echo "check-boot.sh: needs busybox-static (/bin/busybox, static)" >&2
  exit 1
fi

if [[ -z $kernel ]]; then
  kernel=$("$guest_dir/build.sh" kernel | sed -n 's/^HUSK_KERNEL=//p')
fi
[[ -f $kernel ]] || { echo "check-boot.sh: kernel $kernel not found" >&2; exit 1; }

tmp=$(mktemp -d /tmp/husk-check-boot.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
root="$tmp/root"
mkdir -p "$root"/{bin,dev,proc,sys,tmp,run}
if ((!minimal)); then
  cp "$busybox" "$root/bin/busybox"
  for applet in sh mount uname cat ls echo true reboot mkdir sleep; do
    ln -s busybox "$root/bin/$applet"
  done
fi
mknod -m 0600 "$root/dev/console" c 5 1 2>/dev/null || true
# /init is a 1 KB static program that prints the first line and then runs the busybox
# script: the first line then times the kernel alone, not busybox's 2 MB exec.
cat >"$tmp/init.c" <<'EOF'
static long sys3(long nr, long a, long b, long c)
{
	long ret;
	__asm__ volatile("syscall" : "=a"(ret) : "a"(nr), "D"(a), "S"(b), "d"(c)
			 : "rcx", "r11", "memory");
	return ret;
}

void _start(void)
{
	static const char msg[] = "HUSK-INIT: first line\n";
	static char *const argv[] = { "/bin/sh", "/init.sh", 0 };
	static char *const envp[] = { "PATH=/bin", 0 };

	sys3(1, 1, (long)msg, sizeof(msg) - 1);		/* write */
	sys3(59, (long)argv[0], (long)argv, (long)envp);	/* execve */
	/* No busybox (--minimal): report and restart, which ends QEMU. */
	static const char done[] = "HUSK-INIT: done (no /bin/sh)\n";
	sys3(1, 1, (long)done, sizeof(done) - 1);
	sys3(169, 0xfee1dead, 672274793, 0x01234567);		/* reboot(RESTART) */
	sys3(60, 127, 0, 0);					/* exit */
	for (;;)
		;
}
EOF
gcc -static -nostdlib -O2 -fno-stack-protector -fno-pie -no-pie -o "$root/init" "$tmp/init.c"
cat >"$root/init.sh" <<'EOF'
#!/bin/sh
echo "HUSK-INIT: busybox sh running"
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
read -r up0 _ </proc/uptime
echo "HUSK-INIT: uptime $up0 s, kernel $(uname -r)"
echo "HUSK-INIT: cmdline $(cat /proc/cmdline)"
echo "HUSK-INIT: / = $(ls /)"
for i in 1 2 3; do /bin/true; done
read -r up1 _ </proc/uptime
echo "HUSK-INIT: 3x fork+exec of /bin/true: $up0 -> $up1 s"
echo "HUSK-INIT: done"
reboot -f
EOF
chmod 0755 "$root/init" "$root/init.sh"
(cd "$root" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0) >"$tmp/initramfs.cpio"

cmdline="console=ttyS0 $quiet reboot=k panic=-1 noxsave clearcpuid=151,141,158,150,156,306,308,291,296,293,304,297,580 pvm_syscall=pf rodata=off noreplace-smp percpu_alloc=page tsc=reliable slub_nosysfs module_nosysfs_builtin $extra"
echo "check-boot: kernel $kernel" >&2
echo "check-boot: cmdline $cmdline" >&2

status=0
for ((run = 1; run <= runs; run++)); do
  out="$tmp/console.$run"
  start=$EPOCHREALTIME
  first=
  done_at=
  # -no-reboot: the guest's `reboot -f` (i8042 reset with reboot=k) ends QEMU.
  while IFS= read -r line; do
    line=${line%$'\r'}
    printf '%s\n' "$line" >>"$out"
    case "$line" in
      *"HUSK-INIT: first line"*) first=$EPOCHREALTIME ;;
      *"HUSK-INIT: done"*) done_at=$EPOCHREALTIME ;;
    esac
    [[ -n $quiet ]] || printf '  | %s\n' "$line" >&2
  done < <(timeout "${HUSK_BOOT_TIMEOUT:-180}" qemu-system-x86_64 \
    -M microvm,x-option-roms=off,isa-serial=on,rtc=off -enable-kvm -cpu host,-arch-capabilities \
    -smp "$smp" -m 128 -nodefaults -no-user-config -nographic -no-reboot \
    -device i8042 -serial stdio \
    -kernel "$kernel" -initrd "$tmp/initramfs.cpio" -append "$cmdline" 2>&1)
  end=$EPOCHREALTIME
  if [[ -z $first || -z $done_at ]]; then
    echo "check-boot: run $run FAILED (no init output within the timeout); console:" >&2
    tail -n 40 "$out" | sed 's/^/  | /' >&2
    status=1
    continue
  fi
  [[ -z $quiet ]] || grep 'HUSK-INIT' "$out" | sed 's/^/  | /' >&2
  printf 'check-boot: run %d: QEMU start -> init first line %.2f s, -> init done %.2f s, QEMU exit %.2f s\n' \
    "$run" "$(bc <<<"$first - $start")" "$(bc <<<"$done_at - $start")" "$(bc <<<"$end - $start")"
done
exit "$status"
