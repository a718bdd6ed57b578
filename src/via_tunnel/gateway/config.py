"""What the user asks ``via-tunnel gateway up`` for: the tunnel, its WAN interface, the
subnet to masquerade and the forwarded ports, from flags over ``[gateway.TUN]`` of the
config file. Pure: values in, values or :class:`UsageError` (exit 2) out.

Forward specs are ``PROTO:PORT[-PORT]:DEST[:DPORT[-DPORT]]``. A port range is forwarded to
the same ports on DEST (DPORT omitted, or equal to PORT): the kernel keeps a port that lies
inside the NAT range, and nft 1.0.6 has no shifted port ranges.

``[gateway.TUN]`` reaches :func:`merge_config` as :mod:`via_tunnel.core.config` parsed it (a
table under a valid name); its keys and values are checked here, by the same code as the
flags. The gateway's pure modules (this one, :mod:`.plan`, :mod:`.ruleset`,
:mod:`.foreign`) stay in ``gateway/`` rather than ``core/`` because no other front end uses
them; like ``core`` they import only the standard library and ``core``, and touch nothing:
:mod:`via_tunnel.gateway.apply` gathers the facts and applies what they return.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from via_tunnel.core.errors import UsageError
from via_tunnel.core.names import validate_ifname

PROTOS = ("tcp", "udp")

_SPEC = re.compile(
    r"^(?P<proto>[a-z]+):(?P<port>[0-9]+(?:-[0-9]+)?):(?P<dest>[0-9.]+)"
    r"(?::(?P<dport>[0-9]+(?:-[0-9]+)?))?$"
)


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
    :func:`via_tunnel.gateway.plan.plan_gateway`, which knows the subnet."""
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
    table: Mapping[str, Any],
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
