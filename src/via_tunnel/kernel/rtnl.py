"""A small synchronous rtnetlink client over a plain socket, standard library only.

Why not pyroute2's ``IPRoute``: importing it pulls in asyncio, ssl, multiprocessing and
the rest of its socket machinery, ~40 ms of a ~100 ms cold launch; its message classes
alone still cost ~28 ms to import and most of ``status``'s time at a thousand groups. The
requests are built with ``struct`` here and the answers decoded by ``rtmsg.py``, both
pinned to what pyroute2 encodes and decodes (tests/test_rtnl_encode.py, test_rtmsg.py).
pyroute2 itself is used where a message of any shape must be read in full: the doctor's
dump of other tools' ip rules (:meth:`Rtnl.rules_in_full`).

Contracts: one :class:`Rtnl` per thread (requests are answered in order on its socket);
a change either succeeds or raises :class:`NetlinkError` carrying the kernel's errno.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import struct
from collections.abc import Iterator
from typing import Any

from via_tunnel.kernel.nlmsg import (
    FIB_RULE_INVERT,
    FR_ACT_GOTO,
    FR_ACT_TO_TBL,
    FR_ACT_UNREACHABLE,
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_DUMP,
    NLM_F_EXCL,
    NLM_F_REQUEST,
    RT_SCOPE_UNIVERSE,
    NetlinkError,
    Socket,
    attr,
    message,
)
from via_tunnel.kernel.rtmsg import Message, decode

# <linux/rtnetlink.h>, <linux/fib_rules.h> (the netlink basics: nlmsg.py)
RTM_GETLINK = 18
RTM_GETADDR = 22
RTM_NEWROUTE = 24
RTM_DELROUTE = 25
RTM_GETROUTE = 26
RTM_NEWRULE = 32
RTM_DELRULE = 33
RTM_GETRULE = 34
RTPROT_STATIC = 4  # "added by an administrator", what pyroute2's IPRoute gave them
RT_SCOPE_NOWHERE = 255  # in a delete: any scope
RT_TABLE_UNSPEC = 0
RULE_ACTIONS = {"lookup": FR_ACT_TO_TBL, "goto": FR_ACT_GOTO, "unreachable": FR_ACT_UNREACHABLE}

SOL_NETLINK = 270
NETLINK_GET_STRICT_CHK = 12
_DUMP_TRIES = 3


class Rtnl(Socket):
    """One rtnetlink socket. A context manager; closing it twice is harmless."""

    def __init__(self) -> None:
        super().__init__(socket.NETLINK_ROUTE)
        # Let the kernel filter dumps by the header and attributes we send (the table of
        # a route dump, the interface of an address dump), so a host with a full routing
        # table does not stream it all through Python. Kernels before 4.20 ignore the
        # option and the filters; the callers filter again.
        with contextlib.suppress(OSError):
            self.sock.setsockopt(SOL_NETLINK, NETLINK_GET_STRICT_CHK, 1)

    # -- transport --------------------------------------------------------------------

    def _answers(self, seq: int, kind: str, what: str) -> Iterator[Message]:
        """The messages answering request ``seq``, decoded as ``kind`` (see
        :meth:`Socket.answers` and :func:`rtmsg.decode`)."""
        for chunk in self.answers(seq, what):
            yield decode(kind, chunk)

    def _dump(self, msg_type: int, payload: bytes, kind: str, what: str) -> list[Message]:
        """Every answer of a dump. One the kernel marks inconsistent (the table changed
        while it was being dumped) is asked for again, a few times."""
        for _ in range(_DUMP_TRIES):
            out = list(self._answers(self.request(msg_type, NLM_F_REQUEST | NLM_F_DUMP,
                                                  payload), kind, what))
            if not self.interrupted:
                break
        return out

    # -- reads ------------------------------------------------------------------------

    def link(self, name: str) -> Message | None:
        """The RTM_NEWLINK message of interface ``name``, or None if there is none."""
        seq = self.request(RTM_GETLINK, NLM_F_REQUEST, link_request_payload(name))
        try:
            return next(iter(self._answers(seq, "link", f"look up {name}")), None)
        except NetlinkError as exc:
            if exc.code == errno.ENODEV:
                return None
            raise

    def links(self) -> list[Message]:
        """The RTM_NEWLINK messages of every interface (one dump)."""
        return self._dump(RTM_GETLINK, link_request_payload(None), "link", "list interfaces")

    def addresses(self, index: int | None) -> list[Message]:
        """The addresses (both families) of interface ``index`` (None: of every one)."""
        return [a for a in self._dump(RTM_GETADDR, _IFADDRMSG.pack(0, 0, 0, 0, index or 0),
                                      "addr", "list addresses")
                if index is None or a["index"] == index]

    def routes(self, family: int, table: int | None = None,
               oif: int | None = None) -> list[Message]:
        """The routes of ``family``, of ``table`` only when given (None: every table) and
        through interface ``oif`` only when given, both filtered by the kernel (strict
        checking). A family the kernel lacks (IPv6 with ``ipv6.disable=1``) has none: the
        kernel answers such a dump with the routes of every family, so they are filtered
        here too."""
        try:
            out = self._dump(RTM_GETROUTE, route_dump_payload(family, table, oif), "route",
                             "list routes")
        except NetlinkError as exc:
            if table is not None and exc.code == errno.ENOENT:  # no such table: no routes
                return []
            raise
        return [r for r in out if r["family"] == family
                and (table is None or route_table(r) == table)
                and (oif is None or r.get_attr("RTA_OIF") == oif)]

    def rules(self, family: int) -> list[Message]:
        """The ip rules of ``family``, with the attributes via-tunnel's own rules use."""
        return self._dump(RTM_GETRULE, _HDR.pack(family, 0, 0, 0, 0, 0, 0, 0, 0), "rule",
                          "list ip rules")

    def rules_in_full(self, family: int) -> list[Any]:
        """The ip rules of ``family`` decoded by pyroute2, every attribute (the doctor
        describes other tools' rules, whatever selectors they use)."""
        from via_tunnel.kernel.pyroute2_lazy import register_package

        register_package()  # pyroute2's package __init__ would import everything
        from pyroute2.netlink.rtnl.fibmsg import fibmsg

        out = []
        seq = self.request(RTM_GETRULE, NLM_F_REQUEST | NLM_F_DUMP,
                           _HDR.pack(family, 0, 0, 0, 0, 0, 0, 0, 0))
        for chunk in self.answers(seq, "list ip rules"):
            msg = fibmsg(chunk)
            msg.decode()
            out.append(msg)
        return out

    # -- changes ----------------------------------------------------------------------

    def change_all(self, requests: list[Request], what: str) -> list[int]:
        """Send every request, acknowledged, many per datagram (the kernel handles them
        one after the other, in order, and goes on after one it refuses); the errno each
        was answered with (0: done), in order. One round trip where a rule at a time cost
        one each: the first and the last group add and remove ~70 shared rules."""
        codes: list[int] = []
        for start in range(0, len(requests), _BATCH):
            batch = requests[start:start + _BATCH]
            seqs = [self.next_seq() for _ in batch]
            self.sock.send(b"".join(
                message(kind, NLM_F_REQUEST | NLM_F_ACK | flags, seq, payload)
                for seq, (kind, flags, payload) in zip(seqs, batch, strict=True)))
            codes += self.acks(seqs, what)
        return codes


# -- changes: (type, flags, payload), built with struct ---------------------------------
# (pyroute2's encoder cost ~75 us a message: 5 ms for the ~70 rules of a first group.)

Request = tuple[int, int, bytes]  # (message type, flags, payload): for Rtnl.change_all
_BATCH = 128  # changes per datagram (a rule message is ~50 bytes, a route's ~70)
_HDR = struct.Struct("=BBBBBBBBI")  # rtmsg and fib_rule_hdr: 8 bytes then u32 flags
_IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
IFLA_IFNAME = 3
_U32 = struct.Struct("=I")
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_PRIORITY, RTA_TABLE = 1, 4, 5, 6, 15
FRA_GOTO, FRA_PRIORITY, FRA_FWMARK, FRA_TABLE, FRA_FWMASK = 4, 6, 10, 15, 16


def add_route_request(*, family: int, table: int, dst: str | None, dst_len: int, kind: int,
                      oif: int | None = None, gateway: str | None = None,
                      metric: int | None = None) -> Request:
    """Add one route (``dst`` None: the default route), scope universe (also those with no
    next hop: the kernel accepts that). EEXIST if it is there."""
    return (RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL,
            route_payload(family, table, dst, dst_len, kind, oif, gateway, metric,
                          proto=RTPROT_STATIC, scope=RT_SCOPE_UNIVERSE))


def delete_route_request(*, family: int, table: int, dst: str | None, dst_len: int,
                         kind: int, oif: int | None = None, metric: int | None = None
                         ) -> Request:
    """Delete the route with these keys, whatever its scope and protocol."""
    return (RTM_DELROUTE, 0, route_payload(family, table, dst, dst_len, kind, oif, None,
                                           metric, proto=0, scope=RT_SCOPE_NOWHERE))


def rule_request(*, add: bool, family: int, priority: int, fwmark: int, fwmask: int,
                 table: int, action: str, goto: int, invert: bool) -> Request:
    """``ip rule add|del [not] fwmark MARK/MASK ACTION priority PRIORITY`` (ACTION: lookup
    TABLE, goto GOTO or unreachable); an add answers EEXIST if the same rule is there."""
    payload = rule_payload(family, priority, fwmark, fwmask, table, action, goto, invert)
    return (RTM_NEWRULE, NLM_F_CREATE | NLM_F_EXCL, payload) if add \
        else (RTM_DELRULE, 0, payload)


def link_request_payload(name: str | None) -> bytes:
    """An ifinfomsg asking for interface ``name`` (None: for every one, in a dump)."""
    out = _IFINFOMSG.pack(0, 0, 0, 0, 0)
    if name is not None:
        out += attr(IFLA_IFNAME, name.encode() + b"\0")
    return out


def route_dump_payload(family: int, table: int | None, oif: int | None) -> bytes:
    """An rtmsg asking for the routes of ``family`` in ``table``, through ``oif`` (each
    only when given; the kernel filters by them under strict checking)."""
    out = _HDR.pack(family, 0, 0, 0, 0 if table is None or table >= 256 else table,
                    0, 0, 0, 0)
    if table is not None:
        out += attr(RTA_TABLE, _U32.pack(table))
    if oif is not None:
        out += attr(RTA_OIF, _U32.pack(oif))
    return out


def route_payload(family: int, table: int, dst: str | None, dst_len: int, kind: int,
                  oif: int | None, gateway: str | None, metric: int | None, *, proto: int,
                  scope: int) -> bytes:
    """An rtmsg and its attributes (the table also as RTA_TABLE: the header holds 8 bits)."""
    out = _HDR.pack(family, dst_len, 0, 0, table if table < 256 else RT_TABLE_UNSPEC,
                    proto, scope, kind, 0) + attr(RTA_TABLE, _U32.pack(table))
    if dst is not None:
        out += attr(RTA_DST, socket.inet_pton(family, dst))
    if oif is not None:
        out += attr(RTA_OIF, _U32.pack(oif))
    if gateway:
        out += attr(RTA_GATEWAY, socket.inet_pton(family, gateway))
    if metric is not None:
        out += attr(RTA_PRIORITY, _U32.pack(metric))
    return out


def rule_payload(family: int, priority: int, fwmark: int, fwmask: int, table: int,
                 action: str, goto: int, invert: bool) -> bytes:
    """A fib_rule_hdr and its attributes."""
    out = _HDR.pack(family, 0, 0, 0, table if table < 256 else RT_TABLE_UNSPEC, 0, 0,
                    RULE_ACTIONS[action], FIB_RULE_INVERT if invert else 0)
    if action == "lookup":
        out += attr(FRA_TABLE, _U32.pack(table))
    out += (attr(FRA_PRIORITY, _U32.pack(priority)) + attr(FRA_FWMARK, _U32.pack(fwmark))
            + attr(FRA_FWMASK, _U32.pack(fwmask)))
    if action == "goto":
        out += attr(FRA_GOTO, _U32.pack(goto))
    return out


def route_table(msg: Message) -> int:
    """A route's table: the RTA_TABLE attribute (the header field holds only 8 bits)."""
    return int(msg.get_attr("RTA_TABLE") or msg["table"])
