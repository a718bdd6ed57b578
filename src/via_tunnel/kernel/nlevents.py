"""Which netlink notifications can concern one group (pure parsing, plus interface names).

A watcher wakes on every rtnetlink and nftables notification of the host, most of them
about other groups' setups (their links, routes, rules and set elements). Repairing on each
costs every watcher the global lock and listings of our table, for every change of every
group: O(groups²) work per change. :func:`concerns` lets a watcher skip what cannot have
broken its group, and is conservative: a message it cannot read concerns the group.

What concerns the group of interface IFACE with routing table TABLE:
* links and addresses of IFACE (up, down, gone, re-created, readdressed);
* routes removed from TABLE; routes of the main table through IFACE (its next hop);
* ip rules removed from TABLE or from our band (priority 0 and 5099-5133: shared rules);
* nftables objects removed from our table (``nft flush ruleset``, a rule, a set, elements).
Additions to TABLE and to our table are our own setups and repairs, and never break a group.
"""

from __future__ import annotations

import socket
import struct

from via_tunnel.core.settings import CATCH_PRIORITY, ENTRY_PRIORITY, NFT_TABLE, SKIP_PRIORITY
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
_OUR_BAND = range(SKIP_PRIORITY, CATCH_PRIORITY + 1)
_IFINFO = struct.Struct("=BxHiII")  # family, type, index, flags, change
_IFADDR = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
_RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, proto, ..


def concerns(datagram: bytes, proto: int, iface: str, table: int) -> bool:
    """Whether any message of one notification datagram (``proto``: NETLINK_ROUTE or
    NETLINK_NETFILTER) can concern the group of ``iface`` and ``table``."""
    try:
        for kind, _flags, _seq, msg in nlmsg.split(datagram):
            body = msg[nlmsg.HEADER.size:]
            if proto == nlmsg.NETLINK_NETFILTER:
                if _nft_concerns(kind, body):
                    return True
            elif _rtnl_concerns(kind, body, iface, table):
                return True
    except (OSError, struct.error, UnicodeDecodeError):
        return True
    return False


def _name(index: int) -> str | None:
    try:
        return socket.if_indextoname(index)
    except OSError:  # gone meanwhile
        return None


def _rtnl_concerns(kind: int, body: bytes, iface: str, table: int) -> bool:
    if kind in (RTM_NEWLINK, RTM_DELLINK):
        name = nlmsg.attrs(body, _IFINFO.size).get(IFLA_IFNAME)
        return name is None or name.rstrip(b"\0").decode() == iface
    if kind in (RTM_NEWADDR, RTM_DELADDR):
        owner = _name(_IFADDR.unpack_from(body)[4])
        return owner is None or owner == iface
    if kind in (RTM_NEWROUTE, RTM_DELROUTE):
        fields = _RTMSG.unpack_from(body)
        found = nlmsg.attrs(body, _RTMSG.size)
        in_table = struct.unpack("=I", found[RTA_TABLE])[0] if RTA_TABLE in found \
            else fields[4]
        if in_table == table:
            return kind == RTM_DELROUTE
        if in_table != MAIN_TABLE:
            return False
        oif = found.get(RTA_OIF)
        return oif is None or _name(struct.unpack("=I", oif)[0]) in (None, iface)
    if kind == RTM_NEWRULE:
        return False
    if kind == RTM_DELRULE:
        found = nlmsg.attrs(body, 12)  # fib_rule_hdr
        rule_table = struct.unpack("=I", found[FRA_TABLE])[0] if FRA_TABLE in found else 0
        priority = struct.unpack("=I", found[FRA_PRIORITY])[0] if FRA_PRIORITY in found \
            else 0
        return rule_table == table or priority == ENTRY_PRIORITY or priority in _OUR_BAND
    return True  # a type we do not know


def _nft_concerns(kind: int, body: bytes) -> bool:
    if kind >> 8 != NFNL_SUBSYS_NFTABLES:
        return False
    if kind & 0xFF not in NFT_REMOVALS:
        return False
    name = nlmsg.attrs(body, nlmsg.NFGEN.size).get(1)  # NFTA_*_TABLE / NFTA_TABLE_NAME
    return name is None or name.rstrip(b"\0").decode() == NFT_TABLE
