"""The unprivileged launcher's side of the daemon protocol.

One connection, one request: the client sends a JSON object and shuts down its writing side;
the daemon reads the caller's identity (pid, uid, gid) from the kernel, never from the
request, moves *that* process into the interface's group and answers with one JSON object::

    -> {"iface": "vlan3", "gateway": null, "ipv6": "auto", "dns": []}
    <- {"ok": true, "iface": "vlan3", "cgroup": "/sys/fs/cgroup/via-tunnel/if-vlan3"}
    <- {"ok": false, "error": "alice is not allowed to use vlan3 (...)", "code": 125}

On the launch hot path: ``_socket`` and :mod:`via_tunnel.core.fastjson` only (``socket``
imports enum, ``json`` re and enum).
"""

from __future__ import annotations

import _socket

from via_tunnel.core import fastjson
from via_tunnel.core.errors import EXIT_FAILURE, EXIT_USAGE, ViaTunnelError
from via_tunnel.core.wire import MAX_ANSWER, PING, socket_path

# Creating a group is quick, but the daemon may first wait for the global lock (another
# group being torn down, which can take a few seconds while sockets are destroyed).
ANSWER_TIMEOUT = 30.0
NO_DAEMON = ("via-tunnel needs root or the daemon (start `via-tunnel daemon`, "
             "or systemctl enable --now via-tunnel.socket)")


def request(payload: dict[str, object], path: str | None = None) -> dict[str, object]:
    """Send one request and return the daemon's answer when it says ``ok``; otherwise raise
    :class:`ViaTunnelError` with its message and exit code (2 or 125)."""
    path = path or socket_path()
    try:
        answer = exchange(fastjson.dumps(payload).encode(), path, ANSWER_TIMEOUT)
    except (FileNotFoundError, ConnectionRefusedError):
        raise ViaTunnelError(NO_DAEMON) from None
    except PermissionError:
        raise ViaTunnelError(f"{NO_DAEMON}; permission denied on {path} "
                             f"(is this user in the socket's group?)") from None
    except TimeoutError:
        raise ViaTunnelError(f"the daemon at {path} did not answer in time") from None
    except OSError as exc:
        raise ViaTunnelError(f"talking to the daemon at {path}: {exc.strerror}") from None
    if not isinstance(answer, dict):
        raise ViaTunnelError(f"the daemon at {path} gave no valid answer")
    if answer.get("ok") is not True:
        code = answer.get("code")
        raise ViaTunnelError(str(answer.get("error") or "the daemon refused"),
                             code if code in (EXIT_USAGE, EXIT_FAILURE) else EXIT_FAILURE)
    return answer


def ping(path: str, timeout: float) -> object:
    """The daemon's answer to the liveness probe (:data:`wire.PING`): a dict with ``ok``
    true and its ``version``, or ``ok`` false with the ``error`` it gave (busy, or a
    daemon older than the probe); anything else is not a via-tunnel daemon. Raises what
    :func:`exchange` raises."""
    return exchange(PING, path, timeout)


def exchange(data: bytes, path: str, timeout: float) -> object:
    """Send ``data`` as one request to the socket at ``path`` and return the answer, parsed
    as JSON (None if it is not JSON). Raises the OSError of a failed exchange:
    FileNotFoundError or ConnectionRefusedError (no daemon listens), PermissionError,
    TimeoutError (no answer within ``timeout`` seconds), others."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)  # CLOEXEC by default
    try:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(data)
        sock.shutdown(_socket.SHUT_WR)
        chunks = []
        size = 0
        while size <= MAX_ANSWER:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        sock.close()
    try:
        return fastjson.loads(b"".join(chunks))
    except ValueError:
        return None


def join(iface: str, gateway: str | None, ipv6: str, dns: list[str] | tuple[str, ...] = ()
         ) -> dict[str, object]:
    """Ask the daemon to put this very process into ``iface``'s group."""
    return request({"iface": iface, "gateway": gateway, "ipv6": ipv6, "dns": list(dns)})
