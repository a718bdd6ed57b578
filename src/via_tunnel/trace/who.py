"""Which process of a group owns the socket a packet came from.

The kernel does not say it with the packet, so we look it up: the socket tables of
``/proc/net`` (tcp, udp, raw, ping; v4 and v6) give each socket's addresses and inode, and
``/proc/PID/fd`` of the group's members (``cgroup.procs`` of its cgroup, and of its net_cls
cgroup for members moved out of it) says whose inode it is. Only the group's own sockets
are candidates, which keeps the match unambiguous.

The packet is seen after masquerade, which rewrites the source address (and, only on a
clash, the port), so the local address is never compared: the local port and protocol
must match, and a socket whose remote end is the packet's destination is preferred over an
unconnected one (a UDP ``sendto``) and over one whose destination was rewritten (DNAT of
the group's DNS).
"""

from __future__ import annotations

import ipaddress
import os
import struct
from typing import NamedTuple

from via_tunnel.kernel.nflog import Flow

_TABLES = {"tcp": ("tcp", "tcp6"), "udp": ("udp", "udp6"),
           "icmp": ("icmp", "raw"), "ipv6-icmp": ("icmp6", "raw6")}


class SocketRow(NamedTuple):
    local: str
    lport: int
    remote: str
    rport: int
    inode: int


class Who(NamedTuple):
    """The process holding the socket, and the socket's local end (before masquerade)."""

    pid: int
    comm: str
    local: str = ""
    lport: int | None = None


def _address(hexaddr: str) -> str:
    """An address as /proc/net prints it: 32-bit words in host byte order, in hex.
    An IPv4-mapped IPv6 address (a v6 socket talking v4) comes back as plain IPv4."""
    raw = b"".join(struct.pack("=I", int(hexaddr[i:i + 8], 16))
                   for i in range(0, len(hexaddr), 8))
    if len(raw) == 4:
        return str(ipaddress.IPv4Address(raw))
    addr = ipaddress.IPv6Address(raw)
    return str(addr.ipv4_mapped or addr)


def parse_table(text: str) -> list[SocketRow]:
    """The rows of one ``/proc/net/{tcp,udp,raw,icmp}[6]`` file (the header line skipped)."""
    rows = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10:
            continue
        local, _, lport = fields[1].partition(":")
        remote, _, rport = fields[2].partition(":")
        rows.append(SocketRow(_address(local), int(lport, 16), _address(remote),
                              int(rport, 16), int(fields[9])))
    return rows


def best_row(flow: Flow, rows: list[SocketRow], inodes: set[int]) -> SocketRow | None:
    """The group's socket that sent ``flow`` (see the module docstring), or None."""
    best: tuple[int, SocketRow] | None = None
    for row in rows:
        if row.inode not in inodes:
            continue
        if flow.sport is not None and row.lport != flow.sport:
            continue
        if row.remote == flow.dst and (flow.dport is None or row.rport == flow.dport):
            rank = 0  # connected to where the packet goes
        elif row.rport == 0 and row.remote in ("0.0.0.0", "::"):
            rank = 1  # unconnected (sendto)
        else:
            rank = 2  # connected elsewhere: the destination was rewritten (DNAT)
        if best is None or rank < best[0]:
            best = (rank, row)
    return best[1] if best else None


def socket_owners(pids: list[int], proc: str = "/proc") -> dict[int, Who]:
    """Socket inode -> the lowest PID among ``pids`` holding it open, with its command."""
    owners: dict[int, Who] = {}
    for pid in sorted(pids):
        fd_dir = f"{proc}/{pid}/fd"
        try:
            names = os.listdir(fd_dir)
            with open(f"{proc}/{pid}/comm") as f:
                comm = f.read().strip()
        except OSError:
            continue  # exited meanwhile
        for name in names:
            try:
                target = os.readlink(f"{fd_dir}/{name}")
            except OSError:
                continue
            if target.startswith("socket:["):
                owners.setdefault(int(target[8:-1]), Who(pid, comm))
    return owners


def who_sent(flow: Flow, members: list[int], proc: str = "/proc") -> Who | None:
    """The process among the group's ``members`` whose socket sent ``flow``, or None
    (it exited already, or the protocol has no socket table)."""
    tables = _TABLES.get(flow.proto)
    if tables is None:
        return None
    owners = socket_owners(members, proc)
    if not owners:
        return None
    rows: list[SocketRow] = []
    for name in tables:
        try:
            with open(f"{proc}/net/{name}") as f:
                rows.extend(parse_table(f.read()))
        except OSError:
            continue
    if flow.proto in ("icmp", "ipv6-icmp"):  # no ports: any socket of the group that pings
        row = next((r for r in rows if r.inode in owners), None)
    else:
        row = best_row(flow, rows, set(owners))
    if row is None:
        return None
    return owners[row.inode]._replace(local=row.local, lport=row.lport)
