"""lifecycle.py's ordering and rollback guarantees, without root: the kernel adapters are
replaced by fakes (group/adapters.py) that keep a model of the kernel and log every call
with the state of the group's record at that moment. The kernel tests prove the same
against the real thing; these pin the sequencing itself, step by step.

Guarantees checked: the record is written first (an intent log) and marked ready last;
teardown clears ``ready`` before it touches the kernel and deletes the record last; a step
that fails during setup rolls back whatever was done; a teardown that fails half-way leaves
the record (not ready) so that cleanup can finish it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from via_tunnel.core.errors import KernelError, ViaTunnelError
from via_tunnel.core.plan import LinkFacts, RouteSpec, RuleSpec
from via_tunnel.core.settings import Settings
from via_tunnel.group import adapters, lifecycle, repair, state

TUN = LinkFacts(name="tun0", index=7, up=True, pointopoint=True, ipv4=("10.8.0.2/32",),
                mtu=1420)
TUN1 = LinkFacts(name="tun1", index=8, up=True, pointopoint=True, ipv4=("10.9.0.2/32",),
                 mtu=1420)


class FakeKernel:
    """A model of what the adapters change, a log of the calls, and one injected failure
    (``fail_on = "netlink.apply"``: the next such call fails). Cgroups are plain
    directories under ``mount`` (a record is usable only while its cgroup directory
    exists)."""

    def __init__(self, settings: Settings, mount: str) -> None:
        self.settings = settings
        self.mount = mount
        self.log: list[tuple[str, tuple[tuple[str, bool], ...]]] = []
        self.fail_on: str | None = None
        self.global_sysctl = False
        self.cgroups: set[str] = set()
        self.netcls: set[str] = set()
        self.escaped: set[str] = set()  # net_cls cgroups with a process moved out of cgroup2
        self.populated_groups: set[str] = set()
        self.rules: set[RuleSpec] = set()
        self.routes: set[RouteSpec] = set()
        self.table = False
        self.elements: set[str] = set()
        self.sockets_killed: list[str] = []
        self.lingering: int | None = 0  # seconds the group's conntrack entries live on
        self.forgotten: list[int] = []  # marks whose conntrack entries were deleted
        self.links = {"tun0": TUN, "tun1": TUN1}

    def model(self) -> dict[str, Any]:
        """What a group leaves in the kernel (src_valid_mark, raised once and never
        lowered, is not part of it)."""
        return {"cgroups": sorted(self.cgroups), "netcls": sorted(self.netcls),
                "rules": len(self.rules), "routes": len(self.routes), "table": self.table,
                "elements": sorted(self.elements)}

    def call(self, name: str) -> None:
        """Log ``name`` with the records on disk at that moment, (iface, ready) each; then
        fail if told to."""
        records = state.load_all(self.settings)
        self.log.append((name, tuple((r.iface, r.ready) for r in records)))
        if self.fail_on == name:
            self.fail_on = None  # once: the kernel refuses one change, not every one after
            raise KernelError(f"injected failure in {name}")

    def adapters(self) -> adapters.Kernel:
        return adapters.Kernel(nft=_Nft(self), netlink=_Netlink(self), cgroup=_Cgroup(self),
                               sysctl=_Sysctl(self), flows=_Flows(self),
                               resolvers=_Resolvers(), netcls=_NetCls(self),
                               scopes=_Scopes(self))


class _Part:
    def __init__(self, k: FakeKernel) -> None:
        self.k = k


class _Nft(_Part):
    def preload(self) -> None:
        self.k.call("nft.preload")

    def ensure_table(self, level: int) -> None:
        self.k.call("nft.ensure_table")
        self.k.table = True

    def run_json(self, commands: list[dict[str, Any]]) -> dict[str, Any]:
        self.k.call("nft.run_json")
        for command in commands:
            (verb, body), = command.items()
            if verb == "flush":  # a map: all its elements
                name = body["map"]["name"]
                self.k.elements = {e for e in self.k.elements if json.loads(e)["name"] != name}
                continue
            if "table" in body:
                self.k.table, self.k.elements = False, set()
                continue
            key = json.dumps(body["element"], sort_keys=True)
            if verb == "add":
                self.k.elements.add(key)
            elif key in self.k.elements:
                self.k.elements.remove(key)
            else:
                raise KernelError("no such element")
        return {}

    def run_text(self, text: str) -> None:
        self.k.call("nft.run_text")
        self.k.table = True

    def table_exists(self) -> bool:
        return self.k.table

    def table_text(self) -> str | None:
        return None if not self.k.table else ""

    def list_elements(self, sets: tuple[str, ...],
                      maps: tuple[str, ...]) -> list[dict[str, Any]]:
        return []

    def delete_table_command(self) -> dict[str, Any]:
        return {"delete": {"table": {"family": "inet", "name": "via_tunnel"}}}

    def draining(self) -> dict[int, tuple[str, int]]:
        self.k.call("nft.draining")
        out = {}
        for e in map(json.loads, self.k.elements):
            if e["name"] == "draining":
                (key, iface), = e["elem"]
                out[key["elem"]["val"]] = (iface, key["elem"]["timeout"])
        return out


class _Netlink(_Part):
    def link_facts(self, name: str) -> LinkFacts:
        if name not in self.k.links:
            raise ViaTunnelError(f"interface {name} does not exist")
        return self.k.links[name]

    def apply(self, rules: Any, routes: Any) -> None:
        rules, routes = list(rules), list(routes)
        self.k.call("netlink.apply")
        self.k.routes.update(routes)
        self.k.rules.update(rules)

    def remove(self, rules: Any, tables: Any) -> None:
        rules, tables = list(rules), list(tables)
        self.k.call("netlink.remove")
        self.k.rules.difference_update(rules)
        self.k.routes = {r for r in self.k.routes if r.table not in tables}

    def our_rules_and_tables(self, rules: Any, tables: Any) -> tuple[list[RuleSpec], list[int]]:
        tables = list(tables)
        return ([r for r in rules if r in self.k.rules],
                sorted({r.table for r in self.k.routes if r.table in tables}))


class _Cgroup(_Part):
    def cgroup2_mount(self) -> str:
        return self.k.mount

    def level_of(self, path: str, mount: str) -> int:
        return path[len(mount):].count("/")

    def nft_path(self, path: str) -> str:
        return os.path.relpath(path, self.k.mount)

    def make(self, path: str) -> None:
        self.k.call("cgroup.make")
        os.makedirs(path, exist_ok=True)
        self.k.cgroups.add(path)

    def remove(self, path: str) -> None:
        self.k.call("cgroup.remove")
        if path in self.k.populated_groups:
            raise ViaTunnelError(f"cgroup {path} still has processes")
        if os.path.isdir(path):
            os.rmdir(path)
        self.k.cgroups.discard(path)

    def remove_if_empty(self, path: str) -> bool:
        self.k.call("cgroup.remove_if_empty")
        try:
            os.rmdir(path)
        except FileNotFoundError:
            return True
        except OSError:
            return False
        return True

    def populated(self, path: str) -> bool:
        return path in self.k.populated_groups

    def cgroup_id(self, path: str) -> int:
        return os.stat(path).st_ino if os.path.isdir(path) else 0

    def own_cgroup(self, mount: str, pid: int | str = "self") -> str:
        return mount

    def join(self, path: str, pid: int = 0) -> None:
        self.k.call("cgroup.join")


class _NetCls(_Part):
    """net_cls cgroups: a set of names (``escaped`` holds those with a process)."""

    def require(self) -> None:
        pass

    def ensure(self, state_dir: str, rel: str, classid: int) -> str:
        self.k.call("netcls.ensure")
        self.k.netcls.add(rel)
        return rel

    def join(self, state_dir: str, rel: str, pid: int) -> None:
        self.k.call("netcls.join")

    def leave(self, pid: int) -> None:
        self.k.call("netcls.leave")

    def tasks(self, state_dir: str, rel: str | None) -> list[int]:
        return [1] if rel in self.k.escaped else []

    def remove(self, state_dir: str, rel: str | None) -> None:
        self.k.call("netcls.remove")
        if rel in self.k.escaped:
            raise ViaTunnelError(f"cgroup {rel} still has processes")
        self.k.netcls.discard(rel or "")

    def release(self, state_dir: str, subtree: str) -> None:
        self.k.call("netcls.release")


class _Scopes(_Part):
    def start_scope(self, unit: str, slice_name: str, pid: int, path: str,
                    mount: str) -> None:
        self.k.call("scopes.start_scope")
        os.makedirs(path, exist_ok=True)
        self.k.cgroups.add(path)


class _Sysctl(_Part):
    def ensure(self) -> None:
        self.k.call("sysctl.ensure")
        self.k.global_sysctl = True

    def apply_saving(self, values: tuple[tuple[str, str], ...]) -> dict[str, str]:
        self.k.call("sysctl.apply_saving")
        return {}

    def put_back(self, saved: dict[str, str]) -> None:
        self.k.call("sysctl.put_back")

    def forget_saved(self, settings: Settings) -> None:
        self.k.call("sysctl.forget_saved")  # src_valid_mark stays raised (kernel/sysctl.py)


class _Flows(_Part):
    def kill_sockets(self, cgroup_path: str, cgroup_id: int = 0) -> None:
        self.k.call("flows.kill_sockets")
        self.k.sockets_killed.append(cgroup_path)

    def reset_unmasqueraded(self, cgroup_path: str, mark: int, mark_mask: int,
                            own_addresses: tuple[str, ...]) -> object:
        self.k.call("flows.reset_unmasqueraded")
        return []

    def lingering(self, mark: int, mark_mask: int) -> int | None:
        self.k.call("flows.lingering")
        return self.k.lingering

    def forget(self, mark: int, mark_mask: int) -> None:
        self.k.call("flows.forget")
        self.k.forgotten.append(mark)


class _Resolvers:
    def link_resolvers(self, iface: str) -> tuple[str, ...]:
        return ()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(state_dir=str(tmp_path / "state"), cgroup_subtree="via-tunnel-seam")


@pytest.fixture
def fake(settings: Settings, tmp_path: Path) -> Iterator[FakeKernel]:
    k = FakeKernel(settings, str(tmp_path / "cgroup2"))
    with adapters.replaced(k.adapters()):
        yield k


EMPTY = {"cgroups": [], "netcls": [], "rules": 0, "routes": 0, "table": False, "elements": []}
SETUP = ["sysctl.ensure", "netcls.ensure", "cgroup.make", "netlink.apply", "nft.ensure_table",
         "nft.run_json"]


def test_the_real_adapters_are_the_kernel_modules() -> None:
    from via_tunnel.kernel import cgroup, flows, netcls, netlink, nft, resolvers, sysctl, systemd

    k = adapters.current()
    assert (k.nft, k.netlink, k.cgroup, k.sysctl, k.flows, k.resolvers, k.netcls,
            k.scopes) == (nft, netlink, cgroup, sysctl, flows, resolvers, netcls, systemd)


def test_setup_writes_the_record_first_and_marks_it_ready_last(
        settings: Settings, fake: FakeKernel) -> None:
    rec = lifecycle.ensure_group(settings, "tun0")
    assert [name for name, _ in fake.log] == ["nft.preload", *SETUP]
    # the prerequisites are checked before anything is written ...
    assert fake.log[0][1] == ()
    # ... every kernel step ran with the record on disk and not ready (the intent log) ...
    assert all(seen == (("tun0", False),) for _name, seen in fake.log[1:])
    # ... and the record is ready only once everything is in place
    on_disk = state.load(settings, "tun0")
    assert rec.ready and on_disk is not None and on_disk.ready
    assert fake.table and len(fake.elements) == 7 and fake.rules and fake.routes
    assert fake.cgroups == {rec.cgroup}


def test_a_joiner_gets_the_existing_group_without_touching_the_kernel(
        settings: Settings, fake: FakeKernel) -> None:
    first = lifecycle.ensure_group(settings, "tun0")
    fake.populated_groups.add(first.cgroup)  # a member runs in it
    fake.log.clear()
    again = lifecycle.ensure_group(settings, "tun0")
    assert again.slot == first.slot and fake.log == []
    with pytest.raises(ViaTunnelError, match="already in use"):
        lifecycle.ensure_group(settings, "tun0", ipv6="tunnel")  # would change its routing
    assert fake.log == []


def test_a_half_built_group_is_torn_down_and_built_again(
        settings: Settings, fake: FakeKernel) -> None:
    rec = lifecycle.ensure_group(settings, "tun0")
    rec.ready = False  # a crash before the end of setup
    state.save(settings, rec)
    fake.log.clear()
    again = lifecycle.ensure_group(settings, "tun0")
    names = [name for name, _ in fake.log]
    assert names.index("flows.kill_sockets") < names.index("cgroup.remove") \
        < names.index("cgroup.make")
    assert again.ready and fake.cgroups == {again.cgroup}


@pytest.mark.parametrize("step", SETUP)
def test_a_failing_setup_step_rolls_back_everything(
        settings: Settings, fake: FakeKernel, step: str) -> None:
    fake.fail_on = step
    with pytest.raises(KernelError, match="injected"):
        lifecycle.ensure_group(settings, "tun0")
    fake.fail_on = None
    assert fake.model() == EMPTY
    assert state.load_all(settings) == []
    done = [name for name, _ in fake.log]
    failed_at = done.index(step)
    # the rollback is a teardown: sockets, rules and routes, cgroup, sysctls, subtree
    assert done[failed_at + 1] == "flows.kill_sockets"
    assert "netlink.remove" in done[failed_at:] and "sysctl.forget_saved" in done[failed_at:]


def test_teardown_clears_ready_first_and_deletes_the_record_last(
        settings: Settings, fake: FakeKernel) -> None:
    rec = lifecycle.ensure_group(settings, "tun0")
    fake.log.clear()
    lifecycle.teardown(settings, rec)
    names = [name for name, _ in fake.log]
    assert names[0] == "flows.kill_sockets"  # the orphans first, while the rules still hold
    assert names.index("nft.run_json") < names.index("netlink.remove") \
        < names.index("cgroup.remove")
    # from the first kernel step on, nobody can join: the record says "not ready"; it is
    # deleted once everything it names is gone, before what all groups shared
    with_record = [name for name, seen in fake.log if seen == (("tun0", False),)]
    after = [name for name, seen in fake.log if seen == ()]
    assert names == with_record + after
    assert with_record[-2:] == ["cgroup.remove", "netcls.remove"]
    assert after == ["sysctl.forget_saved", "cgroup.remove_if_empty", "netcls.release"]
    assert "nft.draining" not in names  # no drain was ever noted: the map is not listed
    assert state.load(settings, "tun0") is None and fake.model() == EMPTY


def test_teardown_of_one_group_keeps_the_table_and_the_other_group(
        settings: Settings, fake: FakeKernel) -> None:
    a = lifecycle.ensure_group(settings, "tun0")
    lifecycle.ensure_group(settings, "tun1")
    elements_of_both = set(fake.elements)
    lifecycle.teardown(settings, a)
    assert fake.table and fake.global_sysctl
    assert fake.elements and fake.elements < elements_of_both
    assert [r.iface for r in state.load_all(settings)] == ["tun1"]


def test_a_teardown_that_fails_half_way_leaves_a_record_cleanup_finishes(
        settings: Settings, fake: FakeKernel) -> None:
    rec = lifecycle.ensure_group(settings, "tun0")
    fake.fail_on = "netlink.remove"
    with pytest.raises(KernelError):
        lifecycle.teardown(settings, rec)
    left = state.load(settings, "tun0")
    assert left is not None and not left.ready  # never joined again, only torn down
    fake.fail_on = None
    assert lifecycle.cleanup(settings) == ["removed group tun0"]
    assert state.load_all(settings) == [] and fake.model() == EMPTY


def test_a_populated_group_is_not_torn_down(settings: Settings, fake: FakeKernel) -> None:
    rec = lifecycle.ensure_group(settings, "tun0")
    fake.populated_groups.add(rec.cgroup)
    assert lifecycle.teardown_if_empty(settings, "tun0") is False
    assert lifecycle.cleanup(settings) == []
    fake.populated_groups.clear()
    assert lifecycle.teardown_if_empty(settings, "tun0") is True
    assert fake.model() == EMPTY


def test_a_member_moved_out_keeps_the_group_and_a_vanished_cgroup_is_no_obstacle(
        settings: Settings, fake: FakeKernel) -> None:
    """systemd removed the emptied scope's cgroup while a member moved elsewhere lives on
    in the group's net_cls cgroup: the group stays; once that member is gone, teardown
    removes the group's cgroup2 map element by rebuilding the map (nft cannot delete it by
    a path that no longer exists), keeping the other group's."""
    fake.populated_groups.add(lifecycle.ensure_group(settings, "tun1").cgroup)
    elements_of_tun1 = set(fake.elements)
    rec = lifecycle.ensure_group(settings, "tun0")
    fake.escaped.add(rec.netcls or "")
    os.rmdir(rec.cgroup)
    fake.cgroups.discard(rec.cgroup)
    assert lifecycle.teardown_if_empty(settings, "tun0") is False
    assert lifecycle.cleanup(settings) == []
    assert state.load(settings, "tun0") is not None
    fake.escaped.clear()
    fake.log.clear()
    assert lifecycle.teardown_if_empty(settings, "tun0") is True
    assert fake.elements == elements_of_tun1
    assert [n for n, _ in fake.log].count("nft.run_json") == 1  # one transaction


def test_repair_brings_back_what_was_removed_but_never_a_group_being_torn_down(
        settings: Settings, fake: FakeKernel) -> None:
    rec = lifecycle.ensure_group(settings, "tun0")
    with_everything = fake.model()
    fake.rules.clear()
    fake.routes.clear()
    fake.table, fake.elements = False, set()  # nft flush ruleset
    fake.log.clear()
    assert repair.repair(settings, "tun0") is True
    assert fake.model()["rules"] == with_everything["rules"] and fake.table
    assert len(fake.elements) == len(with_everything["elements"])
    assert "flows.reset_unmasqueraded" in [n for n, _ in fake.log]  # its flows escaped
    rec.ready = False
    state.save(settings, rec)
    fake.log.clear()
    assert repair.repair(settings, "tun0") is False and fake.log == []


def test_the_last_group_drains_while_its_flows_live_and_its_mark_waits(
        settings: Settings, fake: FakeKernel) -> None:
    """Late packets of a group's closed flows keep its mark (conntrack): the table, whose
    kill switch drops them, stays with the mark in ``draining`` for as long as the
    longest entry lives (the kernel expires the element); no new group gets that mark."""
    rec = lifecycle.ensure_group(settings, "tun0")
    fake.lingering = 57
    lifecycle.teardown(settings, rec)
    assert fake.table and fake.rules == set() and fake.routes == set() \
        and fake.cgroups == set() and state.load_all(settings) == []
    draining = {rec.mark: ("tun0", 57)}
    assert adapters.current().nft.draining() == draining
    assert [json.loads(e)["name"] for e in fake.elements] == ["draining"]
    fake.log.clear()
    again = lifecycle.ensure_group(settings, "tun0")
    assert again.mark != rec.mark and "nft.draining" in [name for name, _ in fake.log]
    fake.populated_groups.add(again.cgroup)
    assert lifecycle.cleanup(settings) == [] and fake.table  # a live group, a draining one
    fake.populated_groups.clear()
    fake.lingering = 0
    lifecycle.teardown(settings, again)  # nothing of its own lingers; the first still drains
    assert fake.table and adapters.current().nft.draining() == draining
    assert lifecycle.cleanup(settings) == []
    fake.elements.clear()  # the kernel expired the element
    assert lifecycle.cleanup(settings) == ["removed nft table inet via_tunnel"]
    assert fake.model() == EMPTY


@pytest.mark.parametrize(("lingering", "longest", "drains"),
                         [(500, 120, 120), (None, 120, 120), (30, 0, None), (0, 120, None)])
def test_the_drain_is_capped_assumes_the_worst_and_can_be_turned_off(
        settings: Settings, fake: FakeKernel, lingering: int | None, longest: int,
        drains: int | None) -> None:
    settings.drain_max = longest
    rec = lifecycle.ensure_group(settings, "tun0")
    fake.lingering = lingering
    lifecycle.teardown(settings, rec)
    if drains is None:
        assert fake.model() == EMPTY
    else:
        assert adapters.current().nft.draining() == {rec.mark: ("tun0", drains)}


def test_a_mark_no_flow_may_keep_is_forgotten_in_conntrack(settings: Settings,
                                                           fake: FakeKernel) -> None:
    """Without draining, a group's conntrack entries go with it; a group given a mark that
    drained before first deletes the entries a drain may have outlived. Otherwise the
    conntrack walk (a few ms) is not paid."""
    settings.drain_max = 0
    rec = lifecycle.ensure_group(settings, "tun0")
    assert fake.forgotten == []  # no drain ever noted
    lifecycle.teardown(settings, rec)
    assert fake.forgotten == [rec.mark]
    settings.drain_max = 120
    fake.forgotten.clear()
    state.note_drain(settings, 0)  # a drain that is over
    again = lifecycle.ensure_group(settings, "tun0")
    assert fake.forgotten == [again.mark]
