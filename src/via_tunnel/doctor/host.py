"""Doctor: what kind of host this is for groups. Which init (systemd as PID 1 or not) and so
where groups live (scope units in via-tunnel.slice, or a plain cgroup subtree), and whether
the net_cls controller that keeps a moved program routed is there (and mounted where).

The verdicts are pure functions of what :func:`check_placement` and :func:`check_netcls`
gather, tested without root.
"""

from __future__ import annotations

import os

from via_tunnel.core.settings import ENV_CGROUP, SCOPE_SLICE, Settings
from via_tunnel.doctor.check import FAIL, OK, Check


def placement_verdict(systemd: bool, settings: Settings, mount: str, dbus: bool) -> Check:
    """Where this host's groups live (pure)."""
    if settings.scopes:
        where = (f"systemd is PID 1: each group is a scope unit via-tunnel-IFACE.scope in "
                 f"{SCOPE_SLICE} ({os.path.join(mount, settings.cgroup_subtree)})")
        if not dbus:
            return Check("placement", FAIL, f"{where}, made over D-Bus, but python3-dbus is "
                                            f"missing", "apt-get install python3-dbus")
        return Check("placement", OK, where)
    subtree = os.path.join(mount, settings.cgroup_subtree, "if-IFACE")
    if systemd:
        return Check("placement", OK, f"systemd is PID 1, but {ENV_CGROUP} is set: groups "
                                      f"are plain cgroups {subtree}, which systemd does not "
                                      f"know")
    return Check("placement", OK, f"no systemd as PID 1: groups are plain cgroups {subtree}")


def netcls_verdict(proc_cgroups: str, mounted_at: str | None, own: str) -> Check:
    """The net_cls controller (pure): ``proc_cgroups`` is the text of /proc/cgroups,
    ``mounted_at`` where this mount namespace has the hierarchy, ``own`` where via-tunnel
    mounts it."""
    from via_tunnel.kernel.netcls import parse_available, unavailable_reason

    if not parse_available(proc_cgroups):
        return Check("net_cls", FAIL, unavailable_reason(),
                     "a kernel with CONFIG_CGROUP_NET_CLASSID (net_cls enabled in "
                     "/proc/cgroups)")
    if mounted_at is None:
        where = f"not mounted; via-tunnel mounts it at {own} while a group lives"
    elif mounted_at == own:
        where = f"mounted by via-tunnel at {own}"
    else:
        where = f"mounted at {mounted_at} (used as it is)"
    return Check("net_cls", OK, f"net_cls available ({where}): a program moved out of its "
                                f"group (systemd-run --scope, flatpak) stays routed")


def check_placement() -> list[Check]:
    from via_tunnel.kernel import cgroup, systemd

    try:
        import dbus  # type: ignore[import-untyped]  # noqa: F401

        has_dbus = True
    except ImportError:
        has_dbus = False
    return [placement_verdict(systemd.booted(), Settings.from_env(), cgroup.cgroup2_mount(),
                              has_dbus)]


def check_netcls() -> list[Check]:
    from via_tunnel.kernel import cgroup, netcls

    try:
        with open("/proc/cgroups") as f:
            text = f.read()
    except OSError:
        text = ""
    own = netcls.own_mount_point(Settings.from_env().state_dir)
    return [netcls_verdict(text, cgroup.netcls_mount(), own)]
