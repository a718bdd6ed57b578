"""A small synchronous rtnetlink client: pyroute2's message classes over a plain socket.

Why not pyroute2's ``IPRoute``: importing it pulls in asyncio, ssl, multiprocessing and
the rest of its socket machinery, ~40 ms of a ~100 ms cold launch. The message classes
(how each rtnetlink message and attribute is laid out) are the part worth reusing, and
cost a fraction of that; sending a request and reading its answer is a few lines.

Contracts: one :class:`Rtnl` per thread (requests are answered in order on its socket);
a change either succeeds or raises :class:`NetlinkError` carrying the kernel's errno.
"""

from __future__ import annotations

import contextlib
import errno
import socket
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
)
from via_tunnel.kernel.pyroute2_lazy import register_package

register_package()  # pyroute2's package __init__ would import everything (see there)

from pyroute2.netlink.rtnl.fibmsg import fibmsg  # noqa: E402
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg  # noqa: E402
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg  # noqa: E402
from pyroute2.netlink.rtnl.rtmsg import rtmsg  # noqa: E402

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

    def _send(self, msg: Any, msg_type: int, flags: int) -> int:
        seq = self.next_seq()
        msg["header"]["type"] = msg_type
        msg["header"]["flags"] = flags
        msg["header"]["sequence_number"] = seq
        msg.encode()
        self.sock.send(msg.data)
        return seq

    def _answers(self, seq: int, cls: Any, what: str) -> Iterator[Any]:
        """The messages answering request ``seq``, decoded as ``cls`` (see
        :meth:`Socket.answers`)."""
        for chunk in self.answers(seq, what):
            msg = cls(chunk)
            msg.decode()
            yield msg

    def _dump(self, msg: Any, msg_type: int, what: str) -> list[Any]:
        """Every answer of a dump. One the kernel marks inconsistent (the table changed
        while it was being dumped) is asked for again, a few times."""
        for _ in range(_DUMP_TRIES):
            out = list(self._answers(self._send(msg, msg_type, NLM_F_REQUEST | NLM_F_DUMP),
                                     type(msg), what))
            if not self.interrupted:
                break
        return out

    def _change(self, msg: Any, msg_type: int, flags: int, what: str) -> None:
        seq = self._send(msg, msg_type, NLM_F_REQUEST | NLM_F_ACK | flags)
        for _ in self._answers(seq, type(msg), what):
            pass

    # -- reads ------------------------------------------------------------------------

    def link(self, name: str) -> Any | None:
        """The RTM_NEWLINK message of interface ``name``, or None if there is none."""
        msg = ifinfmsg()
        msg["attrs"] = [("IFLA_IFNAME", name)]
        seq = self._send(msg, RTM_GETLINK, NLM_F_REQUEST)
        try:
            return next(iter(self._answers(seq, ifinfmsg, f"look up {name}")), None)
        except NetlinkError as exc:
            if exc.code == errno.ENODEV:
                return None
            raise

    def links(self) -> list[Any]:
        """The RTM_NEWLINK messages of every interface (one dump)."""
        return self._dump(ifinfmsg(), RTM_GETLINK, "list interfaces")

    def addresses(self, index: int | None) -> list[Any]:
        """The addresses (both families) of interface ``index`` (None: of every one)."""
        msg = ifaddrmsg()
        if index is not None:
            msg["index"] = index
        return [a for a in self._dump(msg, RTM_GETADDR, "list addresses")
                if index is None or a["index"] == index]

    def routes(self, family: int, table: int | None = None,
               oif: int | None = None) -> list[Any]:
        """The routes of ``family``, of ``table`` only when given (None: every table) and
        through interface ``oif`` only when given, both filtered by the kernel (strict
        checking). A family the kernel lacks (IPv6 with ``ipv6.disable=1``) has none: the
        kernel answers such a dump with the routes of every family, so they are filtered
        here too."""
        msg = rtmsg()
        msg["family"] = family
        attrs: list[tuple[str, Any]] = []
        if table is not None:
            msg["table"] = table if table < 256 else RT_TABLE_UNSPEC
            attrs.append(("RTA_TABLE", table))
        if oif is not None:
            attrs.append(("RTA_OIF", oif))
        msg["attrs"] = attrs
        try:
            out = self._dump(msg, RTM_GETROUTE, "list routes")
        except NetlinkError as exc:
            if table is not None and exc.code == errno.ENOENT:  # no such table: no routes
                return []
            raise
        return [r for r in out if r["family"] == family
                and (table is None or route_table(r) == table)
                and (oif is None or r.get_attr("RTA_OIF") == oif)]

    def rules(self, family: int) -> list[Any]:
        msg = fibmsg()
        msg["family"] = family
        return self._dump(msg, RTM_GETRULE, "list ip rules")

    # -- changes ----------------------------------------------------------------------

    def add_route(self, *, family: int, table: int, dst: str | None, dst_len: int,
                  kind: int, oif: int | None = None, gateway: str | None = None,
                  metric: int | None = None, what: str) -> None:
        """Add one route (``dst`` None: the default route), scope universe (also those
        with no next hop: the kernel accepts that). EEXIST if
        it is there."""
        msg = _route_msg(family, table, dst, dst_len, kind, oif, gateway, metric,
                         proto=RTPROT_STATIC, scope=RT_SCOPE_UNIVERSE)
        self._change(msg, RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, what)

    def delete_route(self, *, family: int, table: int, dst: str | None, dst_len: int,
                     kind: int, oif: int | None = None, metric: int | None = None,
                     what: str) -> None:
        """Delete the route with these keys, whatever its scope and protocol."""
        msg = _route_msg(family, table, dst, dst_len, kind, oif, None, metric,
                         proto=0, scope=RT_SCOPE_NOWHERE)
        self._change(msg, RTM_DELROUTE, 0, what)

    def add_rule(self, *, family: int, priority: int, fwmark: int, fwmask: int, table: int,
                 action: str, goto: int, invert: bool, what: str) -> None:
        """``ip rule add [not] fwmark MARK/MASK ACTION priority PRIORITY`` (ACTION: lookup
        TABLE, goto GOTO or unreachable); EEXIST if the same rule is there."""
        msg = _rule_msg(family, priority, fwmark, fwmask, table, action, goto, invert)
        self._change(msg, RTM_NEWRULE, NLM_F_CREATE | NLM_F_EXCL, what)

    def delete_rule(self, *, family: int, priority: int, fwmark: int, fwmask: int,
                    table: int, action: str, goto: int, invert: bool, what: str) -> None:
        msg = _rule_msg(family, priority, fwmark, fwmask, table, action, goto, invert)
        self._change(msg, RTM_DELRULE, 0, what)


def route_table(msg: Any) -> int:
    """A route's table: the RTA_TABLE attribute (the header field holds only 8 bits)."""
    return int(msg.get_attr("RTA_TABLE") or msg["table"])


def _route_msg(family: int, table: int, dst: str | None, dst_len: int, kind: int,
               oif: int | None, gateway: str | None, metric: int | None, *, proto: int,
               scope: int) -> Any:
    msg = rtmsg()
    msg["family"] = family
    msg["dst_len"] = dst_len
    msg["table"] = table if table < 256 else RT_TABLE_UNSPEC
    msg["proto"] = proto
    msg["scope"] = scope
    msg["type"] = kind
    attrs: list[tuple[str, Any]] = [("RTA_TABLE", table)]
    if dst is not None:
        attrs.append(("RTA_DST", dst))
    if oif is not None:
        attrs.append(("RTA_OIF", oif))
    if gateway:
        attrs.append(("RTA_GATEWAY", gateway))
    if metric is not None:
        attrs.append(("RTA_PRIORITY", metric))
    msg["attrs"] = attrs
    return msg


def _rule_msg(family: int, priority: int, fwmark: int, fwmask: int, table: int, action: str,
              goto: int, invert: bool) -> Any:
    msg = fibmsg()
    msg["family"] = family
    msg["action"] = RULE_ACTIONS[action]
    msg["flags"] = FIB_RULE_INVERT if invert else 0
    msg["table"] = table if table < 256 else RT_TABLE_UNSPEC
    attrs: list[tuple[str, Any]] = [("FRA_PRIORITY", priority), ("FRA_FWMARK", fwmark),
                                    ("FRA_FWMASK", fwmask)]
    if action == "lookup":
        attrs.insert(0, ("FRA_TABLE", table))
    elif action == "goto":
        attrs.append(("FRA_GOTO", goto))
    msg["attrs"] = attrs
    return msg
