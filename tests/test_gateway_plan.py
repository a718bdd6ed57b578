"""The gateway's pure planning: forward specs, config merging, subnets, nft commands, warnings.

No root and no kernel: the kernel tests (test_gateway_kernel.py) prove the commands work.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from via_tunnel.core.errors import UsageError, ViaTunnelError
from via_tunnel.gateway.config import Forward, merge_config, parse_forward, parse_subnet
from via_tunnel.gateway.foreign import foreign_warnings
from via_tunnel.gateway.plan import (
    Addr4,
    GatewayPlan,
    IfFacts,
    default_subnet,
    free_id,
    plan_gateway,
)
from via_tunnel.gateway.ruleset import (
    GW_TABLE,
    down_commands,
    ids_in_table,
    table_names,
    up_commands,
)

TUN = IfFacts(name="tun0", index=9, mtu=1400,
              ipv4=(Addr4(local="192.0.2.49", prefixlen=32, peer="192.0.2.50"),))
VETH = IfFacts(name="vlan3", index=4, mtu=1500, ipv4=(Addr4("192.0.2.33", 28),))
WAN = IfFacts(name="wan0", index=3, mtu=1500, ipv4=(Addr4("203.0.113.2", 28),))


# --------------------------------------------------------------------------- specs


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("tcp:1000:192.0.2.50", Forward("tcp", (1000, 1000), "192.0.2.50")),
        ("udp:53:192.0.2.50:5353", Forward("udp", (53, 53), "192.0.2.50", 5353)),
        ("tcp:8080:192.0.2.50:8080", Forward("tcp", (8080, 8080), "192.0.2.50")),
        ("TCP:1000-1010:192.0.2.50", Forward("tcp", (1000, 1010), "192.0.2.50")),
        ("udp:1000-1010:192.0.2.50:1000-1010", Forward("udp", (1000, 1010), "192.0.2.50")),
        ("tcp:65535:192.0.2.50:1", Forward("tcp", (65535, 65535), "192.0.2.50", 1)),
    ],
)
def test_forward_specs_parse_and_round_trip(spec: str, expected: Forward) -> None:
    f = parse_forward(spec)
    assert f == expected
    assert parse_forward(f.spec()) == f


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("tcp:1000", "malformed"),
        ("tcp:1000:192.0.2.50:80:90", "malformed"),
        ("", "malformed"),
        ("tcp:10x:192.0.2.50", "malformed"),
        ("tcp:1000:host.example", "malformed"),
        ("sctp:1000:192.0.2.50", "tcp or udp"),
        ("tcp:0:192.0.2.50", "out of range"),
        ("tcp:65536:192.0.2.50", "out of range"),
        ("tcp:1000:192.0.2.50:70000", "out of range"),
        ("tcp:2000-1000:192.0.2.50", "backwards"),
        ("tcp:1000:192.0.2.500", "not an IPv4"),
        ("tcp:1000:192.0.2.50:80-90", "port range"),
        ("tcp:1000-1010:192.0.2.50:2000-2010", "same ports"),
        ('tcp:1000:192.0.2.50"; flush ruleset', "malformed"),
    ],
)
def test_bad_forward_specs_are_usage_errors(spec: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_forward(spec)


def test_subnets() -> None:
    assert str(parse_subnet("192.0.2.49/28")) == "192.0.2.48/28"
    for bad in ("192.0.2.0", "192.0.2.0/33", "2001:db8::/64", "nonsense"):
        with pytest.raises(UsageError):
            parse_subnet(bad)


def test_default_subnet_of_point_to_point_is_the_peers() -> None:
    # OpenVPN p2p: "192.0.2.49 peer 192.0.2.50/32": what is behind the tunnel is the peer.
    assert str(default_subnet(TUN)) == "192.0.2.50/32"
    assert str(default_subnet(VETH)) == "192.0.2.32/28"
    with pytest.raises(ViaTunnelError, match="no IPv4"):
        default_subnet(IfFacts(name="x", index=1, mtu=1500))


# --------------------------------------------------------------------------- config


def test_flags_override_the_config_file() -> None:
    table = {"wan": "eth9", "subnet": "192.0.2.48/28", "forward": ["tcp:1000:192.0.2.50"]}
    cfg = merge_config("tun0", table, wan=None, subnet=None, forwards=None)
    assert (cfg.wan, cfg.subnet, [f.spec() for f in cfg.forwards]) == (
        "eth9", "192.0.2.48/28", ["tcp:1000:192.0.2.50"])
    cfg = merge_config("tun0", table, wan="wan0", subnet=None, forwards=["udp:7:192.0.2.50"])
    assert cfg.wan == "wan0"
    assert [f.spec() for f in cfg.forwards] == ["udp:7:192.0.2.50"]  # replaced, not added


@pytest.mark.parametrize(
    ("table", "kw", "message"),
    [
        ({}, {}, "no WAN interface"),
        ({"wan": "tun0"}, {}, "cannot be the tunnel"),
        ({"wan": "wan0", "forwrd": []}, {}, "unknown key 'forwrd'"),
        ({"wan": "wan0", "forward": "tcp:1:192.0.2.50"}, {}, "list of strings"),
        ({"wan": 3}, {}, "must be a string"),
        ({"wan": "wan0"}, {"subnet": "10.0.0.0"}, "prefix length"),
        ({"wan": "bad/name"}, {}, "forbids"),
        ({"wan": "wan0", "forward": ["tcp:1000-1005:192.0.2.50", "tcp:1005:192.0.2.50"]}, {},
         "overlap"),
    ],
)
def test_bad_config_is_a_usage_error(table: dict[str, Any], kw: dict[str, Any],
                                     message: str) -> None:
    args: dict[str, Any] = {"wan": None, "subnet": None, "forwards": None, **kw}
    with pytest.raises(UsageError, match=message):
        merge_config("tun0", table, **args)


def test_tcp_and_udp_on_the_same_port_do_not_overlap() -> None:
    cfg = merge_config("tun0", {}, wan="wan0", subnet=None,
                       forwards=["tcp:1000:192.0.2.50", "udp:1000:192.0.2.50"])
    assert len(cfg.forwards) == 2


# --------------------------------------------------------------------------- plan


def _plan(forwards: list[str], subnet: str | None = None, tun: IfFacts = TUN,
          wan: IfFacts = WAN, gw_id: int = 1) -> GatewayPlan:
    cfg = merge_config(tun.name, {}, wan=wan.name, subnet=subnet, forwards=forwards)
    return plan_gateway(cfg, tun, wan, gw_id)


def test_dest_must_be_behind_the_tunnel() -> None:
    with pytest.raises(ViaTunnelError, match=re.escape("not in the tunnel's subnet 192.0.2.50/32")):
        _plan(["tcp:1000:192.0.2.51"])
    assert _plan(["tcp:1000:192.0.2.51"], subnet="192.0.2.48/28").subnet == "192.0.2.48/28"
    with pytest.raises(ViaTunnelError, match="own address"):
        _plan(["tcp:1000:192.0.2.33"], tun=VETH)


def test_ipv6_only_when_both_sides_have_it() -> None:
    tun6 = IfFacts(name="tun0", index=9, mtu=1400, ipv4=TUN.ipv4,
                   ipv6_global=("2001:db8:5::1/64",))
    wan6 = IfFacts(name="wan0", index=3, mtu=1500, ipv4=WAN.ipv4,
                   ipv6_global=("2001:db8:9::2/64",))
    assert _plan([], tun=tun6).subnet6 == ()
    assert _plan([], wan=wan6).subnet6 == ()
    p = _plan([], tun=tun6, wan=wan6)
    assert p.subnet6 == ("2001:db8:5::/64",)
    text = json.dumps(up_commands(p, {}))
    assert '"protocol": "ip6", "field": "saddr"' in text


def test_plan_round_trips_through_its_state_record() -> None:
    p = _plan(["tcp:1000-1010:192.0.2.50", "udp:53:192.0.2.50:5353"])
    assert GatewayPlan.from_dict(json.loads(json.dumps(p.to_dict()))) == p


def _names(cmds: list[dict[str, Any]], verb: str, kind: str) -> list[str]:
    return [c[verb][kind]["name"] for c in cmds if verb in c and kind in c[verb]]


def test_up_commands_create_numbered_objects_and_carry_names_as_data() -> None:
    p = _plan(["tcp:1000:192.0.2.50", "udp:2000-2010:192.0.2.50"], gw_id=7)
    cmds = up_commands(p, {})
    assert cmds[0] == {"add": {"table": {"family": "inet", "name": GW_TABLE}}}
    assert _names(cmds, "add", "chain") == ["t7_dnat", "t7_forward", "t7_snat", "t7_local"]
    assert _names(cmds, "add", "counter") == ["t7_f0", "t7_f1", "t7_out", "t7_in"]
    rules = [c["add"]["rule"] for c in cmds if "rule" in c.get("add", {})]
    dnats = [r for r in rules if r["chain"] == "t7_dnat"]
    to_dest = {"dnat": {"family": "ip", "addr": "192.0.2.50"}}
    # Per forward: from WAN, and the hairpin from behind the tunnel to WAN's address.
    assert [r["expr"][-1] for r in dnats] == [to_dest] * 4
    assert [r["expr"][0]["match"]["right"] for r in dnats] == ["wan0", "tun0"] * 2
    assert dnats[2]["expr"][4]["match"]["right"] == {"range": [2000, 2010]}
    hairpin_daddr = {"match": {"op": "==", "right": "203.0.113.2",
                               "left": {"payload": {"protocol": "ip", "field": "daddr"}}}}
    assert hairpin_daddr in dnats[1]["expr"] and hairpin_daddr not in dnats[0]["expr"]
    # This host's own connections to WAN's address and a forwarded port.
    local = [r for r in rules if r["chain"] == "t7_local"]
    assert [r["expr"] for r in local] == [r["expr"][1:] for r in dnats[1::2]]
    snat = [r["expr"] for r in rules if r["chain"] == "t7_snat"]
    # Hairpin masquerade, per forward and only for it: to WAN's address and the forwarded
    # port, from behind the tunnel and from this host. (Others' DNAT keeps its sources.)
    def match(left: Any, right: Any, op: str = "==") -> dict[str, Any]:
        return {"match": {"op": op, "left": left, "right": right}}

    meta = [{"meta": {"key": k}} for k in ("iifname", "oifname", "nfproto", "l4proto")]
    ours = [match(meta[2], "ipv4"),
            match({"ct": {"key": "daddr", "family": "ip", "dir": "original"}}, "203.0.113.2"),
            match(meta[3], "tcp"),
            match({"ct": {"key": "proto-dst", "dir": "original"}}, 1000),
            {"masquerade": None}]
    assert snat[-4] == [match(meta[0], "tun0"), match(meta[1], "tun0"), *ours]
    assert snat[-3] == [match(meta[1], "tun0"),
                        match({"fib": {"result": "type", "flags": ["saddr"]}}, "local"), *ours]
    assert [e[-2]["match"]["right"] for e in snat[-2:]] == [{"range": [2000, 2010]}] * 2
    # WAN's recorded address must still be this host's for the hairpin DNAT to apply.
    local_daddr = match({"fib": {"result": "type", "flags": ["daddr"]}}, "local")
    assert all(local_daddr in r["expr"] for r in [*dnats, *local])
    text = json.dumps(cmds)
    assert '"value": {"rt": {"key": "mtu"}}' in text  # MSS into the tunnel: the route's
    assert '"value": 1360' in text and '"value": 1340' in text  # out of it: 1400 - 40/60
    assert '{"masquerade": null}' in text
    # Every chain and counter name is made of the id only.
    assert all(n.startswith("t7_") for n in _names(cmds, "add", "chain")
               + _names(cmds, "add", "counter"))


def test_up_again_with_objects_present_replaces_them_in_one_transaction() -> None:
    p = _plan(["tcp:1000:192.0.2.50"], gw_id=2)
    present = {"t2_dnat": "chain", "t2_forward": "chain", "t2_snat": "chain",
               "t2_f0": "counter", "t2_f1": "counter", "t2_out": "counter",
               "t1_dnat": "chain", "t1_f0": "counter"}
    cmds = up_commands(p, present)
    assert _names(cmds, "flush", "chain") == ["t2_dnat", "t2_forward", "t2_snat"]
    assert _names(cmds, "add", "chain") == ["t2_local"]  # new since that version
    assert _names(cmds, "delete", "counter") == ["t2_f0", "t2_f1", "t2_out"]
    assert _names(cmds, "add", "counter") == ["t2_f0", "t2_out", "t2_in"]


def test_down_removes_only_its_own_objects_or_the_whole_table_when_last() -> None:
    names = {"t1_dnat": "chain", "t1_forward": "chain", "t1_snat": "chain", "t1_f0": "counter",
             "t12_dnat": "chain", "t12_f0": "counter"}
    cmds = down_commands(1, names)
    assert _names(cmds, "flush", "chain") == ["t1_dnat", "t1_forward", "t1_snat"]
    assert _names(cmds, "delete", "chain") == ["t1_dnat", "t1_forward", "t1_snat"]
    assert _names(cmds, "delete", "counter") == ["t1_f0"]  # after the rules using it are gone
    assert "t12" not in json.dumps(cmds)
    only_mine = {k: v for k, v in names.items() if k.startswith("t1_")}
    assert down_commands(1, only_mine) == [
        {"delete": {"table": {"family": "inet", "name": GW_TABLE}}}]
    assert down_commands(1, {}) == []


def test_ids() -> None:
    assert free_id(set()) == 1
    assert free_id({1, 2, 4}) == 3
    assert ids_in_table({"t3_dnat": "chain", "t10_f2": "counter", "other": "chain"}) == {3, 10}
    listing = [{"chain": {"family": "inet", "table": GW_TABLE, "name": "t1_dnat"}},
               {"counter": {"family": "inet", "table": GW_TABLE, "name": "t1_f0"}},
               {"chain": {"family": "ip", "table": "filter", "name": "FORWARD"}}]
    assert table_names(listing) == {"t1_dnat": "chain", "t1_f0": "counter"}


# --------------------------------------------------------------------------- warnings


def test_warns_about_foreign_drop_policy_and_dnat_of_our_ports() -> None:
    p = _plan(["tcp:1000:192.0.2.50", "udp:53:192.0.2.50"])
    ruleset = [
        {"chain": {"family": "ip", "table": "filter", "name": "FORWARD", "hook": "forward",
                   "policy": "drop"}},
        {"chain": {"family": "ip", "table": "filter", "name": "INPUT", "hook": "input",
                   "policy": "drop"}},
        {"chain": {"family": "inet", "table": GW_TABLE, "name": "t1_forward",
                   "hook": "forward", "policy": "accept"}},
        {"rule": {"family": "ip", "table": "nat", "chain": "PREROUTING", "expr": [
            {"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}},
                       "right": {"range": [900, 1100]}}},
            {"xt": {"type": "target", "name": "DNAT"}}]}},
        {"rule": {"family": "ip", "table": "nat", "chain": "PREROUTING", "expr": [
            {"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}},
                       "right": 53}},
            {"dnat": {"addr": "10.0.0.1"}}]}},  # tcp 53: not ours (we forward udp 53)
        {"rule": {"family": "inet", "table": "other", "chain": "pre", "expr": [
            {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "udp"}},
            {"match": {"op": "==", "left": {"payload": {"protocol": "th", "field": "dport"}},
                       "right": {"set": [53, 54]}}},
            {"redirect": None}]}},
    ]
    w = foreign_warnings(ruleset, p)
    assert len(w) == 3, w
    assert "table ip filter chain FORWARD drops forwarded packets" in w[0]
    assert "tcp port 1000 is also forwarded by table ip nat chain PREROUTING" in w[1]
    assert "udp port 53 is also forwarded by table inet other chain pre" in w[2]
    assert foreign_warnings([], p) == []
