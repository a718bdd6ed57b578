"""kernel/nlevents.py: which notifications can concern a group (messages built here)."""

from __future__ import annotations

import os
import socket
import struct
from pathlib import Path

import pytest

from via_tunnel.kernel import nlmsg
from via_tunnel.kernel.nlevents import concerns

OURS = 0x7674_0001
ROUTE, NFT = socket.NETLINK_ROUTE, nlmsg.NETLINK_NETFILTER
LO = socket.if_nametoindex("lo")


def route(kind: int, table: int, oif: int | None = None) -> bytes:
    body = struct.pack("=BBBBBBBBI", 2, 0, 0, 0, table if table < 256 else 0, 4, 0, 1, 0)
    body += nlmsg.attr(15, struct.pack("=I", table))
    if oif is not None:
        body += nlmsg.attr(4, struct.pack("=I", oif))
    return nlmsg.message(kind, 0, 0, body)


def link(name: bytes) -> bytes:
    return nlmsg.message(16, 0, 0, struct.pack("=BxHiII", 0, 0, 7, 0, 0)
                         + nlmsg.attr(3, name + b"\0"))


def rule(kind: int, table: int, priority: int) -> bytes:
    return nlmsg.message(kind, 0, 0, bytes(12) + nlmsg.attr(15, struct.pack("=I", table))
                         + nlmsg.attr(6, struct.pack("=I", priority)))


def nft(msg: int, table: bytes) -> bytes:
    return nlmsg.message((10 << 8) | msg, 0, 0, struct.pack("!BBH", 1, 0, 0)
                         + nlmsg.attr(1, table + b"\0"))


@pytest.mark.parametrize(("data", "proto", "iface", "expected"), [
    (route(25, OURS), ROUTE, "vlan3", True),  # a route removed from our table
    (route(24, OURS), ROUTE, "vlan3", False),  # added to it: our own setup or repair
    (route(25, OURS + 1), ROUTE, "vlan3", False),  # another group's table
    (route(24, 254, LO), ROUTE, "lo", True),  # the main table through our interface
    (route(24, 254, LO), ROUTE, "vlan3", False),  # ... through another one
    (route(24, 254), ROUTE, "vlan3", True),  # no interface named: cannot tell
    (link(b"vt12"), ROUTE, "vlan3", False),
    (link(b"vlan3"), ROUTE, "vlan3", True),
    (rule(33, OURS, 5105), ROUTE, "vlan3", True),  # our rule deleted
    (rule(33, 100, 0), ROUTE, "vlan3", True),  # a shared rule deleted
    (rule(33, 100, 7000), ROUTE, "vlan3", False),  # a neighbour's
    (rule(32, OURS, 5105), ROUTE, "vlan3", False),  # an addition
    (nft(14, b"via_tunnel"), NFT, "vlan3", True),  # elements deleted from our table
    (nft(12, b"via_tunnel"), NFT, "vlan3", False),  # elements added
    (nft(2, b"via_tunnel"), NFT, "vlan3", True),  # nft flush ruleset
    (nft(2, b"firewalld"), NFT, "vlan3", False),
    (b"\x10\x00\x00", ROUTE, "vlan3", False),  # nothing complete in it
    (struct.pack("=IHHII", 999, 16, 0, 0, 0), ROUTE, "vlan3", True),  # unreadable: may
])
def test_what_concerns_a_group(data: bytes, proto: int, iface: str, expected: bool) -> None:
    assert concerns(data, proto, iface, OURS) is expected


def test_one_message_that_concerns_is_enough() -> None:
    assert concerns(link(b"vt12") + route(25, OURS), ROUTE, "vlan3", OURS)


def test_one_read_tells_which_of_many_groups_a_notification_concerns() -> None:
    from via_tunnel.kernel.nlevents import affected

    groups = {f"vt{n}": OURS + n for n in range(200)}
    burst = route(25, OURS + 7) + rule(33, OURS + 9, 5110) + link(b"vt12") \
        + rule(33, OURS + 500, 5120)  # a group that ended: nobody's
    assert affected(burst, ROUTE, groups) == {"vt7", "vt9", "vt12"}
    assert affected(rule(33, 100, 5100), ROUTE, groups) == set(groups)  # a shared rule
    assert affected(nft(14, b"via_tunnel"), NFT, groups) == set(groups)
    assert affected(route(24, OURS + 3), ROUTE, groups) == set()  # a setup's own route


def test_inotify_names_what_was_written_renamed_and_deleted(tmp_path: Path) -> None:
    from via_tunnel.kernel.inotify import Inotify

    watch = Inotify(str(tmp_path))
    try:
        assert watch.read() == set()
        (tmp_path / "a.json.tmp").write_text("{}")
        os.rename(tmp_path / "a.json.tmp", tmp_path / "a.json")
        (tmp_path / ".wake").write_text("")
        (tmp_path / "a.json").unlink()
        assert watch.read() == {"a.json.tmp", "a.json", ".wake"}
        assert watch.read() == set()
    finally:
        watch.close()


# Element removals as the kernel sent them (captured in a namespace, kernel 6.18): the
# element of mark 0x81000100 (slot 129) deleted from group_oifs (mark first in the key),
# iif_marks and groups_l1 (mark as the data), and dns4 (mark as the key).
CAPTURED = {
    "group_oifs": "010000040f0001007669615f74756e6e656c00000f00020067726f75705f6f6966730000"
                  "24000300200001001c00010018000100000100816c6f00000000000000000000000000"
                  "00",
    "iif_marks": "010000040f0001007669615f74756e6e656c00000e0002006969665f6d61726b730000"
                 "002c0003002800010018000100140001006c6f00000000000000000000000000000c00"
                 "02000800010000010081",
    "dns4": "010000040f0001007669615f74756e6e656c000009000200646e733400000000200003001c"
            "0001000c00010008000100000100810c00020008000100c0000201",
    "groups_l1": "010000040f0001007669615f74756e6e656c00000e00020067726f7570735f6c310000"
                 "002400030020000100100001000c00010005000000000000000c000200080001000001"
                 "0081",
}


@pytest.mark.parametrize("set_name", sorted(CAPTURED))
def test_an_element_removal_concerns_only_the_group_whose_mark_it_held(set_name: str
                                                                       ) -> None:
    from via_tunnel.core.settings import table_for_slot
    from via_tunnel.kernel.nlevents import affected

    data = nlmsg.message((10 << 8) | 14, 0, 0, bytes.fromhex(CAPTURED[set_name]))
    groups = {"vt129": table_for_slot(129), "vt1": table_for_slot(1),
              "vt130": table_for_slot(130)}
    assert affected(data, NFT, groups) == {"vt129"}
    assert affected(data, NFT, {"vt1": table_for_slot(1)}) == set()  # a teardown's own


def test_an_element_removal_from_a_set_we_do_not_know_concerns_every_group() -> None:
    from via_tunnel.core.settings import table_for_slot
    from via_tunnel.kernel.nlevents import affected

    body = bytes.fromhex(CAPTURED["dns4"]).replace(b"dns4", b"dnsX")
    data = nlmsg.message((10 << 8) | 14, 0, 0, body)
    assert affected(data, NFT, {"vt1": table_for_slot(1)}) == {"vt1"}
