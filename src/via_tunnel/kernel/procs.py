"""Facts about processes: a caller's uids (the daemon) and whether a program runs (doctor),
read through psutil; a member's command line (``status``), read from ``/proc`` directly.

Never on the launch hot path: importing psutil alone costs ~15-30 ms, more than a whole
warm launch (the single-instance warning, which a launch runs, reads ``/proc`` itself:
instances.py), so it is imported by the functions that use it; ``status``, which reads a
command line per member, needs none of it. Each function answers None or False for a
process that is gone or that we may not look at, and never raises.
"""

from __future__ import annotations


def preload() -> None:
    """Import psutil now (the daemon: before its first caller, whose uids it checks)."""
    import psutil  # noqa: F401


def uids(pid: int) -> tuple[int, int, int] | None:
    """The real, effective and saved uid of process ``pid``, or None when it is gone."""
    import psutil

    try:
        u = psutil.Process(pid).uids()
    except (psutil.Error, OSError):
        return None
    return int(u.real), int(u.effective), int(u.saved)


def command_line(pid: int) -> str | None:
    """The command line of ``pid`` as one string (arguments joined by spaces; empty for a
    zombie or a kernel thread), or None when it is gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # Each argument NUL-terminated (an empty one too); a program that rewrote its own
    # (setproctitle) may have left spaces instead: as it shows itself, then.
    if data.endswith(b"\0"):
        data = data[:-1]
    return data.replace(b"\0", b" ").decode("utf-8", "replace")


def any_named(*names: str) -> bool:
    """Whether a process whose name (``comm``, or psutil's untruncated form of it) is one of
    ``names`` runs in this PID namespace."""
    import psutil

    wanted = set(names)
    return any(proc.info.get("name") in wanted for proc in psutil.process_iter(["name"]))
