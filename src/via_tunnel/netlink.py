"""Thin adapter over rtnetlink (rtnl.py): read interface facts, apply and remove routes
and rules.

Adds tolerate "already exists" and deletes tolerate "not there", so applying or removing a
plan twice is harmless (cleanup may repeat work a crashed run half did).
"""

from __future__ import annotations

import errno
import ipaddress
from collections.abc import Callable, Iterable
from socket import AF_INET, AF_INET6
from typing import TYPE_CHECKING, Any

from via_tunnel.errors import KernelError, ViaTunnelError
from via_tunnel.plan import LinkFacts, RouteSpec, RuleSpec

if TYPE_CHECKING:
    from via_tunnel.rtnl import Rtnl

IFF_UP = 0x1
IFF_POINTOPOINT = 0x10
IFF_LOWER_UP = 0x10000
MAIN_TABLE = 254
RT_SCOPE_LINK = 253
RTN_UNICAST = 1
RTN_UNREACHABLE = 7
_KINDS = {"unicast": RTN_UNICAST, "unreachable": RTN_UNREACHABLE}

_ADD_OK = {errno.EEXIST}
_DEL_OK = {errno.ENOENT, errno.ESRCH, errno.EADDRNOTAVAIL}


def open_rtnl() -> Rtnl:
    """An rtnetlink socket, imported lazily (the message classes are the slow part)."""
    from via_tunnel.rtnl import Rtnl

    return Rtnl()


def preload() -> None:
    """Import the rtnetlink message classes now, before they are needed."""
    import via_tunnel.rtnl  # noqa: F401


def lookup_link(rt: Rtnl, name: str) -> tuple[int, Any]:
    """The index and RTM_NEWLINK message of interface ``name``; one clear error if absent."""
    link = rt.link(name)
    if link is None:
        raise ViaTunnelError(f"interface {name} does not exist")
    return int(link["index"]), link


def link_facts(name: str) -> LinkFacts:
    """Gather what planning needs about interface ``name``; raise if it does not exist."""
    with open_rtnl() as rt:
        index, link = lookup_link(rt, name)
        flags = int(link["flags"])
        has_l2 = bool(link.get_attr("IFLA_ADDRESS"))
        v4: list[str] = []
        v6: list[str] = []
        for a in rt.addresses(index):
            addr = a.get_attr("IFA_ADDRESS")
            if a["family"] == AF_INET:
                v4.append(f"{a.get_attr('IFA_LOCAL') or addr}/{a['prefixlen']}")
            elif a["family"] == AF_INET6 and a["scope"] == 0:  # scope global (not is_global:
                # that excludes documentation and ULA prefixes, which are real on tunnels)
                v6.append(f"{addr}/{a['prefixlen']}")
        gw4, conn4 = _main_routes(rt, AF_INET, index)
        gw6, conn6 = _main_routes(rt, AF_INET6, index)
    return LinkFacts(
        name=name, index=index,
        up=bool(flags & IFF_UP) and bool(flags & IFF_LOWER_UP),
        pointopoint=bool(flags & IFF_POINTOPOINT) or not has_l2,
        ipv4=tuple(v4), ipv6_global=tuple(v6), gateway4=gw4, gateway6=gw6,
        connected4=tuple(conn4), connected6=tuple(conn6), mtu=link.get_attr("IFLA_MTU"),
    )


def _main_routes(rt: Rtnl, family: int, index: int) -> tuple[str | None, list[str]]:
    """The best next hop through ``index`` in the main table, and its link routes."""
    best: tuple[int, str] | None = None
    connected: list[str] = []
    for r in _routes_or_none(rt, family, MAIN_TABLE):
        if r.get_attr("RTA_OIF") != index or r["type"] != RTN_UNICAST:
            continue
        gw = r.get_attr("RTA_GATEWAY")
        plen = int(r["dst_len"])
        if gw:
            if best is None or plen < best[0]:
                best = (plen, gw)
        elif r["scope"] == RT_SCOPE_LINK and plen > 0:
            dst = r.get_attr("RTA_DST")
            if family == AF_INET6 and ipaddress.IPv6Address(dst).is_link_local:
                continue
            connected.append(f"{dst}/{plen}")
    return (best[1] if best else None), connected


def _routes_or_none(rt: Rtnl, family: int, table: int | None) -> list[Any]:
    """The routes of ``family`` (in ``table``); none where the family is off (IPv6
    disabled answers the dump with EAFNOSUPPORT)."""
    from via_tunnel.rtnl import NetlinkError

    try:
        return rt.routes(family, table)
    except NetlinkError as exc:
        if family == AF_INET6 and exc.code == errno.EAFNOSUPPORT:
            return []
        raise KernelError(f"cannot list routes: {exc}") from exc


def _dst(spec: RouteSpec) -> tuple[str | None, int]:
    if spec.dst == "default":
        return None, 0
    net = ipaddress.ip_network(spec.dst, strict=False)
    return str(net.network_address), net.prefixlen


def _tolerating(codes: set[int], what: str, call: Callable[..., None], **kwargs: Any) -> None:
    """Run one netlink change; errnos in ``codes`` mean "already so" and are fine."""
    from via_tunnel.rtnl import NetlinkError

    try:
        call(what=what, **kwargs)
    except NetlinkError as exc:
        if exc.code not in codes:
            raise KernelError(f"cannot {exc.strerror}") from exc


def _rule_args(spec: RuleSpec) -> dict[str, Any]:
    return {"family": spec.family, "priority": spec.priority, "fwmark": spec.fwmark,
            "fwmask": spec.fwmask, "table": spec.table}


def apply(rules: Iterable[RuleSpec], routes: Iterable[RouteSpec]) -> None:
    """Add routes first, then rules: a rule never points at a table not yet filled."""
    with open_rtnl() as rt:
        for route in routes:
            dst, dst_len = _dst(route)
            _tolerating(_ADD_OK, f"add route {route}", rt.add_route, family=route.family,
                        table=route.table, dst=dst, dst_len=dst_len, kind=_KINDS[route.kind],
                        oif=route.oif, gateway=route.gateway, metric=route.metric)
        for rule in rules:
            _tolerating(_ADD_OK, f"add ip rule {rule}", rt.add_rule, **_rule_args(rule))


def remove(rules: Iterable[RuleSpec], tables: Iterable[int]) -> None:
    """Remove ``rules`` and flush every route in ``tables`` (tables we own entirely)."""
    with open_rtnl() as rt:
        for rule in rules:
            _tolerating(_DEL_OK, f"remove ip rule {rule}", rt.delete_rule, **_rule_args(rule))
        for table in tables:
            for family in (AF_INET, AF_INET6):
                for r in _routes_or_none(rt, family, table):
                    _tolerating(_DEL_OK, "remove route", rt.delete_route, family=family,
                                table=table, dst=r.get_attr("RTA_DST"),
                                dst_len=int(r["dst_len"]), kind=int(r["type"]),
                                oif=r.get_attr("RTA_OIF"), metric=r.get_attr("RTA_PRIORITY"))


def our_rules_and_tables(
    rules: Iterable[RuleSpec], tables: Iterable[int]
) -> tuple[list[RuleSpec], list[int]]:
    """Which of ``rules`` exist, and which of ``tables`` hold routes (for cleanup sweeps)."""
    from via_tunnel.rtnl import route_table

    wanted = {(r.family, r.priority, r.fwmark, r.fwmask, r.table): r for r in rules}
    table_set = set(tables)
    found_rules: list[RuleSpec] = []
    found_tables: set[int] = set()
    with open_rtnl() as rt:
        for family in (AF_INET, AF_INET6):
            for msg in rt.rules(family):
                key = (family, msg.get_attr("FRA_PRIORITY") or 0,
                       msg.get_attr("FRA_FWMARK") or 0, msg.get_attr("FRA_FWMASK") or 0,
                       msg.get_attr("FRA_TABLE") or msg["table"])
                if key in wanted:
                    found_rules.append(wanted[key])
            for r in _routes_or_none(rt, family, None):
                t = route_table(r)
                if t in table_set:
                    found_tables.add(t)
    return found_rules, sorted(found_tables)
