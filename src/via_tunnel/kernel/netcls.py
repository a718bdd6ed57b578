"""The cgroup v1 ``net_cls`` hierarchy: a second, move-proof tag on a group's processes.

A process moved elsewhere in the cgroup2 tree (``systemd-run --scope``, flatpak, snap: PID 1
does it) leaves the group's cgroup, and ``socket cgroupv2`` stops matching its sockets. Its
``net_cls.classid`` stays: it is inherited on fork and a cgroup2 move does not touch it, and
``meta cgroup`` in nftables matches it (NOTES.md). So each group also has a net_cls cgroup
``<subtree>/if-IFACE`` with a classid of its own, every member joins both, and the route
chain falls back to classid -> mark. Joining net_cls also re-tags the sockets the process
already holds (the kernel updates the classid of every socket in its file table).

The hierarchy is used where it is mounted already (found in this mount namespace's
mountinfo; a hybrid host may co-mount it with net_prio), else mounted at
``<state_dir>/net_cls`` and unmounted again once no group is left. Only that mount is ours;
unmounting never harms a group (the kernel keeps a hierarchy with cgroups alive, and the
classids stay with the processes). Mounting needs CAP_SYS_ADMIN.

A kernel without net_cls cannot keep a moved process routed: groups are refused there
(fail closed) rather than made with a hole.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os

from via_tunnel.core.errors import ViaTunnelError
from via_tunnel.core.settings import netcls_mount_point
from via_tunnel.kernel import cgroup

_MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 2, 4, 8
_MNT_DETACH = 2


def available(proc_cgroups: str = "/proc/cgroups") -> bool:
    """Whether this kernel has the net_cls controller, enabled."""
    try:
        with open(proc_cgroups) as f:
            return parse_available(f.read())
    except OSError:
        return False


def parse_available(text: str) -> bool:
    """From the text of /proc/cgroups (pure)."""
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[0] == "net_cls":
            return fields[3] == "1"
    return False


def unavailable_reason() -> str:
    return ("this kernel has no net_cls cgroup controller (/proc/cgroups), which via-tunnel "
            "needs to keep routing a program that is moved out of its group "
            "(systemd-run --scope, flatpak): refusing to start one that could leak")


def require() -> None:
    """Raise (exit 125) unless this kernel has net_cls: checked before a group is made."""
    if not available():
        raise ViaTunnelError(unavailable_reason())


def own_mount_point(state_dir: str) -> str:
    return netcls_mount_point(state_dir)


def ensure_mounted(state_dir: str) -> str:
    """The net_cls mount to use: an existing one, else ours (mounted now)."""
    found = cgroup.netcls_mount(own=own_mount_point(state_dir))
    if found is not None:
        return found
    if not available():
        raise ViaTunnelError(unavailable_reason())
    target = own_mount_point(state_dir)
    os.makedirs(target, mode=0o755, exist_ok=True)
    _mount(target)
    return target


def ensure(state_dir: str, rel: str, classid: int) -> str:
    """The group's net_cls cgroup ``rel`` with ``classid``, made if missing (mounting the
    hierarchy if needed); returns its absolute path."""
    path = os.path.join(ensure_mounted(state_dir), rel)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "net_cls.classid"), "w") as f:
        f.write(str(classid))
    return path


def join(state_dir: str, rel: str, pid: int) -> None:
    """Move ``pid`` into the net_cls cgroup ``rel`` (made by :func:`ensure`)."""
    if not cgroup.join_netcls(rel, pid, own_mount_point(state_dir)):
        raise ViaTunnelError(f"cannot enter the net_cls cgroup {rel}: it is missing")


def tasks(state_dir: str, rel: str | None) -> list[int]:
    """PIDs in the group's net_cls cgroup (and below); [] when it is absent. Mounts the
    hierarchy if this mount namespace lacks it (a restarted daemon has a new one): not
    seeing a moved member must never pass for its absence."""
    if not rel:
        return []
    return cgroup.members(os.path.join(ensure_mounted(state_dir), rel))


def remove(state_dir: str, rel: str | None) -> None:
    """Remove the group's net_cls cgroup (a missing one is fine); ViaTunnelError while a
    process is in it."""
    if rel:
        cgroup.remove(os.path.join(ensure_mounted(state_dir), rel))


def leave(pid: int) -> None:
    """Put ``pid`` back into the hierarchy's root (a failed setup's first member)."""
    mount = cgroup.netcls_mount()
    if mount is not None:
        cgroup.join(mount, pid)


def release(state_dir: str, subtree: str) -> None:
    """No group is left: remove our subtree of the hierarchy, and unmount it if the mount
    is ours (every mount of ours stacked there, in this mount namespace)."""
    target = own_mount_point(state_dir)
    mount = cgroup.netcls_mount(own=target)
    if mount is not None:  # our subtree, and its parents that are empty then
        parts = subtree.strip("/").split("/")
        while parts and cgroup.remove_if_empty(os.path.join(mount, *parts)):
            parts.pop()
    while cgroup.netcls_mount(exact=target) is not None:
        if not _umount(target):
            return
    with contextlib.suppress(OSError):
        os.rmdir(target)


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _mount(target: str) -> None:
    rc = _libc().mount(b"via-tunnel", os.fsencode(target), b"cgroup",
                       _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, b"net_cls")
    if rc != 0:
        code = ctypes.get_errno()
        hint = (" (needs CAP_SYS_ADMIN; and in a container, a hierarchy the host has not "
                "made already can be created only from the host's cgroup namespace)"
                if code == errno.EPERM else "")
        raise ViaTunnelError(f"cannot mount the net_cls cgroup hierarchy at {target}: "
                             f"{os.strerror(code)}{hint}")


def _umount(target: str) -> bool:
    return _libc().umount2(os.fsencode(target), _MNT_DETACH) == 0
