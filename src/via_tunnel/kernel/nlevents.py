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
* nftables objects removed from our table (``nft flush ruleset``, a rule, a set); elements
  removed only when one of them is the group's (its mark is in the element's key or data):
  every teardown deletes its own group's elements, and would otherwise make the watcher
  check every group's (a listing of every set and map, the cgroup maps' costing a walk of
  the cgroup tree per element: seconds at a thousand groups).
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
    TABLE_BASE,
    mark_for_slot,
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
NFT_ELEMENT_REMOVALS = frozenset({14, 30})  # DELSETELEM, DESTROYSETELEM
NFTA_LIST_SET, NFTA_LIST_ELEMENTS = 2, 3  # NFTA_SET_ELEM_LIST_*
NFTA_LIST_ELEM, NFTA_ELEM_KEY, NFTA_ELEM_DATA, NFTA_DATA_VALUE = 1, 1, 2, 1
# Our sets and maps by where an element holds its group's mark (host byte order, as nft
# keeps `meta mark`): first in the key, or as the data. ruleset.nft and nftplan name them.
MARK_IN_KEY = frozenset({"group_oifs", "tx", "rx", "v6_blocked", "dns4", "dns6", "draining"})
MARK_IN_DATA = frozenset({"iif_marks", "classid_marks"})  # and the groups_l<level> maps
NO_GROUPS = frozenset({"udp_in4", "udp_in6"})  # flows that came in, expiring by themselves
_MARK = struct.Struct("=I")
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
                hit = _nft_affected(kind, body, tables)
                if isinstance(hit, set):
                    found |= hit
                    continue
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


def _nft_affected(kind: int, body: bytes, tables: Mapping[int, str]) -> object:
    """ALL, None, or the set of groups whose elements a removal of elements took."""
    if kind >> 8 != NFNL_SUBSYS_NFTABLES or kind & 0xFF not in NFT_REMOVALS:
        return None
    found = nlmsg.attrs(body, nlmsg.NFGEN.size)
    name = found.get(1)  # NFTA_*_TABLE / NFTA_TABLE_NAME
    if name is not None and name.rstrip(b"\0").decode() != NFT_TABLE:
        return None
    if name is None or kind & 0xFF not in NFT_ELEMENT_REMOVALS:
        return ALL
    marks = _removed_marks(found)
    if marks is None:
        return ALL
    return {iface for table, iface in tables.items() if _mark_of_table(table) in marks}


def _removed_marks(found: Mapping[int, bytes]) -> set[int] | None:
    """The marks of the elements in a DELSETELEM message's attributes; None when they
    cannot be told (a set we do not know, an element without its mark)."""
    set_name = found.get(NFTA_LIST_SET, b"").rstrip(b"\0").decode()
    if set_name in NO_GROUPS:
        return set()
    in_key = set_name in MARK_IN_KEY
    if not in_key and set_name not in MARK_IN_DATA and not set_name.startswith("groups_l"):
        return None
    marks: set[int] = set()
    for kind, elem in nlmsg.attr_list(found.get(NFTA_LIST_ELEMENTS, b"")):
        if kind != NFTA_LIST_ELEM:
            return None
        part = nlmsg.attrs(elem).get(NFTA_ELEM_KEY if in_key else NFTA_ELEM_DATA)
        value = nlmsg.attrs(part or b"").get(NFTA_DATA_VALUE, b"")
        if len(value) < _MARK.size:
            return None
        marks.add(_MARK.unpack_from(value)[0])
    return marks


def _mark_of_table(table: int) -> int | None:
    try:
        return mark_for_slot(table - TABLE_BASE)
    except ValueError:
        return None
