"""The kernel side of ``via-tunnel gateway``: facts in, plan applied, state kept.

Every change runs under one lock (``<state_dir>/gateway/lock``). A tunnel's state file
(``<state_dir>/gateway/TUN.json``) is written before the nft transaction and removed after
the teardown, so whatever a crash leaves, ``down`` can still find and remove it.

Forwarding sysctls are shared between tunnels: ``sysctl.json`` holds, per address family
we switched on, the values found before (every sysctl the switch rewrites, in the order to
write them back). The first tunnel that needs a family saves them; they are written back when
the last tunnel that needs it goes down. A family that was already on is recorded with
nothing to restore, so ``down`` never turns off what someone else turned on.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

from via_tunnel.core import config as config_file
from via_tunnel.core.errors import ViaTunnelError
from via_tunnel.core.names import validate_ifname
from via_tunnel.core.settings import Settings, config_path
from via_tunnel.gateway.config import GatewayConfig, merge_config
from via_tunnel.gateway.foreign import foreign_warnings
from via_tunnel.gateway.plan import (
    IPV4_FORWARD,
    IPV6_FORWARD,
    Addr4,
    GatewayPlan,
    IfFacts,
    free_id,
    plan_gateway,
)
from via_tunnel.gateway.ruleset import (
    GW_FAMILY,
    GW_TABLE,
    chain_names,
    counter_names,
    counters,
    down_commands,
    ids_in_table,
    owns,
    table_names,
    up_commands,
)
from via_tunnel.kernel import files, nft, sysctl

PROC_SYS = "/proc/sys"


def warn(message: str) -> None:
    print(f"via-tunnel: warning: {message}", file=sys.stderr)


# --------------------------------------------------------------------------- config


def load_gateway_table(tun: str) -> tuple[Mapping[str, Any], str]:
    """``[gateway.TUN]`` of the config file (``{}`` when the file or section is missing) and
    the file's path. The file is parsed by :mod:`via_tunnel.core.config`, as for the daemon:
    a file it refuses raises its :class:`~via_tunnel.core.config.ConfigError`."""
    path = config_path()
    return config_file.load(path).gateways.get(tun, {}), path


# --------------------------------------------------------------------------- facts


def iface_facts(name: str) -> IfFacts:
    """Index, MTU and addresses of ``name`` (rtnetlink; imported here, it is slow)."""
    from via_tunnel.kernel.netlink import link_addresses, lookup_link, open_rtnl

    with open_rtnl() as rt:
        index, link = lookup_link(rt, name)
        v4, v6 = link_addresses(rt, index, name)
    return IfFacts(name=name, index=index, mtu=int(link.get_attr("IFLA_MTU") or 1500),
                   ipv4=tuple(Addr4(local=local, prefixlen=plen, peer=peer)
                              for local, plen, peer in v4),
                   ipv6_global=tuple(v6))


# --------------------------------------------------------------------------- state


class Paths:
    def __init__(self, settings: Settings) -> None:
        self.dir = os.path.join(settings.state_dir, "gateway")
        self.lock = os.path.join(self.dir, "lock")
        self.sysctl = os.path.join(self.dir, "sysctl.json")

    def tunnel(self, tun: str) -> str:
        return os.path.join(self.dir, f"{validate_ifname(tun)}.json")


def locked(paths: Paths) -> files.FileLock:
    return files.FileLock(paths.lock, paths.dir, who="the gateway")


def load_states(paths: Paths) -> dict[str, dict[str, Any]]:
    """Every tunnel's state record, by tunnel name."""
    out: dict[str, dict[str, Any]] = {}
    try:
        names = sorted(os.listdir(paths.dir))
    except FileNotFoundError:
        return out
    for n in names:
        if not n.endswith(".json") or n == "sysctl.json":
            continue
        try:
            with open(os.path.join(paths.dir, n)) as f:
                rec = json.load(f)
            out[str(rec["plan"]["tun"])] = rec
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return out


# --------------------------------------------------------------------------- sysctls


def _read(rel: str) -> str:
    return sysctl.read(os.path.join(PROC_SYS, rel))


def _write(rel: str, value: str) -> None:
    sysctl.write(os.path.join(PROC_SYS, rel), value)


def _devices(family: str) -> list[str]:
    conf = os.path.join(PROC_SYS, "net", family, "conf")
    return sorted(d for d in os.listdir(conf) if d not in ("all", "default"))


def _snapshot(family: str) -> list[tuple[str, str]]:
    """Everything that switching ``family``'s forwarding on rewrites, master switch first
    (writing it back rewrites the rest, which are then put back one by one)."""
    if family == "ipv4":
        paths = [IPV4_FORWARD, "net/ipv4/conf/all/accept_redirects",
                 "net/ipv4/conf/default/forwarding"]
    else:
        paths = [IPV6_FORWARD, "net/ipv6/conf/default/forwarding"]
    paths += [f"net/{family}/conf/{d}/forwarding" for d in _devices(family)]
    out = []
    for p in paths:
        with contextlib.suppress(OSError):
            out.append((p, _read(p)))
    return out


def _claim_sysctls(paths: Paths, families: list[str]) -> None:
    """Switch forwarding on for ``families``, saving what it was the first time."""
    saved = _load_sysctl(paths)
    for family in families:
        master = IPV4_FORWARD if family == "ipv4" else IPV6_FORWARD
        try:
            on = _read(master) == "1"
        except OSError as exc:
            warn(f"cannot read {master.replace('/', '.')}: {exc.strerror}")
            continue
        first = family not in saved
        if first:  # saved before the change: a crash in between still leaves it restorable
            saved[family] = [] if on else _snapshot(family)
            files.write_json(paths.sysctl, saved)
        if not on:
            try:
                _write(master, "1")
            except OSError as exc:
                warn(f"cannot enable {master.replace('/', '.')} ({exc.strerror}): forwarded "
                     f"traffic will be dropped")
                if first:  # nothing changed, nothing to restore
                    del saved[family]
                    files.write_json(paths.sysctl, saved)


def _release_sysctls(paths: Paths, needed: set[str]) -> None:
    """Write back the saved values of every family no remaining tunnel needs."""
    saved = _load_sysctl(paths)
    for family in [f for f in saved if f not in needed]:
        for rel, value in saved.pop(family):
            with contextlib.suppress(OSError):  # a device that is gone since
                _write(rel, value)
    if saved:
        files.write_json(paths.sysctl, saved)
    else:
        files.remove_json(paths.sysctl)


def _load_sysctl(paths: Paths) -> dict[str, list[tuple[str, str]]]:
    try:
        with open(paths.sysctl) as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    return {k: [(str(p), str(v)) for p, v in vs] for k, vs in data.items()}


def _families(plan: GatewayPlan) -> list[str]:
    return ["ipv4", "ipv6"] if plan.ipv6 else ["ipv4"]


def _check_device_forwarding(plan: GatewayPlan) -> None:
    for dev in (plan.wan, plan.tun):
        rel = f"net/ipv4/conf/{dev}/forwarding"
        with contextlib.suppress(OSError):
            if _read(rel) != "1":
                warn(f"{rel.replace('/', '.')} is 0: packets arriving on {dev} are not "
                     f"forwarded")


# --------------------------------------------------------------------------- nft


def _table() -> list[dict[str, Any]]:
    return nft.list_json(f"list table {GW_FAMILY} {GW_TABLE}") or []


# --------------------------------------------------------------------------- actions


def _require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise ViaTunnelError(f"gateway {what} needs root")


def resolve(tun: str, *, wan: str | None, subnet: str | None,
            forwards: list[str] | None) -> GatewayConfig:
    table, path = load_gateway_table(validate_ifname(tun))
    return merge_config(tun, table, wan=wan, subnet=subnet, forwards=forwards, source=path)


def up(cfg: GatewayConfig, settings: Settings) -> str:
    """Bring ``cfg`` up (or replace a different earlier setup of the same tunnel); returns a
    one-line summary. Everything is checked before anything changes."""
    _require_root("up")
    paths = Paths(settings)
    with locked(paths):
        files.remove_orphan_tmp_in((paths.dir,))  # of a run killed while writing
        tun = iface_facts(cfg.tun)
        wan = iface_facts(cfg.wan)
        states = load_states(paths)
        names = table_names(_table())
        old = states.get(cfg.tun)
        if old is not None:
            gw_id = int(old["plan"]["id"])
        else:
            used = {int(s["plan"]["id"]) for s in states.values()} | ids_in_table(names)
            gw_id = free_id(used)
        plan = plan_gateway(cfg, tun, wan, gw_id)
        for other, rec in states.items():
            if other == cfg.tun:
                continue
            theirs = GatewayPlan.from_dict(rec["plan"])
            if theirs.wan != plan.wan:
                continue
            for f in plan.forwards:
                for g in theirs.forwards:
                    if f.overlaps(g):
                        raise ViaTunnelError(
                            f"{f.proto} port {f.port[0]} of {plan.wan} is already forwarded "
                            f"by gateway {other} ({g.spec()})"
                        )
        for w in foreign_warnings(nft.others_ruleset() or [], plan):
            warn(w)
        wanted = {*chain_names(gw_id), *counter_names(plan)}
        # Up twice changes nothing: same plan and exactly its objects in place.
        same = (old is not None and GatewayPlan.from_dict(old["plan"]) == plan
                and {n for n in names if owns(gw_id, n)} == wanted)
        if not same:
            record = {"plan": plan.to_dict(), "since": time.time()}
            files.write_json(paths.tunnel(cfg.tun), record)
            try:
                nft.run_json(up_commands(plan, names))
            except ViaTunnelError:
                if old is None:
                    files.remove_json(paths.tunnel(cfg.tun))
                else:
                    files.write_json(paths.tunnel(cfg.tun), old)
                raise
        _claim_sysctls(paths, _families(plan))
        _check_device_forwarding(plan)
    fw = ", ".join(f.spec() for f in plan.forwards) or "no ports"
    verdict = "already up" if same else "up"
    return (f"gateway {plan.tun} {verdict}: {plan.subnet} masqueraded out of {plan.wan}; "
            f"forwarding {fw}")


def down(tun: str, settings: Settings) -> str:
    """Remove what ``up`` added for ``tun``, and nothing else. Not up: says so, exit 0."""
    validate_ifname(tun)
    _require_root("down")
    paths = Paths(settings)
    with locked(paths):
        files.remove_orphan_tmp_in((paths.dir,))
        states = load_states(paths)
        rec = states.pop(tun, None)
        if rec is None:
            return f"gateway {tun} is not up"
        gw_id = int(rec["plan"]["id"])
        cmds = down_commands(gw_id, table_names(_table()))
        if cmds:
            nft.run_json(cmds)
        files.remove_json(paths.tunnel(tun))
        needed = {f for r in states.values()
                  for f in _families(GatewayPlan.from_dict(r["plan"]))}
        _release_sysctls(paths, needed)
    return f"gateway {tun} down"


def status(settings: Settings) -> list[dict[str, Any]]:
    """Every tunnel that is up, with its counters (None where the table lacks them)."""
    paths = Paths(settings)
    states = load_states(paths)
    objects = _table() if states else []
    names = table_names(objects)
    values = counters(objects)

    def count(name: str) -> dict[str, int] | None:
        if name not in values:
            return None
        return {"packets": values[name][0], "bytes": values[name][1]}

    out = []
    for tun, rec in sorted(states.items()):
        plan = GatewayPlan.from_dict(rec["plan"])
        n = plan.id
        out.append({
            "tunnel": tun, "wan": plan.wan, "id": n, "subnet": plan.subnet,
            "subnet6": list(plan.subnet6), "mtu": plan.mtu, "since": rec.get("since"),
            "active": all(c in names for c in chain_names(n)),
            "forwards": [{"spec": f.spec(), "proto": f.proto, "ports": list(f.port),
                          "dest": f.dest, "dport": f.dport, "counter": count(f"t{n}_f{i}")}
                         for i, f in enumerate(plan.forwards)],
            "outbound": count(f"t{n}_out"), "inbound_replies": count(f"t{n}_in"),
        })
    return out
