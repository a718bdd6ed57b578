"""What a test or demo instance of via-tunnel leaves on the host, and its removal.

Each instance runs with its own state directory and cgroup subtree (``VIA_TUNNEL_STATE_DIR``,
``VIA_TUNNEL_CGROUP``); :func:`remove_footprint` removes both once the instance is done.
Only empty cgroups can be removed: what is left is returned, never forced.
"""

from __future__ import annotations

import os
import shutil


def cgroup2_mount() -> str | None:
    """The cgroup2 mount point from ``/proc/self/mountinfo`` (None without one)."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if right.split(" ", 1)[0] == "cgroup2":
                return left.split(" ")[4]
    return None


def remove_footprint(state_dir: str, cgroup_subtree: str) -> list[str]:
    """Remove a test or demo instance's state directory and its cgroup subtree (relative to
    the cgroup2 mount; only empty cgroups can go). Returns what could not be removed."""
    left: list[str] = []
    _remove_netcls(state_dir, cgroup_subtree.strip("/"), left)
    shutil.rmtree(state_dir, ignore_errors=True)
    if os.path.exists(state_dir):
        left.append(state_dir)
    mount = cgroup2_mount()
    sub = cgroup_subtree.strip("/")
    if mount and sub:
        top = os.path.join(mount, sub)
        if os.path.isdir(top):
            for dirpath, _dirs, _files in os.walk(top, topdown=False):
                try:
                    os.rmdir(dirpath)
                except OSError:
                    left.append(dirpath)
    return left



def _remove_netcls(state_dir: str, sub: str, left: list[str]) -> None:
    """The instance's net_cls cgroups (empty ones) and its mount of that hierarchy."""
    from via_tunnel.kernel import cgroup, netcls

    mount = cgroup.netcls_mount(own=netcls.own_mount_point(state_dir))
    if mount is not None and sub:
        top = os.path.join(mount, sub)
        for dirpath, _dirs, _files in os.walk(top, topdown=False):
            try:
                os.rmdir(dirpath)
            except OSError:
                left.append(dirpath)
    netcls.release(state_dir, sub)
    if cgroup.netcls_mount(exact=netcls.own_mount_point(state_dir)) is not None:
        left.append(netcls.own_mount_point(state_dir))
