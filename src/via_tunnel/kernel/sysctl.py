"""Sysctls: the one via-tunnel needs host-wide, and per-interface ones a group sets.

``net.ipv4.conf.all.src_valid_mark=1`` lets strict rp_filter take the packet mark into
account, so replies arriving on a tunnel are not dropped. It is raised when a group needs
it and never lowered again: other tools rely on it too (wg-quick sets it and never puts it
back), and a value saved before they started would break them when restored. It changes
nothing for packets without a mark.
"""

from __future__ import annotations

import contextlib

from via_tunnel.core.errors import UsageError
from via_tunnel.core.names import validate_ifname
from via_tunnel.core.settings import Settings
from via_tunnel.kernel import files

SRC_VALID_MARK = "/proc/sys/net/ipv4/conf/all/src_valid_mark"
WANTED = {SRC_VALID_MARK: "1"}


def read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def ensure() -> None:
    """Set what every group needs (never lowered afterwards, see above)."""
    for path, value in WANTED.items():
        if read(path) != value:
            write(path, value)


def apply_saving(values: tuple[tuple[str, str], ...]) -> dict[str, str]:
    """Set each (path, value); return the previous values of those that changed."""
    saved = {}
    for path, value in values:
        old = read(path)
        if old != value:
            write(path, value)
            saved[path] = old
    return saved


CONF = "/proc/sys/net/ipv4/conf/"
RESTORABLE_KEYS = frozenset({"route_localnet"})  # what a group's plan sets (core/plan.py)


def restorable(path: str) -> bool:
    """Whether ``path`` (read from a record) is one a group may have set:
    ``/proc/sys/net/ipv4/conf/IFNAME/KEY`` with a valid interface name and a known key."""
    if not isinstance(path, str) or not path.startswith(CONF):
        return False
    parts = path[len(CONF):].split("/")
    if len(parts) != 2 or parts[1] not in RESTORABLE_KEYS or parts[0] in ("all", "default"):
        return False
    try:
        validate_ifname(parts[0])
    except UsageError:
        return False
    return True


def put_back(saved: dict[str, str]) -> None:
    """Restore what :func:`apply_saving` returned; an interface gone meanwhile is fine. Only
    :func:`restorable` paths with a short value are written (they come from a record)."""
    for path, value in saved.items():
        if restorable(path) and isinstance(value, str) and value.strip().isdigit() \
                and len(value) < 16:
            with contextlib.suppress(OSError):
                write(path, value)


def forget_saved(settings: Settings) -> None:
    """Remove ``sysctl.json``, where earlier versions saved ``src_valid_mark`` to restore it
    (called when the last group is gone); nothing is written back."""
    files.remove_json(settings.sysctl_path)
