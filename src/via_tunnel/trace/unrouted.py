"""The traced group's drops while its table has no route (its interface down or gone).

Those packets are dropped by the re-route after via-tunnel's output route chain, before any
postrouting chain (rules.py says how trace still sees them). The ``unrouted`` chain that logs
them is armed only while a family of the group's table lacks its default route, the exact
condition of those drops, and removed as soon as the route is back: while the interface
carries the group, this part of tracing costs nothing per packet.

When to look: rtnetlink notifications of links and routes wake the tracer (:meth:`fileno`),
and :meth:`Unrouted.update` then reads the interface and the table (two netlink requests).
Without the notification socket, the tracer looks on every poll instead.
"""

from __future__ import annotations

import contextlib
import socket
import sys
from socket import AF_INET, AF_INET6

from via_tunnel.core.errors import KernelError
from via_tunnel.group.state import GroupRecord
from via_tunnel.kernel import netlink, nft
from via_tunnel.kernel.ifflags import is_up
from via_tunnel.trace.rules import (
    arm_text,
    cgroup_element,
    cgroups_set_text,
    disarm_text,
    flush_cgroups_text,
)

# rtnetlink multicast groups as bind() bits (1 << (RTNLGRP_x - 1)): links, IPv4 and IPv6
# routes.
_RTNLGRP_LINK, _RTNLGRP_IPV4_ROUTE, _RTNLGRP_IPV6_ROUTE = 1, 7, 11
_GROUPS = sum(1 << (g - 1) for g in (_RTNLGRP_LINK, _RTNLGRP_IPV4_ROUTE, _RTNLGRP_IPV6_ROUTE))


def unrouted_families(rec: GroupRecord, routes: dict[int, list[tuple[int, int]]]
                      ) -> frozenset[int]:
    """The families whose packets the group's table cannot route: no unicast default route
    left in it (``routes``: family -> (dst_len, type) of the table's routes). IPv6 counts
    only for a group whose IPv6 goes through the interface: a blocked one is refused in the
    route chain whatever the link does (and trace does not show refusals)."""
    wanted = (AF_INET, AF_INET6) if rec.ipv6 == "tunnel" else (AF_INET,)
    return frozenset(fam for fam in wanted
                     if (0, netlink.RTN_UNICAST) not in routes.get(fam, []))


class Unrouted:
    """The ``unrouted`` chain of one trace: which cgroup it watches, armed or not, why."""

    def __init__(self, iface: str) -> None:
        self.iface = iface
        self.rec: GroupRecord | None = None  # the group whose cgroup is in our set
        self.armed: frozenset[int] = frozenset()  # the families the chain logs
        self.reason = ""  # why the group's packets are dropped ("tun0 is down")
        self.events: socket.socket | None = None
        with contextlib.suppress(OSError):
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC
                                 | socket.SOCK_NONBLOCK, socket.NETLINK_ROUTE)
            try:
                sock.bind((0, _GROUPS))
            except OSError:
                sock.close()
                raise
            self.events = sock
        self.rtnl = netlink.open_rtnl()

    def fileno(self) -> int:
        """Readable when a link or route changed (-1 without notifications)."""
        return self.events.fileno() if self.events is not None else -1

    def close(self) -> None:
        """Close the sockets (the chain goes with trace's table)."""
        if self.events is not None:
            self.events.close()
            self.events = None
        self.rtnl.close()

    def follow(self, rec: GroupRecord | None) -> None:
        """Watch the cgroup of ``rec`` (None: no group) instead of the previous one."""
        if self.rec is not None:
            self._arm(frozenset())
            with contextlib.suppress(KernelError):
                nft.run_text(flush_cgroups_text(self.rec.level))
            self.rec = None
        if rec is not None and rec.usable():
            try:
                nft.run_text(cgroups_set_text(rec.level))
                nft.run_json([cgroup_element(rec.level, rec.cgroup_nft_path)])
            except KernelError:  # its cgroup went away meanwhile: the group is ending
                return
            self.rec = rec
        self.update()

    def drain(self) -> None:
        """Read the pending notifications (their content does not matter), then look."""
        assert self.events is not None
        while True:
            try:
                if not self.events.recv(65536):
                    break
            except BlockingIOError:
                break
            except OSError:  # ENOBUFS: some were lost; looking covers them all
                continue
        self.update()

    def update(self) -> None:
        """Arm or disarm the chain for what the interface and the group's table are now."""
        rec = self.rec
        if rec is None:
            return
        try:
            link = self.rtnl.link(self.iface)
            routes = {fam: [(int(r["dst_len"]), int(r["type"]))
                            for r in self.rtnl.routes(fam, rec.table)]
                      for fam in netlink.families()}
        except OSError:  # the kernel refused to say: look again at the next change
            return
        if link is None:
            reason = f"{self.iface} is gone"
        elif not is_up(int(link["flags"])):
            reason = f"{self.iface} is down"
        else:
            reason = f"no route through {self.iface}"
        families = unrouted_families(rec, routes)
        if families and (not self.armed or reason != self.reason):
            _say(f"{reason}: the group's packets are dropped (shown as DROPPED)")
        elif self.armed and not families:
            _say(f"{self.iface} carries the group's packets again")
        self.reason = reason
        self._arm(families)

    def _arm(self, families: frozenset[int]) -> None:
        if families == self.armed:
            return
        if families:
            assert self.rec is not None
            nft.run_text(arm_text(self.rec.level, families))
        else:
            nft.run_text(disarm_text())
        self.armed = families


def _say(message: str) -> None:
    sys.stderr.write(f"via-tunnel: {message}\n")  # one write: see session.say
    sys.stderr.flush()
