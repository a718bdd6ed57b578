"""Our footprint (marks with their mask, routing tables, rule priority) collides with none of
the neighbours listed in NOTES.md: Tailscale, wg-quick, Mullvad, and the kernel's own rules.

Pure arithmetic over what the planner really emits (``group_rules`` for every slot), so a
change of a constant that would make us match a neighbour's packets fails here.
"""

from __future__ import annotations

from socket import AF_INET, AF_INET6

import pytest

from via_tunnel.core.plan import RuleSpec, group_rules, shared_rules
from via_tunnel.core.settings import (
    CATCH_PRIORITY,
    MAX_SLOT,
    SKIP_PRIORITY,
    mark_for_slot,
    slot_of_mark,
    table_for_slot,
)

# Neighbours' marks as (value, mask): a packet p "matches" when p & mask == value.
TAILSCALE_MARK_BITS = 0x00FF0000  # Tailscale's fwmark rules test bits in this mask
TAILSCALE_MARKS = [(0x00040000, TAILSCALE_MARK_BITS), (0x00080000, TAILSCALE_MARK_BITS)]
WG_QUICK_MARK = (51820, 0xFFFFFFFF)  # `not fwmark 51820 table 51820`
MULLVAD_MARK = (0x6D6F6C65, 0xFFFFFFFF)
MULLVAD_CT_MARK = (0x00000F41, 0xFFFFFFFF)
NEIGHBOUR_MARKS = [*TAILSCALE_MARKS, WG_QUICK_MARK, MULLVAD_MARK, MULLVAD_CT_MARK]

TAILSCALE_PRIORITIES = range(5210, 5271)
KERNEL_PRIORITIES = {0, 32766, 32767}  # local, main, default
WG_QUICK_PRIORITIES = {32764, 32765}  # where `ip rule add` without a priority lands them
# Tables: Tailscale 52, wg-quick 51820, Mullvad names its table by its mark; the kernel's
# unspec/default/main/local.
NEIGHBOUR_TABLES = {52, 51820, 0x6D6F6C65, 0, 253, 254, 255}

SLOTS = range(1, MAX_SLOT + 1)


def all_rules() -> list[RuleSpec]:
    """Every rule that matches our marks (the skip rule, inverted, matches the others)."""
    return [*(rule for slot in SLOTS for rule in group_rules(slot)),
            *(rule for rule in shared_rules() if not rule.invert)]


def test_every_slot_has_one_v4_and_one_v6_rule() -> None:
    for slot in SLOTS:
        rules = group_rules(slot)
        assert sorted(r.family for r in rules) == sorted([AF_INET, AF_INET6])
        assert {slot_of_mark(r.fwmark) for r in rules} == {slot}


@pytest.mark.parametrize(("value", "mask"), NEIGHBOUR_MARKS)
def test_our_rules_never_match_a_neighbours_mark(value: int, mask: int) -> None:
    # Our rule matches a packet p when p & fwmask == fwmark: never for a neighbour's mark.
    for rule in all_rules():
        assert value & rule.fwmask != rule.fwmark, (hex(rule.fwmark), hex(value))


@pytest.mark.parametrize(("value", "mask"), NEIGHBOUR_MARKS)
def test_a_neighbours_rule_never_matches_our_marks(value: int, mask: int) -> None:
    for slot in SLOTS:
        ours = mark_for_slot(slot)
        assert ours & mask != value, (hex(ours), hex(value), hex(mask))


def test_our_mark_bits_are_disjoint_from_tailscales_and_the_flag_is_ours_alone() -> None:
    for rule in all_rules():
        assert rule.fwmask & TAILSCALE_MARK_BITS == 0
        assert rule.fwmark & ~rule.fwmask == 0  # nothing outside our mask is set
        assert rule.fwmark & 0x8000_0000  # bit 31 set...
    for value, _mask in NEIGHBOUR_MARKS:
        assert not value & 0x8000_0000  # ...and no neighbour uses it (ruleset.nft tests it)


def test_marks_and_tables_are_distinct_per_slot() -> None:
    marks = [mark_for_slot(s) for s in SLOTS]
    tables = [table_for_slot(s) for s in SLOTS]
    assert len(set(marks)) == len(marks)
    assert len(set(tables)) == len(tables)


def test_tables_collide_with_no_neighbour() -> None:
    tables = {rule.table for rule in all_rules() if rule.action == "lookup"}
    assert tables == {table_for_slot(s) for s in SLOTS}
    assert not tables & NEIGHBOUR_TABLES
    assert all(t < 2**32 for t in tables)


def test_rule_priorities_enter_at_0_and_keep_to_a_band_before_every_neighbour() -> None:
    priorities = {rule.priority for rule in [*all_rules(), *shared_rules()]}
    # The entry rule shares priority 0 with `local` (added after it, so tried after it);
    # everything else keeps to one band, ahead of Tailscale's and wg-quick's rules and main.
    band = priorities - {0}
    assert band == set(range(SKIP_PRIORITY, CATCH_PRIORITY + 1))
    assert not band & (set(TAILSCALE_PRIORITIES) | KERNEL_PRIORITIES | WG_QUICK_PRIORITIES)
    assert max(band) < min(TAILSCALE_PRIORITIES) and max(band) < min(WG_QUICK_PRIORITIES)
