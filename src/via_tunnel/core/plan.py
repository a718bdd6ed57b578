"""Pure planning: from facts about an interface to what must exist in the kernel.

Nothing here touches the system. The adapters (:mod:`via_tunnel.kernel.nft`,
:mod:`via_tunnel.kernel.netlink`) apply what these functions return, and the same plan drives both
setup and teardown, so the two can never disagree about what "ours" is.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from socket import AF_INET, AF_INET6
from typing import Literal

from via_tunnel.core.errors import ViaTunnelError
from via_tunnel.core.settings import (
    BUCKET_BASE,
    BUCKET_MASK,
    BUCKETS,
    CATCH_PRIORITY,
    ENTRY_PRIORITY,
    MARK_FLAG,
    MARK_MASK,
    RULE_PRIORITY,
    SKIP_PRIORITY,
    SLOT_LOW_SHIFT,
    UNREACHABLE_METRIC,
    bucket_priority,
    mark_for_slot,
    table_for_slot,
)

IPv6Mode = Literal["auto", "tunnel", "block"]


@dataclass(frozen=True)
class LinkFacts:
    """What the kernel says about one interface, gathered by the netlink adapter."""

    name: str
    index: int
    up: bool
    pointopoint: bool  # IFF_POINTOPOINT or no L2 address (tun): no next hop needed
    ipv4: tuple[str, ...] = ()  # addresses, "a.b.c.d/len"
    ipv6_global: tuple[str, ...] = ()
    gateway4: str | None = None  # next hop of a main-table route through this interface
    gateway6: str | None = None
    peer4: str | None = None  # the other end of an IPv4 address with a peer (``peer P``)
    connected4: tuple[str, ...] = ()  # main-table link routes ("dst/len") on this interface
    connected6: tuple[str, ...] = ()
    mtu: int | None = None


@dataclass(frozen=True)
class RouteSpec:
    """One route in a group's table. ``dst`` is ``"default"`` or a prefix."""

    family: int
    table: int
    dst: str
    kind: Literal["unicast", "unreachable"] = "unicast"
    oif: int | None = None
    gateway: str | None = None
    metric: int = 0


@dataclass(frozen=True)
class RuleSpec:
    """``ip rule add [not] fwmark MARK/MASK ACTION priority PRIORITY`` for one family.

    ``action`` is ``lookup`` (``table``), ``goto`` (the rule at priority ``goto``) or
    ``unreachable``; ``invert`` matches the packets whose mark does *not* match."""

    family: int
    priority: int
    fwmark: int
    fwmask: int
    table: int = 0
    action: Literal["lookup", "goto", "unreachable"] = "lookup"
    goto: int = 0
    invert: bool = False


@dataclass(frozen=True)
class GroupPlan:
    """Everything one group (one interface) needs, besides the shared nft table."""

    iface: str
    slot: int
    mark: int
    table: int
    level: int
    cgroup_nft_path: str
    rules: tuple[RuleSpec, ...]
    routes: tuple[RouteSpec, ...]
    ipv6: Literal["tunnel", "block"]
    gateway4: str | None = None
    dns4: str | None = None  # every DNS query of the group goes here (DNAT), through IFACE
    dns6: str | None = None
    sysctls: tuple[tuple[str, str], ...] = ()  # (path, value) the group needs while it lives
    classid: int = 0  # net_cls classid of the group's members (0: none, an older record)


def plan_group(
    facts: LinkFacts,
    *,
    slot: int,
    level: int,
    cgroup_nft_path: str,
    gateway: str | None = None,
    ipv6: IPv6Mode = "auto",
    dns: tuple[str, ...] = (),
) -> GroupPlan:
    """Plan the routing of one group through ``facts.name``.

    Raises :class:`ViaTunnelError` (exit 125) when the interface cannot carry the group:
    it is down, has no IPv4 address, or is a broadcast interface with no next hop (a
    main-table route's, else an address's peer). Never guesses a gateway. The table always
    ends with ``unreachable default`` at the highest metric, so a lookup in it can never
    fall through to the main table (fail closed).
    """
    if not facts.up:
        raise ViaTunnelError(f"interface {facts.name} is down")
    if not facts.ipv4:
        raise ViaTunnelError(f"interface {facts.name} has no IPv4 address")
    nexthop = None
    if gateway is not None:
        nexthop = _check_gateway(facts, gateway)
    elif not facts.pointopoint:
        # A main-table route's next hop says most; else the peer of an address such as
        # `10.0.4.3 peer 10.0.4.1` is the one host at the other end (a veth or tap tunnel).
        nexthop = facts.gateway4 or facts.peer4
        if nexthop is None:
            raise ViaTunnelError(
                f"interface {facts.name} is a broadcast interface, has no address with a peer "
                f"and the main table has no route with a next hop through it; "
                f"pass --gateway ADDR"
            )
    table = table_for_slot(slot)
    mark = mark_for_slot(slot)
    routes: list[RouteSpec] = [
        RouteSpec(AF_INET, table, dst, oif=facts.index) for dst in facts.connected4
    ]
    routes.append(RouteSpec(AF_INET, table, "default", oif=facts.index, gateway=nexthop))
    routes.append(RouteSpec(AF_INET, table, "default", kind="unreachable",
                            metric=UNREACHABLE_METRIC))
    v6_mode = _ipv6_mode(facts, ipv6)
    if v6_mode == "tunnel":
        routes.extend(RouteSpec(AF_INET6, table, dst, oif=facts.index)
                      for dst in facts.connected6)
        gw6 = None if facts.pointopoint else facts.gateway6
        routes.append(RouteSpec(AF_INET6, table, "default", oif=facts.index, gateway=gw6))
    routes.append(RouteSpec(AF_INET6, table, "default", kind="unreachable",
                            metric=UNREACHABLE_METRIC))
    rules = group_rules(slot)
    dns4, dns6 = split_resolvers(dns)
    if dns6 is not None and v6_mode == "block":
        raise ViaTunnelError(
            f"--dns {dns6}: the group's IPv6 is blocked ({facts.name} has no IPv6 route)")
    sysctls: tuple[tuple[str, str], ...] = ()
    if dns4 is not None:
        # Queries to a local stub (127.0.0.53) leave with source 127.0.0.1 once DNATed;
        # the kernel routes such packets off the host only with route_localnet.
        sysctls = ((f"/proc/sys/net/ipv4/conf/{facts.name}/route_localnet", "1"),)
    return GroupPlan(
        iface=facts.name, slot=slot, mark=mark, table=table, level=level,
        cgroup_nft_path=cgroup_nft_path, rules=rules, routes=tuple(routes), ipv6=v6_mode,
        gateway4=nexthop, dns4=dns4, dns6=dns6, sysctls=sysctls,
    )


def group_rules(slot: int) -> tuple[RuleSpec, ...]:
    """The ip rules (v4 and v6) that send a group's marked packets to its table, in its
    slot's bucket."""
    return tuple(RuleSpec(fam, bucket_priority(slot), mark_for_slot(slot), MARK_MASK,
                          table_for_slot(slot))
                 for fam in (AF_INET, AF_INET6))


def shared_rules() -> tuple[RuleSpec, ...]:
    """The ip rules (v4 and v6) every group relies on, in the order they are added (the
    target of a goto before the goto); removed in reverse once the last group is gone.

    * priority 0, right after ``local``: a packet with our flag goes to the groups' rules,
      ahead of whatever is added later without a priority (wg-quick, Tailscale's fallback,
      scripts): the kernel gives such a rule priority 0 behind ours;
    * ``SKIP_PRIORITY``: any other packet jumps over the groups' rules, so the host's own
      traffic pays for three rules whatever the number of groups;
    * ``RULE_PRIORITY``: one rule per bucket sends a group's packet to its bucket's rules
      (``bucket_priority``), so it meets at most BUCKETS + MAX_SLOT / BUCKETS rules;
    * ``CATCH_PRIORITY``: a packet with our flag whose group has no rule (being set up or
      torn down) is unreachable, never routed by ``main``.
    """
    rules = []
    for fam in (AF_INET, AF_INET6):
        rules.append(RuleSpec(fam, CATCH_PRIORITY, MARK_FLAG, MARK_FLAG, action="unreachable"))
        rules += [RuleSpec(fam, RULE_PRIORITY, MARK_FLAG | (b << SLOT_LOW_SHIFT), BUCKET_MASK,
                           action="goto", goto=BUCKET_BASE + b) for b in range(BUCKETS)]
        rules += [
            RuleSpec(fam, SKIP_PRIORITY, MARK_FLAG, MARK_FLAG, action="goto",
                     goto=CATCH_PRIORITY, invert=True),
            RuleSpec(fam, ENTRY_PRIORITY, MARK_FLAG, MARK_FLAG, action="goto",
                     goto=RULE_PRIORITY),
        ]
    return tuple(rules)


def split_resolvers(dns: tuple[str, ...]) -> tuple[str | None, str | None]:
    """The first IPv4 and the first IPv6 resolver of ``dns`` (validated).

    One per family: a DNAT target is one address. Later ones are accepted as fallbacks a
    user may list, but only the first of each family is used (documented).
    """
    v4: str | None = None
    v6: str | None = None
    for text in dns:
        try:
            addr = ipaddress.ip_address(text)
        except ValueError:
            raise ViaTunnelError(f"--dns {text!r} is not an IP address") from None
        if addr.is_loopback or addr.is_unspecified or addr.is_multicast:
            raise ViaTunnelError(f"--dns {addr}: a resolver must be reachable through the "
                                 f"interface, not a local or special address")
        if addr.version == 4:
            v4 = v4 or str(addr)
        else:
            v6 = v6 or str(addr)
    return v4, v6


def _check_gateway(facts: LinkFacts, gateway: str) -> str:
    try:
        addr = ipaddress.IPv4Address(gateway)
    except ValueError:
        raise ViaTunnelError(f"--gateway {gateway!r} is not an IPv4 address") from None
    if facts.pointopoint:
        return str(addr)
    nets = [ipaddress.IPv4Interface(a).network for a in facts.ipv4]
    nets += [ipaddress.IPv4Network(p, strict=False) for p in facts.connected4]
    if not any(addr in n for n in nets):
        raise ViaTunnelError(
            f"--gateway {addr} is not on a subnet of {facts.name} "
            f"({', '.join(facts.ipv4)})"
        )
    return str(addr)


def _ipv6_mode(facts: LinkFacts, mode: IPv6Mode) -> Literal["tunnel", "block"]:
    has_v6 = bool(facts.ipv6_global) and (facts.pointopoint or facts.gateway6 is not None)
    if mode == "block":
        return "block"
    if mode == "tunnel" and not has_v6:
        raise ViaTunnelError(
            f"--ipv6 tunnel: interface {facts.name} has no global IPv6 address and route"
        )
    return "tunnel" if has_v6 else "block"
