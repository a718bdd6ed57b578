"""The one sysctl via-tunnel needs, saved before it is changed and restored afterwards.

``net.ipv4.conf.all.src_valid_mark=1`` lets strict rp_filter take the packet mark into
account (what wg-quick sets too), so replies arriving on a tunnel are not dropped.
"""

from __future__ import annotations

import contextlib
import json
import os

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


def ensure(settings: Settings) -> None:
    """Set what we need, saving the previous values once (the first group saves them)."""
    if not os.path.exists(settings.sysctl_path):
        files.write_json(settings.sysctl_path, {p: read(p) for p in WANTED})
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


def put_back(saved: dict[str, str]) -> None:
    """Restore what :func:`apply_saving` returned; an interface gone meanwhile is fine."""
    for path, value in saved.items():
        if path.startswith("/proc/sys/net/"):
            with contextlib.suppress(OSError):
                write(path, value)


def restore(settings: Settings) -> None:
    """Put back what :func:`ensure` found (called when the last group is gone)."""
    try:
        with open(settings.sysctl_path) as f:
            saved = json.load(f)
    except FileNotFoundError:  # never saved, or killed mid-save: nothing was changed yet
        saved = {}
    for path, value in saved.items():
        if path in WANTED:
            with contextlib.suppress(OSError):
                write(path, str(value))
    files.remove_json(settings.sysctl_path)
