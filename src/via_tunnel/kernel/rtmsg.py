"""rtnetlink answers as via-tunnel reads them: the header's fields and the attributes it
uses, decoded with ``struct``.

Why not pyroute2's message classes: importing them cost ~28 ms of a cold launch, and
decoding every attribute of every message (an interface's statistics, its per-family
configuration) made ``status`` at a thousand groups spend ~0.8 s in them. via-tunnel reads
a dozen attributes; those are decoded here, the others skipped.
``tests/test_rtmsg.py`` pins the result to what pyroute2 decodes from the same bytes.

Contract: a :class:`Message` answers ``msg[field]`` for its header's fields (the names
pyroute2 gives them) and ``msg.get_attr(NAME)`` for the attributes of its table below
(None when absent). Addresses are strings as ``ip`` prints them, numbers ints, names str.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable
from typing import Any

from via_tunnel.kernel.nlmsg import HEADER, attr_list

_U32 = struct.Struct("=I")


def _u32(raw: bytes) -> int | None:
    return _U32.unpack_from(raw)[0] if len(raw) >= 4 else None


def _name(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def _ip(raw: bytes) -> str | None:
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw)
    if len(raw) == 16:
        return socket.inet_ntop(socket.AF_INET6, raw)
    return None


def _hwaddr(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


Decoder = Callable[[bytes], Any]

# name -> (attribute number, decoder), per message kind (<linux/if_link.h>,
# <linux/if_addr.h>, <linux/rtnetlink.h>, <linux/fib_rules.h>)
_LINK_ATTRS: dict[int, tuple[str, Decoder]] = {
    1: ("IFLA_ADDRESS", _hwaddr), 3: ("IFLA_IFNAME", _name), 4: ("IFLA_MTU", _u32),
}
_ADDR_ATTRS: dict[int, tuple[str, Decoder]] = {
    1: ("IFA_ADDRESS", _ip), 2: ("IFA_LOCAL", _ip), 3: ("IFA_LABEL", _name),
}
_ROUTE_ATTRS: dict[int, tuple[str, Decoder]] = {
    1: ("RTA_DST", _ip), 2: ("RTA_SRC", _ip), 4: ("RTA_OIF", _u32), 5: ("RTA_GATEWAY", _ip),
    6: ("RTA_PRIORITY", _u32), 7: ("RTA_PREFSRC", _ip), 15: ("RTA_TABLE", _u32),
}
_RULE_ATTRS: dict[int, tuple[str, Decoder]] = {
    1: ("FRA_DST", _ip), 2: ("FRA_SRC", _ip), 3: ("FRA_IIFNAME", _name), 4: ("FRA_GOTO", _u32),
    6: ("FRA_PRIORITY", _u32), 10: ("FRA_FWMARK", _u32), 14: ("FRA_SUPPRESS_PREFIXLEN", _u32),
    15: ("FRA_TABLE", _u32), 16: ("FRA_FWMASK", _u32), 17: ("FRA_OIFNAME", _name),
}

# header struct, its fields' names, the attribute table
_KINDS: dict[str, tuple[struct.Struct, tuple[str, ...], dict[int, tuple[str, Decoder]]]] = {
    "link": (struct.Struct("=BxHiII"), ("family", "ifi_type", "index", "flags", "change"),
             _LINK_ATTRS),
    "addr": (struct.Struct("=BBBBI"), ("family", "prefixlen", "flags", "scope", "index"),
             _ADDR_ATTRS),
    "route": (struct.Struct("=BBBBBBBBI"), ("family", "dst_len", "src_len", "tos", "table",
                                            "proto", "scope", "type", "flags"), _ROUTE_ATTRS),
    "rule": (struct.Struct("=BBBBBBBBI"), ("family", "dst_len", "src_len", "tos", "table",
                                           "res1", "res2", "action", "flags"), _RULE_ATTRS),
}


class Message:
    """One decoded answer: header fields by name, known attributes by name."""

    __slots__ = ("_attrs", "_fields")

    def __init__(self, fields: dict[str, int], attrs: dict[str, Any]) -> None:
        self._fields = fields
        self._attrs = attrs

    def __getitem__(self, field: str) -> int:
        return self._fields[field]

    def get_attr(self, name: str) -> Any:
        return self._attrs.get(name)

    def __repr__(self) -> str:
        return f"Message({self._fields!r}, {self._attrs!r})"


def decode(kind: str, msg: bytes) -> Message:
    """Decode ``msg`` (a whole netlink message, header included) as an answer of ``kind``:
    "link", "addr", "route" or "rule". A message too short for its header raises
    ``struct.error`` (a kernel never sends one)."""
    header, names, table = _KINDS[kind]
    values = header.unpack_from(msg, HEADER.size)
    fields = dict(zip(names, values, strict=True))
    attrs: dict[str, Any] = {}
    for number, raw in attr_list(msg, HEADER.size + header.size):
        known = table.get(number)
        if known is not None and known[0] not in attrs:  # (the first wins, as get_attr)
            attrs[known[0]] = known[1](raw)
    return Message(fields, attrs)
