"""The rtnetlink adapter (netlink.py over rtnl.py) against the kernel, with iproute2's
``ip -j`` as the oracle: the rules and routes of a plan are exactly there after
``apply`` (twice is harmless), exactly gone after ``remove`` (twice too), and the kernel's
refusals come back as one clear error, not a traceback.

Runs in the lab's client namespace with a slot no test uses, and leaves it as it was.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import pytest

from via_tunnel.core.settings import MARK_MASK, mark_for_slot, table_for_slot
from via_tunnel.lab.netlab import Lab

pytestmark = pytest.mark.kernel

SLOT = 120  # far from the slots the launcher tests take (they count from 1)
TABLE = table_for_slot(SLOT)

# Runs in the namespace: plan eth0's group for SLOT, then one action per argument.
SCRIPT = r"""
import dataclasses, json, sys
from via_tunnel.kernel import netlink
from via_tunnel.core.errors import ViaTunnelError
from via_tunnel.core.plan import RouteSpec, plan_group
slot, ipv6 = int(sys.argv[1]), sys.argv[2]
facts = netlink.link_facts("eth0")
plan = plan_group(facts, slot=slot, level=2, cgroup_nft_path="x", gateway=None, ipv6=ipv6,
                  dns=())
for action in sys.argv[3:]:
    try:
        if action == "facts":
            print(json.dumps(dataclasses.asdict(facts)))
        elif action == "apply":
            netlink.apply(plan.rules, plan.routes)
        elif action == "remove":
            netlink.remove(plan.rules, [plan.table])
        elif action == "present":
            print(json.dumps(netlink.our_rules_and_tables(plan.rules, [plan.table])[1]))
        elif action == "bad-route":
            netlink.apply([], [RouteSpec(2, plan.table, "default", oif=99999)])
        elif action == "missing":
            netlink.link_facts("nope0")
        elif action == "altname":
            netlink.link_facts("vtalt0")
    except ViaTunnelError as exc:
        print(f"error: {exc.message}")
"""


def run(lab: Lab, ipv6: str, *actions: str) -> list[str]:
    out = lab.run(lab.client, [sys.executable, "-c", SCRIPT, str(SLOT), ipv6, *actions])
    return out.stdout.splitlines()


def ip(lab: Lab, *args: str) -> Any:
    return json.loads(lab.run(lab.client, ["ip", "-j", *args]).stdout or "[]")


def ours(lab: Lab) -> dict[str, Any]:
    """Our rules and the routes of our table, as iproute2 shows them."""
    mark = f"{mark_for_slot(SLOT):#x}"
    return {
        "rules4": [r for r in ip(lab, "-4", "rule") if r.get("fwmark") == mark],
        "rules6": [r for r in ip(lab, "-6", "rule") if r.get("fwmark") == mark],
        "routes4": [r for r in ip(lab, "-4", "route", "show", "table", "all")
                    if r.get("table") == str(TABLE)],
        "routes6": [r for r in ip(lab, "-6", "route", "show", "table", "all")
                    if r.get("table") == str(TABLE)],
    }


def test_link_facts_match_iproute2(lab: Lab) -> None:
    facts = json.loads(run(lab, "block", "facts")[0])
    link = ip(lab, "link", "show", "eth0")[0]
    addrs = ip(lab, "addr", "show", "eth0")[0]["addr_info"]
    assert facts["index"] == link["ifindex"] and facts["mtu"] == link["mtu"]
    assert facts["up"] and not facts["pointopoint"]
    assert facts["ipv4"] == [f"{a['local']}/{a['prefixlen']}" for a in addrs
                             if a["family"] == "inet"]
    assert facts["ipv6_global"] == [f"{a['local']}/{a['prefixlen']}" for a in addrs
                                    if a["family"] == "inet6" and a["scope"] == "global"]
    assert facts["gateway4"] == Lab.LAN_GW and facts["gateway6"] == Lab.LAN_GW6


@pytest.mark.parametrize("ipv6", ["tunnel", "block"])
def test_apply_and_remove_are_exact_and_idempotent(lab: Lab, ipv6: str) -> None:
    before = lab.snapshot(lab.client)
    assert ours(lab) == {"rules4": [], "rules6": [], "routes4": [], "routes6": []}
    try:
        assert run(lab, ipv6, "apply", "apply", "present") == [f"[{TABLE}]"]
        got = ours(lab)
        mark = f"{mark_for_slot(SLOT):#x}"
        for family in ("rules4", "rules6"):
            assert [(r["fwmark"], r["fwmask"], r["table"]) for r in got[family]] == \
                [(mark, f"{MARK_MASK:#x}", str(TABLE))]
        v4 = {(r.get("type", "unicast"), r["dst"], r.get("gateway"), r.get("dev"))
              for r in got["routes4"]}
        assert ("unicast", "default", Lab.LAN_GW, "eth0") in v4
        assert ("unreachable", "default", None, None) in v4  # the kill route
        v6 = {(r.get("type", "unicast"), r["dst"], r.get("gateway")) for r in got["routes6"]}
        assert ("unreachable", "default", None) in v6
        assert (("unicast", "default", Lab.LAN_GW6) in v6) == (ipv6 == "tunnel")
    finally:
        assert run(lab, ipv6, "remove", "remove", "present") == ["[]"]
    assert ours(lab) == {"rules4": [], "rules6": [], "routes4": [], "routes6": []}
    assert lab.snapshot(lab.client) == before


def test_refusals_are_one_clear_error(lab: Lab) -> None:
    before = lab.snapshot(lab.client)
    lab.run(lab.client, ["ip", "link", "property", "add", "dev", "eth0", "altname", "vtalt0"])
    try:
        out = run(lab, "block", "bad-route", "missing", "altname")
    finally:
        lab.run(lab.client, ["ip", "link", "property", "del", "dev", "eth0", "altname",
                             "vtalt0"])
    assert out[0].startswith("error: cannot add route") and "No such device" in out[0]
    assert out[1] == "error: interface nope0 does not exist"
    # The kernel finds eth0 by its alternative name; our nft rules would match "vtalt0"
    # against the real name and the kill switch would drop everything: refused.
    assert out[2] == "error: vtalt0 is an alternative name of interface eth0: name eth0 " \
                     "instead"
    assert lab.snapshot(lab.client) == before


DUMPS = r"""
import json
from socket import AF_INET, AF_INET6
from via_tunnel.kernel.rtnl import Rtnl
with Rtnl() as rt:
    main4 = sorted(str(r.get_attr("RTA_DST") or "default") for r in rt.routes(AF_INET, 254))
    filtered = [rt.filtered]
    eth0 = sorted(a.get_attr("IFA_ADDRESS") for a in rt.addresses(rt.link("eth0")["index"]))
    filtered.append(rt.filtered)
    rt.filtered = False
    by_vlan3 = sorted(str(r.get_attr("RTA_DST") or "default")
                      for r in rt.routes(AF_INET, 254, rt.link("vlan3")["index"]))
    filtered.append(rt.filtered)
    print(json.dumps({
        "by_vlan3": by_vlan3,
        "main4": main4, "eth0": eth0, "filtered": filtered,
        "main6": len(rt.routes(AF_INET6, 254)),
        "absent": [len(rt.routes(f, 12345)) for f in (AF_INET, AF_INET6)],
        "all4": len(rt.routes(AF_INET)),
        # A family the kernel lacks (as IPv6 is with ipv6.disable=1; 29 is unassigned):
        # the kernel answers with every family's routes, none of which is of that family.
        "nofamily": len(rt.routes(29, 254)),
    }))
"""


def test_dumps_filtered_by_table_and_interface_match_iproute2(lab: Lab) -> None:
    got = json.loads(lab.run(lab.client, [sys.executable, "-c", DUMPS]).stdout)
    main4 = ip(lab, "-4", "route", "show", "table", "main")
    assert got["main4"] == sorted(r["dst"].split("/")[0] for r in main4)
    assert got["main6"] == len(ip(lab, "-6", "route", "show", "table", "main"))
    assert got["absent"] == [0, 0]  # a table that does not exist holds no routes
    assert got["filtered"] == [True, True, True]  # the kernel filtered (strict checks)
    assert got["by_vlan3"] == sorted(r["dst"].split("/")[0] for r in main4
                                     if r.get("dev") == "vlan3")
    assert got["by_vlan3"]  # the lab's main table has routes through vlan3
    assert got["nofamily"] == 0
    assert got["all4"] == len(ip(lab, "-4", "route", "show", "table", "all"))
    addrs = ip(lab, "addr", "show", "eth0")[0]["addr_info"]
    assert got["eth0"] == sorted(a["local"] for a in addrs)
