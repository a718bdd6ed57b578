"""Doctor: the daemon. Is there a socket, and does a daemon answer a ping on it (through
the daemon's own client, group/client.py)?
"""

from __future__ import annotations

import os
import stat

from via_tunnel.doctor.check import FAIL, NEEDS_ROOT, OK, WARN, Check

DAEMON_TIMEOUT = 2.0


def check_daemon() -> list[Check]:
    """Is there a daemon socket, and does a daemon answer on it? The probe sends a ping
    (:data:`wire.PING`); it never asks for anything."""
    from via_tunnel.core.wire import socket_path

    path = socket_path()
    start = "start `via-tunnel daemon` (or systemctl enable --now via-tunnel.socket)"
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return [Check("daemon", WARN, f"no daemon socket at {path}: only root can launch "
                                      f"(fine if nobody else needs to)",
                      f"{start} so that allowed users can launch without root")]
    except OSError as exc:
        return [Check("daemon", WARN, f"cannot look at {path}: {exc.strerror}", NEEDS_ROOT)]
    if not stat.S_ISSOCK(st.st_mode):
        return [Check("daemon", FAIL, f"{path} exists but is not a socket",
                      f"remove it, then {start}")]
    answer = _ask_daemon(path)
    if isinstance(answer, dict) and answer.get("ok") is True:
        return [Check("daemon", OK, f"a daemon (version {answer.get('version')}) answers "
                                    f"at {path}")]
    if isinstance(answer, dict) and "ok" in answer:  # busy, or a daemon from before ping
        return [Check("daemon", WARN, f"a daemon answers at {path} but refused a ping: "
                                      f"{answer.get('error')}",
                      "if it is busy, try again; an older version: restart it")]
    return [Check("daemon", WARN, f"{path}: {answer}", start)]


def _ask_daemon(path: str) -> dict[str, object] | str:
    """The daemon's answer to a ping, or why there is none (a string)."""
    from via_tunnel.group import client

    try:
        answer = client.ping(path, DAEMON_TIMEOUT)
    except ConnectionRefusedError:
        return "the socket exists but nothing listens (a daemon that died)"
    except PermissionError:
        return "permission denied (this user is not in the socket's group)"
    except TimeoutError:
        return f"something accepts connections but gives no answer in {DAEMON_TIMEOUT:g} s"
    except OSError as exc:
        return f"talking to the daemon failed: {exc.strerror}"
    return answer if isinstance(answer, dict) else "something answers, but not a via-tunnel daemon"
