"""The processes the lab starts: their argv, their first line, their end, and the lab's error.

Standard library only; every external program is called with an argument list, never a
shell string, and with a timeout.

* :func:`helper_argv` is the argv of one of :mod:`via_tunnel.lab.programs` (run by path
  with ``python -I``: it works whether or not the package is installed).
* :func:`wait_ready` returns once a started server printed ``ready``; :func:`read_until`
  reads a pipe up to a marker, EOF or a deadline.
* :func:`stop_all` ends processes (SIGTERM, then SIGKILL after :data:`KILL_GRACE`) and
  reaps them; :func:`wait_gone` waits until pids that are not our children are gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# Run by path, not imported: see the contract of via_tunnel.lab.programs.
PROGRAMS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "programs.py")
KILL_GRACE = 3.0


class LabError(RuntimeError):
    """The lab could not be built, or a command run in it failed (``check=True``)."""


def helper_argv(*args: str) -> list[str]:
    """Argv that runs :mod:`via_tunnel.lab.programs` as a script with ``args`` (``serve``,
    ``ping``, ``udp``, ``dns-serve``, ``dns``).

    ``-I`` keeps the script's own directory off ``sys.path`` (so the package's modules do not
    shadow the standard library) and ignores ``PYTHON*`` variables: it works whether or not
    the package is installed.
    """
    return [sys.executable, "-I", PROGRAMS_FILE, *args]


def read_until(stream: Any, marker: bytes, timeout: float) -> bytes:
    """Read ``stream`` (a binary pipe) until ``marker`` shows, EOF, or ``timeout``."""
    fd = stream.fileno()
    data = b""
    deadline = time.monotonic() + timeout
    while marker not in data:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data


def wait_ready(proc: subprocess.Popen[str], timeout: float) -> None:
    """Wait for the echo server's "ready" line."""
    assert proc.stdout is not None
    seen = read_until(proc.stdout, b"ready\n", timeout)
    if b"ready\n" not in seen:
        raise LabError(f"the echo server did not start (exit {proc.poll()}): {seen!r}")


def tail(path: Path, lines: int = 3) -> str:
    """The last ``lines`` lines of a log file, joined with " / "."""
    try:
        return " / ".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"unreadable ({exc.strerror})"


def merged_env(env: Mapping[str, str] | None) -> dict[str, str] | None:
    """``env`` added to (and overriding) the current environment; None stays None."""
    return None if env is None else {**os.environ, **env}


def show(argv: list[str]) -> str:
    return " ".join(argv)


def parse_json(text: str, *, default: Any) -> Any:
    """``text`` as JSON, or ``default`` when it is empty."""
    text = text.strip()
    return json.loads(text) if text else default


def wait_gone(pids: list[int], timeout: float) -> None:
    """Wait until none of ``pids`` exists (or is only a zombie of someone else's)."""
    deadline = time.monotonic() + timeout
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                        break
            except (FileNotFoundError, ProcessLookupError, IndexError):
                break
            time.sleep(0.01)


def stop_all(procs: list[subprocess.Popen[Any]]) -> None:
    """SIGTERM every running process, wait a little, SIGKILL the rest, reap all."""
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
    deadline = time.monotonic() + KILL_GRACE
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=KILL_GRACE)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()

