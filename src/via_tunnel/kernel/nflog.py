"""Read packets that nftables ``log group N`` rules send to userspace (NFLOG).

A small, dependency-free client of the kernel's nfnetlink_log (``NETLINK_NETFILTER``,
subsystem ``NFNL_SUBSYS_ULOG``; constants from ``<linux/netfilter/nfnetlink_log.h>``).
:class:`NflogSocket` binds one group of the calling process's network namespace; the parse
functions are pure, so they are tested on crafted bytes without root.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from typing import NamedTuple

from via_tunnel.core.errors import KernelError
from via_tunnel.kernel.nlmsg import (
    HEADER,
    NETLINK_NETFILTER,
    NFGEN,
    NFNETLINK_V0,
    NLM_F_ACK,
    NLM_F_REQUEST,
    NLMSG_ERROR,
    align,
    attr,
    attrs,
    message,
)

NFNL_SUBSYS_ULOG = 4
NFULNL_MSG_PACKET = 0
NFULNL_MSG_CONFIG = 1

NFULA_CFG_CMD = 1
NFULA_CFG_MODE = 2
NFULA_CFG_QTHRESH = 5
NFULNL_CFG_CMD_BIND = 1
NFULNL_COPY_PACKET = 2

NFULA_MARK = 2
NFULA_IFINDEX_INDEV = 4
NFULA_IFINDEX_OUTDEV = 5
NFULA_PAYLOAD = 9
NFULA_PREFIX = 10

COPY_RANGE = 128  # enough for an IPv6 header and a TCP header with options

GROUP_BASE = 0x7674  # "vt": far from the small numbers people use in their own rules
GROUP_TRIES = 64



class Logged(NamedTuple):
    """One packet a ``log group`` rule sent us."""

    prefix: str
    mark: int
    indev: int  # ifindex, 0 when none
    outdev: int
    payload: bytes  # from the network header on (at most COPY_RANGE bytes)


class Flow(NamedTuple):
    """The addresses of one packet, as its headers say at the point where it was logged."""

    proto: str  # "tcp", "udp", "icmp", "ipv6-icmp" or the protocol number as text
    src: str
    sport: int | None  # None for protocols without ports (and non-first fragments)
    dst: str
    dport: int | None


def config_message(group: int, body: bytes, seq: int) -> bytes:
    """An NFULNL_MSG_CONFIG request for ``group`` carrying the attributes ``body``."""
    payload = NFGEN.pack(socket.AF_UNSPEC, NFNETLINK_V0, group) + body
    kind = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG
    return message(kind, NLM_F_REQUEST | NLM_F_ACK, seq, payload)


def parse_messages(data: bytes) -> tuple[list[Logged], list[int]]:
    """Split a datagram from the socket into logged packets and netlink error codes
    (``NLMSG_ERROR`` payloads: 0 is an acknowledgement, else a negative errno)."""
    packets: list[Logged] = []
    errors: list[int] = []
    offset = 0
    while offset + HEADER.size <= len(data):
        length, kind, _flags, _seq, _pid = HEADER.unpack_from(data, offset)
        if length < HEADER.size or offset + length > len(data):
            break
        body = data[offset + HEADER.size: offset + length]
        if kind == NLMSG_ERROR and len(body) >= 4:
            errors.append(struct.unpack_from("=i", body)[0])
        elif kind == (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET:
            packets.append(_packet(attrs(body, NFGEN.size)))
        offset += align(length)
    return packets, errors


def _packet(a: dict[int, bytes]) -> Logged:
    def u32(kind: int) -> int:
        raw = a.get(kind, b"")
        return struct.unpack("!I", raw[:4])[0] if len(raw) >= 4 else 0

    prefix = a.get(NFULA_PREFIX, b"").split(b"\0", 1)[0].decode("utf-8", "replace")
    return Logged(prefix=prefix, mark=u32(NFULA_MARK), indev=u32(NFULA_IFINDEX_INDEV),
                  outdev=u32(NFULA_IFINDEX_OUTDEV), payload=a.get(NFULA_PAYLOAD, b""))


_PROTOS = {6: "tcp", 17: "udp", 1: "icmp", 58: "ipv6-icmp", 132: "sctp", 136: "udplite"}
_PORTED = (6, 17, 132, 136)


def flow_of(payload: bytes) -> Flow | None:
    """The protocol, addresses and ports of an IPv4 or IPv6 packet (None if unreadable).
    IPv6 extension headers are not walked: such a packet shows its first next-header."""
    if not payload:
        return None
    version = payload[0] >> 4
    if version == 4 and len(payload) >= 20:
        ihl = (payload[0] & 0x0F) * 4
        first_fragment = struct.unpack_from("!H", payload, 6)[0] & 0x1FFF == 0
        proto = payload[9]
        src = str(ipaddress.IPv4Address(payload[12:16]))
        dst = str(ipaddress.IPv4Address(payload[16:20]))
        l4 = ihl if first_fragment else -1
    elif version == 6 and len(payload) >= 40:
        proto = payload[6]
        src = str(ipaddress.IPv6Address(payload[8:24]))
        dst = str(ipaddress.IPv6Address(payload[24:40]))
        l4 = 40
    else:
        return None
    sport = dport = None
    if proto in _PORTED and l4 >= 0 and len(payload) >= l4 + 4:
        sport, dport = struct.unpack_from("!HH", payload, l4)
    return Flow(_PROTOS.get(proto, str(proto)), src, sport, dst, dport)


class NflogSocket:
    """A NETLINK_NETFILTER socket bound to a free NFLOG group of this network namespace.

    ``group`` is the number to put in ``log group N``. Packets are copied (first
    COPY_RANGE bytes) and delivered one by one (queue threshold 1), not batched per second.
    """

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self._seq = 0
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            self.sock.bind((0, 0))
            self.group = self._bind_free_group()
            mode = struct.pack("!IBB", COPY_RANGE, NFULNL_COPY_PACKET, 0)
            self._request(self.group, attr(NFULA_CFG_MODE, mode))
            self._request(self.group, attr(NFULA_CFG_QTHRESH, struct.pack("!I", 1)))
        except OSError as exc:
            self.sock.close()
            raise KernelError(f"cannot listen to NFLOG: {exc.strerror}") from exc
        except BaseException:
            self.sock.close()
            raise

    def _bind_free_group(self) -> int:
        bind = attr(NFULA_CFG_CMD, bytes([NFULNL_CFG_CMD_BIND]))
        for group in range(GROUP_BASE, GROUP_BASE + GROUP_TRIES):
            try:
                self._request(group, bind)
            except OSError as exc:
                # Bound by another socket (EPERM; EBUSY on older kernels): try the next.
                if exc.errno in (errno.EPERM, errno.EBUSY):
                    continue
                raise
            return group
        raise KernelError(f"no free NFLOG group in {GROUP_BASE}..{GROUP_BASE + GROUP_TRIES}")

    def _request(self, group: int, body: bytes) -> None:
        self._seq += 1
        self.sock.send(config_message(group, body, self._seq))
        while True:  # packets may already arrive between the acks; none is logged yet
            _packets, errors = parse_messages(self.sock.recv(65536))
            if errors:
                if errors[0] != 0:
                    raise OSError(-errors[0], os.strerror(-errors[0]))
                return

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self) -> tuple[list[Logged], bool]:
        """The packets of one datagram (call when readable) and whether the kernel
        dropped some because we read too slowly (ENOBUFS)."""
        try:
            data = self.sock.recv(1 << 16)
        except OSError as exc:
            if exc.errno == errno.ENOBUFS:
                return [], True
            raise
        return parse_messages(data)[0], False

    def close(self) -> None:
        self.sock.close()
