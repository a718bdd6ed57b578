"""The nft side of the plan (pure): the fixed ruleset (``ruleset.nft``, package data beside
this file), the per-level rules, and the JSON transactions that attach and detach a group.

Only integers we compute ever reach nft as text; every name (interfaces, cgroup paths,
resolvers) travels as JSON data in the per-group transactions.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from via_tunnel.core.errors import ViaTunnelError
from via_tunnel.core.plan import GroupPlan
from via_tunnel.core.settings import MARK_FLAG, NFT_FAMILY, NFT_TABLE

RULESET_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ruleset.nft")


def base_ruleset() -> str:
    """The text that creates our table (without any group or cgroup level)."""
    with open(RULESET_FILE) as f:
        text = f.read()
    if f"0x{MARK_FLAG:08x}" not in text:  # the file and settings.py must agree
        raise ViaTunnelError(f"{RULESET_FILE} does not use mark flag 0x{MARK_FLAG:08x}")
    return text


def level_map_name(level: int) -> str:
    return f"groups_l{int(level)}"


def level_ruleset(level: int) -> str:
    """Text adding the cgroup map and socket rule for one cgroup2 level.

    ``socket cgroupv2`` cannot be expressed in libnftables JSON (NOTES.md), so this is
    text; ``level`` is an int we computed from the cgroup path, never user input.
    """
    level = int(level)
    if not 1 <= level <= 255:
        raise ValueError(f"cgroup level {level} out of range")
    name = level_map_name(level)
    return (
        f"add map {NFT_FAMILY} {NFT_TABLE} {name} {{ type cgroupsv2 : mark; }}\n"
        f"add rule {NFT_FAMILY} {NFT_TABLE} group_sockets "
        f"meta mark set socket cgroupv2 level {level} map @{name} ct mark set meta mark\n"
    )


def group_elements(plan: GroupPlan, verb: Literal["add", "delete"],
                   cgroup: bool = True) -> list[dict[str, Any]]:
    """The nft JSON commands that attach (``add``) or detach (``delete``) one group
    (``cgroup=False``: all but its cgroup2 map element, whose path may be gone).

    One list = one transaction. Setup and teardown come from this one function, so they
    always name the same elements.
    """

    def element(name: str, elem: list[Any]) -> dict[str, Any]:
        return {verb: {"element": {"family": NFT_FAMILY, "table": NFT_TABLE,
                                   "name": name, "elem": elem}}}

    commands = [
        element("group_oifs", [{"concat": [plan.mark, plan.iface]}]),
        element("tx", [{"concat": [plan.mark, plan.iface]}]),
        element("rx", [{"concat": [plan.mark, plan.iface]}]),
        element("iif_marks", [[plan.iface, plan.mark]]),
    ]
    if cgroup:
        commands.append(element(level_map_name(plan.level), [[plan.cgroup_nft_path, plan.mark]]))
    if plan.classid:
        commands.append(element("classid_marks", [[plan.classid, plan.mark]]))
    if plan.ipv6 == "block":
        commands.append(element("v6_blocked", [plan.mark]))
    if plan.dns4 is not None:
        commands.append(element("dns4", [[plan.mark, plan.dns4]]))
    if plan.dns6 is not None:
        commands.append(element("dns6", [[plan.mark, plan.dns6]]))
    return commands


def drain_element(mark: int, iface: str, seconds: int) -> dict[str, Any]:
    """The JSON command that keeps a torn-down group's mark draining for ``seconds``
    (the kernel removes the element then; ruleset.nft says why it exists)."""
    return {"add": {"element": {"family": NFT_FAMILY, "table": NFT_TABLE, "name": "draining",
                                "elem": [[{"elem": {"val": mark, "timeout": int(seconds)}},
                                          iface]]}}}


def draining_in(listing: list[dict[str, Any]]) -> dict[int, tuple[str, int]]:
    """mark -> (interface, seconds left) of the ``draining`` map in an nft JSON listing."""
    out: dict[int, tuple[str, int]] = {}
    for obj in listing:
        body = obj.get("map") or {}
        if body.get("name") != "draining":
            continue
        for key, iface in body.get("elem", []):
            elem = key.get("elem", {}) if isinstance(key, dict) else {"val": key}
            out[int(elem["val"])] = (str(iface), int(elem.get("expires", 0)))
    return out


def missing_from(listing: list[dict[str, Any]], plan: GroupPlan) -> bool:
    """Whether a listing of our table (nft JSON objects) lacks anything that
    ``group_elements(plan, "add")`` adds.

    The cgroup maps are checked by value only: nft prints a cgroup key by searching
    /sys/fs/cgroup for its inode, which on a hybrid host can name the wrong path.
    """
    held: dict[str, list[Any]] = {}
    for obj in listing:
        body = obj.get("set") or obj.get("map")
        if body is not None:
            held[body["name"]] = [_element_value(e) for e in body.get("elem", [])]
    for command in group_elements(plan, "add"):
        elem = command["add"]["element"]
        have = held.get(elem["name"])
        if have is None:
            return True
        for item in elem["elem"]:
            if elem["name"].startswith("groups_l"):
                if not any(isinstance(h, list) and h[1] == item[1] for h in have):
                    return True
            elif item not in have:
                return True
    return False


def _element_value(e: Any) -> Any:
    """An element as listed, without the per-element statements (counters)."""
    return e["elem"]["val"] if isinstance(e, dict) and "elem" in e else e


def table_damaged(text: str) -> bool:
    """Whether our table, as nft prints it (text), misses a chain or rule of the fixed
    ruleset or of a cgroup level (what ``nft flush table`` or a stray ``nft delete rule``
    leaves)."""
    have = rule_counts(text)
    expected = rule_counts(base_ruleset())
    expected["group_sockets"] = len(levels_in(text))
    return any(have.get(chain, -1) < n for chain, n in expected.items())


def rule_counts(text: str) -> dict[str, int]:
    """chain -> number of rules, from nft ruleset text (ruleset.nft or an ``nft list``
    printout): every line inside a chain block other than its type/policy line and
    comments is one rule."""
    counts: dict[str, int] = {}
    chain: str | None = None
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if line.startswith("chain "):
            chain = line.split()[1]
            counts[chain] = 0
        elif chain is not None and line == "}":
            chain = None
        elif chain is not None and line and not line.startswith("type "):
            counts[chain] += 1
    return counts


def levels_in(text: str) -> set[int]:
    """The cgroup levels that have a map in our table, from its nft printout."""
    levels = set()
    for raw in text.splitlines():
        words = raw.split()
        if len(words) >= 2 and words[0] == "map" and words[1].startswith("groups_l") \
                and words[1][8:].isdigit():
            levels.add(int(words[1][8:]))
    return levels


def element_names(levels: set[int]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(sets, maps) that hold groups' elements: what :func:`missing_from` needs listed."""
    return (("group_oifs", "tx", "rx", "v6_blocked"),
            ("iif_marks", "dns4", "dns6", "classid_marks",
             *(level_map_name(lv) for lv in sorted(levels))))
