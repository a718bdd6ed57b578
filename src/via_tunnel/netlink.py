"""Thin adapter over pyroute2: read interface facts, apply and remove routes and rules.

Adds tolerate "already exists" and deletes tolerate "not there", so applying or removing a
plan twice is harmless (cleanup may repeat work a crashed run half did).
"""

from __future__ import annotations

import errno
import ipaddress
from collections.abc import Iterable
from socket import AF_INET, AF_INET6
from typing import Any

from via_tunnel.errors import KernelError, ViaTunnelError
from via_tunnel.plan import LinkFacts, RouteSpec, RuleSpec

IFF_UP = 0x1
IFF_POINTOPOINT = 0x10
IFF_LOWER_UP = 0x10000
MAIN_TABLE = 254
RT_SCOPE_LINK = 253
RTN_UNICAST = 1

_ADD_OK = {errno.EEXIST}
_DEL_OK = {errno.ENOENT, errno.ESRCH, errno.EADDRNOTAVAIL}


def open_iproute() -> Any:
    """An rtnetlink socket (pyroute2 ``IPRoute``), imported lazily: it is the slow part."""
    from via_tunnel.pyroute2_lazy import iproute_class

    return iproute_class()()


def _table(msg: Any) -> int:
    return int(msg.get_attr("RTA_TABLE") or msg.get("table"))


def lookup_link(ipr: Any, name: str) -> tuple[int, Any]:
    """The index and RTM_NEWLINK message of interface ``name``; one clear error if absent."""
    idx = ipr.link_lookup(ifname=name)
    if not idx:
        raise ViaTunnelError(f"interface {name} does not exist")
    return idx[0], next(iter(ipr.get_links(idx[0])))


def link_facts(name: str) -> LinkFacts:
    """Gather what planning needs about interface ``name``; raise if it does not exist."""
    with open_iproute() as ipr:
        index, link = lookup_link(ipr, name)
        flags = int(link["flags"])
        has_l2 = bool(link.get_attr("IFLA_ADDRESS"))
        v4: list[str] = []
        v6: list[str] = []
        for a in ipr.get_addr(index=index):
            addr = a.get_attr("IFA_ADDRESS")
            if a["family"] == AF_INET:
                v4.append(f"{a.get_attr('IFA_LOCAL') or addr}/{a['prefixlen']}")
            elif a["family"] == AF_INET6 and a["scope"] == 0:  # scope global (not is_global:
                # that excludes documentation and ULA prefixes, which are real on tunnels)
                v6.append(f"{addr}/{a['prefixlen']}")
        gw4, conn4 = _main_routes(ipr, AF_INET, index)
        gw6, conn6 = _main_routes(ipr, AF_INET6, index)
    return LinkFacts(
        name=name, index=index,
        up=bool(flags & IFF_UP) and bool(flags & IFF_LOWER_UP),
        pointopoint=bool(flags & IFF_POINTOPOINT) or not has_l2,
        ipv4=tuple(v4), ipv6_global=tuple(v6), gateway4=gw4, gateway6=gw6,
        connected4=tuple(conn4), connected6=tuple(conn6), mtu=link.get_attr("IFLA_MTU"),
    )


def _main_routes(ipr: Any, family: int, index: int) -> tuple[str | None, list[str]]:
    """The best next hop through ``index`` in the main table, and its link routes."""
    best: tuple[int, str] | None = None
    connected: list[str] = []
    for r in ipr.get_routes(family=family, table=MAIN_TABLE):
        if r.get_attr("RTA_OIF") != index or _table(r) != MAIN_TABLE:
            continue
        if r["type"] != RTN_UNICAST:
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


def _route_args(spec: RouteSpec) -> dict[str, Any]:
    dst = ("0.0.0.0/0" if spec.family == AF_INET else "::/0") if spec.dst == "default" else spec.dst
    args: dict[str, Any] = {"family": spec.family, "dst": dst, "table": spec.table,
                            "priority": spec.metric, "type": spec.kind}
    if spec.oif is not None:
        args["oif"] = spec.oif
    if spec.gateway:
        args["gateway"] = spec.gateway
    return args


def _rule_args(spec: RuleSpec) -> dict[str, Any]:
    return {"family": spec.family, "priority": spec.priority, "fwmark": spec.fwmark,
            "fwmask": spec.fwmask, "table": spec.table}


def _tolerating(codes: set[int], what: str, call: Any, *args: Any, **kwargs: Any) -> None:
    """Run one netlink change; errnos in ``codes`` mean "already so" and are fine."""
    from via_tunnel.pyroute2_lazy import netlink_error

    try:
        call(*args, **kwargs)
    except netlink_error() as exc:
        if getattr(exc, "code", None) not in codes:
            raise KernelError(f"cannot {what}: {exc}") from exc


def apply(rules: Iterable[RuleSpec], routes: Iterable[RouteSpec]) -> None:
    """Add routes first, then rules: a rule never points at a table not yet filled."""
    with open_iproute() as ipr:
        for route in routes:
            _tolerating(_ADD_OK, f"add route {route}", ipr.route, "add", **_route_args(route))
        for rule in rules:
            _tolerating(_ADD_OK, f"add ip rule {rule}", ipr.rule, "add", **_rule_args(rule))


def remove(rules: Iterable[RuleSpec], tables: Iterable[int]) -> None:
    """Remove ``rules`` and flush every route in ``tables`` (tables we own entirely)."""
    with open_iproute() as ipr:
        for rule in rules:
            _tolerating(_DEL_OK, f"remove ip rule {rule}", ipr.rule, "del", **_rule_args(rule))
        for table in tables:
            for family in (AF_INET, AF_INET6):
                for r in list(ipr.get_routes(family=family, table=table)):
                    if _table(r) == table:
                        _tolerating(_DEL_OK, "remove route", ipr.route, "del",
                                    **_dump_to_del(r, family, table))


def _dump_to_del(r: Any, family: int, table: int) -> dict[str, Any]:
    dst = r.get_attr("RTA_DST") or ("0.0.0.0" if family == AF_INET else "::")
    args: dict[str, Any] = {"family": family, "table": table, "dst": f"{dst}/{r['dst_len']}",
                            "type": r["type"]}
    prio = r.get_attr("RTA_PRIORITY")
    if prio is not None:
        args["priority"] = prio
    oif = r.get_attr("RTA_OIF")
    if oif is not None:
        args["oif"] = oif
    return args


def our_rules_and_tables(
    rules: Iterable[RuleSpec], tables: Iterable[int]
) -> tuple[list[RuleSpec], list[int]]:
    """Which of ``rules`` exist, and which of ``tables`` hold routes (for cleanup sweeps)."""
    wanted = {(r.family, r.priority, r.fwmark, r.fwmask, r.table): r for r in rules}
    table_set = set(tables)
    found_rules: list[RuleSpec] = []
    found_tables: set[int] = set()
    with open_iproute() as ipr:
        for family in (AF_INET, AF_INET6):
            for msg in ipr.get_rules(family=family):
                key = (family, msg.get_attr("FRA_PRIORITY") or 0,
                       msg.get_attr("FRA_FWMARK") or 0, msg.get_attr("FRA_FWMASK") or 0,
                       msg.get_attr("FRA_TABLE") or msg["table"])
                if key in wanted:
                    found_rules.append(wanted[key])
            for r in ipr.get_routes(family=family):  # every table (table=0 matched none)
                t = _table(r)
                if t in table_set:
                    found_tables.add(t)
    return found_rules, sorted(found_tables)
