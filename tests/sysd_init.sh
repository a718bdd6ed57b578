#!/bin/bash
# Boot the distribution's systemd as PID 1 in a throwaway container on a pure cgroup v2
# hierarchy (tests/sysd_container.py drives it; NOTES.md, "systemd as PID 1 in a throwaway
# container"). Three stages, each exec'ing the next, so that the last one becomes systemd:
#
#   outer GROUP NAME    on the host, in GROUP/outer: unshare the namespaces. unshare's parent
#                       waits here, outside the container's tree (else systemd would find a
#                       process it cannot see in its root cgroup).
#   payload GROUP NAME  PID 1 of the new pid namespace: join GROUP/payload, unshare the cgroup
#                       namespace (rooted at payload).
#   rootfs NAME         build the root (overlay of / with a tmpfs upper layer, so nothing
#                       reaches the host's disk), pivot into it, drop capabilities, exec
#                       systemd.
#
# stdin/stdout/stderr must be the slave of a pty: it becomes /dev/console.
set -euo pipefail

stage=$1
shift

# Units that would act on the host, or are only slow here: masked in the container, with
# every unit the host's admin or packages enabled (/etc/systemd/system/*.wants: services of
# that machine, such as networking, docker or cron) but those the container needs.
MASKED_UNITS=(
    apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer e2scrub_all.timer
    e2scrub_reap.service fstrim.timer man-db.timer logrotate.timer
    systemd-tmpfiles-clean.timer systemd-timesyncd.service systemd-pstore.service
    apparmor.service openvpn.service ssh.service cron.service
    systemd-networkd.service systemd-networkd-wait-online.service
    console-getty.service getty@tty1.service serial-getty@.service remote-fs.target
)
# Capabilities PID 1 (and so everything in the container) never gets.
DROPPED_CAPS=-sys_module,-sys_time,-sys_rawio,-sys_boot,-syslog,-mac_admin,-mac_override,-wake_alarm,-block_suspend,-sys_pacct

outer() {
    local group=$1 name=$2
    echo 0 > "$group/outer/cgroup.procs"
    # If the test process dies, unshare gets SIGKILL, and --kill-child takes the container.
    exec setpriv --pdeathsig KILL -- \
        unshare --pid --fork --kill-child --mount --uts --ipc --net --propagation private \
        -- "$0" payload "$group" "$name"
}

payload() {
    local group=$1 name=$2
    echo 0 > "$group/payload/cgroup.procs"
    keep_netcls "${group##*/}"
    exec unshare --cgroup -- "$0" rootfs "$name"
}

# A cgroup v1 hierarchy can be created only from the initial cgroup namespace; one that
# exists can be mounted from any. The container's via-tunnel mounts net_cls (kernel/netcls.py),
# as a host's does from the initial namespace: make sure the hierarchy exists, kept alive by
# a child cgroup named after the host group (sysd_container.py removes it). Best effort: a
# host that mounts net_cls co-mounted with other controllers has it already.
keep_netcls() {
    local keep=$1 dir
    dir=$(mktemp -d)
    if mount -t cgroup -o net_cls vtsysd "$dir" 2>/dev/null; then
        mkdir -p "$dir/$keep"
        umount "$dir"
    fi
    rmdir "$dir"
}

make_dev() {
    local dev=$1
    mount -t tmpfs -o mode=755,nosuid,size=1m tmpfs "$dev"
    mknod -m 666 "$dev/null" c 1 3
    mknod -m 666 "$dev/zero" c 1 5
    mknod -m 666 "$dev/full" c 1 7
    mknod -m 666 "$dev/random" c 1 8
    mknod -m 666 "$dev/urandom" c 1 9
    mknod -m 666 "$dev/tty" c 5 0
    mkdir -m 755 "$dev/net" "$dev/pts"
    mknod -m 666 "$dev/net/tun" c 10 200
    mkdir -m 1777 "$dev/shm"
    ln -s /proc/self/fd "$dev/fd"
    ln -s /proc/self/fd/0 "$dev/stdin"
    ln -s /proc/self/fd/1 "$dev/stdout"
    ln -s /proc/self/fd/2 "$dev/stderr"
    ln -s pts/ptmx "$dev/ptmx"
    mount -t devpts -o newinstance,ptmxmode=0666,mode=0620,gid=5 devpts "$dev/pts"
    touch "$dev/console"
    mount --bind /proc/self/fd/0 "$dev/console"
}

rootfs() {
    local name=$1
    # A private tmpfs to build in (this mount namespace's own; the host never sees it).
    local stage_dir=/tmp
    mount -t tmpfs -o mode=700 tmpfs "$stage_dir"
    mkdir "$stage_dir/upper" "$stage_dir/work" "$stage_dir/root"
    local root=$stage_dir/root
    mount -t overlay overlay \
        -o "lowerdir=/,upperdir=$stage_dir/upper,workdir=$stage_dir/work" "$root"

    mount -t proc proc "$root/proc"
    # The kernel's tunables stay the host's, except the network namespace's own.
    mount --bind "$root/proc/sys" "$root/proc/sys"
    mount --bind "$root/proc/sys/net" "$root/proc/sys/net"
    mount -o remount,bind,ro "$root/proc/sys"
    if [ -e "$root/proc/sysrq-trigger" ]; then
        mount --bind "$root/proc/sysrq-trigger" "$root/proc/sysrq-trigger"
        mount -o remount,bind,ro "$root/proc/sysrq-trigger"
    fi
    mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$root/sys"
    mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 "$root/sys/fs/cgroup"
    make_dev "$root/dev"
    mount -t tmpfs -o mode=755,nosuid,nodev tmpfs "$root/run"
    mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$root/tmp"

    local unit link
    for link in "$root"/etc/systemd/system/*.wants/*; do
        unit=${link##*/}
        case $unit in
            dbus* | systemd-logind* | systemd-journald* | systemd-resolved* | via-tunnel*) ;;
            *) MASKED_UNITS+=("$unit") ;;
        esac
    done
    for unit in "${MASKED_UNITS[@]}"; do
        ln -sfn /dev/null "$root/etc/systemd/system/$unit"
    done
    echo "$name" > "$root/etc/hostname"
    hostname "$name"

    cd "$root"
    mkdir -p .oldroot
    pivot_root . .oldroot
    umount -l /.oldroot
    rmdir /.oldroot
    cd /
    exec setpriv --bounding-set "$DROPPED_CAPS" -- \
        env -i "container=$name" /lib/systemd/systemd --system
}

case $stage in
    outer | payload | rootfs) "$stage" "$@" ;;
    *) echo "usage: $0 outer GROUP NAME" >&2; exit 2 ;;
esac
