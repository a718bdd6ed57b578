"""rtmsg.py decodes rtnetlink answers with struct. Pure: from the same bytes (encoded by
pyroute2's message classes, with attributes we skip among those we read) it must give the
header fields and attributes pyroute2 decodes, and rtnl.py's dump requests must be byte for
byte what pyroute2 encodes for them."""

from __future__ import annotations

from socket import AF_INET, AF_INET6
from typing import Any

import pytest

from via_tunnel.kernel import rtnl
from via_tunnel.kernel.nlmsg import message
from via_tunnel.kernel.pyroute2_lazy import register_package
from via_tunnel.kernel.rtmsg import decode

register_package()
from pyroute2.netlink.rtnl.fibmsg import fibmsg  # noqa: E402
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg  # noqa: E402
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg  # noqa: E402
from pyroute2.netlink.rtnl.rtmsg import rtmsg  # noqa: E402

NLMSGHDR = 16


def _wire(cls: Any, fields: dict[str, int], attrs: list[tuple[str, Any]]) -> bytes:
    """The message pyroute2 encodes (a kernel answer's layout), header included."""
    msg = cls()
    for key, value in fields.items():
        msg[key] = value
    msg["attrs"] = attrs
    msg.encode()
    return bytes(msg.data)


def _theirs(cls: Any, wire: bytes) -> Any:
    msg = cls(wire)
    msg.decode()
    return msg


def _same(kind: str, cls: Any, wire: bytes, fields: list[str], attrs: list[str]) -> None:
    ours, theirs = decode(kind, wire), _theirs(cls, wire)
    for field in fields:
        assert ours[field] == theirs[field], field
    for name in attrs:
        assert ours.get_attr(name) == theirs.get_attr(name), name


LINK_FIELDS = ["family", "ifi_type", "index", "flags", "change"]
LINK_ATTRS = ["IFLA_IFNAME", "IFLA_MTU", "IFLA_ADDRESS"]


@pytest.mark.parametrize("attrs", [
    [("IFLA_IFNAME", "vlan3"), ("IFLA_MTU", 1420), ("IFLA_TXQLEN", 1000),
     ("IFLA_ADDRESS", "02:00:5e:10:00:01"), ("IFLA_OPERSTATE", "UP")],
    [("IFLA_IFNAME", "wg0"), ("IFLA_MTU", 1420), ("IFLA_GROUP", 0)],  # no l2 address
    [("IFLA_MTU", 65535), ("IFLA_IFNAME", "a-long-name-15c")],
])
def test_a_link_decodes_as_pyroute2_decodes_it(attrs: list[tuple[str, Any]]) -> None:
    wire = _wire(ifinfmsg, {"family": 0, "ifi_type": 1, "index": 7, "flags": 0x11043,
                            "change": 0}, attrs)
    _same("link", ifinfmsg, wire, LINK_FIELDS, LINK_ATTRS)


@pytest.mark.parametrize(("family", "attrs"), [
    (AF_INET, [("IFA_ADDRESS", "198.51.100.1"), ("IFA_LOCAL", "198.51.100.2"),
               ("IFA_LABEL", "vlan4"), ("IFA_FLAGS", 0x80)]),
    (AF_INET, [("IFA_LOCAL", "192.0.2.9"), ("IFA_ADDRESS", "192.0.2.9")]),
    (AF_INET6, [("IFA_ADDRESS", "2001:db8::2"), ("IFA_FLAGS", 0x80)]),
])
def test_an_address_decodes_as_pyroute2_decodes_it(family: int,
                                                   attrs: list[tuple[str, Any]]) -> None:
    wire = _wire(ifaddrmsg, {"family": family, "prefixlen": 24, "flags": 0x80, "scope": 0,
                             "index": 9}, attrs)
    _same("addr", ifaddrmsg, wire, ["family", "prefixlen", "flags", "scope", "index"],
          ["IFA_ADDRESS", "IFA_LOCAL", "IFA_LABEL"])


@pytest.mark.parametrize(("family", "attrs"), [
    (AF_INET, [("RTA_TABLE", 0x76740001), ("RTA_GATEWAY", "192.0.2.1"), ("RTA_OIF", 7),
               ("RTA_PRIORITY", 0xFFFFFFFF), ("RTA_MARK", 5)]),
    (AF_INET, [("RTA_TABLE", 254), ("RTA_DST", "203.0.113.0"), ("RTA_PREFSRC", "203.0.113.5"),
               ("RTA_OIF", 3)]),
    (AF_INET6, [("RTA_TABLE", 254), ("RTA_DST", "2001:db8::"), ("RTA_OIF", 3),
                ("RTA_PRIORITY", 256), ("RTA_PREF", 0)]),
    (AF_INET6, [("RTA_TABLE", 5100), ("RTA_GATEWAY", "fe80::1"), ("RTA_OIF", 4)]),
])
def test_a_route_decodes_as_pyroute2_decodes_it(family: int,
                                                attrs: list[tuple[str, Any]]) -> None:
    wire = _wire(rtmsg, {"family": family, "dst_len": 24, "table": 254, "proto": 4,
                         "scope": 253, "type": 1}, attrs)
    _same("route", rtmsg, wire, ["family", "dst_len", "src_len", "tos", "table", "proto",
                                 "scope", "type", "flags"],
          ["RTA_DST", "RTA_OIF", "RTA_GATEWAY", "RTA_PRIORITY", "RTA_TABLE", "RTA_PREFSRC"])
    assert rtnl.route_table(decode("route", wire)) == dict(attrs)["RTA_TABLE"]


@pytest.mark.parametrize(("family", "attrs"), [
    (AF_INET, [("FRA_TABLE", 0x76740001), ("FRA_PRIORITY", 5101), ("FRA_FWMARK", 0x81000000),
               ("FRA_FWMASK", 0xFF001F00), ("FRA_PROTOCOL", 0)]),
    (AF_INET, [("FRA_PRIORITY", 0), ("FRA_FWMARK", 0x80000000), ("FRA_FWMASK", 0x80000000),
               ("FRA_GOTO", 5100)]),
    (AF_INET6, [("FRA_TABLE", 51820), ("FRA_PRIORITY", 32765), ("FRA_FWMARK", 51820),
                ("FRA_SUPPRESS_PREFIXLEN", 0), ("FRA_IIFNAME", "lo"),
                ("FRA_OIFNAME", "wg0")]),
    (AF_INET, [("FRA_TABLE", 200), ("FRA_SRC", "192.0.2.0"), ("FRA_DST", "198.51.100.0")]),
])
def test_a_rule_decodes_as_pyroute2_decodes_it(family: int,
                                               attrs: list[tuple[str, Any]]) -> None:
    wire = _wire(fibmsg, {"family": family, "dst_len": 24, "src_len": 24, "table": 0,
                          "action": 1, "flags": 0x2}, attrs)
    _same("rule", fibmsg, wire, ["family", "dst_len", "src_len", "tos", "table", "action",
                                 "flags"],
          ["FRA_DST", "FRA_SRC", "FRA_IIFNAME", "FRA_OIFNAME", "FRA_GOTO", "FRA_PRIORITY",
           "FRA_FWMARK", "FRA_FWMASK", "FRA_TABLE", "FRA_SUPPRESS_PREFIXLEN"])


def test_an_attribute_we_do_not_read_is_none_and_the_first_of_two_wins() -> None:
    wire = message(16, 2, 1, rtnl._IFINFOMSG.pack(0, 1, 7, 0, 0)
                   + _attr_name(3, "first") + _attr_name(3, "second"))
    msg = decode("link", wire)
    assert msg.get_attr("IFLA_IFNAME") == "first"
    assert msg.get_attr("IFLA_MTU") is None
    assert msg.get_attr("IFLA_NOT_A_THING") is None


def _attr_name(kind: int, name: str) -> bytes:
    from via_tunnel.kernel.nlmsg import attr

    return attr(kind, name.encode() + b"\0")


@pytest.mark.parametrize("name", ["vlan3", None])
def test_the_link_request_is_what_pyroute2_encodes(name: str | None) -> None:
    wire = _wire(ifinfmsg, {}, [("IFLA_IFNAME", name)] if name else [])
    assert rtnl.link_request_payload(name) == wire[NLMSGHDR:]


@pytest.mark.parametrize(("family", "table", "oif"), [
    (AF_INET, 254, 7), (AF_INET6, 0x76740001, None), (AF_INET, None, None),
    (AF_INET6, None, 3),
])
def test_the_route_dump_request_is_what_pyroute2_encodes(family: int, table: int | None,
                                                         oif: int | None) -> None:
    attrs: list[tuple[str, Any]] = []
    fields = {"family": family}
    if table is not None:
        fields["table"] = table if table < 256 else 0
        attrs.append(("RTA_TABLE", table))
    if oif is not None:
        attrs.append(("RTA_OIF", oif))
    assert rtnl.route_dump_payload(family, table, oif) == _wire(rtmsg, fields,
                                                                attrs)[NLMSGHDR:]
