#!/bin/busybox sh
# The guest's init, run by the initramfs's static busybox (see tests/guest/image.py).
#
# Stage 1 (pid 1 in the initramfs): load the modules listed in /modules/order, mount the
# host's / read-only over virtio-9p with a tmpfs overlay for writes, and switch_root into it.
# Stage 2 (pid 1 in the overlay): mount proc, sys, dev and cgroup2 with the memory
# controller enabled below the root, then run the agent on the virtio-serial port named
# "oomkit.agent" and power off when it exits.  Settings come from the kernel command line
# as environment variables (oomkit_python, oomkit_agent, oomkit_zram).
#
# A failure prints "oomkit-guest: FAILED <what>" on the console and powers off: the host
# reports the console's last lines.
set -u
B=/bin/busybox

fail() {
	echo "oomkit-guest: FAILED $*"
	$B poweroff -f
}

if [ "${1:-}" != stage2 ]; then
	$B mount -t proc proc /proc || fail "mount /proc"
	$B mount -t sysfs sys /sys || fail "mount /sys"
	$B mount -t devtmpfs dev /dev || fail "mount /dev"
	want_zram=${oomkit_zram:-0}
	while read -r mod; do
		case $mod in zram.ko | zsmalloc.ko) [ "$want_zram" = 1 ] || continue ;; esac
		$B insmod "/modules/$mod" || fail "insmod $mod"
	done </modules/order
	$B mkdir -p /lower /rw /newroot
	$B mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144,cache=loose hostroot /lower \
		|| fail "mount the host's / over 9p"
	$B mount -t tmpfs -o mode=0755 rw /rw || fail "mount the overlay's tmpfs"
	$B mkdir -p /rw/upper /rw/work
	$B mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work overlay /newroot \
		|| fail "mount the overlay"
	$B mkdir -p /newroot/oomkit-guest
	$B cp /bin/busybox /init /newroot/oomkit-guest/ || fail "copy busybox into the overlay"
	$B mount --move /dev /newroot/dev || fail "move /dev"
	$B umount /sys
	$B umount /proc
	exec $B switch_root /newroot /oomkit-guest/busybox sh /oomkit-guest/init stage2
fi

B=/oomkit-guest/busybox
$B mount -t proc proc /proc || fail "mount /proc"
$B mount -t sysfs sys /sys || fail "mount /sys"
$B mount -t cgroup2 cgroup2 /sys/fs/cgroup || fail "mount cgroup2"
# Nothing else is mounted over the host's tree: a checkout in /tmp must stay visible, and the
# overlay makes every directory writable already.
# Every controller the kernel offers, so test cgroups have memory.* files (and cpu/io
# pressure too); the agent stays in the root cgroup, which no limit applies to.
for c in $($B cat /sys/fs/cgroup/cgroup.controllers); do
	echo "+$c" >/sys/fs/cgroup/cgroup.subtree_control || fail "enable the $c controller"
done
port=
for p in /sys/class/virtio-ports/*; do
	[ "$($B cat "$p/name" 2>/dev/null)" = oomkit.agent ] && port=/dev/${p##*/}
done
[ -n "$port" ] || fail "no virtio-serial port named oomkit.agent"
echo "oomkit-guest: up, agent on $port"
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8
# -I -S: the agent needs the standard library only; no site-packages makes it start faster.
"$oomkit_python" -I -S "$oomkit_agent" "$port" &
agent=$!
# Reap orphans while the agent runs (a shell's wait collects any child of pid 1).
while $B kill -0 "$agent" 2>/dev/null; do
	wait
done
echo "oomkit-guest: agent exited; powering off"
$B sync
$B poweroff -f
