"""Which netlink notifications can concern one group (pure parsing, plus interface names).

A watcher wakes on every rtnetlink and nftables notification of the host, most of them
about other groups' setups (their links, routes, rules and set elements). Repairing on each
costs every watcher the global lock and listings of our table, for every change of every
group: O(groups²) work per change. :func:`affected` tells the watcher which groups a
notification can have broken (each message read once), and is conservative: a message it
cannot read concerns every group.

What concerns the group of interface IFACE with routing table TABLE:
* links and addresses of IFACE (up, down, gone, re-created, readdressed);
* routes removed from TABLE; routes of the main table through IFACE (its next hop);
* ip rules removed from TABLE, and the shared ones (priorities 0, 5099, 5100, 5133);
* nftables objects removed from our table (``nft flush ruleset``, a rule, a set, elements).
Additions to TABLE and to our table are our own setups and repairs, and never break a group.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Mapping

from via_tunnel.core.settings import (
    CATCH_PRIORITY,
    ENTRY_PRIORITY,
    NFT_TABLE,
    RULE_PRIORITY,
    SKIP_PRIORITY,
)
from via_tunnel.kernel import nlmsg

RTM_NEWLINK, RTM_DELLINK = 16, 17
RTM_NEWADDR, RTM_DELADDR = 20, 21
RTM_NEWROUTE, RTM_DELROUTE = 24, 25
RTM_NEWRULE, RTM_DELRULE = 32, 33
IFLA_IFNAME = 3
RTA_OIF, RTA_TABLE = 4, 15
FRA_PRIORITY, FRA_TABLE = 6, 15
MAIN_TABLE = 254
NFNL_SUBSYS_NFTABLES = 10
# NFT_MSG_* that remove something: DELTABLE, DELCHAIN, DELRULE, DELSET, DELSETELEM,
# DESTROYTABLE.. (kernels >= 6.3 also send DESTROY* for `nft destroy`).
NFT_REMOVALS = frozenset({2, 5, 8, 11, 14, 26, 27, 28, 29, 30})
_SHARED = frozenset({ENTRY_PRIORITY, SKIP_PRIORITY, RULE_PRIORITY, CATCH_PRIORITY})
_IFINFO = struct.Struct("=BxHiII")  # family, type, index, flags, change
_IFADDR = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
_RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, proto, ..


def concerns(datagram: bytes, proto: int, iface: str, table: int) -> bool:
    """Whether any message of one notification datagram (``proto``: NETLINK_ROUTE or
    NETLINK_NETFILTER) can concern the group of ``iface`` and ``table``."""
    return bool(affected(datagram, proto, {iface: table}))


def affected(datagram: bytes, proto: int, groups: Mapping[str, int]) -> set[str]:
    """The groups (interface -> routing table) that a notification datagram can concern:
    every message is read once, whatever the number of groups."""
    tables = {table: iface for iface, table in groups.items()}
    found: set[str] = set()
    try:
        for kind, _flags, _seq, msg in nlmsg.split(datagram):
            body = msg[nlmsg.HEADER.size:]
            if proto == nlmsg.NETLINK_NETFILTER:
                hit: object = ALL if _nft_concerns(kind, body) else None
            else:
                hit = _rtnl_affected(kind, body, tables)
            if hit is ALL:
                return set(groups)
            if isinstance(hit, str) and hit in groups:
                found.add(hit)
    except (OSError, struct.error, UnicodeDecodeError, KeyError):
        return set(groups)
    return found


ALL = object()  # a message that can concern every group


def _name(index: int) -> str | None:
    try:
        return socket.if_indextoname(index)
    except OSError:  # gone meanwhile
        return None


def _rtnl_affected(kind: int, body: bytes, tables: Mapping[int, str]) -> object:
    """The interface of the one group a message can concern, ALL, or None."""
    if kind in (RTM_NEWLINK, RTM_DELLINK):
        name = nlmsg.attrs(body, _IFINFO.size).get(IFLA_IFNAME)
        return ALL if name is None else name.rstrip(b"\0").decode()
    if kind in (RTM_NEWADDR, RTM_DELADDR):
        owner = _name(_IFADDR.unpack_from(body)[4])
        return ALL if owner is None else owner
    if kind in (RTM_NEWROUTE, RTM_DELROUTE):
        fields = _RTMSG.unpack_from(body)
        found = nlmsg.attrs(body, _RTMSG.size)
        in_table = struct.unpack("=I", found[RTA_TABLE])[0] if RTA_TABLE in found \
            else fields[4]
        if in_table in tables:
            return tables[in_table] if kind == RTM_DELROUTE else None
        if in_table != MAIN_TABLE:
            return None
        oif = found.get(RTA_OIF)
        through = None if oif is None else _name(struct.unpack("=I", oif)[0])
        return ALL if through is None else through
    if kind == RTM_NEWRULE:
        return None
    if kind == RTM_DELRULE:
        found = nlmsg.attrs(body, 12)  # fib_rule_hdr
        rule_table = struct.unpack("=I", found[FRA_TABLE])[0] if FRA_TABLE in found else 0
        priority = struct.unpack("=I", found[FRA_PRIORITY])[0] if FRA_PRIORITY in found \
            else 0
        if rule_table in tables:
            return tables[rule_table]
        # the shared rules (entry, skip, buckets, catch-all); a group rule's band with a
        # table no group has is a group's own teardown (or one that ended)
        return ALL if priority in _SHARED else None
    return ALL  # a type we do not know


def _nft_concerns(kind: int, body: bytes) -> bool:
    if kind >> 8 != NFNL_SUBSYS_NFTABLES:
        return False
    if kind & 0xFF not in NFT_REMOVALS:
        return False
    name = nlmsg.attrs(body, nlmsg.NFGEN.size).get(1)  # NFTA_*_TABLE / NFTA_TABLE_NAME
    return name is None or name.rstrip(b"\0").decode() == NFT_TABLE
