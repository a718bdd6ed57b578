"""Facts about processes, read through psutil: a caller's uids (the daemon), a member's
command line (``status``), whether a program runs (doctor).

Never on the launch hot path: importing psutil alone costs ~30 ms, more than a whole warm
launch (the single-instance warning, which a launch runs, reads ``/proc`` itself:
instances.py). Each function answers None or False for a process that is gone or that we
may not look at, and never raises.
"""

from __future__ import annotations

import psutil


def uids(pid: int) -> tuple[int, int, int] | None:
    """The real, effective and saved uid of process ``pid``, or None when it is gone."""
    try:
        u = psutil.Process(pid).uids()
    except (psutil.Error, OSError):
        return None
    return int(u.real), int(u.effective), int(u.saved)


def command_line(pid: int) -> str | None:
    """The command line of ``pid`` as one string (arguments joined by spaces; empty for a
    zombie), or None when it is gone."""
    try:
        return " ".join(psutil.Process(pid).cmdline())
    except (psutil.Error, OSError):
        return None


def any_named(*names: str) -> bool:
    """Whether a process whose name (``comm``, or psutil's untruncated form of it) is one of
    ``names`` runs in this PID namespace."""
    wanted = set(names)
    return any(proc.info.get("name") in wanted for proc in psutil.process_iter(["name"]))
