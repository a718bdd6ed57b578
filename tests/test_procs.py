"""procs.command_line reads /proc/PID/cmdline itself (psutil's import would cost `status`
~15 ms): the same string psutil's cmdline gives, joined; None for a process that is gone,
"" for a zombie."""

from __future__ import annotations

import os
import subprocess
import sys

import psutil

from via_tunnel.kernel import procs


def test_a_command_line_is_what_psutil_reads() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()", "a b", ""],
                             stdin=subprocess.PIPE)
    try:
        assert procs.command_line(child.pid) == " ".join(psutil.Process(child.pid).cmdline())
        assert procs.command_line(os.getpid()) == " ".join(psutil.Process().cmdline())
    finally:
        child.communicate(b"")
    assert procs.command_line(child.pid) is None  # reaped: gone


def test_a_zombie_has_an_empty_command_line() -> None:
    child = subprocess.Popen(["true"])
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped
    try:
        assert procs.command_line(child.pid) == ""
    finally:
        child.wait()
