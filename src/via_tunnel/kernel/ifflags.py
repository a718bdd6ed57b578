"""Interface flags: the one definition of "the interface is up".

An interface is up when the administrator set it up (``IFF_UP``) and the kernel says it can
carry packets (``IFF_RUNNING``: operationally up, carrier present, not dormant). The same two
bits are read from ``SIOCGIFFLAGS`` (the launch hot path: one ioctl) and from rtnetlink's
``ifi_flags`` (everything else).
"""

from __future__ import annotations

import _socket
import fcntl
import struct

from via_tunnel.core.errors import ViaTunnelError

SIOCGIFFLAGS = 0x8913
IFF_UP = 0x1
IFF_POINTOPOINT = 0x10
IFF_RUNNING = 0x40


def is_up(flags: int) -> bool:
    """Whether interface ``flags`` (ioctl or ``ifi_flags``) say the interface is up."""
    return bool(flags & IFF_UP) and bool(flags & IFF_RUNNING)


def check_link(iface: str) -> None:
    """Refuse an interface that does not exist or is down (one ioctl: cheap enough for the
    warm path, which otherwise trusts the group record)."""
    sock = _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM)
    try:
        req = struct.pack("16sH14x", iface.encode("utf-8", "surrogateescape"), 0)
        flags = struct.unpack_from("16sH", fcntl.ioctl(sock.fileno(), SIOCGIFFLAGS, req))[1]
    except OSError:
        raise ViaTunnelError(f"interface {iface} does not exist") from None
    finally:
        sock.close()
    if not is_up(flags):
        raise ViaTunnelError(f"interface {iface} is down")
