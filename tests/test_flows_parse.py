"""Which conntrack entries of a group escaped masquerade (pure logic of flows.py), and the
netlink messages of conntrack.py and sockdiag.py, built and read without root."""

from __future__ import annotations

import socket
import struct

import pytest

from via_tunnel.kernel import conntrack, flows, nlmsg, sockdiag
from via_tunnel.kernel.conntrack import Entry
from via_tunnel.kernel.flows import unmasqueraded

MARK, MASK = 0x81000000, 0xFF000000
OWN = ("192.0.2.50/32", "2001:db8::50/128")
V6 = socket.AF_INET6
ENTRIES = [
    Entry("udp", "192.0.2.2", "198.51.100.10", 50002, 7, "192.0.2.50", MARK),
    Entry("udp", "192.0.2.2", "198.51.100.10", 50003, 7, "192.0.2.2", 0),
    Entry("udp", "198.51.100.10", "192.0.2.2", 7, 50004, "198.51.100.10", 0),
    Entry("tcp", "203.0.113.9", "192.0.2.50", 50002, 8080, "203.0.113.9", MARK),
    Entry("udp", "192.0.2.2", "198.51.100.10", 50005, 7, "192.0.2.2", 0x82000000),
    Entry("udp", "192.0.2.2", "198.51.100.10", 40000, 7, "192.0.2.2", 0),
    Entry("udp", "2001:db8::2", "2001:db8:1::10", 50006, 7, "2001:db8::2", 0, V6),
    Entry("udp", "2001:db8::2", "2001:db8:1::10", 50007, 7, "2001:db8::50", MARK, V6),
]
PORTS = {("udp", 50002), ("udp", 50003), ("udp", 50004), ("tcp", 8080), ("udp", 50005),
         ("udp", 50006), ("udp", 50007)}


def test_only_the_groups_unmasqueraded_entries_are_picked() -> None:
    stale = {(e.proto, e.sport, e.dport) for e in unmasqueraded(ENTRIES, PORTS, MARK, MASK, OWN)}
    assert stale == {
        ("udp", 50003, 7),  # ours, unmarked, replies to the LAN address
        ("udp", 7, 50004),  # a late reply turned into an inbound flow to the LAN address
        ("udp", 50006, 7),  # the same over IPv6 (the conntrack program listed only IPv4)
    }
    # Not picked: masqueraded (50002, 50007), a connection that came in by the tunnel
    # (8080), another group's mark (50005), a port the group does not hold (40000).


def _answer(payload: bytes) -> bytes:
    return nlmsg.message((conntrack.NFNL_SUBSYS_CTNETLINK << 8) | 0, nlmsg.NLM_F_MULTI, 1,
                         payload)


def test_a_conntrack_entry_reads_back_from_the_kernels_layout() -> None:
    for e in (ENTRIES[1], ENTRIES[6]._replace(zone=3, timeout=117)):
        reply = conntrack.tuple_attr(conntrack.CTA_TUPLE_REPLY, e.family, e.proto, e.dst,
                                     e.reply_dst, e.dport, e.sport)
        request = conntrack.delete_request(e)  # family header, original tuple, zone
        payload = request + reply + nlmsg.attr(conntrack.CTA_MARK, struct.pack("!I", e.mark))
        if e.timeout:
            payload += nlmsg.attr(conntrack.CTA_TIMEOUT, struct.pack("!I", e.timeout))
        assert conntrack.parse_entry(_answer(payload)) == e


def test_a_conntrack_dump_is_filtered_by_mark_for_every_family() -> None:
    payload = conntrack.dump_request(MARK, MASK)
    family, version, _res = nlmsg.NFGEN.unpack_from(payload)
    assert (family, version) == (socket.AF_UNSPEC, 0)  # both families
    found = nlmsg.attrs(payload, nlmsg.NFGEN.size)
    assert found == {conntrack.CTA_MARK: struct.pack("!I", MARK),
                     conntrack.CTA_MARK_MASK: struct.pack("!I", MASK)}


def test_the_cgroup_filter_is_a_chain_the_kernel_accepts() -> None:
    """The audit of net/ipv4/inet_diag.c: every jump lands on an op reached by the chain
    of "yes" steps, the end (accept) or 4 bytes past it (reject)."""
    for ids in ([7], [7, 8], [7, 8, 9]):
        code = sockdiag.cgroup_filter(ids)
        chain, offset, conds = set(), 0, []
        while offset < len(code):
            kind, yes, _no = struct.unpack_from("=BBH", code, offset)
            chain.add(offset)
            if kind == sockdiag.INET_DIAG_BC_CGROUP_COND:
                conds.append(struct.unpack_from("=Q", code, offset + 4)[0])
            offset += yes
        assert offset == len(code) and conds == ids
        for at in chain:
            _kind, _yes, no = struct.unpack_from("=BBH", code, at)
            assert at + no in chain | {len(code), len(code) + 4}
        assert _run(code, 8) == (8 in ids) and _run(code, 42) is False


def _run(code: bytes, cgroup_id: int) -> bool:
    """The kernel's inet_diag_bc_run for cgroup conditions and jumps."""
    offset = 0
    while 0 <= offset < len(code):
        kind, yes, no = struct.unpack_from("=BBH", code, offset)
        if kind == sockdiag.INET_DIAG_BC_JMP:
            offset += no
        elif struct.unpack_from("=Q", code, offset + 4)[0] == cgroup_id:
            offset += yes
        else:
            offset += no
    return offset == len(code)


def test_a_socket_reads_back_and_is_destroyed_by_its_own_id() -> None:
    sockid = struct.pack("!HH16s16s", 8080, 50002, socket.inet_pton(V6, "2001:db8::50"),
                         socket.inet_pton(V6, "2001:db8::9")) + struct.pack("=I8s", 0, b"cookie!!")
    msg = nlmsg.message(sockdiag.SOCK_DIAG_BY_FAMILY, nlmsg.NLM_F_MULTI, 1,
                        struct.pack("=BBBB", V6, 1, 0, 0) + sockid + bytes(20))
    sock = sockdiag.parse_sock(msg, "tcp")
    assert sock[:6] == (V6, "tcp", "2001:db8::50", 8080, "2001:db8::9", 50002)
    assert sock.state == 1 and not sock.awaits_ack_of_fin()  # TCP_ESTABLISHED
    request = sockdiag.destroy_request(sock)
    assert request[:2] == bytes([V6, socket.IPPROTO_TCP]) and request.endswith(sockid)
    assert len(request) == 56  # struct inet_diag_req_v2


def _sock(proto: str, state: int) -> sockdiag.Sock:
    return sockdiag.Sock(socket.AF_INET, proto, "192.0.2.2", 40000, "198.51.100.1", 80,
                         b"", state)


@pytest.mark.parametrize(("states", "dumps"), [
    ([[1, 7]], 1),  # nothing waits for an ACK: one dump, destroyed at once
    ([[sockdiag.TCP_LAST_ACK, 1], [sockdiag.TCP_LAST_ACK], [1]], 3),  # until the ACK came
])
def test_kill_sockets_waits_only_while_a_fin_awaits_its_ack(
        monkeypatch: pytest.MonkeyPatch, states: list[list[int]], dumps: int) -> None:
    views = [[_sock("tcp", st) for st in view] for view in states]
    seen: list[int] = []
    destroyed: list[list[sockdiag.Sock]] = []

    def sockets(path: str, known: tuple[int, ...] = ()) -> list[sockdiag.Sock]:
        seen.append(1)
        return views[min(len(seen), len(views)) - 1]

    monkeypatch.setattr(sockdiag, "sockets", sockets)
    monkeypatch.setattr(sockdiag, "destroy_sockets", destroyed.append)
    flows.kill_sockets("/sys/fs/cgroup/x")
    assert len(seen) == dumps
    assert destroyed == [views[-1]]


def test_kill_sockets_gives_up_waiting_after_the_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    waiting = [_sock("tcp", sockdiag.TCP_FIN_WAIT1), _sock("udp", sockdiag.TCP_LAST_ACK)]
    destroyed: list[list[sockdiag.Sock]] = []
    monkeypatch.setattr(sockdiag, "sockets", lambda path, known=(): waiting)
    monkeypatch.setattr(sockdiag, "destroy_sockets", destroyed.append)
    monkeypatch.setattr(flows, "CLOSING_GRACE", 0.02)
    flows.kill_sockets("/sys/fs/cgroup/x")
    assert destroyed == [waiting]
    assert [s.awaits_ack_of_fin() for s in waiting] == [True, False]  # (UDP: never)
