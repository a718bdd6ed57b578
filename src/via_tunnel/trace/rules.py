"""The nft table of ``via-tunnel trace`` (pure: JSON commands, no I/O).

Its own table, ``inet via_tunnel_trace``, never via-tunnel's: trace only watches.

* ``drops`` (postrouting, priority filter - 1: just before via-tunnel's own postrouting
  chain) logs the packets the kill switch is about to drop: the group's mark, leaving by
  neither ``lo`` nor an interface the group may use. The same condition as the kill switch
  in ruleset.nft, for the traced group only.
* ``new`` (postrouting, priority srcnat + 1: just after masquerade) logs the first packet
  of each new connection of the group, so its source is the one the far end sees. Later
  copies of a first packet (a retransmitted SYN) find their connection already confirmed
  and are not shown again.

What changes with the group (its mark, its interface name) is set data in JSON, added and
removed with :func:`group_elements`; the interface name is never nft text.
"""

from __future__ import annotations

from typing import Any, Literal

from via_tunnel.core.settings import NFT_FAMILY

TABLE = "via_tunnel_trace"
PREFIX_NEW = "via-tunnel new"
PREFIX_DROP = "via-tunnel drop"
PRIO_DROPS = -1  # filter - 1: before ruleset.nft's postrouting (filter) drops the packet
PRIO_NEW = 101  # srcnat + 1: after ruleset.nft's masquerade (srcnat)


def _obj(kind: str, **fields: Any) -> dict[str, Any]:
    return {kind: {"family": NFT_FAMILY, "table": TABLE, **fields}}


def _meta(key: str) -> dict[str, Any]:
    return {"meta": {"key": key}}


def _match(op: str, left: Any, right: Any) -> dict[str, Any]:
    return {"match": {"op": op, "left": left, "right": right}}


def table_commands(group: int) -> list[dict[str, Any]]:
    """Sets, chains and rules of the trace table (which must already exist: it is created
    with ``flags owner`` in text, see trace.py), logging to NFLOG ``group``."""
    mark_oif = {"concat": [_meta("mark"), _meta("oifname")]}
    drops = [
        _match("==", _meta("mark"), "@marks"),
        _match("!=", _meta("oifname"), "lo"),
        _match("!=", mark_oif, "@oifs"),
        {"log": {"prefix": PREFIX_DROP, "group": group}},
    ]
    new = [
        _match("==", _meta("mark"), "@marks"),
        _match("in", {"ct": {"key": "state"}}, "new"),
        _match("!", {"ct": {"key": "status"}}, "confirmed"),
        {"log": {"prefix": PREFIX_NEW, "group": group}},
    ]
    return [{"add": item} for item in (
        _obj("set", name="marks", type="mark"),
        _obj("set", name="oifs", type=["mark", "ifname"]),
        _obj("chain", name="drops", type="filter", hook="postrouting", prio=PRIO_DROPS,
             policy="accept"),
        _obj("chain", name="new", type="filter", hook="postrouting", prio=PRIO_NEW,
             policy="accept"),
        _obj("rule", chain="drops", expr=drops),
        _obj("rule", chain="new", expr=new),
    )]


def group_elements(mark: int, iface: str,
                   verb: Literal["add", "delete"]) -> list[dict[str, Any]]:
    """Add or remove the traced group: its mark, and where its packets may leave."""
    return [
        {verb: _obj("element", name="marks", elem=[mark])},
        {verb: _obj("element", name="oifs", elem=[{"concat": [mark, iface]}])},
    ]


def delete_table_command() -> dict[str, Any]:
    return {"delete": {"table": {"family": NFT_FAMILY, "name": TABLE}}}
