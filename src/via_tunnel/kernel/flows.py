"""The sockets of a group's processes and the conntrack entries of its flows.

:func:`kill_sockets` destroys the sockets an exited program left behind, before teardown:
its orphaned TCP sockets keep sending FIN and unacknowledged data, which would leave by the
LAN once our rules are gone (NOTES.md). :func:`lingering` says how long the group's
conntrack entries outlive it (the group drains meanwhile: lifecycle.teardown).

NAT is decided once per connection, on its first packet. A flow of the group that starts
while our nft table is missing or half rebuilt (someone ran ``nft flush ruleset``; see
:func:`repair.repair`) gets a conntrack entry without source NAT; once the table is
back its packets are marked and routed through the interface again, but keep the LAN
source address for as long as the entry lives (for an active UDP stream: forever). Such
entries are found by the group's own sockets (by cgroup) and deleted: the next packet
creates a fresh entry, which masquerade handles.

In-process, over the kernel's netlink interfaces: the group's sockets through sock_diag
(sockdiag.py, filtered by cgroup in the kernel), conntrack through ctnetlink
(conntrack.py: both families, filtered by mark in the kernel, deletions in one datagram).
``cgroup_path`` is a group's cgroup directory.
"""

from __future__ import annotations

import contextlib
import ipaddress
import time
from collections.abc import Iterable

from via_tunnel.kernel import conntrack, sockdiag
from via_tunnel.kernel.conntrack import Entry

UNMARKED = (0, 0xFFFF_FFFF)  # (mark, mask) of entries that carry no mark at all


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


# How long a teardown lets the group's last TCP closes finish (see kill_sockets).
CLOSING_GRACE = 0.25
_CLOSING_POLL = 0.003


def kill_sockets(cgroup_path: str, cgroup_id: int = 0) -> None:
    """Destroy every TCP and UDP socket of the group (sock_destroy, as ``ss -K``), found by
    its cgroup's id (``cgroup_id`` when the directory is gone: systemd removes an emptied
    scope's). Best effort, as it always was: a kernel that refuses leaves them.

    A socket that only waits for the far end's ACK of its FIN (a program that closed and
    exited at once: curl after an HTTP/1.0 answer) is given up to CLOSING_GRACE to get it:
    destroyed before, the ACK that arrives a round trip later finds no socket and the
    kernel answers it with a reset, sent once our rules may be gone (by the LAN, where
    draining is off) and, either way, a reset where the far end expected a clean close.
    No wait when no socket is in that state (the usual case: one dump, as before)."""
    known = (cgroup_id,) if cgroup_id else ()
    with contextlib.suppress(OSError):
        found = sockdiag.sockets(cgroup_path, known=known)
        deadline = time.monotonic() + CLOSING_GRACE
        while any(s.awaits_ack_of_fin() for s in found) and time.monotonic() < deadline:
            time.sleep(_CLOSING_POLL)
            found = sockdiag.sockets(cgroup_path, known=known)
        sockdiag.destroy_sockets(found)


def forget(mark: int, mark_mask: int) -> None:
    """Delete the conntrack entries with the group's mark (both families). While one
    lives, a new flow with the same addresses and ports (a program in no group that got
    the same UDP port, and talks to the same server) would be taken for it and carry the
    mark: dropped, or routed by the next group given that mark. Best effort."""
    with contextlib.suppress(OSError), conntrack.open_socket() as nl:
        conntrack.delete(nl, conntrack.dump(nl, mark, mark_mask))


def lingering(mark: int, mark_mask: int) -> int | None:
    """The longest time, in seconds, that a conntrack entry with the group's mark still
    lives (0: none is left); None when conntrack cannot be read (the caller assumes the
    worst). While an entry lives, a late packet of its flow (a retransmitted FIN, a
    segment after close) draws an answer from the kernel that carries the group's mark."""
    try:
        with conntrack.open_socket() as nl:
            return max((e.timeout for e in conntrack.dump(nl, mark, mark_mask)), default=0)
    except OSError:
        return None


def reset_unmasqueraded(cgroup_path: str, mark: int, mark_mask: int,
                        own_addresses: tuple[str, ...], passes: int = 4,
                        pause: float = 0.01) -> list[Entry]:
    """Delete the conntrack entries of the group in cgroup ``cgroup_path`` that escaped
    masquerade. Returns them.

    A few passes, a moment apart: a reply still on its way to a flow that leaked creates a
    new stale entry when it arrives after the first pass. Each pass asks the kernel for
    the entries with the group's mark and those with none (the only ones that can be the
    group's), both families, and deletes the stale ones in one datagram. Best effort: a
    kernel that refuses leaves them.
    """
    removed: list[Entry] = []
    try:
        ports = {(s.proto, s.port) for s in sockdiag.sockets(cgroup_path)}
        if not ports:
            return removed
        with conntrack.open_socket() as nl:
            for n in range(passes):
                if n:
                    time.sleep(pause)
                candidates = conntrack.dump(nl, mark, mark_mask) + conntrack.dump(nl, *UNMARKED)
                stale = unmasqueraded(candidates, ports, mark, mark_mask, own_addresses)
                if not stale and n:
                    break
                conntrack.delete(nl, stale)
                removed += stale
    except OSError:
        pass
    return removed
