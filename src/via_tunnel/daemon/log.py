"""The daemon's log: one line on stderr (the journal under systemd)."""

from __future__ import annotations

import os


def log(line: str) -> None:
    """One line on stderr. A single write(2), so lines from threads and from signal handlers
    never interleave and no lock can deadlock."""
    os.write(2, f"via-tunnel daemon: {line}\n".encode(errors="replace"))
