"""Pure planning for ``via-tunnel gateway``: the VPS end of a tunnel.

The gateway masquerades what the tunnel's subnet sends out of the WAN interface, forwards
chosen WAN ports (DNAT) to an address behind the tunnel, counts and accepts that forwarded
traffic and clamps the MSS of TCP crossing the tunnel. Nothing here touches the system:
:mod:`via_tunnel.gateway.apply` gathers the facts and applies what these functions return.

Footprint, all in ``table inet via_tunnel_gw``:

* each tunnel that is up has a numbered id ``N`` (1..MAX_ID) and owns three base chains
  ``tN_dnat`` (nat prerouting), ``tN_forward`` (filter forward), ``tN_snat`` (nat
  postrouting) and the named counters ``tN_fI`` (forward I), ``tN_out`` and ``tN_in``.
  Object names are built from integers only; the user's interface names, addresses and
  ports travel as JSON data, never as nft text.
* ``down`` deletes exactly those objects; with the last tunnel gone it deletes the table.

Forward specs are ``PROTO:PORT[-PORT]:DEST[:DPORT[-DPORT]]``. A port range is forwarded to
the same ports on DEST (DPORT omitted, or equal to PORT): the kernel keeps a port that lies
inside the NAT range, and nft 1.0.6 has no shifted port ranges.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any

from via_tunnel.core.errors import UsageError, ViaTunnelError
from via_tunnel.core.names import validate_ifname

GW_FAMILY = "inet"
GW_TABLE = "via_tunnel_gw"
MAX_ID = 4095
PROTOS = ("tcp", "udp")
IPV4_TCP_OVERHEAD = 40  # IPv4 + TCP headers: MSS = MTU - 40
IPV6_TCP_OVERHEAD = 60

# Sysctl paths (relative to /proc/sys). ``ip_forward`` is ``conf/all/forwarding``; writing it
# also rewrites default/forwarding, every device's forwarding and all/accept_redirects
# (net/ipv4/devinet.c: inet_forward_change), so all of those are saved to be restored.
IPV4_FORWARD = "net/ipv4/ip_forward"
IPV6_FORWARD = "net/ipv6/conf/all/forwarding"

_SPEC = re.compile(
    r"^(?P<proto>[a-z]+):(?P<port>[0-9]+(?:-[0-9]+)?):(?P<dest>[0-9.]+)"
    r"(?::(?P<dport>[0-9]+(?:-[0-9]+)?))?$"
)


# --------------------------------------------------------------------------- input


@dataclass(frozen=True)
class Forward:
    """One forwarded WAN port or port range. ``dport`` is None: the same port(s) on DEST."""

    proto: str
    port: tuple[int, int]  # (first, last); first == last for a single port
    dest: str
    dport: int | None = None  # only for single ports

    def spec(self) -> str:
        """The canonical spec text (what ``parse_forward`` reads back to an equal value)."""
        lo, hi = self.port
        ports = str(lo) if lo == hi else f"{lo}-{hi}"
        tail = f":{self.dport}" if self.dport is not None else ""
        return f"{self.proto}:{ports}:{self.dest}{tail}"

    def overlaps(self, other: Forward) -> bool:
        return (self.proto == other.proto and self.port[0] <= other.port[1]
                and other.port[0] <= self.port[1])


def _port_range(text: str, spec: str) -> tuple[int, int]:
    lo_s, _, hi_s = text.partition("-")
    lo, hi = int(lo_s), int(hi_s or lo_s)
    for p in (lo, hi):
        if not 1 <= p <= 65535:
            raise UsageError(f"forward {spec!r}: port {p} is out of range 1-65535")
    if hi < lo:
        raise UsageError(f"forward {spec!r}: port range {text} is backwards")
    return lo, hi


def parse_forward(spec: str) -> Forward:
    """Parse ``PROTO:PORT[-PORT]:DEST[:DPORT[-DPORT]]``; raise :class:`UsageError` (exit 2)
    on anything malformed. Whether DEST lies in the tunnel's subnet is checked by
    :func:`plan_gateway`, which knows the subnet."""
    m = _SPEC.match(spec.strip().lower())
    if m is None:
        raise UsageError(
            f"forward {spec!r} is malformed: expected PROTO:PORT[-PORT]:DEST[:DPORT], "
            f"e.g. tcp:8080:192.0.2.50:80"
        )
    proto = m["proto"]
    if proto not in PROTOS:
        raise UsageError(f"forward {spec!r}: protocol must be tcp or udp, not {proto!r}")
    port = _port_range(m["port"], spec)
    try:
        dest = ipaddress.IPv4Address(m["dest"])
    except ValueError:
        raise UsageError(f"forward {spec!r}: {m['dest']!r} is not an IPv4 address") from None
    dport: int | None = None
    if m["dport"] is not None:
        dlo, dhi = _port_range(m["dport"], spec)
        if port[0] == port[1]:
            if dlo != dhi:
                raise UsageError(f"forward {spec!r}: one port cannot go to a port range")
            dport = dlo if dlo != port[0] else None
        elif (dlo, dhi) != port:
            raise UsageError(
                f"forward {spec!r}: a port range can only be forwarded to the same ports"
            )
    return Forward(proto=proto, port=port, dest=str(dest), dport=dport)


def parse_subnet(text: str) -> ipaddress.IPv4Network:
    """An IPv4 CIDR (host bits allowed: ``192.0.2.49/28`` means 192.0.2.48/28)."""
    try:
        net = ipaddress.IPv4Network(text.strip(), strict=False)
    except ValueError:
        raise UsageError(f"subnet {text!r} is not an IPv4 CIDR like 192.0.2.48/28") from None
    if "/" not in text:
        raise UsageError(f"subnet {text!r} has no prefix length (e.g. {text}/28)")
    return net


@dataclass(frozen=True)
class GatewayConfig:
    """What the user asked for, from flags over the config file's ``[gateway.TUN]``."""

    tun: str
    wan: str
    subnet: str | None = None
    forwards: tuple[Forward, ...] = ()


def merge_config(
    tun: str,
    table: dict[str, Any],
    *,
    wan: str | None,
    subnet: str | None,
    forwards: list[str] | None,
    source: str = "config",
) -> GatewayConfig:
    """Combine ``[gateway.TUN]`` (``table``, possibly empty) with flags; flags win, and
    ``--forward`` replaces the file's whole ``forward`` list. Raises :class:`UsageError`."""
    validate_ifname(tun)
    known = {"wan", "subnet", "forward"}
    extra = sorted(set(table) - known)
    if extra:
        raise UsageError(f"{source}: [gateway.{tun}] has unknown key {extra[0]!r}")
    for key in ("wan", "subnet"):
        if key in table and not isinstance(table[key], str):
            raise UsageError(f"{source}: [gateway.{tun}] {key} must be a string")
    file_fwd = table.get("forward", [])
    if not isinstance(file_fwd, list) or not all(isinstance(f, str) for f in file_fwd):
        raise UsageError(f"{source}: [gateway.{tun}] forward must be a list of strings")
    wan = wan if wan is not None else table.get("wan")
    if not wan:
        raise UsageError(
            f"gateway {tun}: no WAN interface: pass --wan or set wan in [gateway.{tun}] "
            f"of {source}"
        )
    validate_ifname(wan)
    if wan == tun:
        raise UsageError(f"gateway {tun}: the WAN interface cannot be the tunnel itself")
    subnet = subnet if subnet is not None else table.get("subnet")
    if subnet is not None:
        parse_subnet(subnet)
    specs = forwards if forwards else file_fwd
    parsed = tuple(parse_forward(s) for s in specs)
    for i, a in enumerate(parsed):
        for b in parsed[:i]:
            if a.overlaps(b):
                raise UsageError(f"forwards {b.spec()!r} and {a.spec()!r} overlap")
    return GatewayConfig(tun=tun, wan=wan, subnet=subnet, forwards=parsed)


# --------------------------------------------------------------------------- facts


@dataclass(frozen=True)
class Addr4:
    """One IPv4 address of an interface: ``local`` and, on a point-to-point link, ``peer``
    (IFA_ADDRESS when it differs from IFA_LOCAL)."""

    local: str
    prefixlen: int
    peer: str | None = None


@dataclass(frozen=True)
class IfFacts:
    """What planning needs about one interface, gathered by the adapter."""

    name: str
    index: int
    mtu: int
    ipv4: tuple[Addr4, ...] = ()
    ipv6_global: tuple[str, ...] = ()  # "addr/len"


def default_subnet(tun: IfFacts) -> ipaddress.IPv4Network:
    """The subnet to masquerade when the user gives none: that of TUN's first IPv4 address.

    On a point-to-point address with a peer (OpenVPN p2p: ``192.0.2.49 peer 192.0.2.50/32``)
    the prefix belongs to the peer, so the subnet is ``peer/prefixlen`` (192.0.2.50/32):
    what sits behind the tunnel. Clients routed behind that peer need ``--subnet``.
    """
    if not tun.ipv4:
        raise ViaTunnelError(f"interface {tun.name} has no IPv4 address")
    a = tun.ipv4[0]
    base = a.peer if a.peer and a.peer != a.local else a.local
    return ipaddress.IPv4Network(f"{base}/{a.prefixlen}", strict=False)


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class GatewayPlan:
    """Everything one tunnel's gateway consists of; saved as its state and compared on the
    next ``up`` (equal plan and objects present: nothing to do)."""

    tun: str
    wan: str
    id: int
    subnet: str
    mtu: int
    forwards: tuple[Forward, ...] = ()
    subnet6: tuple[str, ...] = ()  # the tunnel's global IPv6 prefixes, when WAN has v6 too
    # WAN's IPv4 addresses: a forwarded port asked for at one of them from this host or
    # from behind the tunnel (hairpin) goes to DEST too. Another `up` follows a change.
    wan4: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default=(), compare=False)

    @property
    def ipv6(self) -> bool:
        return bool(self.subnet6)

    def to_dict(self) -> dict[str, Any]:
        return {
            "tun": self.tun, "wan": self.wan, "id": self.id, "subnet": self.subnet,
            "mtu": self.mtu, "subnet6": list(self.subnet6), "wan4": list(self.wan4),
            "forwards": [f.spec() for f in self.forwards],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GatewayPlan:
        return cls(
            tun=str(data["tun"]), wan=str(data["wan"]), id=int(data["id"]),
            subnet=str(data["subnet"]), mtu=int(data["mtu"]),
            subnet6=tuple(str(s) for s in data.get("subnet6", [])),
            wan4=tuple(str(a) for a in data.get("wan4", [])),
            forwards=tuple(parse_forward(s) for s in data.get("forwards", [])),
        )


def plan_gateway(cfg: GatewayConfig, tun: IfFacts, wan: IfFacts, gw_id: int) -> GatewayPlan:
    """Check ``cfg`` against the interfaces and plan one tunnel's gateway.

    Raises :class:`ViaTunnelError` (exit 125) when the system cannot carry it: TUN without
    IPv4, or a DEST outside the subnet or equal to one of the gateway's own addresses.
    """
    if not 1 <= gw_id <= MAX_ID:
        raise ValueError(f"gateway id {gw_id} out of range")
    subnet = parse_subnet(cfg.subnet) if cfg.subnet else default_subnet(tun)
    own = {ipaddress.IPv4Address(a.local) for a in tun.ipv4 + wan.ipv4}
    for f in cfg.forwards:
        dest = ipaddress.IPv4Address(f.dest)
        if dest not in subnet:
            raise ViaTunnelError(
                f"forward {f.spec()!r}: {dest} is not in the tunnel's subnet {subnet} "
                f"(pass --subnet to widen it)"
            )
        if dest in own:
            raise ViaTunnelError(
                f"forward {f.spec()!r}: {dest} is this gateway's own address, not one "
                f"behind the tunnel"
            )
    subnet6: tuple[str, ...] = ()
    if tun.ipv6_global and wan.ipv6_global:
        subnet6 = tuple(sorted({str(ipaddress.IPv6Interface(a).network)
                                for a in tun.ipv6_global}))
    return GatewayPlan(tun=cfg.tun, wan=cfg.wan, id=gw_id, subnet=str(subnet), mtu=tun.mtu,
                       forwards=cfg.forwards, subnet6=subnet6,
                       wan4=tuple(sorted({a.local for a in wan.ipv4})))


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
    # the tunnel's own endpoint; seen here). Only ours: others' DNAT keeps its sources.
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


def free_id(used: set[int]) -> int:
    """The smallest id no tunnel uses."""
    for i in range(1, MAX_ID + 1):
        if i not in used:
            return i
    raise ViaTunnelError(f"too many gateways: all {MAX_ID} ids are in use")


def ids_in_table(names: dict[str, str]) -> set[int]:
    """Ids that have objects in the table (also stale ones a lost state file left)."""
    out = set()
    for n in names:
        m = re.match(r"^t([0-9]+)_", n)
        if m:
            out.add(int(m.group(1)))
    return out


# --------------------------------------------------------------------------- warnings


def _expr_ports(expr: list[dict[str, Any]]) -> tuple[str | None, list[tuple[int, int]]]:
    """(protocol, destination ports) that a rule's matches name, as far as they can be read."""
    proto: str | None = None
    ports: list[tuple[int, int]] = []
    for e in expr:
        m = e.get("match") if isinstance(e, dict) else None
        if not m or m.get("op") not in ("==", "in"):
            continue
        left, right = m.get("left"), m.get("right")
        if not isinstance(left, dict):
            continue
        if "payload" in left and left["payload"].get("field") == "dport":
            p = left["payload"].get("protocol")
            if p in PROTOS:
                proto = p
            ports += _values(right)
        elif left.get("meta", {}).get("key") == "l4proto" and right in PROTOS:
            proto = right
    return proto, ports


def _values(right: Any) -> list[tuple[int, int]]:
    if isinstance(right, int):
        return [(right, right)]
    if isinstance(right, dict):
        if "range" in right:
            lo, hi = right["range"]
            return [(int(lo), int(hi))] if isinstance(lo, int) and isinstance(hi, int) else []
        if "set" in right:
            out: list[tuple[int, int]] = []
            for v in right["set"]:
                out += _values(v)
            return out
    if isinstance(right, list):
        return [x for v in right for x in _values(v)]
    return []


def _is_dnat(expr: list[dict[str, Any]]) -> bool:
    for e in expr:
        if not isinstance(e, dict):
            continue
        if "dnat" in e or "redirect" in e:
            return True
        xt = e.get("xt")
        if isinstance(xt, dict) and str(xt.get("name", "")).upper() in ("DNAT", "REDIRECT"):
            return True
    return False


def foreign_warnings(ruleset: list[dict[str, Any]], plan: GatewayPlan) -> list[str]:
    """What other tables do that would silently break ``plan`` (from ``nft -j list
    ruleset``): a forward base chain with policy drop (Docker sets one), and a DNAT or
    redirect of one of our WAN ports. Best effort: rules it cannot read are not reported."""
    warnings: list[str] = []
    for obj in ruleset:
        c = obj.get("chain")
        if (c and c.get("table") != GW_TABLE and c.get("hook") == "forward"
                and c.get("policy") == "drop"):
            warnings.append(
                f"table {c.get('family')} {c.get('table')} chain {c.get('name')} drops "
                f"forwarded packets by policy: the gateway's traffic is dropped unless a rule "
                f"there accepts it (Docker: add accept rules to DOCKER-USER)"
            )
    seen: set[tuple[str, str, str, int]] = set()
    for obj in ruleset:
        r = obj.get("rule")
        if not r or r.get("table") == GW_TABLE:
            continue
        expr = r.get("expr", [])
        if not _is_dnat(expr):
            continue
        proto, ports = _expr_ports(expr)
        for f in plan.forwards:
            if proto not in (None, f.proto):
                continue
            for lo, hi in ports:
                key = (str(r.get("family")), str(r.get("table")), str(r.get("chain")),
                       f.port[0])
                if lo <= f.port[1] and f.port[0] <= hi and key not in seen:
                    seen.add(key)
                    warnings.append(
                        f"{f.proto} port {f.port[0]} is also forwarded by table "
                        f"{key[0]} {key[1]} chain {key[2]}: whichever runs first wins"
                    )
    return warnings
