"""Netlink basics shared by via-tunnel's netlink clients: rtnetlink (rtnl.py), NFLOG
(nflog.py), conntrack (conntrack.py) and sock_diag (sockdiag.py).

One definition of the message header, the flags, attributes and the kernel numbers that more
than one module needs, and :class:`Socket`: send a request, read exactly its answers.
Standard library only (the watcher and ``trace`` import it; the launch path does not).

Contract of :meth:`Socket.answers`: it yields the messages answering one request and stops at
its end (DONE, the acknowledgement, or the single answer of a request that is not a dump);
an error from the kernel raises :class:`NetlinkError` with its errno.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Self

# <linux/netlink.h>
HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, sequence, port id
ATTR = struct.Struct("=HH")  # nlattr: length, type
NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_DUMP_INTR = 0x10  # the dumped table changed meanwhile: the dump may be inconsistent
NLM_F_DUMP_FILTERED = 0x20  # the kernel applied the filter we sent
NLM_F_DUMP = 0x300
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLMSG_ERROR = 0x2
NLMSG_DONE = 0x3
NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED / NLA_F_NET_BYTEORDER
NETLINK_SOCK_DIAG = 4
NETLINK_NETFILTER = 12

# <linux/rtnetlink.h>, <linux/fib_rules.h>: numbers more than one module uses.
RT_SCOPE_UNIVERSE = 0
FR_ACT_TO_TBL = 1
FR_ACT_GOTO = 2
FR_ACT_UNREACHABLE = 7
FIB_RULE_INVERT = 0x2
# rtnetlink multicast groups (enum rtnetlink_groups)
RTNLGRP_LINK = 1
RTNLGRP_IPV4_IFADDR = 5
RTNLGRP_IPV4_ROUTE = 7
RTNLGRP_IPV4_RULE = 8
RTNLGRP_IPV6_IFADDR = 9
RTNLGRP_IPV6_ROUTE = 11
RTNLGRP_IPV6_RULE = 19

# <linux/netfilter/nfnetlink.h>
NFNETLINK_V0 = 0
NFNLGRP_NFTABLES = 7
NFGEN = struct.Struct("!BBH")  # nfgenmsg: family, version, resource id (big endian)

_RECV_SIZE = 1 << 18  # a dump's datagrams are at most 32 KiB
_BATCH = 256  # requests per datagram (well below the socket's send buffer)


class NetlinkError(OSError):
    """The kernel refused a request; ``code`` is its errno."""

    def __init__(self, code: int, what: str) -> None:
        super().__init__(code, f"{what}: {os.strerror(code)}")
        self.code = code


def group_bits(*groups: int) -> int:
    """The ``bind()`` bit mask of multicast groups numbered from 1 (``RTNLGRP_x``)."""
    return sum(1 << (g - 1) for g in groups)


def align(n: int) -> int:
    return (n + 3) & ~3


def attr(kind: int, payload: bytes) -> bytes:
    """One netlink attribute, padded."""
    raw = ATTR.pack(ATTR.size + len(payload), kind) + payload
    return raw + b"\0" * (align(len(raw)) - len(raw))


def nested(kind: int, *children: bytes) -> bytes:
    """A nested attribute holding the (already packed) ``children``."""
    return attr(kind | NLA_F_NESTED, b"".join(children))


def attrs(data: bytes, offset: int = 0) -> dict[int, bytes]:
    """The netlink attributes in ``data[offset:]`` as {type: payload} (the last one wins)."""
    return dict(attr_list(data, offset))


def attr_list(data: bytes, offset: int = 0) -> list[tuple[int, bytes]]:
    """The netlink attributes in ``data[offset:]`` as (type, payload), in order (a list
    attribute repeats one type: the elements of a set)."""
    out: list[tuple[int, bytes]] = []
    while offset + ATTR.size <= len(data):
        length, kind = ATTR.unpack_from(data, offset)
        if length < ATTR.size or offset + length > len(data):
            break
        out.append((kind & NLA_TYPE_MASK, data[offset + ATTR.size: offset + length]))
        offset += align(length)
    return out


def message(kind: int, flags: int, seq: int, payload: bytes) -> bytes:
    """One netlink message: the header, then ``payload``."""
    return HEADER.pack(HEADER.size + len(payload), kind, flags, seq, 0) + payload


def split(data: bytes) -> Iterator[tuple[int, int, int, bytes]]:
    """(type, flags, sequence, whole message) of each message in one datagram. A length
    that does not fit raises EPROTO: a kernel never sends one."""
    offset = 0
    while offset + HEADER.size <= len(data):
        length, kind, flags, seq, _port = HEADER.unpack_from(data, offset)
        if length < HEADER.size or offset + length > len(data):
            raise NetlinkError(errno.EPROTO, "read a netlink message")
        yield kind, flags, seq, data[offset:offset + length]
        offset += align(length)


def error_code(msg: bytes) -> int:
    """The (negative) errno of an NLMSG_ERROR or NLMSG_DONE message, 0 for an ack."""
    return struct.unpack_from("=i", msg, HEADER.size)[0] if len(msg) >= HEADER.size + 4 else 0


class Socket:
    """One netlink socket of protocol ``proto`` (close-on-exec). A context manager."""

    def __init__(self, proto: int, groups: int = 0) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                  proto)
        try:
            self.sock.bind((0, groups))
        except BaseException:
            self.sock.close()
            raise
        self._seq = 0
        self.interrupted = False  # the last dump was marked inconsistent by the kernel
        self.filtered = False  # the kernel filtered the last dump

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def fileno(self) -> int:
        return self.sock.fileno()

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def request(self, kind: int, flags: int, payload: bytes) -> int:
        """Send one message; returns its sequence number (for :meth:`answers`)."""
        seq = self.next_seq()
        self.sock.send(message(kind, flags, seq, payload))
        return seq

    def each_acked(self, kind: int, payloads: list[bytes], what: str) -> list[int]:
        """Send one acknowledged request of type ``kind`` per payload, many per datagram
        (the kernel handles them one after the other), and return the errno the kernel
        answered each with (0: done), in order."""
        codes: list[int] = []
        for start in range(0, len(payloads), _BATCH):
            batch = payloads[start:start + _BATCH]
            seqs = [self.next_seq() for _ in batch]
            self.sock.send(b"".join(message(kind, NLM_F_REQUEST | NLM_F_ACK, seq, payload)
                                    for seq, payload in zip(seqs, batch, strict=True)))
            codes += self.acks(seqs, what)
        return codes

    def answers(self, seq: int, what: str) -> Iterator[bytes]:
        """The messages answering request ``seq`` (whole, header included), until its end.
        Sets ``interrupted`` and ``filtered`` from the answers' flags."""
        self.interrupted = self.filtered = False
        while True:
            last = False
            for kind, flags, msg_seq, msg in split(self.sock.recv(_RECV_SIZE)):
                if msg_seq != seq:
                    continue  # the late end of an earlier request
                self.interrupted |= bool(flags & NLM_F_DUMP_INTR)
                self.filtered |= bool(flags & NLM_F_DUMP_FILTERED)
                if kind in (NLMSG_ERROR, NLMSG_DONE):
                    # An error or ack; DONE carries the errno of a dump that failed half-way.
                    code = error_code(msg)
                    if code < 0:
                        raise NetlinkError(-code, what)
                    if kind == NLMSG_ERROR and len(msg) < HEADER.size + 4:
                        raise NetlinkError(errno.EPROTO, what)
                    return
                yield msg
                if not flags & NLM_F_MULTI:  # not part of a dump: the only answer
                    last = True
            if last:
                return

    def acks(self, seqs: list[int], what: str) -> list[int]:
        """Read the acknowledgements of requests ``seqs`` (sent with NLM_F_ACK, possibly
        in one datagram); returns the errno of each (0: done), in the order of ``seqs``."""
        pending = dict.fromkeys(seqs, -1)
        left = len(pending)
        while left:
            for kind, _flags, msg_seq, msg in split(self.sock.recv(_RECV_SIZE)):
                if kind == NLMSG_ERROR and pending.get(msg_seq) == -1:
                    pending[msg_seq] = -error_code(msg)
                    left -= 1
        return [pending[s] for s in seqs]
