"""The single-instance warning: CMD's program already runs outside the group.

Browsers and many desktop apps hand a new launch to the instance that is already running
and exit; that instance is outside the group, so the new window's traffic bypasses the
tunnel. We cannot prevent it, but we can say so. A scan of ``/proc`` (a stat per process,
a readlink only for the user's own) keeps this cheap enough for the launch hot path (not
psutil, procs.py: importing it alone costs ~30 ms, more than a warm launch).
"""

from __future__ import annotations

import os
import sys

# Shells and interpreters run everywhere at once and are never single-instance apps.
_NEVER = frozenset({"env", "python", "python3", "perl", "ruby", "node", "sudo", "doas",
                    "sleep", "via-tunnel"})


def _shells() -> frozenset[str]:
    try:
        with open("/etc/shells") as f:
            lines = f.read().split()
    except OSError:
        return frozenset()
    return frozenset(os.path.realpath(x) for x in lines if x.startswith("/"))


def cgroup_of(pid: int | str, proc: str = "/proc") -> str:
    """The cgroup2 path of ``pid`` as ``/proc/PID/cgroup`` shows it (``/via-tunnel/if-x``)."""
    with open(f"{proc}/{pid}/cgroup") as f:
        return next((ln[3:].rstrip("\n") for ln in f if ln.startswith("0::")), "")


def others_running(exe: str, uid: int, cgroup_rel: str, proc: str = "/proc") -> list[int]:
    """PIDs of ``uid``'s processes whose executable is ``exe`` (a real path) and whose
    cgroup2 path is not ``cgroup_rel``."""
    me = os.getpid()
    found = []
    for name in os.listdir(proc):
        if not name.isdigit() or int(name) == me:
            continue
        base = f"{proc}/{name}"
        try:
            if os.stat(base).st_uid != uid or os.readlink(f"{base}/exe") != exe:
                continue
            if cgroup_of(name, proc) != cgroup_rel:
                found.append(int(name))
        except OSError:
            continue
    return found


def warn_if_running(path: str, uid: int, iface: str) -> None:
    """Print one warning line when CMD (``path``) already runs for ``uid`` outside the
    group this process has just joined. Never fails: this is advice."""
    try:
        exe = os.path.realpath(path)
        base = os.path.basename(exe)
        if base in _NEVER or base.startswith("python") or exe in _shells():
            return
        pids = others_running(exe, uid, cgroup_of("self"))
    except Exception:
        return
    if pids:
        sys.stderr.write(
            f"via-tunnel: warning: {base} is already running outside {iface}'s group "
            f"(pid {pids[0]}); a single-instance app hands new windows to that process, "
            f"whose traffic bypasses {iface}: start it with a separate profile "
            f"(e.g. firefox -P NAME --no-remote, chromium --user-data-dir=DIR)\n")
        sys.stderr.flush()
