"""Files of the state directory: atomic JSON records, their removal, and flock locks.

Contract: a reader never sees half a file (write to ``.tmp``, then rename); a writer killed
between the two leaves ``NAME.json.tmp``, which :func:`remove_json` and
:func:`remove_orphan_tmp_in` remove. A lock is released when its fd is closed, also when the
process dies. Standard library only: on the launch hot path.
"""

from __future__ import annotations

import fcntl
import os

from via_tunnel.core import fastjson
from via_tunnel.core.errors import ViaTunnelError


def ensure_dir(path: str) -> None:
    os.makedirs(path, mode=0o755, exist_ok=True)


class FileLock:
    """Hold an exclusive flock on ``path`` (created, with ``make_dir``, if missing);
    ``as`` gives the fd (CLOEXEC). Released when the fd is closed, also when the process
    dies, so a crash never leaves it held. (A class rather than contextlib.contextmanager:
    contextlib is a noticeable share of a warm launch.)"""

    def __init__(self, path: str, make_dir: str, who: str = "via-tunnel") -> None:
        self._path = path
        self._make_dir = make_dir
        self._who = who
        self._fd = -1

    def __enter__(self) -> int:
        try:
            ensure_dir(self._make_dir)
            self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except PermissionError as exc:
            raise ViaTunnelError(f"cannot write {self._make_dir}: {self._who} needs root") \
                from exc
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        return self._fd

    def __exit__(self, *exc: object) -> None:
        os.close(self._fd)


def write_json(path: str, data: object) -> None:
    """Write atomically (rename), so a reader never sees half a file. A crash between the
    write and the rename leaves ``path.tmp``; :func:`remove_json` removes it too."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(fastjson.dumps(data))
    os.replace(tmp, path)


def remove_json(path: str) -> None:
    """Remove a file written by :func:`write_json`, and the ``.tmp`` a writer killed
    mid-write left beside it; missing files are fine. Call under the lock that guards
    the writers, or a live writer's ``.tmp`` could vanish before its rename."""
    for name in (path, path + ".tmp"):
        try:  # noqa: SIM105 - importing contextlib costs the warm launch
            os.unlink(name)
        except FileNotFoundError:
            pass


def remove_orphan_tmp_in(directories: tuple[str, ...]) -> list[str]:
    """:func:`remove_orphan_tmp` for ``directories``; the caller holds the lock of every
    writer to them."""
    done = []
    for directory in directories:
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            continue
        for name in names:
            if name.endswith(".json.tmp"):
                path = os.path.join(directory, name)
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    continue
                done.append(f"removed half-written {path}")
    return done
