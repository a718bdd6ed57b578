"""Repair: put back what someone removed from a live group (a neighbour's ``nft flush
ruleset``, systemd-networkd dropping foreign ip rules, routes the kernel dropped with a
re-created interface). The watcher calls it for the groups a notification can concern.

Everything is checked before it is written, so a repair of an intact group changes nothing
and triggers no new notification. Caller holds the global lock, as for every change
(lifecycle.py).
"""

from __future__ import annotations

from collections.abc import Iterable

from via_tunnel.core.errors import ViaTunnelError
from via_tunnel.core.nftplan import group_elements
from via_tunnel.core.plan import shared_rules
from via_tunnel.core.settings import MARK_MASK, NFT_FAMILY, NFT_TABLE, Settings
from via_tunnel.group import adapters, state
from via_tunnel.group.lifecycle import plan_of
from via_tunnel.group.state import GroupRecord


def repair(settings: Settings, iface: str) -> bool:
    """Put back whatever of the group of ``iface`` someone removed: our nft table, its rules
    and elements (``nft flush ruleset``), the ip rules (systemd-networkd) and the routes
    (the kernel drops them when the interface goes down or is re-created). Caller holds
    the lock. Returns True when routing is in place again.

    Everything is checked before it is written, so a repair of an intact group changes
    nothing and triggers no new change event (the watcher would wake up again). While the
    interface is down or gone, the table's ``unreachable`` default and the postrouting drop
    keep the group closed.
    """
    return iface in repair_many(settings, [iface])


def repair_many(settings: Settings, ifaces: Iterable[str], *, nft: bool = True) -> set[str]:
    """:func:`repair` for several groups at once: the table is checked once for all of
    them (unless ``nft`` is False: what happened cannot have touched it, an rtnetlink
    change), then each group's routing. Returns the groups whose routing is in place."""
    records = [rec for rec in (state.load(settings, i) for i in ifaces)
               if rec is not None and rec.ready]  # a group being torn down stays so
    if not records:
        return set()
    for reattached in reattach_nft(settings) if nft else ():
        _reset_flows(reattached)
    return {rec.iface for rec in records if _repair_routing(rec)}


def _repair_routing(rec: GroupRecord) -> bool:
    """Put back the group's routes and ip rules (and the shared rules) where missing."""
    from via_tunnel.core.plan import plan_group

    k = adapters.current()
    iface = rec.iface
    try:
        facts = k.netlink.link_facts(iface)
        plan = plan_group(facts, slot=rec.slot, level=rec.level,
                          cgroup_nft_path=rec.cgroup_nft_path, gateway=rec.gateway4,
                          ipv6="block" if rec.ipv6 == "block" else "auto",
                          dns=tuple(a for a in (rec.dns4, rec.dns6) if a))
        k.netlink.apply(plan.rules + shared_rules(), plan.routes)
    except ViaTunnelError:
        # Down, gone, changed beyond use, or half back (an IPv6 next hop before its
        # prefix route): stay closed; the next rtnetlink event brings us back here.
        return False
    k.sysctl.apply_saving(plan.sysctls)  # a re-created interface starts with defaults again
    return True


def _reset_flows(rec: GroupRecord) -> None:
    """After our table came back: drop the conntrack entries of the group's flows that
    started without it (they escaped masquerade; see flows.py)."""
    k = adapters.current()
    try:
        facts = k.netlink.link_facts(rec.iface)
    except ViaTunnelError:
        return  # the interface is gone: its routes are too, and repair comes back later
    k.flows.reset_unmasqueraded(rec.cgroup, rec.mark, MARK_MASK,
                              (*facts.ipv4, *facts.ipv6_global))


def reattach_nft(settings: Settings) -> list[GroupRecord]:
    """Make our nft table whole again for every ready group; returns the groups whose
    routing it had to put back (empty when nothing was missing).

    A table that lost rules (``nft flush table``) gets them back in one transaction that
    flushes and re-adds every rule, keeping its chains and elements: deleting the table
    would also drop the conntrack NAT state of the groups' flows. Missing elements follow
    in a second transaction (JSON: nft text must not carry names).
    """
    from via_tunnel.core.nftplan import (
        base_ruleset,
        element_names,
        level_ruleset,
        levels_in,
        missing_from,
        table_damaged,
    )

    nft = adapters.current().nft
    records = [r for r in state.load_all(settings) if r.usable()]
    if not records:
        return []
    printed = nft.table_text()
    needed = {r.level for r in records}
    if printed is None:
        text, have = base_ruleset(), set()
    elif table_damaged(printed):
        have = levels_in(printed)
        text = f"flush table {NFT_FAMILY} {NFT_TABLE}\n" + base_ruleset() \
            + "".join(level_ruleset(level) for level in sorted(have))
    else:
        text, have = "", levels_in(printed)
    text += "".join(level_ruleset(level) for level in sorted(needed - have))
    listing = [] if printed is None else nft.list_elements(*element_names(have | needed))
    commands = []
    reattached = []
    for rec in records:
        plan = plan_of(rec)
        if printed is None or missing_from(listing, plan):
            commands += group_elements(plan, "add")
            reattached.append(rec)
    if text:
        nft.run_text(text)
    if commands:
        nft.run_json(commands)
    return records if text else reattached  # without rules, no group was routed
