"""Doctor: other nftables tables that give packets marks in via-tunnel's space (pure).

Every via-tunnel mark has bit 31 set, and our table takes any packet whose packet or
connection mark has bit 31 for a group's: the kill switch drops it unless it leaves by that
group's interface, and our ip rules route it. So a foreign rule that sets bit 31 (``meta
mark set 0x80000000``, ``ct mark set ct mark | 0x80000000``, ...) breaks the traffic it
marks. The input is ``nft -j`` objects of the other tables (``nft.others_ruleset``); a
value we cannot evaluate (a map lookup, a hash) is not reported, nor is iptables-nft's
``MARK`` target (an ``xt`` expression nft cannot show): this check is best effort.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from via_tunnel.core.settings import MARK_FLAG
from via_tunnel.doctor.check import FAIL, OK, Check

_FULL = 0xFFFF_FFFF


def bits_set(value: Any) -> int | None:
    """Which bits the mangle value ``value`` may turn on, or None when it is not a
    constant expression over the mark (a map lookup, a hash, a number generator)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value & _FULL
    if isinstance(value, dict) and len(value) == 1:
        (op, args), = value.items()
        if op in ("meta", "ct") and isinstance(args, dict) and args.get("key") == "mark":
            return 0  # a copy between packet and connection mark adds no bits
        if op in ("|", "&", "^") and isinstance(args, list) and len(args) == 2:
            inner, const = bits_set(args[0]), args[1]
            if inner is None or not isinstance(const, int) or isinstance(const, bool):
                return None
            if op == "|":
                return inner | (const & _FULL)
            if op == "&":
                return inner & const
            return inner | (const & _FULL)  # xor may turn on any bit of the constant
    return None


def _mark_writes(expr: Iterable[Any]) -> Iterable[tuple[str, int]]:
    """(which mark, bits it may turn on) of each mangle statement of a rule's ``expr``."""
    for stmt in expr:
        mangle = stmt.get("mangle") if isinstance(stmt, dict) else None
        if not isinstance(mangle, dict):
            continue
        key = mangle.get("key")
        if not isinstance(key, dict):
            continue
        for kind in ("meta", "ct"):
            if isinstance(key.get(kind), dict) and key[kind].get("key") == "mark":
                bits = bits_set(mangle.get("value"))
                if bits is not None:
                    yield ("packet" if kind == "meta" else "connection"), bits


def check_foreign_marks(objects: Iterable[dict[str, Any]]) -> list[Check]:
    """One FAIL per foreign rule that may set bit 31 of a packet or connection mark, or
    one OK saying how many rules were read."""
    out: list[Check] = []
    rules = 0
    for obj in objects:
        rule = obj.get("rule")
        if not isinstance(rule, dict):
            continue
        rules += 1
        for which, bits in _mark_writes(rule.get("expr") or []):
            if bits & MARK_FLAG:
                where = (f"table {rule.get('family')} {rule.get('table')} chain "
                         f"{rule.get('chain')} (handle {rule.get('handle')})")
                out.append(Check(
                    "nft-marks", FAIL,
                    f"{where} sets bit 31 of the {which} mark: via-tunnel takes every "
                    f"packet with that bit for one of its groups', so its kill switch drops "
                    f"those packets unless they leave by a group's interface",
                    "give those packets marks with bit 31 clear (every via-tunnel mark has "
                    "it set)"))
    if not out:
        out.append(Check("nft-marks", OK, f"no rule of another nftables table sets "
                                          f"via-tunnel's mark bit ({rules} rules read; "
                                          f"iptables-nft MARK targets are not readable)"))
    return out
