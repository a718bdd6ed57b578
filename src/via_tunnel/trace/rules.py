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
* ``unrouted`` (output, priority mangle - 1: just before via-tunnel's route chain) exists
  only while the group's table has no route for a family (its interface is down or gone:
  the kernel removed the routes through it). Then the re-route after via-tunnel's route
  chain finds only the table's ``unreachable default`` and drops the packet on the spot,
  so it never reaches ``drops``. The group's mark is not set yet at that point: the
  group's packets are told by their socket (``socket cgroupv2 level N @cgroups_lN``), and
  ``unrouted_log`` logs those that will be dropped: all but those to this host, except
  DNS to this host (``--dns`` turns it into a query to the resolver, which is dropped
  too; without ``--dns`` it is refused, which is not shown, as while the link is up).

What changes with the group (its mark, its interface name, its cgroup) is set data in JSON,
added and removed with :func:`group_elements` and :func:`cgroup_element`; names are never
nft text. What needs text (``socket cgroupv2`` cannot be written in JSON, NOTES.md) is built
from integers only.
"""

from __future__ import annotations

from socket import AF_INET, AF_INET6
from typing import Any, Literal

from via_tunnel.core.settings import NFT_FAMILY

TABLE = "via_tunnel_trace"
PREFIX_NEW = "via-tunnel new"
PREFIX_DROP = "via-tunnel drop"
PRIO_DROPS = -1  # filter - 1: before ruleset.nft's postrouting (filter) drops the packet
PRIO_NEW = 101  # srcnat + 1: after ruleset.nft's masquerade (srcnat)
PREFIX_UNROUTED = "via-tunnel unrouted"
PREFIX_UNROUTED_DNS = "via-tunnel unrouted dns"  # to this host: dropped only with --dns
PRIO_UNROUTED = -151  # mangle - 1: before ruleset.nft's route chain (mangle) re-routes
UNROUTED_CHAIN = "unrouted"
_FAMILIES: dict[int, str] = {AF_INET: "ipv4", AF_INET6: "ipv6"}


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
    to_host = _match("==", {"fib": {"result": "type", "flags": ["daddr"]}}, "local")
    unrouted_dns = [
        to_host,
        _match("==", _meta("l4proto"), {"set": ["tcp", "udp"]}),
        _match("==", {"payload": {"protocol": "th", "field": "dport"}}, 53),
        {"log": {"prefix": PREFIX_UNROUTED_DNS, "group": group}},
        {"return": None},
    ]
    unrouted = [{"log": {"prefix": PREFIX_UNROUTED, "group": group}}]
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
        _obj("chain", name="unrouted_log"),
        _obj("rule", chain="drops", expr=drops),
        _obj("rule", chain="new", expr=new),
        _obj("rule", chain="unrouted_log", expr=unrouted_dns),
        _obj("rule", chain="unrouted_log", expr=[to_host, {"return": None}]),
        _obj("rule", chain="unrouted_log", expr=unrouted),
    )]


def group_elements(mark: int, iface: str,
                   verb: Literal["add", "delete"]) -> list[dict[str, Any]]:
    """Add or remove the traced group: its mark, and where its packets may leave."""
    return [
        {verb: _obj("element", name="marks", elem=[mark])},
        {verb: _obj("element", name="oifs", elem=[{"concat": [mark, iface]}])},
    ]


def cgroups_set(level: int) -> str:
    """The name of the set of traced cgroups at cgroup2 ``level`` (an int of ours)."""
    level = int(level)
    if not 1 <= level <= 255:
        raise ValueError(f"cgroup level {level} out of range")
    return f"cgroups_l{level}"


def cgroups_set_text(level: int) -> str:
    """Text that creates (if missing) the set of traced cgroups at ``level``."""
    return f"add set {NFT_FAMILY} {TABLE} {cgroups_set(level)} {{ type cgroupsv2; }}\n"


def cgroup_element(level: int, nft_path: str) -> dict[str, Any]:
    """Add the group's cgroup (the path nft resolves when the element is added) to the set
    of its level. Removed by flushing the set (:func:`flush_cgroups_text`): a cgroup that
    is gone can no longer be named."""
    return {"add": _obj("element", name=cgroups_set(level), elem=[nft_path])}


def flush_cgroups_text(level: int) -> str:
    return f"flush set {NFT_FAMILY} {TABLE} {cgroups_set(level)}\n"


def arm_text(level: int, families: frozenset[int]) -> str:
    """Text that makes the ``unrouted`` chain log the packets of the cgroups at ``level``
    of ``families`` (AF_INET, AF_INET6), replacing what it did before. Integers only."""
    chain = f"{NFT_FAMILY} {TABLE} {UNROUTED_CHAIN}"
    text = (f"add chain {chain} {{ type filter hook output priority {PRIO_UNROUTED}; "
            f"policy accept; }}\nflush chain {chain}\n")
    for fam in sorted(families):
        text += (f"add rule {chain} meta nfproto {_FAMILIES[fam]} socket cgroupv2 level "
                 f"{int(level)} @{cgroups_set(level)} goto unrouted_log\n")
    return text


def disarm_text() -> str:
    """Text that removes the ``unrouted`` chain: no hook, no cost per packet."""
    chain = f"{NFT_FAMILY} {TABLE} {UNROUTED_CHAIN}"
    return f"flush chain {chain}\ndelete chain {chain}\n"


def delete_table_command() -> dict[str, Any]:
    return {"delete": {"table": {"family": NFT_FAMILY, "name": TABLE}}}
