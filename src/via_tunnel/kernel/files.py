"""Files of the state directory: atomic JSON records, their removal, and flock locks.

Contract: a reader never sees half a file (write to ``.tmp``, then rename); a writer killed
between the two leaves ``NAME.json.tmp``, which :func:`remove_json` and
:func:`remove_orphan_tmp_in` remove. A lock is released when its fd is closed, also when the
process dies. Standard library only: on the launch hot path.
"""

from __future__ import annotations

import fcntl
import os
import stat

from via_tunnel.core import fastjson
from via_tunnel.core.errors import ViaTunnelError


def ensure_dir(path: str) -> None:
    os.makedirs(path, mode=0o755, exist_ok=True)


def check_private_dir(path: str) -> None:
    """Create ``path`` if missing; raise unless it is a real directory (no symlink) owned
    by root and writable by nobody else: whoever can write it could forge the records the
    daemon acts on."""
    ensure_dir(path)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
        raise ViaTunnelError(f"{path} must be a directory that belongs to root and is "
                             f"writable by root only (refusing to trust it)")


def read_trusted(path: str) -> str | None:
    """The text of the file at ``path`` (None when missing), only if it is a regular file
    (not a symlink: it stays inside its directory) owned by root or by us and writable by
    nobody else; raise ViaTunnelError otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:  # ELOOP: a symlink
        raise ViaTunnelError(f"refusing to trust {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid not in (0, os.geteuid()) \
                or st.st_mode & 0o022:
            raise ViaTunnelError(f"refusing to trust {path}: not a regular file of root's "
                                 f"that only root may write")
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks).decode()


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
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o644)
    with open(fd, "w") as f:
        os.fchmod(fd, 0o644)  # whatever the umask: a record writable by others is not trusted
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
