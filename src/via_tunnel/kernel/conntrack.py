"""Conntrack entries through the kernel's ctnetlink (``NETLINK_NETFILTER``, subsystem
``NFNL_SUBSYS_CTNETLINK``; ``<linux/netfilter/nfnetlink_conntrack.h>``), in-process.

:func:`dump` lists the TCP and UDP entries of both families (with the seconds each has
left) whose ct mark matches a value under a mask: the kernel filters (CTA_MARK,
CTA_MARK_MASK), so only those cross into Python. :func:`delete` removes entries by their
original tuple, every request in one datagram (where ``conntrack -D`` would be a process
per entry).

The message layouts are pure functions, tested without root.
"""

from __future__ import annotations

import errno
import socket
import struct
from typing import NamedTuple

from via_tunnel.kernel.nlmsg import (
    HEADER,
    NETLINK_NETFILTER,
    NFGEN,
    NFNETLINK_V0,
    NLM_F_DUMP,
    NLM_F_REQUEST,
    NetlinkError,
    Socket,
    attr,
    attrs,
    nested,
)

NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_GET = 1
IPCTNL_MSG_CT_DELETE = 2
CTA_TUPLE_ORIG = 1
CTA_TUPLE_REPLY = 2
CTA_TIMEOUT = 7
CTA_MARK = 8
CTA_ZONE = 18
CTA_MARK_MASK = 21
CTA_TUPLE_IP = 1
CTA_TUPLE_PROTO = 2
CTA_IP_V4_SRC, CTA_IP_V4_DST, CTA_IP_V6_SRC, CTA_IP_V6_DST = 1, 2, 3, 4
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3
PROTOCOLS = {socket.IPPROTO_TCP: "tcp", socket.IPPROTO_UDP: "udp"}
_NUMBERS = {name: num for num, name in PROTOCOLS.items()}
_ADDR: dict[int, tuple[int, int]] = {socket.AF_INET: (CTA_IP_V4_SRC, CTA_IP_V4_DST),
                                     socket.AF_INET6: (CTA_IP_V6_SRC, CTA_IP_V6_DST)}


class Entry(NamedTuple):
    """One conntrack entry: its original tuple, where replies go, its ct mark."""

    proto: str  # "tcp" or "udp"
    src: str
    dst: str
    sport: int
    dport: int
    reply_dst: str
    mark: int
    family: int = socket.AF_INET
    zone: int = 0
    timeout: int = 0  # seconds the kernel keeps it without another packet

    def __str__(self) -> str:
        return (f"{self.proto} {self.src}:{self.sport} -> {self.dst}:{self.dport} "
                f"(replies to {self.reply_dst}, mark 0x{self.mark:08x})")


def _type(msg: int) -> int:
    return (NFNL_SUBSYS_CTNETLINK << 8) | msg


def dump_request(mark: int, mask: int) -> bytes:
    """The payload of a dump of every family's entries whose ``ct mark & mask == mark``."""
    return (NFGEN.pack(socket.AF_UNSPEC, NFNETLINK_V0, 0)
            + attr(CTA_MARK, struct.pack("!I", mark))
            + attr(CTA_MARK_MASK, struct.pack("!I", mask)))


def tuple_attr(kind: int, family: int, proto: str, src: str, dst: str, sport: int,
               dport: int) -> bytes:
    """A CTA_TUPLE_ORIG or CTA_TUPLE_REPLY attribute."""
    src_type, dst_type = _ADDR[family]
    return nested(kind,
                  nested(CTA_TUPLE_IP, attr(src_type, socket.inet_pton(family, src)),
                         attr(dst_type, socket.inet_pton(family, dst))),
                  nested(CTA_TUPLE_PROTO, attr(CTA_PROTO_NUM, bytes([_NUMBERS[proto]])),
                         attr(CTA_PROTO_SRC_PORT, struct.pack("!H", sport)),
                         attr(CTA_PROTO_DST_PORT, struct.pack("!H", dport))))


def delete_request(e: Entry) -> bytes:
    """The payload that deletes entry ``e`` (found by its original tuple and zone)."""
    body = tuple_attr(CTA_TUPLE_ORIG, e.family, e.proto, e.src, e.dst, e.sport, e.dport)
    if e.zone:
        body += attr(CTA_ZONE, struct.pack("!H", e.zone))
    return NFGEN.pack(e.family, NFNETLINK_V0, 0) + body


def _tuple(raw: bytes, family: int) -> tuple[int, str, str, int, int] | None:
    """(protocol number, source, destination, source port, destination port)."""
    parts = attrs(raw)
    ip, proto = attrs(parts.get(CTA_TUPLE_IP, b"")), attrs(parts.get(CTA_TUPLE_PROTO, b""))
    src_type, dst_type = _ADDR[family]
    try:
        return (proto[CTA_PROTO_NUM][0], socket.inet_ntop(family, ip[src_type]),
                socket.inet_ntop(family, ip[dst_type]),
                struct.unpack("!H", proto[CTA_PROTO_SRC_PORT])[0],
                struct.unpack("!H", proto[CTA_PROTO_DST_PORT])[0])
    except (KeyError, IndexError, ValueError, struct.error):
        return None


def parse_entry(msg: bytes) -> Entry | None:
    """The entry in one answer of a dump (a whole netlink message); None for a protocol
    other than TCP and UDP, or an entry without the parts we need."""
    family = NFGEN.unpack_from(msg, HEADER.size)[0]
    if family not in _ADDR:
        return None
    a = attrs(msg, HEADER.size + NFGEN.size)
    orig = _tuple(a.get(CTA_TUPLE_ORIG, b""), family)
    reply = _tuple(a.get(CTA_TUPLE_REPLY, b""), family)
    if orig is None or reply is None or orig[0] not in PROTOCOLS:
        return None
    mark = struct.unpack("!I", a[CTA_MARK])[0] if len(a.get(CTA_MARK, b"")) == 4 else 0
    zone = struct.unpack("!H", a[CTA_ZONE])[0] if len(a.get(CTA_ZONE, b"")) == 2 else 0
    timeout = struct.unpack("!I", a[CTA_TIMEOUT])[0] if len(a.get(CTA_TIMEOUT, b"")) == 4 else 0
    num, src, dst, sport, dport = orig
    return Entry(PROTOCOLS[num], src, dst, sport, dport, reply[2], mark, family, zone,
                 timeout)


def dump(nl: Socket, mark: int, mask: int) -> list[Entry]:
    """The TCP and UDP entries (both families) whose ``ct mark & mask == mark``, on the
    ctnetlink socket ``nl`` (:func:`open_socket`)."""
    seq = nl.request(_type(IPCTNL_MSG_CT_GET), NLM_F_REQUEST | NLM_F_DUMP,
                     dump_request(mark, mask))
    entries = (parse_entry(m) for m in nl.answers(seq, "list conntrack entries"))
    return [e for e in entries if e is not None]


def delete(nl: Socket, entries: list[Entry]) -> int:
    """Delete ``entries``, many per datagram; returns how many the kernel deleted (one
    already gone, ENOENT, is not an error)."""
    codes = nl.each_acked(_type(IPCTNL_MSG_CT_DELETE), [delete_request(e) for e in entries],
                          "delete conntrack entries")
    bad = [code for code in codes if code not in (0, errno.ENOENT)]
    if bad:
        raise NetlinkError(bad[0], "delete conntrack entries")
    return codes.count(0)


def open_socket() -> Socket:
    """A ctnetlink socket (NETLINK_NETFILTER)."""
    return Socket(NETLINK_NETFILTER)
