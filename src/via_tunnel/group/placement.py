"""Where a group's processes live, and how the group stays whole around them.

Two cgroups per group, both made at setup and removed at teardown (lifecycle.py sequences
them; this module knows their names and rules):

* its **cgroup2 group**, what ``socket cgroupv2`` matches. On a systemd host (Settings.scopes)
  it is the transient scope ``via-tunnel-IFACE.scope`` in ``via-tunnel.slice``, started with
  the group's first member (``PIDs=``, Delegate=yes; later members are written into it).
  systemd removes the scope's cgroup as soon as it is empty, so teardown must not need it.
  Elsewhere it is the directory ``<subtree>/if-IFACE`` we make and remove.
* its **net_cls cgroup** ``<subtree>/if-IFACE`` with the group's classid (kernel/netcls.py):
  a member moved out of the cgroup2 group (``systemd-run --scope``) keeps the classid, and
  the route chain's classid map keeps it routed. The group lives while either has a process.

nft can delete a ``socket cgroupv2`` map element only by a path that still exists (it turns
the path into the cgroup's id when the command is parsed). When a group's cgroup2 group is
gone, its element is removed by rebuilding the level's map instead: flush it and add back
the other groups' elements, in the same transaction as the rest of the teardown.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from via_tunnel.core.settings import NFT_FAMILY, NFT_TABLE, SCOPE_SLICE, Settings
from via_tunnel.group import adapters
from via_tunnel.group.state import GroupRecord

if TYPE_CHECKING:  # (the planner costs ~20 ms to import; `status` reads members only)
    from via_tunnel.core.plan import GroupPlan

GROUP_PREFIX = "if-"  # cgroup dir = if-IFACE: never collides with cgroup.* control files


def group_path(settings: Settings, mount: str, iface: str) -> str:
    """The group's cgroup2 group (a scope unit's cgroup on a systemd host)."""
    if settings.scopes:
        from via_tunnel.kernel.systemd import scope_name

        return os.path.join(mount, settings.cgroup_subtree, scope_name(iface))
    return os.path.join(mount, settings.cgroup_subtree, GROUP_PREFIX + iface)


def netcls_rel(settings: Settings, iface: str) -> str:
    """The group's net_cls cgroup, relative to that hierarchy's mount."""
    return f"{settings.cgroup_subtree}/{GROUP_PREFIX}{iface}"


def make(settings: Settings, rec: GroupRecord, first_pid: int | None) -> None:
    """Create both cgroups of ``rec``. With ``first_pid``, that process joins the net_cls
    cgroup, and on a systemd host it becomes the scope's first member (systemd moves it);
    elsewhere its caller moves it into the cgroup2 group (early_join.py, the daemon)."""
    k = adapters.current()
    if rec.netcls:
        k.netcls.ensure(settings.state_dir, rec.netcls, rec.classid)
        if first_pid is not None:
            k.netcls.join(settings.state_dir, rec.netcls, first_pid)
    if settings.scopes:
        if first_pid is None:
            raise ValueError("a scope needs its first member")
        mount = k.cgroup.cgroup2_mount()
        k.scopes.start_scope(os.path.basename(rec.cgroup), SCOPE_SLICE, first_pid,
                             rec.cgroup, mount)
    else:
        k.cgroup.make(rec.cgroup)
    rec.cgroup_id = k.cgroup.cgroup_id(rec.cgroup)


def in_use(settings: Settings, rec: GroupRecord) -> bool:
    """Whether a process is in the group: in its cgroup2 group, or moved out of it but
    still in its net_cls cgroup."""
    k = adapters.current()
    return k.cgroup.populated(rec.cgroup) or bool(k.netcls.tasks(settings.state_dir,
                                                                  rec.netcls))


def moved_members(settings: Settings, rec: GroupRecord) -> list[int]:
    """The group's processes that something moved out of its cgroup2 group (systemd-run
    --scope, flatpak): in its net_cls cgroup but not in its cgroup2 group. Read only where
    the hierarchy is mounted in this mount namespace (never mounts: an allowed user's
    ``status`` may not); [] otherwise."""
    from via_tunnel.kernel import cgroup

    return moved_out(rec, cgroup.members(rec.cgroup), netcls_root_of(settings))


def moved_out(rec: GroupRecord, inside: list[int], netcls_root: str | None) -> list[int]:
    """:func:`moved_members` from what a caller looking at many groups read once: the
    group's cgroup2 members (``inside``) and :func:`netcls_root_of`."""
    from via_tunnel.kernel import cgroup

    if not rec.netcls or netcls_root is None:
        return []
    members = set(inside)
    return [p for p in cgroup.members(os.path.join(netcls_root, rec.netcls))
            if p not in members]


def netcls_root_of(settings: Settings) -> str | None:
    """Where this instance's net_cls hierarchy is mounted here (None: not mounted)."""
    from via_tunnel.core.settings import netcls_mount_point
    from via_tunnel.kernel import cgroup

    return cgroup.netcls_mount(own=netcls_mount_point(settings.state_dir))


def put_back(home: str | None, pid: int | None) -> None:
    """A setup that failed: its first member leaves both cgroups again (before they go)."""
    if pid is None:
        return
    k = adapters.current()
    k.netcls.leave(pid)
    if home is not None:
        k.cgroup.join(home, pid)


def remove(settings: Settings, rec: GroupRecord) -> None:
    """Remove both cgroups of ``rec`` (already gone is fine: systemd removes an empty
    scope's)."""
    k = adapters.current()
    k.cgroup.remove(rec.cgroup)
    k.netcls.remove(settings.state_dir, rec.netcls)


def release(settings: Settings, subtree: str) -> None:
    """The last group is gone: our cgroup2 subtree (a slice is systemd's) and our part of
    the net_cls hierarchy, unmounted if we mounted it."""
    k = adapters.current()
    if not settings.scopes:
        k.cgroup.remove_if_empty(subtree)
    k.netcls.release(settings.state_dir, settings.cgroup_subtree)


def rebuilt_level_map(level: int, others: list[GroupPlan]) -> list[dict[str, Any]]:
    """JSON commands that empty the cgroup2 map of ``level`` and add back the elements of
    ``others`` (the groups at that level whose cgroup exists)."""
    from via_tunnel.core.nftplan import level_map_name

    name = level_map_name(level)
    commands: list[dict[str, Any]] = [
        {"flush": {"map": {"family": NFT_FAMILY, "table": NFT_TABLE, "name": name}}}]
    elems = [[p.cgroup_nft_path, p.mark] for p in others if p.level == level]
    if elems:
        commands.append({"add": {"element": {"family": NFT_FAMILY, "table": NFT_TABLE,
                                             "name": name, "elem": elems}}})
    return commands
