"""The netlink basics (kernel/nlmsg.py), pure: what every netlink client of ours builds on."""

from __future__ import annotations

import errno

import pytest

from via_tunnel.kernel import nlmsg


def test_attributes_round_trip_padded_and_nested() -> None:
    raw = nlmsg.attr(1, b"abc") + nlmsg.nested(2, nlmsg.attr(3, b"\x01\x02\x03\x04"))
    assert len(raw) % 4 == 0
    parsed = nlmsg.attrs(raw)
    assert parsed[1] == b"abc"
    assert nlmsg.attrs(parsed[2]) == {3: b"\x01\x02\x03\x04"}  # NLA_F_NESTED masked off


def test_messages_split_and_a_bad_length_is_refused() -> None:
    one = nlmsg.message(16, nlmsg.NLM_F_REQUEST, 7, b"xyz")
    two = nlmsg.message(nlmsg.NLMSG_DONE, 0, 8, b"\0\0\0\0")
    datagram = one + b"\0" * (nlmsg.align(len(one)) - len(one)) + two
    assert [(k, s) for k, _f, s, _m in nlmsg.split(datagram)] == [(16, 7), (nlmsg.NLMSG_DONE, 8)]
    assert nlmsg.error_code(two) == 0
    with pytest.raises(nlmsg.NetlinkError) as err:
        list(nlmsg.split(nlmsg.HEADER.pack(4096, 16, 0, 1, 0)))
    assert err.value.code == errno.EPROTO


def test_rtnetlink_groups_are_the_kernels_bits() -> None:
    # links, IPv4/IPv6 addresses, routes and rules: what the watcher listens to
    bits = nlmsg.group_bits(nlmsg.RTNLGRP_LINK, nlmsg.RTNLGRP_IPV4_IFADDR,
                            nlmsg.RTNLGRP_IPV4_ROUTE, nlmsg.RTNLGRP_IPV4_RULE,
                            nlmsg.RTNLGRP_IPV6_IFADDR, nlmsg.RTNLGRP_IPV6_ROUTE,
                            nlmsg.RTNLGRP_IPV6_RULE)
    assert bits == 0x1 | 0x10 | 0x40 | 0x80 | 0x100 | 0x400 | 0x40000
