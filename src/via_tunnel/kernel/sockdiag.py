"""The sockets of a cgroup, through the kernel's sock_diag (``NETLINK_SOCK_DIAG``,
``<linux/inet_diag.h>``): list them and destroy them, in-process.

What ``ss -K -tua cgroup PATH`` does, without starting ``ss``: one dump per family and
protocol, filtered by the kernel on the cgroup's id (an ``INET_DIAG_BC_CGROUP_COND``
bytecode, Linux 5.8), then one ``SOCK_DESTROY`` per socket (the kernel's ``sock_destroy``,
CONFIG_INET_DIAG_DESTROY), sent together in one datagram. TCP and UDP sockets of IPv4 and
IPv6: what outlives a process is an orphaned TCP socket (a raw socket closes with its
process, and has no port for conntrack). Only full sockets carry a cgroup, so TIME_WAIT and
request sockets are never matched (nor do they send data).

The message layouts are pure functions, tested without root.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from typing import NamedTuple

from via_tunnel.kernel.nlmsg import (
    HEADER,
    NETLINK_SOCK_DIAG,
    NLM_F_DUMP,
    NLM_F_REQUEST,
    NetlinkError,
    Socket,
    attr,
)

SOCK_DIAG_BY_FAMILY = 20
SOCK_DESTROY = 21
INET_DIAG_REQ_BYTECODE = 1
INET_DIAG_BC_JMP = 1
INET_DIAG_BC_CGROUP_COND = 13
ALL_STATES = 0xFFFFFFFF
PROTOCOLS = {socket.IPPROTO_TCP: "tcp", socket.IPPROTO_UDP: "udp"}
FAMILIES = (socket.AF_INET, socket.AF_INET6)

# struct inet_diag_req_v2 and struct inet_diag_sockid (ports and addresses big endian)
_REQ = struct.Struct("=BBBxI")  # family, protocol, extensions, (pad: raw protocol), states
_SOCKID = struct.Struct("!HH16s16s")  # sport, dport, src, dst (then if, cookie: native)
_SOCKID_TAIL = struct.Struct("=I8s")  # interface, cookie
_MSG_HEAD = struct.Struct("=BBBB")  # inet_diag_msg: family, state, timer, retrans
_BC_OP = struct.Struct("=BBH")  # inet_diag_bc_op: code, yes, no
TCP_FIN_WAIT1, TCP_LAST_ACK, TCP_CLOSING = 4, 9, 11
_AWAITING_ACK_OF_FIN = frozenset({TCP_FIN_WAIT1, TCP_LAST_ACK, TCP_CLOSING})


class Sock(NamedTuple):
    """One socket as sock_diag shows it; ``sockid`` is its raw inet_diag_sockid, what a
    SOCK_DESTROY names it by (ports, addresses, interface, cookie)."""

    family: int
    proto: str  # "tcp" or "udp"
    local: str
    port: int
    remote: str
    remote_port: int
    sockid: bytes
    state: int = 0  # TCP_* of <net/tcp_states.h> (UDP: TCP_CLOSE or TCP_ESTABLISHED)

    def awaits_ack_of_fin(self) -> bool:
        """A TCP socket that closed and waits only for the far end to acknowledge its FIN
        (FIN_WAIT1, CLOSING, LAST_ACK): it is gone one round trip later, by itself."""
        return self.proto == "tcp" and self.state in _AWAITING_ACK_OF_FIN


def cgroup_filter(cgroup_ids: list[int]) -> bytes:
    """The bytecode "the socket's cgroup is one of ``cgroup_ids``", laid out as ``ss``
    compiles an "or": a condition goes on to the next op when true ("yes") and jumps
    ``no`` bytes when false; the end of the code accepts, 4 bytes past it rejects. Each
    condition but the last is followed by a jump to the end, and on false skips it to the
    next condition (the kernel requires every target on the chain of "yes" steps)."""
    cond = _BC_OP.size + 8
    block = cond + _BC_OP.size
    total = block * (len(cgroup_ids) - 1) + cond
    ops = []
    for i, cid in enumerate(cgroup_ids):
        ops.append(_BC_OP.pack(INET_DIAG_BC_CGROUP_COND, cond, cond + 4)
                   + struct.pack("=Q", cid))
        if i < len(cgroup_ids) - 1:
            ops.append(_BC_OP.pack(INET_DIAG_BC_JMP, _BC_OP.size, total - i * block - cond))
    return b"".join(ops)


def dump_request(family: int, protocol: int, cgroup_ids: list[int]) -> bytes:
    """The payload of a SOCK_DIAG_BY_FAMILY dump of one family and protocol, every state,
    only the sockets of the cgroups ``cgroup_ids``."""
    head = _REQ.pack(family, protocol, 0, ALL_STATES)
    empty_id = bytes(_SOCKID.size + _SOCKID_TAIL.size)
    return head + empty_id + attr(INET_DIAG_REQ_BYTECODE, cgroup_filter(cgroup_ids))


def destroy_request(sock: Sock) -> bytes:
    """The payload of a SOCK_DESTROY of ``sock``."""
    protocol = {v: k for k, v in PROTOCOLS.items()}[sock.proto]
    return _REQ.pack(sock.family, protocol, 0, ALL_STATES) + sock.sockid


def parse_sock(msg: bytes, proto: str) -> Sock:
    """A socket from one answer of a dump (a whole netlink message)."""
    offset = HEADER.size
    family, state, _timer, _retrans = _MSG_HEAD.unpack_from(msg, offset)
    offset += _MSG_HEAD.size
    sockid = msg[offset:offset + _SOCKID.size + _SOCKID_TAIL.size]
    sport, dport, src, dst = _SOCKID.unpack_from(msg, offset)
    size = 4 if family == socket.AF_INET else 16
    return Sock(family, proto, socket.inet_ntop(family, src[:size]), sport,
                socket.inet_ntop(family, dst[:size]), dport, sockid, state)


def cgroup_ids(path: str, descendants: bool = True) -> list[int]:
    """The ids of the cgroup at ``path`` and (unless told not to) its descendants: a cgroup2
    directory's inode number is the id the kernel compares; [] when it does not exist."""
    ids = []
    for dirpath in [d for d, _dirs, _files in os.walk(path)] if descendants else [path]:
        try:
            ids.append(os.stat(dirpath).st_ino)
        except FileNotFoundError:
            continue
    return ids


def sockets(path: str, descendants: bool = True, known: tuple[int, ...] = ()) -> list[Sock]:
    """Every TCP and UDP socket of the processes in the cgroup at ``path`` and (unless told
    not to) its descendants, both families; none when it does not exist. Raises NetlinkError when
    the kernel refuses the dump (no sock_diag, or a kernel without the cgroup filter); a
    family or protocol it has no diag module for has none."""
    wanted = sorted({*cgroup_ids(path, descendants), *known})
    found: list[Sock] = []
    if not wanted:
        return found
    with Socket(NETLINK_SOCK_DIAG) as nl:
        for family in FAMILIES:
            for protocol, name in PROTOCOLS.items():
                seq = nl.request(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP,
                                 dump_request(family, protocol, wanted))
                try:
                    found += [parse_sock(m, name)
                              for m in nl.answers(seq, f"list the {name} sockets of {path}")]
                except NetlinkError as exc:
                    if exc.code not in (errno.ENOENT, errno.EAFNOSUPPORT):  # no such diag
                        raise
    return found


def destroy(path: str, known: tuple[int, ...] = ()) -> list[Sock]:
    """Destroy every socket of the cgroup at ``path`` and its descendants, and of the
    cgroups whose ids are ``known`` (the kernel aborts them: a TCP socket sends a reset and
    is gone). Returns those destroyed."""
    return destroy_sockets(sockets(path, known=known))


def destroy_sockets(found: list[Sock]) -> list[Sock]:
    """Destroy the sockets ``found`` (from :func:`sockets`); returns those the kernel
    destroyed (one that closed meanwhile is skipped)."""
    if not found:
        return []
    with Socket(NETLINK_SOCK_DIAG) as nl:
        codes = nl.each_acked(SOCK_DESTROY, [destroy_request(s) for s in found],
                              "destroy sockets")
    return [s for s, code in zip(found, codes, strict=True) if code == 0]
