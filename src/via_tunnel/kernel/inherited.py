"""Sockets CMD would inherit from before it joined its group.

A socket's traffic is matched by the cgroup the socket was *created* in (``socket
cgroupv2``), so an AF_INET/AF_INET6 socket opened before the launch (inherited through
exec, or passed later over SCM_RIGHTS) keeps using the main route. via-tunnel cannot move
it; the launcher says so in one line. On the launch hot path: ``os`` and ``_socket`` only,
one listdir and a getsockopt per inheritable descriptor.
"""

from __future__ import annotations

import _socket
import os

FAMILIES = {_socket.AF_INET: "IPv4", _socket.AF_INET6: "IPv6"}


def inet_sockets() -> list[tuple[int, str]]:
    """(fd, "IPv4"/"IPv6") of this process's inheritable internet sockets, by fd."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if not os.get_inheritable(fd):
                continue  # closed at exec: CMD never sees it
            sock = _socket.socket(fileno=fd)  # reads SO_DOMAIN; ENOTSOCK otherwise
        except OSError:
            continue
        family = sock.family
        sock.detach()
        if family in FAMILIES:
            found.append((fd, FAMILIES[family]))
    return sorted(found)


def warning(iface: str) -> str | None:
    """The launcher's one line about inherited internet sockets, or None."""
    found = inet_sockets()
    if not found:
        return None
    names = ", ".join(f"fd {fd} ({family})" for fd, family in found)
    return (f"via-tunnel: CMD inherits socket(s) opened outside {iface}'s group: {names}; "
            f"their traffic keeps leaving by the main route, not {iface}")
