"""The plan of one tunnel's gateway, from the user's request and the interfaces' facts.

Pure: :func:`plan_gateway` checks a :class:`~via_tunnel.gateway.config.GatewayConfig`
against :class:`IfFacts` (gathered by :mod:`via_tunnel.gateway.apply`) and returns a
:class:`GatewayPlan`: what :mod:`via_tunnel.gateway.ruleset` turns into nft commands, saved
as the tunnel's state and compared on the next ``up``. Each tunnel that is up has an id
``1..MAX_ID`` (:func:`free_id`) from which its nft object names are built. Standard library
and ``core`` only (see :mod:`via_tunnel.gateway.config` for why this lives in ``gateway/``).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

from via_tunnel.core.errors import ViaTunnelError
from via_tunnel.gateway.config import Forward, GatewayConfig, parse_forward, parse_subnet

MAX_ID = 4095

# Sysctl paths (relative to /proc/sys). ``ip_forward`` is ``conf/all/forwarding``; writing it
# also rewrites default/forwarding, every device's forwarding and all/accept_redirects
# (net/ipv4/devinet.c: inet_forward_change), so all of those are saved to be restored.
IPV4_FORWARD = "net/ipv4/ip_forward"
IPV6_FORWARD = "net/ipv6/conf/all/forwarding"


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


def free_id(used: set[int]) -> int:
    """The smallest id no tunnel uses."""
    for i in range(1, MAX_ID + 1):
        if i not in used:
            return i
    raise ViaTunnelError(f"too many gateways: all {MAX_ID} ids are in use")
