"""What other tables do that would silently break a gateway: warnings, never errors.

Pure: :func:`foreign_warnings` reads ``nft -j list ruleset`` (as parsed JSON) and a
:class:`~via_tunnel.gateway.plan.GatewayPlan`, and returns one line per finding. Best
effort: rules it cannot read are not reported. Standard library and ``core`` only (see
:mod:`via_tunnel.gateway.config` for why this lives in ``gateway/``).
"""

from __future__ import annotations

from typing import Any

from via_tunnel.gateway.config import PROTOS
from via_tunnel.gateway.plan import GatewayPlan
from via_tunnel.gateway.ruleset import GW_TABLE


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
