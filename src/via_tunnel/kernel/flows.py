"""The sockets of a group's processes and the conntrack entries of its flows.

:func:`kill_sockets` destroys the sockets an exited program left behind, before teardown:
its orphaned TCP sockets keep sending FIN and unacknowledged data, which would leave by the
LAN once our rules are gone (NOTES.md).


NAT is decided once per connection, on its first packet. A flow of the group that starts
while our nft table is missing or half rebuilt (someone ran ``nft flush ruleset``; see
:func:`lifecycle.repair`) gets a conntrack entry without source NAT; once the table is
back its packets are marked and routed through the interface again, but keep the LAN
source address for as long as the entry lives (for an active UDP stream: forever). Such
entries are found by the group's own sockets (``ss``, by cgroup) and deleted: the next
packet creates a fresh entry, which masquerade handles.

Adapters over ``ss`` and the ``conntrack`` program. ``cgroup_rel`` is a group's cgroup as
``ss`` wants it, relative to the cgroup2 mount (:func:`cgroup.tree_path`).
"""

from __future__ import annotations

import ipaddress
import subprocess
import time
from collections.abc import Iterable

_TIMEOUT = 5


class Entry:
    """One conntrack entry: protocol, original tuple, reply destination, ct mark."""

    __slots__ = ("dport", "dst", "mark", "proto", "reply_dst", "sport", "src")

    def __init__(self, proto: str, src: str, dst: str, sport: int, dport: int,
                 reply_dst: str, mark: int) -> None:
        self.proto = proto
        self.src = src
        self.dst = dst
        self.sport = sport
        self.dport = dport
        self.reply_dst = reply_dst
        self.mark = mark

    def __repr__(self) -> str:
        return (f"{self.proto} {self.src}:{self.sport} -> {self.dst}:{self.dport} "
                f"(replies to {self.reply_dst}, mark 0x{self.mark:08x})")


def parse_conntrack(text: str) -> list[Entry]:
    """Entries of ``conntrack -L`` output (TCP and UDP only; other lines are skipped)."""
    entries = []
    for line in text.splitlines():
        words = line.split()
        if not words or words[0] not in ("tcp", "udp"):
            continue
        fields: dict[str, list[str]] = {}
        for word in words:
            key, eq, value = word.partition("=")
            if eq:
                fields.setdefault(key, []).append(value)
        try:
            entries.append(Entry(words[0], fields["src"][0], fields["dst"][0],
                                 int(fields["sport"][0]), int(fields["dport"][0]),
                                 fields["dst"][1], int(fields.get("mark", ["0"])[0])))
        except (KeyError, IndexError, ValueError):
            continue
    return entries


def parse_ss_ports(text: str) -> set[tuple[str, int]]:
    """(protocol, local port) of every socket in ``ss -Htuna`` output."""
    ports = set()
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 5 and words[0] in ("tcp", "udp"):
            _addr, _, port = words[4].rpartition(":")
            if port.isdigit():
                ports.add((words[0], int(port)))
    return ports


def unmasqueraded(entries: Iterable[Entry], ports: set[tuple[str, int]], mark: int,
                  mark_mask: int, own_addresses: Iterable[str]) -> list[Entry]:
    """Entries of the group's sockets (by protocol and local port) that are unmarked or
    carry the group's mark but do not use one of the interface's own addresses:

    * seen from our side (the socket's port is the original source port): replies go to
      another address, so its packets leave with that address;
    * seen from the far end (the port is the original destination port, the entry was
      created by a packet that came in): it came in to another address. That is what a
      late reply to a flow that leaked by the LAN creates, and the group's packets would
      then match it as replies, unmarked, by the LAN.
    """
    own = {ipaddress.ip_address(a.split("/")[0]) for a in own_addresses}
    stale = []
    for e in entries:
        if e.mark != 0 and e.mark & mark_mask != mark:
            continue
        if ipaddress.ip_address(e.dst) in own:
            continue  # a connection that came in by the interface: ours, as it should be
        ours_out = (e.proto, e.sport) in ports and ipaddress.ip_address(e.reply_dst) not in own
        ours_in = (e.proto, e.dport) in ports
        if ours_out or ours_in:
            stale.append(e)
    return stale


def _run(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=_TIMEOUT,
                             check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout


def kill_sockets(cgroup_rel: str) -> None:
    """Destroy every TCP, UDP and raw socket of the group (sock_destroy, as ``ss -K``)."""
    _run(["ss", "-K", "-tuwa", "cgroup", cgroup_rel])


def reset_unmasqueraded(cgroup_rel: str, mark: int, mark_mask: int,
                        own_addresses: tuple[str, ...], passes: int = 4,
                        pause: float = 0.01) -> list[Entry]:
    """Delete the conntrack entries of the group in cgroup ``cgroup_rel`` that escaped
    masquerade. Returns them.

    A few passes, a moment apart: a reply still on its way to a flow that leaked creates a
    new stale entry when it arrives after the first pass.
    """
    ports = parse_ss_ports(_run(["ss", "-Htuna", "cgroup", cgroup_rel]))
    removed: list[Entry] = []
    for n in range(passes if ports else 0):
        if n:
            time.sleep(pause)
        stale = unmasqueraded(parse_conntrack(_run(["conntrack", "-L"])), ports, mark,
                              mark_mask, own_addresses)
        if not stale and n:
            break
        for e in stale:
            _run(["conntrack", "-D", "-p", e.proto, "-s", e.src, "-d", e.dst,
                  "--sport", str(e.sport), "--dport", str(e.dport)])
        removed += stale
    return removed
