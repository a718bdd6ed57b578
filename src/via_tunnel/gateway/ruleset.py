"""The nft side of the gateway: one tunnel's plan as one transaction, and its removal.

Pure: functions take a :class:`~via_tunnel.gateway.plan.GatewayPlan` or the JSON listing of
our table and return libnftables JSON commands or values; :mod:`via_tunnel.gateway.apply`
lists and runs them. The gateway masquerades what the tunnel's subnet sends out of the WAN
interface, forwards chosen WAN ports (DNAT) to an address behind the tunnel, counts and
accepts that forwarded traffic and clamps the MSS of TCP crossing the tunnel.

Footprint, all in ``table inet via_tunnel_gw``:

* each tunnel that is up has a numbered id ``N`` (1..MAX_ID) and owns the base chains
  ``tN_dnat`` (nat prerouting), ``tN_forward`` (filter forward), ``tN_snat`` (nat
  postrouting) and ``tN_local`` (nat output) and the named counters ``tN_fI`` (forward I),
  ``tN_out`` and ``tN_in``. Object names are built from integers only; the user's interface
  names, addresses and ports travel as JSON data, never as nft text.
* ``down`` deletes exactly those objects; with the last tunnel gone it deletes the table.

Standard library and ``core`` only (see :mod:`via_tunnel.gateway.config` for why this
lives in ``gateway/``).
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from via_tunnel.gateway.plan import GatewayPlan

GW_FAMILY = "inet"
GW_TABLE = "via_tunnel_gw"
IPV4_TCP_OVERHEAD = 40  # IPv4 + TCP headers: MSS = MTU - 40
IPV6_TCP_OVERHEAD = 60


def chain_names(gw_id: int) -> tuple[str, str, str, str]:
    """``(dnat, forward, snat, local)`` chain names of tunnel ``gw_id`` (built from the int
    only); ``local`` DNATs this host's own connections to a forwarded port."""
    n = int(gw_id)
    return f"t{n}_dnat", f"t{n}_forward", f"t{n}_snat", f"t{n}_local"


def counter_names(plan: GatewayPlan) -> list[str]:
    n = int(plan.id)
    return [f"t{n}_f{i}" for i in range(len(plan.forwards))] + [f"t{n}_out", f"t{n}_in"]


def owns(gw_id: int, name: str) -> bool:
    """Whether the chain or counter ``name`` belongs to tunnel ``gw_id``."""
    return name.startswith(f"t{int(gw_id)}_")


def _obj(kind: str, **data: Any) -> dict[str, Any]:
    return {kind: {"family": GW_FAMILY, "table": GW_TABLE, **data}}


def _match(left: Any, right: Any, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": left, "right": right}}


def _meta(key: str) -> dict[str, Any]:
    return {"meta": {"key": key}}


def _ports(port: tuple[int, int]) -> Any:
    return port[0] if port[0] == port[1] else {"range": [port[0], port[1]]}


def _rule(chain: str, expr: list[dict[str, Any]]) -> dict[str, Any]:
    return {"add": _obj("rule", chain=chain, expr=expr)}


def _rules(plan: GatewayPlan) -> list[dict[str, Any]]:
    dnat, fwd, snat, local = chain_names(plan.id)
    n = plan.id
    tun, wan = plan.tun, plan.wan
    net = ipaddress.IPv4Network(plan.subnet)
    rules: list[dict[str, Any]] = []
    wan4 = plan.wan4[0] if len(plan.wan4) == 1 else {"set": list(plan.wan4)}
    local_daddr = _match({"fib": {"result": "type", "flags": ["daddr"]}}, "local")
    # WAN's address as recorded, and still this host's (after a change of address, an old
    # one that now belongs to someone else must not be taken over until `up` runs again).
    to_wan4 = [_match(_meta("nfproto"), "ipv4"),
               _match({"payload": {"protocol": "ip", "field": "daddr"}}, wan4), local_daddr]
    for f in plan.forwards:
        target: dict[str, Any] = {"family": "ip", "addr": f.dest}
        if f.dport is not None:
            target["port"] = f.dport
        port = [_match(_meta("l4proto"), f.proto),
                _match({"payload": {"protocol": "th", "field": "dport"}}, _ports(f.port)),
                {"dnat": target}]
        rules.append(_rule(dnat, [
            _match(_meta("iifname"), wan),
            # Only packets addressed to this host: traffic routed through WAN is not ours.
            local_daddr,
            _match(_meta("nfproto"), "ipv4"),
            *port,
        ]))
        if plan.wan4:
            # Hairpin: the public address and port asked for from behind the tunnel...
            rules.append(_rule(dnat, [_match(_meta("iifname"), tun), *to_wan4, *port]))
            # ...and from this host itself (its packets never pass prerouting).
            rules.append(_rule(local, [*to_wan4, *port]))
    syn = _match({"payload": {"protocol": "tcp", "field": "flags"}}, "syn", "in")
    mss = {"tcp option": {"name": "maxseg", "field": "size"}}
    # Into the tunnel the route's MTU is the tunnel's; out of it the route is WAN's, so the
    # tunnel's MSS is a number computed here (the kernel only ever lowers an MSS).
    rules.append(_rule(fwd, [_match(_meta("oifname"), tun), syn,
                             {"mangle": {"key": mss, "value": {"rt": {"key": "mtu"}}}}]))
    for proto, overhead in (("ipv4", IPV4_TCP_OVERHEAD), ("ipv6", IPV6_TCP_OVERHEAD)):
        rules.append(_rule(fwd, [_match(_meta("iifname"), tun), _match(_meta("nfproto"), proto),
                                 syn, {"mangle": {"key": mss, "value": plan.mtu - overhead}}]))
    pair = {"concat": [_meta("iifname"), _meta("oifname")]}
    both_ways = {"set": [{"concat": [wan, tun]}, {"concat": [tun, wan]},
                         {"concat": [tun, tun]}]}  # the last: hairpin
    for i, f in enumerate(plan.forwards):
        # Both directions of each forwarded connection, counted per forward.
        rules.append(_rule(fwd, [
            _match(pair, both_ways),
            _match({"ct": {"key": "status"}}, "dnat", "in"),
            _match(_meta("l4proto"), f.proto),
            _match({"ct": {"key": "proto-dst", "dir": "original"}}, _ports(f.port)),
            {"counter": f"t{n}_f{i}"}, {"accept": None},
        ]))
    src4 = _match({"payload": {"protocol": "ip", "field": "saddr"}},
                  {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}})
    rules.append(_rule(fwd, [_match(_meta("iifname"), tun), _match(_meta("oifname"), wan),
                             src4, {"counter": f"t{n}_out"}, {"accept": None}]))
    src6 = [_match({"payload": {"protocol": "ip6", "field": "saddr"}},
                   {"prefix": {"addr": str(ipaddress.IPv6Network(p).network_address),
                               "len": ipaddress.IPv6Network(p).prefixlen}})
            for p in plan.subnet6]
    for s in src6:
        rules.append(_rule(fwd, [_match(_meta("iifname"), tun), _match(_meta("oifname"), wan),
                                 s, {"counter": f"t{n}_out"}, {"accept": None}]))
    rules.append(_rule(fwd, [
        _match(_meta("iifname"), wan), _match(_meta("oifname"), tun),
        _match({"ct": {"key": "state"}}, ["established", "related"], "in"),
        {"counter": f"t{n}_in"}, {"accept": None},
    ]))
    for s in [src4, *src6]:
        rules.append(_rule(snat, [_match(_meta("oifname"), wan), s, {"masquerade": None}]))
    # Hairpin connections (to WAN's address and a forwarded port, from behind the tunnel
    # or from this host) are masqueraded to TUN's address: DEST would answer the caller
    # directly, or answer WAN's address, which OpenVPN drops as recursive routing (it is
    # the tunnel's own endpoint). Only ours: others' DNAT keeps its sources.
    callers = ([_match(_meta("iifname"), tun), _match(_meta("oifname"), tun)],
               [_match(_meta("oifname"), tun),
                _match({"fib": {"result": "type", "flags": ["saddr"]}}, "local")])
    for f in plan.forwards if plan.wan4 else ():
        ours = [_match(_meta("nfproto"), "ipv4"),
                _match({"ct": {"key": "daddr", "family": "ip", "dir": "original"}}, wan4),
                _match(_meta("l4proto"), f.proto),
                _match({"ct": {"key": "proto-dst", "dir": "original"}}, _ports(f.port))]
        for caller in callers:
            rules.append(_rule(snat, [*caller, *ours, {"masquerade": None}]))
    return rules


def up_commands(plan: GatewayPlan, present: dict[str, str]) -> list[dict[str, Any]]:
    """The one transaction that makes ``plan`` live.

    ``present`` is :func:`table_names` of the table as it is now (empty: no table). A
    previous setup of this tunnel is replaced (its chains flushed,
    its counters recreated) in the same transaction, so traffic never sees a half state.
    """
    dnat, fwd, snat, local = chain_names(plan.id)
    cmds: list[dict[str, Any]] = [{"add": {"table": {"family": GW_FAMILY, "name": GW_TABLE}}}]
    for name, kind, hook, prio in ((dnat, "nat", "prerouting", -100),
                                   (fwd, "filter", "forward", 0),
                                   (snat, "nat", "postrouting", 100),
                                   (local, "nat", "output", -100)):
        if name in present:
            cmds.append({"flush": _obj("chain", name=name)})
        else:
            cmds.append({"add": _obj("chain", name=name, type=kind, hook=hook, prio=prio,
                                     policy="accept")})
    counters = counter_names(plan)
    cmds += [{"delete": _obj("counter", name=c)} for c, kind in sorted(present.items())
             if kind == "counter" and owns(plan.id, c)]
    cmds += [{"add": _obj("counter", name=c)} for c in counters]
    return cmds + _rules(plan)


def down_commands(gw_id: int, names: dict[str, str]) -> list[dict[str, Any]]:
    """The one transaction that removes tunnel ``gw_id``: its chains and counters, or the
    whole table when nothing of another tunnel is left in it. ``names`` maps every chain or
    counter name in the table to its kind (``"chain"``/``"counter"``); no table: ``[]``."""
    if not names:
        return []
    mine = {n: k for n, k in names.items() if owns(gw_id, n)}
    if len(mine) == len(names):
        return [{"delete": {"table": {"family": GW_FAMILY, "name": GW_TABLE}}}]
    cmds: list[dict[str, Any]] = []
    for n, kind in sorted(mine.items()):
        if kind == "chain":
            cmds.append({"flush": _obj("chain", name=n)})
    for n, kind in sorted(mine.items(), key=lambda kv: kv[1] == "counter"):
        cmds.append({"delete": _obj(kind, name=n)})
    return cmds


def table_names(objects: list[dict[str, Any]]) -> dict[str, str]:
    """Chain and counter names in our table's JSON listing, mapped to their kind."""
    out: dict[str, str] = {}
    for obj in objects:
        for kind in ("chain", "counter"):
            o = obj.get(kind)
            if o and o.get("table") == GW_TABLE and o.get("family") == GW_FAMILY:
                out[str(o["name"])] = kind
    return out


def counters(objects: list[dict[str, Any]]) -> dict[str, tuple[int, int]]:
    """``{name: (packets, bytes)}`` of the named counters in our table's listing."""
    out: dict[str, tuple[int, int]] = {}
    for obj in objects:
        c = obj.get("counter")
        if c and c.get("table") == GW_TABLE:
            out[str(c["name"])] = (int(c.get("packets", 0)), int(c.get("bytes", 0)))
    return out


def ids_in_table(names: dict[str, str]) -> set[int]:
    """Ids that have objects in the table (also stale ones a lost state file left)."""
    out = set()
    for n in names:
        m = re.match(r"^t([0-9]+)_", n)
        if m:
            out.add(int(m.group(1)))
    return out
