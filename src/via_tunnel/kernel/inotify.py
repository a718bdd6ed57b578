"""inotify(7) on one directory, in-process (ctypes: the standard library has no binding).

The watcher learns from it that a group's record appeared, changed or went, and that a cold
launcher woke it (group/state.py: ``poke``).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import struct


class Inotify:
    """Watch one directory for files written (closed after writing, or renamed into
    place) and deleted. Readable (``fileno``) when something happened."""

    _IN_CLOSE_WRITE, _IN_MOVED_TO, _IN_DELETE, _IN_Q_OVERFLOW = 0x8, 0x80, 0x200, 0x4000
    _IN_NONBLOCK, _IN_CLOEXEC = 0o4000, 0o2000000

    def __init__(self, path: str) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = libc.inotify_init1(self._IN_NONBLOCK | self._IN_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        mask = self._IN_CLOSE_WRITE | self._IN_MOVED_TO | self._IN_DELETE
        if libc.inotify_add_watch(self.fd, os.fsencode(path), mask) < 0:
            code = ctypes.get_errno()
            os.close(self.fd)
            raise OSError(code, f"inotify_add_watch {path}")

    def fileno(self) -> int:
        return self.fd

    def read(self) -> set[str] | None:
        """The names of the files that changed since the last read; None when the
        kernel's queue overflowed (events were lost)."""
        names: set[str] = set()
        with contextlib.suppress(BlockingIOError):
            while True:
                data = os.read(self.fd, 65536)
                if not data:
                    break
                offset = 0
                while offset + 16 <= len(data):
                    _wd, mask, _cookie, size = struct.unpack_from("iIII", data, offset)
                    if mask & self._IN_Q_OVERFLOW:
                        return None
                    raw = data[offset + 16:offset + 16 + size].split(b"\0", 1)[0]
                    names.add(os.fsdecode(raw))
                    offset += 16 + size
        return names

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)
