"""The life of a group: create it, let processes join, tear it down when it is empty.

This is the one place that sequences the adapters. The launcher and the daemon both
call it, always with the global lock held (:func:`via_tunnel.group.state.locked`), which is what
makes concurrent starts and exits race-free: a launcher joins a group and a watcher decides
the group is empty under the same lock.

Ordering guarantees (no moment without routing for a process already in the group):
* setup: record (intent log) -> cgroup -> routes -> ip rules -> nft elements -> record
  marked ready. CMD runs in the group only after all of that succeeded (a cold launcher
  may enter the new cgroup earlier, see early_join.py: it sends no traffic of its own).
* teardown: only when ``cgroup.events`` says unpopulated; the record is marked not ready
  first (nobody joins from then on); kill the group's remaining sockets
  (flows.kill_sockets: orphaned TCP sockets would otherwise retransmit by the LAN once the
  rules are gone) -> nft elements (the mark goes to ``draining`` while conntrack keeps
  flows of the group: their late packets still carry the mark, the kill switch drops
  them; the table outlives the last group until the drain is over) -> ip rules and
  routes -> cgroup -> record; then what the last group shared (global sysctl, our
  subtree).
* rollback: a setup step that fails is followed by a teardown of everything the record
  names; a teardown that fails half-way leaves the record, not ready, for ``cleanup``.

The kernel is reached only through the adapters of :mod:`via_tunnel.group.adapters` (one
Protocol per kernel interface; the kernel modules by default), so these guarantees are also
tested without root, with fakes (tests/test_lifecycle_seam.py).
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

from via_tunnel.core.errors import KernelError, ViaTunnelError
from via_tunnel.core.nftplan import drain_element, group_elements
from via_tunnel.core.plan import GroupPlan, IPv6Mode, RuleSpec, group_rules, shared_rules
from via_tunnel.core.settings import (
    MARK_MASK,
    MAX_SLOT,
    Settings,
    classid_for_slot,
    mark_for_slot,
    table_for_slot,
)
from via_tunnel.group import adapters, placement, state
from via_tunnel.group.joining import check_compatible, check_same
from via_tunnel.group.placement import GROUP_PREFIX, group_path
from via_tunnel.group.state import GroupRecord

__all__ = ["GROUP_PREFIX", "group_path"]


def ensure_group(
    settings: Settings, iface: str, *, gateway: str | None = None, ipv6: IPv6Mode = "auto",
    dns: tuple[str, ...] = (), exact: bool = False, first_pid: int | None = None,
) -> GroupRecord:
    """Return the active group of ``iface``, creating it if needed. Caller holds the lock.
    ``first_pid``: the process that joins next (a scope is started with it; placement.py).

    ``exact`` (a non-root caller of the daemon): a running group is joined only when it
    was created with exactly these options (:func:`check_same`), so that no user's run ever
    takes another user's routing. On any failure everything this call added is removed
    again before the error propagates.
    """
    rec = state.load(settings, iface)
    if rec is not None:
        if rec.ready and not rec.usable() and placement.in_use(settings, rec):
            _revive(settings, rec, first_pid)  # its cgroup2 group is gone, not its members
        if rec.usable():
            try:
                if exact:
                    check_same(rec, gateway=gateway, ipv6=ipv6, dns=dns)
                else:
                    check_compatible(rec, gateway=gateway, ipv6=ipv6, dns=dns)
                return rec
            except ViaTunnelError:
                # Other options, but no member left: its last one just exited and the
                # watcher has not torn it down yet (`via-tunnel X -- a; via-tunnel --dns D
                # X -- b` in a script). Its options bind nobody: replace it.
                if placement.in_use(settings, rec):
                    raise
        teardown(settings, rec)  # stale, half-built, or empty with other options
    return _create(settings, iface, gateway=gateway, ipv6=ipv6, dns=dns, first_pid=first_pid)


def _revive(settings: Settings, rec: GroupRecord, first_pid: int | None) -> None:
    """The group's cgroup2 group is gone (systemd removed the emptied scope) while members
    moved out of it live on (net_cls): make it again for the next member, and point the
    level's map at the new cgroup (nft keyed the old element by the old one's id)."""
    k = adapters.current()
    placement.make(settings, rec, first_pid)
    same_level = [plan_of(r) for r in state.load_all(settings)
                  if r.level == rec.level and r.usable()]
    k.nft.run_json(placement.rebuilt_level_map(rec.level, same_level))
    state.save(settings, rec)


def _create(settings: Settings, iface: str, *, gateway: str | None, ipv6: IPv6Mode,
            dns: tuple[str, ...], first_pid: int | None = None) -> GroupRecord:
    import dataclasses

    from via_tunnel.core.plan import plan_group

    k = adapters.current()
    # Every prerequisite before the first change: a missing binding must not leave rules,
    # routes and a cgroup behind (the interface's facts below need rtnetlink too).
    k.nft.preload()
    k.netcls.require()  # fail closed: without net_cls a moved member would leak
    mount = k.cgroup.cgroup2_mount()
    path = group_path(settings, mount, iface)
    draining = k.nft.draining() if state.drain_may_be_live(settings) else {}
    slot = state.free_slot(state.taken_slots(settings), set(draining))
    if state.drain_noted(settings):  # a drain ended: a flow it outlived (UDP refreshed by
        k.flows.forget(mark_for_slot(slot), MARK_MASK)  # late packets) keeps the mark
    # The shared rules come with every group: "already there" costs the kernel a lookup
    # per rule in the same round trip, and whatever removed some is mended by it.
    shared = shared_rules()
    facts = k.netlink.link_facts(iface)
    plan = plan_group(facts, slot=slot, level=k.cgroup.level_of(path, mount),
                      cgroup_nft_path=k.cgroup.nft_path(path), gateway=gateway, ipv6=ipv6,
                      dns=dns or k.resolvers.link_resolvers(iface))
    plan = dataclasses.replace(plan, classid=classid_for_slot(slot))
    rec = GroupRecord(iface=iface, slot=slot, mark=plan.mark, table=plan.table,
                      level=plan.level, cgroup=path, cgroup_nft_path=plan.cgroup_nft_path,
                      created=time.time(), gateway4=plan.gateway4, ipv6=plan.ipv6,
                      ipv6_asked=ipv6, gateway_asked=gateway, dns_asked=list(dns),
                      dns4=plan.dns4, dns6=plan.dns6,
                      netcls=placement.netcls_rel(settings, iface), classid=plan.classid)
    state.save(settings, rec)
    home = k.cgroup.own_cgroup(mount, first_pid) if first_pid is not None else None
    try:
        k.sysctl.ensure()
        if plan.sysctls:
            rec.saved_sysctls = k.sysctl.apply_saving(plan.sysctls)
            state.save(settings, rec)
        placement.make(settings, rec, first_pid)
        state.save(settings, rec)
        k.netlink.apply(plan.rules + shared, plan.routes)
        _nft_attach(k.nft, plan)
        rec.ready = True
        state.save(settings, rec)
    except BaseException:
        with contextlib.suppress(Exception):
            placement.put_back(home, first_pid)
        with contextlib.suppress(Exception):
            teardown(settings, rec)
        raise
    return rec


def _nft_attach(nft: adapters.Nft, plan: GroupPlan) -> None:
    nft.ensure_table(plan.level)
    nft.run_json(group_elements(plan, "add"))


def plan_of(rec: GroupRecord) -> GroupPlan:
    """Enough of the plan to name everything a record's group added (teardown needs no
    facts): the same rules and nft elements, from the same functions setup used."""
    return GroupPlan(iface=rec.iface, slot=rec.slot, mark=rec.mark, table=rec.table,
                     level=rec.level, cgroup_nft_path=rec.cgroup_nft_path,
                     rules=group_rules(rec.slot), routes=(),
                     ipv6="tunnel" if rec.ipv6 == "tunnel" else "block",
                     dns4=rec.dns4, dns6=rec.dns6, classid=rec.classid)


def teardown(settings: Settings, rec: GroupRecord) -> None:
    """Remove everything ``rec`` names. Idempotent; caller holds the lock and has checked
    that the group is empty (a populated cgroup makes the final rmdir fail loudly)."""
    k = adapters.current()
    plan = plan_of(rec)
    if rec.ready:  # first of all: a crash from here on leaves a record nobody will join
        rec.ready = False
        state.save(settings, rec)
    k.flows.kill_sockets(rec.cgroup, rec.cgroup_id)
    # (Names only: reading every record made each teardown O(groups).)
    others = [iface for iface in state.recorded(settings) if iface != rec.iface]
    nft_error: ViaTunnelError | None = None
    try:
        if k.nft.table_exists():
            drain = _drain_seconds(k, rec, settings.drain_max)
            if not others and not drain and not _draining_others(k, settings, rec.mark):
                k.nft.run_json([k.nft.delete_table_command()])
                state.forget_drains(settings)
            else:
                if drain:
                    state.note_drain(settings, drain)
                keep = [drain_element(rec.mark, rec.iface, drain)] if drain else []
                if k.cgroup.cgroup_id(rec.cgroup):
                    _nft_detach(k.nft, group_elements(plan, "delete") + keep)
                else:  # its cgroup is gone, and with it the path nft could delete it by
                    rebuilt = placement.rebuilt_level_map(
                        rec.level, [plan_of(r) for r in state.load_all(settings)
                                    if r.iface != rec.iface and r.usable()])
                    _nft_detach(k.nft,
                                group_elements(plan, "delete", cgroup=False) + rebuilt + keep)
    except ViaTunnelError as exc:  # an unusable adapter: remove the rest all the same
        nft_error = exc
    k.netlink.remove(plan.rules, [rec.table])
    if not others:
        k.netlink.remove(shared_rules()[::-1], [])
    k.sysctl.put_back(rec.saved_sysctls)
    placement.remove(settings, rec)
    state.delete(settings, rec.iface, rec.slot)
    if not others:
        k.sysctl.forget_saved(settings)
        placement.release(settings, os.path.dirname(rec.cgroup))  # our subtree
    if nft_error is not None:
        raise nft_error


def _drain_seconds(k: adapters.Kernel, rec: GroupRecord, longest: int) -> int:
    """How long the group drains: as long as a conntrack entry with its mark lives (a late
    packet of that flow draws an answer with the mark), at most ``longest``; ``longest``
    when conntrack cannot be read (no leak wins). Called after its sockets are destroyed,
    so only what the kernel keeps of closed flows (TIME_WAIT, CLOSE, UDP) counts."""
    if longest <= 0:  # no drain: no flow may keep the mark either (flows.forget)
        k.flows.forget(rec.mark, MARK_MASK)
        return 0
    left = k.flows.lingering(rec.mark, MARK_MASK)
    return longest if left is None else min(left, longest)


def _draining_others(k: adapters.Kernel, settings: Settings, mark: int) -> bool:
    """Whether a group other than the one with ``mark`` still drains (the table stays).
    The map is listed only while the state dir says a drain may be live."""
    return state.drain_may_be_live(settings) and any(m != mark for m in k.nft.draining())


def _nft_detach(nft: adapters.Nft, commands: list[dict[str, Any]]) -> None:
    """Delete the group's elements: one transaction, or element by element when some are
    already gone (cleanup after a crash) so the rest still goes."""
    try:
        nft.run_json(commands)
    except KernelError:
        for command in commands:
            with contextlib.suppress(KernelError):
                nft.run_json([command])


def teardown_if_empty(settings: Settings, iface: str) -> bool:
    """Tear the group down if it has no process left. Caller holds the lock."""
    rec = state.load(settings, iface)
    if rec is None:
        return True
    if placement.in_use(settings, rec):
        return False
    teardown(settings, rec)
    return True


def cleanup(settings: Settings) -> list[str]:
    """Remove what crashed or killed runs left behind; never touch a group with members.
    Call under :func:`state.locked`.

    Returns a line per thing removed. Besides recorded groups, sweeps kernel objects in our
    numeric ranges that no record explains (a crash before the record was written).
    """
    k = adapters.current()
    done: list[str] = []
    records = state.load_all(settings)
    for rec in records:
        if not placement.in_use(settings, rec):
            teardown(settings, rec)
            done.append(f"removed group {rec.iface}")
    live = state.load_all(settings)
    done.extend(state.remove_orphan_tmp(settings))
    rules, tables = stray_kernel_objects({r.slot for r in live})
    if not live:
        present, _ = k.netlink.our_rules_and_tables(shared_rules()[::-1], [])
        rules = [*rules, *present]
    if rules or tables:
        k.netlink.remove(rules, tables)
        done.append(f"removed {len(rules)} stray ip rule(s), {len(tables)} stray table(s)")
    if not live:
        if k.nft.table_exists() and not k.nft.draining():
            k.nft.run_json([k.nft.delete_table_command()])
            state.forget_drains(settings)
            done.append("removed nft table inet via_tunnel")
        k.sysctl.forget_saved(settings)
        if not state.watcher_alive(settings):  # a watcher killed: its files stay
            state.forget_watcher(settings)
        for child in group_cgroups(settings):
            if not k.cgroup.populated(child):
                k.cgroup.remove(child)
                done.append(f"removed cgroup {child}")
        placement.release(settings, subtree_path(settings))
    return done


def stray_kernel_objects(live_slots: set[int]) -> tuple[list[RuleSpec], list[int]]:
    """Our ip rules, and our routing tables that hold routes, of every slot no group holds
    (a run killed before it wrote its record, or after): what :func:`cleanup` removes and
    doctor reports."""
    spare = [s for s in range(1, MAX_SLOT + 1) if s not in live_slots]
    rules = [r for s in spare for r in group_rules(s)]
    tables = [table_for_slot(s) for s in spare]
    return adapters.current().netlink.our_rules_and_tables(rules, tables)


def subtree_path(settings: Settings) -> str:
    """Our cgroup subtree, the parent of every group's cgroup."""
    return os.path.join(adapters.current().cgroup.cgroup2_mount(), settings.cgroup_subtree)


def group_cgroups(settings: Settings) -> list[str]:
    """Every group cgroup (``if-IFACE``) in our subtree, recorded or not, sorted."""
    subtree = subtree_path(settings)
    try:
        names = sorted(os.listdir(subtree))
    except FileNotFoundError:
        return []
    prefix = "via-tunnel-" if settings.scopes else GROUP_PREFIX
    return [os.path.join(subtree, n) for n in names
            if n.startswith(prefix) and os.path.isdir(os.path.join(subtree, n))]
