"""Doctor's pure parts, without root: rules against our footprint, verdicts, the report."""

from __future__ import annotations

import io
import json
from socket import AF_INET, AF_INET6

import pytest

from via_tunnel.core.errors import ViaTunnelError
from via_tunnel.core.plan import LinkFacts
from via_tunnel.core.settings import (
    MARK_MASK,
    MAX_SLOT,
    RULE_PRIORITY,
    bucket_priority,
    mark_for_slot,
    table_for_slot,
)
from via_tunnel.doctor import run as doctor
from via_tunnel.doctor.check import FAIL, OK, WARN, Check
from via_tunnel.doctor.checks import cgroup2_verdict
from via_tunnel.doctor.iface import facts_verdicts
from via_tunnel.doctor.marks import bits_set, check_foreign_marks
from via_tunnel.doctor.netfilter import probe_verdict
from via_tunnel.doctor.networkd import networkd_settings, networkd_verdict
from via_tunnel.doctor.routing import rp_filter_verdict
from via_tunnel.doctor.rules import (
    FR_ACT_BLACKHOLE,
    IpRule,
    classify,
    finding,
    matched_marks,
    our_slot,
)

LOCAL = IpRule(priority=0, table=255)
MAIN = IpRule(priority=32766, table=254)
DEFAULT = IpRule(priority=32767, table=253)
KERNEL = [LOCAL, MAIN, DEFAULT]


def ours(slot: int, family: int = AF_INET) -> IpRule:
    return IpRule(family=family, priority=bucket_priority(slot), fwmark=mark_for_slot(slot),
                  fwmask=MARK_MASK, table=table_for_slot(slot))


def statuses(checks: list[Check]) -> dict[str, str]:
    return {c.name: c.status for c in checks}


# ---------------------------------------------------------------- rules: our own


def test_our_rules_are_recognised_and_not_findings() -> None:
    for slot in (1, 5, 127, 128, 4095):
        for fam in (AF_INET, AF_INET6):
            assert our_slot(ours(slot, fam)) == slot
            assert finding(ours(slot, fam)) is None
    checks = classify([*KERNEL, ours(1), ours(1, AF_INET6)])
    assert [(c.name, c.status) for c in checks] == [("ip-rules", OK)]
    assert "5 rules checked" in checks[0].detail


def test_a_rule_of_our_form_with_a_wrong_mark_is_not_ours() -> None:
    odd = IpRule(priority=RULE_PRIORITY, fwmark=mark_for_slot(2), fwmask=MARK_MASK,
                 table=table_for_slot(3))
    assert our_slot(odd) is None
    found = finding(odd)
    assert found is not None and found.name == "ip-rules:table" and found.status == FAIL


# ---------------------------------------------------------------- rules: collisions


def test_foreign_rule_at_our_priority_that_matches_our_marks_fails() -> None:
    found = finding(IpRule(priority=RULE_PRIORITY, table=100))
    assert found is not None and (found.name, found.status) == ("ip-rules:priority", FAIL)
    assert "5100" in found.detail and "lookup 100" in found.detail and found.fix


def test_foreign_rule_at_our_priority_that_cannot_match_our_marks_warns() -> None:
    found = finding(IpRule(priority=RULE_PRIORITY, fwmark=0x1, fwmask=0x1, table=100))
    assert found is not None and (found.name, found.status) == ("ip-rules:priority", WARN)


def test_foreign_rule_using_our_table_fails() -> None:
    found = finding(IpRule(priority=6000, fwmark=0x1, table=table_for_slot(5)))
    assert found is not None and (found.name, found.status) == ("ip-rules:table", FAIL)
    assert "0x76740005" in found.detail and "slot 5" in found.detail


@pytest.mark.parametrize(("mark", "mask"), [
    (0x8000_0000, 0xFF00_0000),  # bit 31 under our mask: their marks look like ours in nft
    (0x8100_0000, 0xFF00_0000),  # exactly slot 1's mark
    (0x8000_0000, 0x8000_0000),
    (0x0100_0000, 0x0100_0000),  # matches every odd slot
])
def test_fwmark_overlapping_our_mark_bits_fails(mark: int, mask: int) -> None:
    rule = IpRule(priority=5230, fwmark=mark, fwmask=mask, table=52)
    found = finding(rule)
    assert found is not None and (found.name, found.status) == ("ip-rules:marks", FAIL)
    assert f"0x{mark:x}/0x{mask:x}" in found.detail


def test_catch_all_rule_before_our_entry_warns_and_specific_ones_do_not() -> None:
    found = finding(IpRule(priority=0, table=100), before_entry=True)
    assert found is not None and (found.name, found.status) == ("ip-rules:before", WARN)
    assert found.fix == ("ip rule del from all lookup 100 priority 0 && "
                         "ip rule add from all lookup 100 priority 1  (a group's packets "
                         "jump over priorities 1-5099)")
    found = finding(IpRule(priority=0, action=FR_ACT_BLACKHOLE), before_entry=True)
    assert found is not None and "dropped" in found.detail
    assert finding(IpRule(priority=0, table=100, src="10.0.0.0/8"), before_entry=True) is None
    assert finding(IpRule(priority=0, table=100, iif="eth0"), before_entry=True) is None
    assert finding(IpRule(priority=0, table=100, iif="lo"), before_entry=True) is not None
    assert finding(IpRule(priority=0, table=100, fwmark=0x1), before_entry=True) is None
    assert finding(LOCAL, before_entry=True) is None  # the kernel's own local-table rule
    # After our entry rule, or at priorities a group's packets jump over: harmless.
    assert finding(IpRule(priority=0, table=100)) is None
    assert finding(IpRule(priority=1000, table=100), before_entry=True) is None


def test_matched_marks_honours_invert() -> None:
    wg = IpRule(priority=32764, fwmark=0xCA6C, table=0xCA6C, invert=True)
    assert len(matched_marks(wg)) == MAX_SLOT
    assert matched_marks(IpRule(fwmark=0xCA6C)) == []
    assert matched_marks(IpRule(fwmark=mark_for_slot(3), fwmask=MARK_MASK)) == [mark_for_slot(3)]


# ---------------------------------------------------------------- rules: neighbours

TAILSCALE = [
    IpRule(priority=5210, fwmark=0x80000, fwmask=0xFF0000, table=254),
    IpRule(priority=5230, fwmark=0x80000, fwmask=0xFF0000, table=253),
    IpRule(priority=5250, table=0, action=7),  # unreachable
    IpRule(priority=5270, table=52),
]
WG_QUICK = [
    IpRule(priority=32764, table=254, suppress_prefixlen=0),
    IpRule(priority=32765, fwmark=0xCA6C, table=0xCA6C, invert=True),
]
MULLVAD = [IpRule(priority=32760, fwmark=0x6D6F6C65, table=0x6D6F6C65, invert=True)]


def test_known_neighbours_coexist_with_an_explanation() -> None:
    checks = classify([*KERNEL, *TAILSCALE, *WG_QUICK, *MULLVAD, ours(1)])
    assert statuses(checks) == {"ip-rules": OK, "neighbour:tailscale": OK,
                                "neighbour:wg-quick": OK, "neighbour:mullvad": OK}
    wg = next(c for c in checks if c.name == "neighbour:wg-quick")
    assert "bypass" in wg.detail and "not from all fwmark 0xca6c lookup 51820" in wg.detail


ENTRY = IpRule(priority=0, fwmark=0x8000_0000, fwmask=0x8000_0000, action=2)
WG_AT_0 = [IpRule(priority=0, table=254, suppress_prefixlen=0),
           IpRule(priority=0, fwmark=0xCA6C, table=0xCA6C, invert=True)]


def test_wg_quick_added_before_our_entry_rule_warns() -> None:
    # Both at priority 0: what the dump lists first is tried first.
    checks = classify([LOCAL, *WG_AT_0, ENTRY])
    assert [c.name for c in checks] == ["ip-rules:before", "ip-rules:before"]
    assert all(c.status == WARN for c in checks)


def test_wg_quick_added_while_a_group_runs_lands_after_our_entry_and_is_fine() -> None:
    checks = classify([LOCAL, ENTRY, *WG_AT_0])
    assert [(c.name, c.status) for c in checks] == [("ip-rules", OK), ("neighbour:wg-quick", OK)]


def test_from_netlink_reads_a_kernel_dump() -> None:
    # As pyroute2 gives them (fields of the message, attributes by name).
    wg = IpRule.from_netlink(AF_INET, {"table": 252, "action": 1, "flags": 2, "src_len": 0},
                             {"FRA_TABLE": 51820, "FRA_SUPPRESS_PREFIXLEN": 0xFFFFFFFF,
                              "FRA_PRIORITY": 32000, "FRA_FWMARK": 51820,
                              "FRA_FWMASK": 0xFFFFFFFF})
    assert (wg.table, wg.priority, wg.fwmark, wg.invert, wg.suppress_prefixlen) == \
        (51820, 32000, 51820, True, None)
    local = IpRule.from_netlink(AF_INET, {"table": 255, "action": 1, "flags": 0},
                                {"FRA_TABLE": 255, "FRA_SUPPRESS_PREFIXLEN": 0xFFFFFFFF})
    assert (local.priority, local.fwmark, local.table) == (0, None, 255)
    v6 = IpRule.from_netlink(AF_INET6, {"table": 0, "action": 6, "src_len": 64},
                             {"FRA_PRIORITY": 7, "FRA_SRC": "2001:db8::", "FRA_IIFNAME": "lo"})
    assert v6.describe() == "ip -6 rule 7: from 2001:db8::/64 iif lo blackhole"
    ts = IpRule.from_netlink(AF_INET, {"table": 52},
                             {"FRA_PRIORITY": 5210, "FRA_FWMARK": 0x80000, "FRA_FWMASK": 0xFF0000,
                              "FRA_TABLE": 254})
    assert ts.describe() == "ip rule 5210: from all fwmark 0x80000/0xff0000 lookup 254"


# ---------------------------------------------------------------- other verdicts

PURE_V2 = ["24 1 0:21 / /sys/fs/cgroup rw,nosuid shared:9 - cgroup2 cgroup2 rw"]
HYBRID = [
    "25 1 0:22 / /sys/fs/cgroup ro shared:9 - tmpfs tmpfs ro,mode=755",
    "26 25 0:23 / /sys/fs/cgroup/unified rw shared:10 - cgroup2 cgroup2 rw",
    "27 25 0:24 / /sys/fs/cgroup/cpu rw shared:11 - cgroup cgroup rw,cpu",
]


def test_cgroup2_verdicts() -> None:
    c = cgroup2_verdict(PURE_V2)
    assert c.status == OK and "/sys/fs/cgroup," in c.detail and "pure v2" in c.detail
    c = cgroup2_verdict(HYBRID)
    assert c.status == OK and "/sys/fs/cgroup/unified" in c.detail and "hybrid" in c.detail
    ours = "40 24 0:40 / /run/via-tunnel/net_cls rw,nosuid - cgroup via-tunnel rw,net_cls"
    c = cgroup2_verdict([*PURE_V2, ours])  # our own net_cls mount, while groups run
    assert c.status == OK and "pure v2" in c.detail
    c = cgroup2_verdict(HYBRID[:1])
    assert c.status == FAIL and c.fix and "mount" in c.fix
    c = cgroup2_verdict(["30 1 0:25 / /mnt/cg rw - cgroup2 cgroup2 rw"])
    assert c.status == FAIL and "outside /sys/fs/cgroup" in c.detail


def test_probe_verdicts() -> None:
    abort = "Error: Could not process rule: No such file or directory\ndelete table ...\n"
    assert probe_verdict("nat", -1, abort).status == OK
    refused = "Error: Could not process rule: Operation not supported\nadd rule ...\n"
    c = probe_verdict("socket-cgroupv2", -1, refused + abort)
    assert c.status == FAIL and "Operation not supported" in c.detail
    assert probe_verdict("nat", -1, "Error: syntax error, unexpected foo\n").status == FAIL
    assert probe_verdict("nat", 0, "").status == FAIL  # never success without the abort
    c = probe_verdict("nat", -1, "Error: Could not process rule: Operation not permitted\n")
    assert c.status == WARN


def test_rp_filter_verdicts() -> None:
    assert rp_filter_verdict("rp", 0, 0, 3, "x").status == OK
    assert rp_filter_verdict("rp", 2, 0, 3, "x").status == OK
    assert rp_filter_verdict("rp", 1, 1, 3, "x").status == OK
    idle = rp_filter_verdict("rp", 1, 0, 0, "x")
    assert idle.status == OK and "src_valid_mark=1 when a group starts" in idle.detail
    broken = rp_filter_verdict("rp", 1, 0, 2, "x")
    assert broken.status == FAIL and broken.fix == \
        "sysctl -w net.ipv4.conf.all.src_valid_mark=1"


def test_networkd_settings_last_assignment_wins_and_sections_count() -> None:
    values = networkd_settings([
        "[Network]\nManageForeignRoutingPolicyRules=yes\n#ManageForeignRoutes=no\n",
        "[DHCPv4]\nManageForeignRoutes=no\n",
        "[Network]\n ManageForeignRoutingPolicyRules = no \n",
    ])
    assert values == {"ManageForeignRoutingPolicyRules": "no"}


def test_networkd_verdicts() -> None:
    assert networkd_verdict(False, False, {}, []).status == OK
    c = networkd_verdict(True, False, {"ManageForeignRoutingPolicyRules": "no"}, ["f"])
    assert c.status == WARN and "ManageForeignRoutes=yes (default)" in c.detail
    assert c.fix and "ManageForeignRoutes=no" in c.fix
    assert "ManageForeignRoutingPolicyRules" not in c.fix
    ok = {"ManageForeignRoutingPolicyRules": "false", "ManageForeignRoutes": "0"}
    assert networkd_verdict(False, True, ok, ["f"]).status == OK


def _facts(**kw: object) -> LinkFacts:
    base: dict[str, object] = {"name": "tun0", "index": 7, "up": True, "pointopoint": True,
                               "ipv4": ("192.0.2.50/32",), "mtu": 1500}
    base.update(kw)
    return LinkFacts(**base)  # type: ignore[arg-type]


def test_interface_verdicts() -> None:
    assert {c.status for c in facts_verdicts(_facts())} == {OK}
    got = statuses(facts_verdicts(_facts(up=False, ipv4=())))
    assert got["iface:up"] == FAIL and got["iface:ipv4"] == FAIL
    got = statuses(facts_verdicts(_facts(pointopoint=False, mtu=1200)))
    assert got["iface:nexthop"] == WARN and got["iface:mtu"] == WARN
    assert statuses(facts_verdicts(_facts(pointopoint=False, gateway4="192.0.2.1", mtu=None)))[
        "iface:nexthop"] == OK


# ---------------------------------------------------------------- framework


def test_guarded_turns_errors_into_lines() -> None:
    def boom() -> list[Check]:
        raise ViaTunnelError("cannot read x")

    def bug() -> list[Check]:
        raise KeyError("k")

    assert [(c.status, c.detail) for c in doctor.guarded("a", boom)] == [(FAIL, "cannot read x")]
    [c] = doctor.guarded("b", bug)
    assert c.status == FAIL and "KeyError" in c.detail


def test_report_shapes_and_exit_code() -> None:
    checks = [Check("a", OK, "fine"), Check("b", WARN, "hmm", "do x")]
    text = io.StringIO()
    doctor.render_text(checks, text)
    assert text.getvalue().splitlines() == ["OK    a: fine", "WARN  b: hmm  -- fix: do x"]
    assert doctor.exit_code(checks) == 0
    checks.append(Check("c", FAIL, "bad", "fix it"))
    out = io.StringIO()
    doctor.render_json(checks, out)
    data = json.loads(out.getvalue())
    assert data["version"] == 1 and data["ok"] is False
    assert data["checks"][0] == {"name": "a", "status": "ok", "detail": "fine", "fix": None}
    assert doctor.exit_code(checks) == 1
    with pytest.raises(ValueError):
        Check("x", "bad", "y")


def test_doctor_module_does_not_import_typer() -> None:
    import subprocess
    import sys

    code = "import sys, via_tunnel.doctor.run; print('typer' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


# ----------------------------------------------------------------- foreign nft marks

META_MARK = {"meta": {"key": "mark"}}


@pytest.mark.parametrize(("value", "bits"), [
    (0x80000001, 0x80000001),
    (0x00080000, 0x00080000),
    (META_MARK, 0),  # meta mark set meta mark: nothing new
    ({"ct": {"key": "mark"}}, 0),  # a copy of the connection mark
    ({"|": [META_MARK, 0x80000000]}, 0x80000000),
    ({"&": [META_MARK, 0x00FFFFFF]}, 0),  # clearing bits turns none on
    ({"|": [{"&": [META_MARK, 0xFF00FFFF]}, 0x00040000]}, 0x00040000),  # Tailscale-like
    ({"^": [META_MARK, 0x80000000]}, 0x80000000),
    ({"map": {"key": {"meta": {"key": "iifname"}}, "data": "@m"}}, None),  # unknown
    ({"|": [META_MARK, {"jhash": {}}]}, None),
    (True, None),
])
def test_bits_a_mark_statement_may_turn_on(value: object, bits: int | None) -> None:
    assert bits_set(value) == bits


def _rule(*expr: object, table: str = "t") -> dict[str, object]:
    return {"rule": {"family": "inet", "table": table, "chain": "c", "handle": 4,
                     "expr": list(expr)}}


def _mangle(kind: str, value: object) -> dict[str, object]:
    return {"mangle": {"key": {kind: {"key": "mark"}}, "value": value}}


def test_foreign_marks_verdicts() -> None:
    fine = [_rule(_mangle("meta", 0x40000)), _rule({"accept": None}),
            _rule(_mangle("meta", {"map": {}})), {"table": {"name": "t"}}]
    checks = check_foreign_marks(fine)
    assert [(c.name, c.status) for c in checks] == [("nft-marks", OK)]
    assert "(3 rules read; " in checks[0].detail
    bad = check_foreign_marks([*fine, _rule(_mangle("ct", 0x80000000), table="x"),
                               _rule(_mangle("meta", {"|": [META_MARK, 1 << 31]}))])
    assert [(c.name, c.status) for c in bad] == [("nft-marks", FAIL)] * 2
    assert bad[0].detail.startswith("table inet x chain c (handle 4) sets bit 31 of the "
                                    "connection mark")
    assert "packet mark" in bad[1].detail and all(c.fix for c in bad)


# ----------------------------------------------------------------- host: init, placement, net_cls

PROC_CGROUPS = ("#subsys_name\thierarchy\tnum_cgroups\tenabled\ncpuset\t3\t1\t1\n"
                "net_cls\t{hier}\t1\t{enabled}\n")


def test_placement_on_a_systemd_host_is_a_scope_in_our_slice() -> None:
    from via_tunnel.core.settings import Settings
    from via_tunnel.doctor.host import placement_verdict

    scopes = Settings(cgroup_subtree="via.slice/via-tunnel.slice", scopes=True)
    c = placement_verdict(True, scopes, "/sys/fs/cgroup", dbus=True)
    assert c.status == OK and "via-tunnel-IFACE.scope in via-tunnel.slice" in c.detail
    assert "/sys/fs/cgroup/via.slice/via-tunnel.slice" in c.detail
    assert placement_verdict(True, scopes, "/sys/fs/cgroup", dbus=False).status == FAIL
    plain = Settings(cgroup_subtree="via-tunnel")
    c = placement_verdict(False, plain, "/sys/fs/cgroup/unified", dbus=False)
    assert c.status == OK and "no systemd" in c.detail
    assert "/sys/fs/cgroup/unified/via-tunnel/if-IFACE" in c.detail
    c = placement_verdict(True, Settings(cgroup_subtree="lab"), "/sys/fs/cgroup", dbus=True)
    assert "VIA_TUNNEL_CGROUP is set" in c.detail


def test_net_cls_missing_fails_and_says_where_it_is_mounted() -> None:
    from via_tunnel.doctor.host import netcls_verdict

    own = "/run/via-tunnel/net_cls"
    assert netcls_verdict("cpuset\t3\t1\t1\n", None, own).status == FAIL
    disabled = PROC_CGROUPS.format(hier=0, enabled=0)
    c = netcls_verdict(disabled, None, own)
    assert c.status == FAIL and "refusing" in c.detail and c.fix
    enabled = PROC_CGROUPS.format(hier=0, enabled=1)
    assert "not mounted" in netcls_verdict(enabled, None, own).detail
    assert "mounted by via-tunnel" in netcls_verdict(enabled, own, own).detail
    c = netcls_verdict(enabled, "/sys/fs/cgroup/net_cls,net_prio", own)
    assert c.status == OK and "/sys/fs/cgroup/net_cls,net_prio (used as it is)" in c.detail


def test_net_cls_mount_is_found_alone_or_co_mounted() -> None:
    from via_tunnel.kernel.cgroup import parse_netcls_mount

    lines = [
        "32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu",
        "41 31 0:38 / /sys/fs/cgroup/net_cls,net_prio rw - cgroup cgroup rw,net_cls,net_prio",
        "50 23 0:40 / /run/via-tunnel/net_cls rw - cgroup via-tunnel rw,net_cls",
    ]
    assert parse_netcls_mount(lines) == "/sys/fs/cgroup/net_cls,net_prio"
    assert parse_netcls_mount(lines, exact="/run/via-tunnel/net_cls") == \
        "/run/via-tunnel/net_cls"
    assert parse_netcls_mount(lines[:1]) is None
    assert parse_netcls_mount(["60 23 0:41 / /x rw - cgroup2 cgroup2 rw,net_cls"]) is None


def test_an_instance_uses_the_hosts_net_cls_mount_or_its_own_never_another_instances() -> None:
    """Test labs side by side each mount the hierarchy below their state directory and
    unmount it when their last group ends: one that used another's mount found its group's
    net_cls cgroup "missing" the moment the other lab finished."""
    from via_tunnel.kernel.cgroup import parse_netcls_mount

    other = "50 23 0:40 / /run/via-tunnel-test-b/net_cls rw - cgroup via-tunnel rw,net_cls"
    own = "51 23 0:40 / /run/via-tunnel-test-a/net_cls rw - cgroup via-tunnel rw,net_cls"
    host = "41 31 0:38 / /sys/fs/cgroup/net_cls rw - cgroup cgroup rw,net_cls,net_prio"
    me = "/run/via-tunnel-test-a/net_cls"
    assert parse_netcls_mount([other, own], own=me) == me
    assert parse_netcls_mount([other], own=me) is None  # so it mounts its own
    assert parse_netcls_mount([other, own, host], own=me) == "/sys/fs/cgroup/net_cls"
