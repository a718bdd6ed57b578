"""Pure planning: from facts about an interface to what must exist in the kernel.

Nothing here touches the system. The adapters (:mod:`via_tunnel.kernel.nft`,
:mod:`via_tunnel.kernel.netlink`) apply what these functions return, and the same plan drives both
setup and teardown, so the two can never disagree about what "ours" is.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from socket import AF_INET, AF_INET6
from typing import Any, Literal

from via_tunnel.core.errors import ViaTunnelError
from via_tunnel.core.settings import (
    CATCH_PRIORITY,
    ENTRY_PRIORITY,
    MARK_FLAG,
    MARK_MASK,
    NFT_FAMILY,
    NFT_TABLE,
    RULE_PRIORITY,
    SKIP_PRIORITY,
    UNREACHABLE_METRIC,
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
    rules = group_rules(mark, table)
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


def group_rules(mark: int, table: int) -> tuple[RuleSpec, ...]:
    """The ip rules (v4 and v6) that send a group's marked packets to its table."""
    return tuple(RuleSpec(fam, RULE_PRIORITY, mark, MARK_MASK, table)
                 for fam in (AF_INET, AF_INET6))


def shared_rules() -> tuple[RuleSpec, ...]:
    """The ip rules (v4 and v6) every group relies on, in the order they are added (the
    target of a goto before the goto); removed in reverse once the last group is gone.

    * priority 0, right after ``local``: a packet with our flag goes to the groups' rules,
      ahead of whatever is added later without a priority (wg-quick, Tailscale's fallback,
      scripts): the kernel gives such a rule priority 0 behind ours;
    * ``SKIP_PRIORITY``: any other packet jumps over the groups' rules, so the host's own
      traffic pays for two rules whatever the number of groups;
    * ``CATCH_PRIORITY``: a packet with our flag whose group has no rule (being set up or
      torn down) is unreachable, never routed by ``main``.
    """
    rules = []
    for fam in (AF_INET, AF_INET6):
        rules += [
            RuleSpec(fam, CATCH_PRIORITY, MARK_FLAG, MARK_FLAG, action="unreachable"),
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


# --------------------------------------------------------------------------- nftables

# The fixed part of the ruleset lives in ruleset.nft next to this file (package data).
# Only integers we compute ever reach nft as text; every name (interfaces, cgroup paths)
# travels as JSON data in the per-group transactions.
RULESET_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ruleset.nft")


def base_ruleset() -> str:
    """The text that creates our table (without any group or cgroup level)."""
    with open(RULESET_FILE) as f:
        text = f.read()
    if f"0x{MARK_FLAG:08x}" not in text:  # the file and settings.py must agree
        raise ViaTunnelError(f"{RULESET_FILE} does not use mark flag 0x{MARK_FLAG:08x}")
    return text


def level_map_name(level: int) -> str:
    return f"groups_l{int(level)}"


def level_ruleset(level: int) -> str:
    """Text adding the cgroup map and socket rule for one cgroup2 level.

    ``socket cgroupv2`` cannot be expressed in libnftables JSON (NOTES.md), so this is
    text; ``level`` is an int we computed from the cgroup path, never user input.
    """
    level = int(level)
    if not 1 <= level <= 255:
        raise ValueError(f"cgroup level {level} out of range")
    name = level_map_name(level)
    return (
        f"add map {NFT_FAMILY} {NFT_TABLE} {name} {{ type cgroupsv2 : mark; }}\n"
        f"add rule {NFT_FAMILY} {NFT_TABLE} group_sockets "
        f"meta mark set socket cgroupv2 level {level} map @{name} ct mark set meta mark\n"
    )


def group_elements(plan: GroupPlan, verb: Literal["add", "delete"],
                   cgroup: bool = True) -> list[dict[str, Any]]:
    """The nft JSON commands that attach (``add``) or detach (``delete``) one group
    (``cgroup=False``: all but its cgroup2 map element, whose path may be gone).

    One list = one transaction. Setup and teardown come from this one function, so they
    always name the same elements.
    """

    def element(name: str, elem: list[Any]) -> dict[str, Any]:
        return {verb: {"element": {"family": NFT_FAMILY, "table": NFT_TABLE,
                                   "name": name, "elem": elem}}}

    commands = [
        element("group_oifs", [{"concat": [plan.mark, plan.iface]}]),
        element("tx", [{"concat": [plan.mark, plan.iface]}]),
        element("rx", [{"concat": [plan.mark, plan.iface]}]),
        element("iif_marks", [[plan.iface, plan.mark]]),
    ]
    if cgroup:
        commands.append(element(level_map_name(plan.level), [[plan.cgroup_nft_path, plan.mark]]))
    if plan.classid:
        commands.append(element("classid_marks", [[plan.classid, plan.mark]]))
    if plan.ipv6 == "block":
        commands.append(element("v6_blocked", [plan.mark]))
    if plan.dns4 is not None:
        commands.append(element("dns4", [[plan.mark, plan.dns4]]))
    if plan.dns6 is not None:
        commands.append(element("dns6", [[plan.mark, plan.dns6]]))
    return commands


def missing_from(listing: list[dict[str, Any]], plan: GroupPlan) -> bool:
    """Whether a listing of our table (nft JSON objects) lacks anything that
    ``group_elements(plan, "add")`` adds.

    The cgroup maps are checked by value only: nft prints a cgroup key by searching
    /sys/fs/cgroup for its inode, which on a hybrid host can name the wrong path.
    """
    held: dict[str, list[Any]] = {}
    for obj in listing:
        body = obj.get("set") or obj.get("map")
        if body is not None:
            held[body["name"]] = [_element_value(e) for e in body.get("elem", [])]
    for command in group_elements(plan, "add"):
        elem = command["add"]["element"]
        have = held.get(elem["name"])
        if have is None:
            return True
        for item in elem["elem"]:
            if elem["name"].startswith("groups_l"):
                if not any(isinstance(h, list) and h[1] == item[1] for h in have):
                    return True
            elif item not in have:
                return True
    return False


def _element_value(e: Any) -> Any:
    """An element as listed, without the per-element statements (counters)."""
    return e["elem"]["val"] if isinstance(e, dict) and "elem" in e else e


def table_damaged(text: str) -> bool:
    """Whether our table, as nft prints it (text), misses a chain or rule of the fixed
    ruleset or of a cgroup level (what ``nft flush table`` or a stray ``nft delete rule``
    leaves)."""
    have = rule_counts(text)
    expected = rule_counts(base_ruleset())
    expected["group_sockets"] = len(levels_in(text))
    return any(have.get(chain, -1) < n for chain, n in expected.items())


def rule_counts(text: str) -> dict[str, int]:
    """chain -> number of rules, from nft ruleset text (ruleset.nft or an ``nft list``
    printout): every line inside a chain block other than its type/policy line and
    comments is one rule."""
    counts: dict[str, int] = {}
    chain: str | None = None
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if line.startswith("chain "):
            chain = line.split()[1]
            counts[chain] = 0
        elif chain is not None and line == "}":
            chain = None
        elif chain is not None and line and not line.startswith("type "):
            counts[chain] += 1
    return counts


def levels_in(text: str) -> set[int]:
    """The cgroup levels that have a map in our table, from its nft printout."""
    levels = set()
    for raw in text.splitlines():
        words = raw.split()
        if len(words) >= 2 and words[0] == "map" and words[1].startswith("groups_l") \
                and words[1][8:].isdigit():
            levels.add(int(words[1][8:]))
    return levels


def element_names(levels: set[int]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(sets, maps) that hold groups' elements: what :func:`missing_from` needs listed."""
    return (("group_oifs", "tx", "rx", "v6_blocked"),
            ("iif_marks", "dns4", "dns6", "classid_marks",
             *(level_map_name(lv) for lv in sorted(levels))))
