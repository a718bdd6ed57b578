"""The daemon's protocol, shared by its client and server: where the socket is, the liveness
probe, and the vocabulary of a request.

One connection carries one request: a JSON object from the client, then one JSON object back.
The caller's identity (pid, uid, gid) comes from the kernel (SO_PEERCRED), never from the
request. Standard library only, nothing imported: the client side is on the launch hot path.
"""

from __future__ import annotations

import os

DEFAULT_SOCKET = "/run/via-tunnel/daemon.sock"
ENV_SOCKET = "VIA_TUNNEL_SOCKET"
MAX_ANSWER = 64 * 1024
IPV6_MODES = ("auto", "tunnel", "block")
PING = b'{"ping": true}'


def socket_path() -> str:
    """The daemon's socket: ``$VIA_TUNNEL_SOCKET`` or /run/via-tunnel/daemon.sock."""
    return os.environ.get(ENV_SOCKET) or DEFAULT_SOCKET


def is_ping(raw: bytes) -> bool:
    """Whether the request is a liveness probe (exactly :data:`PING`, what ``doctor``
    sends): answered with the daemon's version, nothing decided, nothing logged."""
    return raw == PING
