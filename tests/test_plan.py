"""Golden tests of the pure planner: what a group needs, for each kind of interface."""

from socket import AF_INET, AF_INET6

import pytest

from via_tunnel.core.errors import ViaTunnelError
from via_tunnel.core.nftplan import base_ruleset, group_elements, level_ruleset
from via_tunnel.core.plan import LinkFacts, RouteSpec, RuleSpec, plan_group
from via_tunnel.core.settings import (
    MARK_MASK,
    MAX_SLOT,
    RULE_PRIORITY,
    mark_for_slot,
    table_for_slot,
)

TUN = LinkFacts(name="tun0", index=7, up=True, pointopoint=True, ipv4=("192.0.2.50/32",))
VETH = LinkFacts(name="vlan3", index=5, up=True, pointopoint=False, ipv4=("192.0.2.34/28",),
                 gateway4="192.0.2.33", connected4=("192.0.2.32/28",))


def plan(facts: LinkFacts, **kw):  # type: ignore[no-untyped-def]
    return plan_group(facts, slot=3, level=2, cgroup_nft_path="unified/via-tunnel/if-x", **kw)


def test_point_to_point_routes_without_next_hop_and_fails_closed() -> None:
    p = plan(TUN)
    t = table_for_slot(3)
    assert p.routes == (
        RouteSpec(AF_INET, t, "default", oif=7),
        RouteSpec(AF_INET, t, "default", kind="unreachable", metric=0xFFFFFFFF),
        RouteSpec(AF_INET6, t, "default", kind="unreachable", metric=0xFFFFFFFF),
    )
    assert p.rules == (
        RuleSpec(AF_INET, 5101 + 3, mark_for_slot(3), MARK_MASK, t),
        RuleSpec(AF_INET6, 5101 + 3, mark_for_slot(3), MARK_MASK, t),
    )
    assert p.ipv6 == "block"


def test_broadcast_uses_main_table_next_hop_and_copies_link_routes() -> None:
    p = plan(VETH)
    t = table_for_slot(3)
    assert RouteSpec(AF_INET, t, "192.0.2.32/28", oif=5) in p.routes
    assert RouteSpec(AF_INET, t, "default", oif=5, gateway="192.0.2.33") in p.routes
    assert p.gateway4 == "192.0.2.33"


def test_broadcast_without_next_hop_is_an_error_not_a_guess() -> None:
    facts = LinkFacts(name="eth1", index=2, up=True, pointopoint=False, ipv4=("192.0.2.2/28",))
    with pytest.raises(ViaTunnelError, match="--gateway"):
        plan(facts)


def test_explicit_gateway_must_be_on_the_interface_subnet() -> None:
    assert plan(VETH, gateway="192.0.2.40").gateway4 == "192.0.2.40"
    with pytest.raises(ViaTunnelError, match="not on a subnet"):
        plan(VETH, gateway="198.51.100.1")
    with pytest.raises(ViaTunnelError, match="not an IPv4"):
        plan(VETH, gateway="nope")


def test_down_or_addressless_interface_is_refused() -> None:
    with pytest.raises(ViaTunnelError, match="down"):
        plan(LinkFacts(name="tun0", index=7, up=False, pointopoint=True, ipv4=("1.2.3.4/32",)))
    with pytest.raises(ViaTunnelError, match="no IPv4"):
        plan(LinkFacts(name="tun0", index=7, up=True, pointopoint=True))


def test_ipv6_goes_through_the_tunnel_only_when_it_has_v6() -> None:
    v6 = LinkFacts(name="tun0", index=7, up=True, pointopoint=True, ipv4=("192.0.2.50/32",),
                   ipv6_global=("2001:db8:5::2/64",))
    assert plan(v6).ipv6 == "tunnel"
    assert RouteSpec(AF_INET6, table_for_slot(3), "default", oif=7) in plan(v6).routes
    assert plan(v6, ipv6="block").ipv6 == "block"
    with pytest.raises(ViaTunnelError, match="no global IPv6"):
        plan(TUN, ipv6="tunnel")


def test_marks_tables_never_collide_with_known_neighbours() -> None:
    tailscale = [(0x80000, 0xFF0000), (0x40000, 0xFF0000)]
    for slot in range(1, MAX_SLOT + 1):
        mark = mark_for_slot(slot)
        assert mark & MARK_MASK == mark
        for value, mask in tailscale:
            assert mark & mask != value
        assert mark not in (51820, 0x6D6F6C65)
        assert mark != (0x6D6F6C65 & MARK_MASK)  # Mullvad's mark never matches our rule
        assert table_for_slot(slot) not in (52, 51820, 253, 254, 255)
    with pytest.raises(ValueError):
        mark_for_slot(0)
    with pytest.raises(ValueError):
        mark_for_slot(MAX_SLOT + 1)
    assert mark_for_slot(5) == 0x8500_0000  # slots 1-127 keep the marks they always had
    assert mark_for_slot(128) == 0x8000_0100


def test_nft_text_carries_no_names_and_elements_carry_them_as_data() -> None:
    weird = LinkFacts(name='q"x;', index=9, up=True, pointopoint=True, ipv4=("192.0.2.50/32",))
    p = plan(weird)
    assert 'q"x;' not in base_ruleset() + level_ruleset(2)
    add = group_elements(p, "add")
    delete = group_elements(p, "delete")
    assert [next(iter(c)) for c in add] == ["add"] * 6
    assert [c["add"] for c in add] == [c["delete"] for c in delete]
    elements = {c["add"]["element"]["name"]: c["add"]["element"]["elem"] for c in add}
    for name in ("group_oifs", "tx", "rx"):
        assert elements[name] == [{"concat": [p.mark, 'q"x;']}]
    assert elements["iif_marks"] == [['q"x;', p.mark]]
    assert elements["v6_blocked"] == [p.mark]
    assert "groups_l2" in elements


def test_level_ruleset_rejects_nonsense_levels() -> None:
    assert "socket cgroupv2 level 4 map @groups_l4" in level_ruleset(4)
    for bad in (0, 256, -1):
        with pytest.raises(ValueError):
            level_ruleset(bad)


def test_an_address_with_a_peer_gives_the_next_hop_of_a_broadcast_interface() -> None:
    facts = LinkFacts(name="vlan4", index=9, up=True, pointopoint=False,
                      ipv4=("10.0.4.3/32",), peer4="10.0.4.1", connected4=("10.0.4.1/32",))
    p = plan(facts)
    assert p.gateway4 == "10.0.4.1"
    assert RouteSpec(AF_INET, table_for_slot(3), "default", oif=9, gateway="10.0.4.1") \
        in p.routes
    # A main-table route's next hop says more than the peer.
    assert plan(LinkFacts(**{**facts.__dict__, "gateway4": "10.0.4.9"})).gateway4 == "10.0.4.9"


def test_shared_rules_enter_from_priority_0_skip_for_others_dispatch_and_catch() -> None:
    from via_tunnel.core.plan import shared_rules

    flag = 0x8000_0000
    v4 = [r for r in shared_rules() if r.family == AF_INET]
    assert v4[0] == RuleSpec(AF_INET, 5133, flag, flag, action="unreachable")
    assert v4[1:33] == [RuleSpec(AF_INET, RULE_PRIORITY, flag | b << 24, 0x9F00_0000,
                                 action="goto", goto=5101 + b) for b in range(32)]
    assert v4[33:] == [
        RuleSpec(AF_INET, 5099, flag, flag, action="goto", goto=5133, invert=True),
        RuleSpec(AF_INET, 0, flag, flag, action="goto", goto=RULE_PRIORITY),
    ]
    assert [r.family for r in shared_rules()] == [AF_INET] * 35 + [AF_INET6] * 35


def test_a_groups_packet_meets_a_bounded_number_of_rules_whatever_its_slot() -> None:
    from via_tunnel.core.plan import group_rules, shared_rules

    dispatch = [r for r in shared_rules() if r.family == AF_INET and r.action == "goto"
                and r.priority == RULE_PRIORITY]
    every = [r for s in range(1, MAX_SLOT + 1) for r in group_rules(s) if r.family == AF_INET]
    for slot in (1, 31, 32, 127, 128, 2049, MAX_SLOT):
        mark = mark_for_slot(slot)
        hop = next(i for i, r in enumerate(dispatch) if mark & r.fwmask == r.fwmark)
        bucket = [r for r in every if r.priority == dispatch[hop].goto]
        assert any(mark & r.fwmask == r.fwmark and r.table == table_for_slot(slot)
                   for r in bucket)
        assert hop + 1 + len(bucket) <= 32 + 128
