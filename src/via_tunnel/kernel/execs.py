"""Finding and exec'ing the user's command: ``resolve`` before anything changes, then
``exec_in_place`` (same PID, exit status, signals and terminal).

Exit codes follow env, nice and timeout: 127 not found, 126 found but not executable.
Standard library C modules only: this is on the launch hot path.
"""

from __future__ import annotations

import _signal
import os
import stat
import sys

from via_tunnel.core.errors import EXIT_CANNOT_EXEC, EXIT_NOT_FOUND, ViaTunnelError


def resolve(cmd: str, path_env: str | None = None) -> str:
    """Find CMD like execvp would, before anything is changed: 127 not found, 126 not
    executable (the convention of env, nice and timeout)."""
    if "/" in cmd:
        candidates = [cmd]
    else:
        path_env = os.environ.get("PATH", os.defpath) if path_env is None else path_env
        candidates = [os.path.join(d or ".", cmd) for d in path_env.split(":")]
    denied = None
    for cand in candidates:
        try:
            st = os.stat(cand)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and os.access(cand, os.X_OK):
            return cand
        denied = denied or cand
    if denied is not None:
        raise ViaTunnelError(f"{cmd}: permission denied", EXIT_CANNOT_EXEC)
    raise ViaTunnelError(f"{cmd}: command not found", EXIT_NOT_FOUND)


def exec_in_place(path: str, argv: list[str]) -> None:
    """Replace this process with CMD, restoring what Python changed about signals."""
    # Python ignores SIGPIPE and SIGXFSZ; ignored signals stay ignored across exec.
    for sig in (_signal.SIGPIPE, _signal.SIGXFSZ, _signal.SIGINT):
        _signal.signal(sig, _signal.SIG_DFL)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execv(path, argv)
    except FileNotFoundError:
        raise ViaTunnelError(f"{argv[0]}: command not found", EXIT_NOT_FOUND) from None
    except OSError as exc:
        raise ViaTunnelError(f"{argv[0]}: {exc.strerror}", EXIT_CANNOT_EXEC) from None
