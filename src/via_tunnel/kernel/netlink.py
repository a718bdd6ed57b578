"""Thin adapter over rtnetlink (rtnl.py): read interface facts, apply and remove routes
and rules.

Adds tolerate "already exists" and deletes tolerate "not there", so applying or removing a
plan twice is harmless (cleanup may repeat work a crashed run half did).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable
from socket import AF_INET, AF_INET6
from typing import TYPE_CHECKING, Any

from via_tunnel.core.errors import KernelError, ViaTunnelError
from via_tunnel.kernel.ifflags import IFF_POINTOPOINT, is_up
from via_tunnel.kernel.nlmsg import RT_SCOPE_UNIVERSE

if TYPE_CHECKING:  # (the planner's dataclasses cost ~9 ms to import; `status` needs none)
    from via_tunnel.core.plan import LinkFacts, RouteSpec, RuleSpec
    from via_tunnel.kernel.rtnl import Rtnl

MAIN_TABLE = 254
RT_SCOPE_LINK = 253
RTN_UNICAST = 1
RTN_UNREACHABLE = 7
_KINDS = {"unicast": RTN_UNICAST, "unreachable": RTN_UNREACHABLE}

_ADD_OK = {errno.EEXIST}
_DEL_OK = {errno.ENOENT, errno.ESRCH, errno.EADDRNOTAVAIL}


def open_rtnl() -> Rtnl:
    """An rtnetlink socket, imported lazily (the message classes are the slow part)."""
    from via_tunnel.kernel.rtnl import Rtnl

    return Rtnl()


def preload() -> None:
    """Import the rtnetlink message classes now, before they are needed."""
    import via_tunnel.kernel.rtnl  # noqa: F401


_families: tuple[int, ...] | None = None


def families() -> tuple[int, ...]:
    """The address families this kernel has: IPv6 is absent with ``ipv6.disable=1`` (then
    no IPv6 packet can exist, and IPv6 rules and routes can neither be added nor needed).
    Looked up once per process."""
    global _families
    if _families is None:
        _families = (AF_INET, AF_INET6) if os.path.isdir("/proc/sys/net/ipv6") else (AF_INET,)
    return _families


def lookup_link(rt: Rtnl, name: str) -> tuple[int, Any]:
    """The index and RTM_NEWLINK message of interface ``name``; one clear error if absent
    or if ``name`` is only an alternative name (the nft rules match the real one)."""
    from via_tunnel.kernel.rtnl import NetlinkError

    try:
        link = rt.link(name)
    except NetlinkError as exc:
        raise KernelError(f"cannot look up interface {name}: {exc.strerror}") from exc
    if link is None:
        raise ViaTunnelError(f"interface {name} does not exist")
    real = link.get_attr("IFLA_IFNAME")
    if real != name:
        raise ViaTunnelError(f"{name} is an alternative name of interface {real}: "
                             f"name {real} instead")
    return int(link["index"]), link


def link_addresses(rt: Rtnl, index: int,
                   name: str) -> tuple[list[tuple[str, int, str | None]], list[str]]:
    """The addresses of interface ``index``: IPv4 as ``(local, prefixlen, peer)`` (peer:
    the other end of a point-to-point address, else None) and global IPv6 as
    ``"addr/len"``. One clear error if the kernel refuses (the interface vanished since it
    was looked up)."""
    from via_tunnel.kernel.rtnl import NetlinkError

    try:
        msgs = rt.addresses(index)
    except NetlinkError as exc:
        raise KernelError(f"cannot read the addresses of {name}: {exc.strerror}") from exc
    return _split_addresses(msgs)


def _split_addresses(msgs: Iterable[Any]) -> tuple[list[tuple[str, int, str | None]],
                                                   list[str]]:
    v4: list[tuple[str, int, str | None]] = []
    v6: list[str] = []
    for a in msgs:
        address = a.get_attr("IFA_ADDRESS")
        if a["family"] == AF_INET:
            # On a point-to-point address IFA_ADDRESS is the peer's, IFA_LOCAL ours.
            local = a.get_attr("IFA_LOCAL") or address
            v4.append((local, int(a["prefixlen"]),
                       address if address and address != local else None))
        elif a["family"] == AF_INET6 and a["scope"] == RT_SCOPE_UNIVERSE:
            # The kernel's scope, not ipaddress.is_global: documentation and ULA prefixes
            # are real on tunnels and route like any other.
            v6.append(f"{address}/{a['prefixlen']}")
    return v4, v6


def link_states(names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """For ``status``: each named interface's state ("up", "down" or "absent"), MTU and
    addresses, from one dump of the links and one of the addresses, however many."""
    from via_tunnel.kernel.rtnl import NetlinkError

    wanted = set(names)
    try:
        with open_rtnl() as rt:
            links = {link.get_attr("IFLA_IFNAME"): link for link in rt.links()}
            by_index: dict[int, list[Any]] = {}
            for a in rt.addresses(None):
                by_index.setdefault(int(a["index"]), []).append(a)
    except NetlinkError as exc:
        raise KernelError(f"cannot list interfaces: {exc.strerror}") from exc
    out: dict[str, dict[str, Any]] = {}
    for name in wanted:
        link = links.get(name)
        if link is None:
            out[name] = {"state": "absent", "mtu": None, "addresses": []}
            continue
        v4, v6 = _split_addresses(by_index.get(int(link["index"]), []))
        out[name] = {"state": "up" if is_up(int(link["flags"])) else "down",
                     "mtu": link.get_attr("IFLA_MTU"),
                     "addresses": [*(f"{local}/{plen}" for local, plen, _ in v4), *v6]}
    return out


def link_facts(name: str) -> LinkFacts:
    """Gather what planning needs about interface ``name``; raise if it does not exist."""
    from via_tunnel.core.plan import LinkFacts

    with open_rtnl() as rt:
        index, link = lookup_link(rt, name)
        flags = int(link["flags"])
        has_l2 = bool(link.get_attr("IFLA_ADDRESS"))
        v4, v6 = link_addresses(rt, index, name)
        gw4, conn4 = _main_routes(rt, AF_INET, index)
        gw6, conn6 = _main_routes(rt, AF_INET6, index)
    return LinkFacts(
        name=name, index=index,
        up=is_up(flags),
        pointopoint=bool(flags & IFF_POINTOPOINT) or not has_l2,
        ipv4=tuple(f"{local}/{plen}" for local, plen, _peer in v4), ipv6_global=tuple(v6),
        gateway4=gw4, gateway6=gw6, peer4=next((peer for *_, peer in v4 if peer), None),
        connected4=tuple(conn4), connected6=tuple(conn6), mtu=link.get_attr("IFLA_MTU"),
    )


def _main_routes(rt: Rtnl, family: int, index: int) -> tuple[str | None, list[str]]:
    """The best next hop through ``index`` in the main table, and its link routes (none of
    a family the kernel lacks)."""
    import ipaddress

    best: tuple[int, str] | None = None
    connected: list[str] = []
    for r in _routes(rt, family, MAIN_TABLE, oif=index):  # the kernel filters: not the
        if r.get_attr("RTA_OIF") != index or r["type"] != RTN_UNICAST:  # whole main table
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


def _routes(rt: Rtnl, family: int, table: int | None, oif: int | None = None) -> list[Any]:
    """The routes of ``family`` (in ``table``, through ``oif``); none of a family this
    kernel lacks."""
    from via_tunnel.kernel.rtnl import NetlinkError

    if family not in families():
        return []
    try:
        return rt.routes(family, table, oif)
    except NetlinkError as exc:
        raise KernelError(f"cannot {exc.strerror}") from exc


def _dst(spec: RouteSpec) -> tuple[str | None, int]:
    import ipaddress

    if spec.dst == "default":
        return None, 0
    net = ipaddress.ip_network(spec.dst, strict=False)
    return str(net.network_address), net.prefixlen


def _check(codes: list[int], whats: list[str], ok: set[int]) -> None:
    """Raise for the first answer of a :meth:`Rtnl.change_all` that is neither done nor one
    of ``ok`` (errnos that mean "already so")."""
    for code, what in zip(codes, whats, strict=True):
        if code and code not in ok:
            raise KernelError(f"cannot {what}: {os.strerror(code)}")


def _rule_args(spec: RuleSpec) -> dict[str, Any]:
    return {"family": spec.family, "priority": spec.priority, "fwmark": spec.fwmark,
            "fwmask": spec.fwmask, "table": spec.table, "action": spec.action,
            "goto": spec.goto, "invert": spec.invert}


def apply(rules: Iterable[RuleSpec], routes: Iterable[RouteSpec]) -> None:
    """Add routes first, then rules: a rule never points at a table not yet filled. Those
    of a family the kernel lacks are left out. Each kind goes in one round trip (the kernel
    takes them in order); on a refusal the caller's rollback removes what did go in."""
    from via_tunnel.kernel.rtnl import add_route_request, rule_request

    have = families()
    routes = [r for r in routes if r.family in have]
    rules = [r for r in rules if r.family in have]
    with open_rtnl() as rt:
        requests = []
        for route in routes:
            dst, dst_len = _dst(route)
            requests.append(add_route_request(
                family=route.family, table=route.table, dst=dst, dst_len=dst_len,
                kind=_KINDS[route.kind], oif=route.oif, gateway=route.gateway,
                metric=route.metric))
        _check(rt.change_all(requests, "add routes"), [f"add route {r}" for r in routes],
               _ADD_OK)
        _check(rt.change_all([rule_request(add=True, **_rule_args(r)) for r in rules],
                             "add ip rules"),
               [f"add ip rule {r}" for r in rules], _ADD_OK)


def remove(rules: Iterable[RuleSpec], tables: Iterable[int]) -> None:
    """Remove ``rules`` and flush every route in ``tables`` (tables we own entirely): the
    rules in one round trip, then per table and family a dump and one round trip."""
    from via_tunnel.kernel.rtnl import delete_route_request, rule_request

    have = families()
    rules = [r for r in rules if r.family in have]
    with open_rtnl() as rt:
        _check(rt.change_all([rule_request(add=False, **_rule_args(r)) for r in rules],
                             "remove ip rules"),
               [f"remove ip rule {r}" for r in rules], _DEL_OK)
        for table in tables:
            for family in have:
                found = _routes(rt, family, table)
                requests = [delete_route_request(
                    family=family, table=table, dst=r.get_attr("RTA_DST"),
                    dst_len=int(r["dst_len"]), kind=int(r["type"]),
                    oif=r.get_attr("RTA_OIF"), metric=r.get_attr("RTA_PRIORITY"))
                    for r in found]
                whats = [f"remove route {r.get_attr('RTA_DST') or 'default'}/{r['dst_len']} "
                         f"from table {table}" for r in found]
                _check(rt.change_all(requests, "remove routes"), whats, _DEL_OK)


PER_TABLE_DUMPS = 16  # more tables than this: one dump of every table instead


def our_rules_and_tables(
    rules: Iterable[RuleSpec], tables: Iterable[int]
) -> tuple[list[RuleSpec], list[int]]:
    """Which of ``rules`` exist, and which of ``tables`` hold routes (for cleanup sweeps).
    Each table is dumped on its own: the kernel filters, so a host with a full routing
    table is not read through Python."""
    from via_tunnel.kernel.nlmsg import FIB_RULE_INVERT
    from via_tunnel.kernel.rtnl import RULE_ACTIONS, NetlinkError, route_table

    action_names = {number: name for name, number in RULE_ACTIONS.items()}
    wanted_tables = set(tables)
    wanted = {(r.family, r.priority, r.fwmark, r.fwmask, r.table, r.action, r.goto,
               r.invert): r for r in rules}
    found_rules: list[RuleSpec] = []
    found_tables: set[int] = set()
    with open_rtnl() as rt:
        for family in families():
            try:
                msgs = rt.rules(family)
            except NetlinkError as exc:
                raise KernelError(f"cannot {exc.strerror}") from exc
            for msg in msgs:
                action = action_names.get(int(msg["action"]), "")
                table = msg.get_attr("FRA_TABLE") or msg["table"]
                key = (family, msg.get_attr("FRA_PRIORITY") or 0,
                       msg.get_attr("FRA_FWMARK") or 0, msg.get_attr("FRA_FWMASK") or 0,
                       table if action == "lookup" else 0, action,
                       msg.get_attr("FRA_GOTO") or 0,
                       bool(int(msg["flags"]) & FIB_RULE_INVERT))
                if key in wanted:
                    found_rules.append(wanted[key])
            if len(wanted_tables) > PER_TABLE_DUMPS:  # one dump beats thousands
                found_tables.update(route_table(r) for r in _routes(rt, family, None)
                                    if route_table(r) in wanted_tables)
            else:
                found_tables.update(t for t in wanted_tables if _routes(rt, family, t))
    return found_rules, sorted(found_tables)
