"""Next to a system-wide VPN set up the way wg-quick does it, via-tunnel both routes a
program into the tunnel and lets one *bypass* it (what ``mullvad-exclude`` does).

The lab's OpenVPN tun0 plays the system VPN: its own UDP carries mark 51820 (``--mark``),
and the client gets wg-quick's policy routing (a table of its own with ``default dev tun0``,
``not fwmark 51820``, ``suppress_prefixlength 0``, ``src_valid_mark``) and its nft rules that
keep strict rp_filter working (the mark saved in the ct mark and restored on the way in).
Every claim is checked with real traffic: the echo server's view of the caller, and
captures on the interface the traffic must *not* use.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator

import pytest
from helpers import canonical, via, via_popen, vt_env_for, wait_for

from via_tunnel.lab.capture import Capture
from via_tunnel.lab.footprint import remove_footprint
from via_tunnel.lab.netlab import Lab

pytestmark = pytest.mark.kernel

WG = 51820
# wg-quick's nft rules (the `premangle`/`postmangle` chains of wg-quick's nft mode).
WG_NFT = f"""
table ip wg_quick_lab {{
    chain premangle {{
        type filter hook prerouting priority mangle; policy accept;
        meta l4proto udp meta mark set ct mark
    }}
    chain postmangle {{
        type filter hook postrouting priority mangle; policy accept;
        meta l4proto udp meta mark {WG} ct mark set meta mark
    }}
}}
"""
SERVER_BPF = f"host {Lab.SERVER}"


@pytest.fixture(scope="module")
def wglab() -> Iterator[Lab]:
    from conftest import require_kernel

    require_kernel()
    lab = Lab(openvpn=True, vpn_mark=WG).up()
    try:
        c = lab.client
        lab.run(c, ["ip", "-4", "route", "add", "default", "dev", "tun0", "table", str(WG)])
        lab.run(c, ["ip", "-4", "rule", "add", "not", "fwmark", str(WG), "table", str(WG)])
        lab.run(c, ["ip", "-4", "rule", "add", "table", "main", "suppress_prefixlength", "0"])
        lab.run(c, ["sysctl", "-q", "-w", "net.ipv4.conf.all.src_valid_mark=1"])
        lab.run(c, ["nft", "-f", "-"], input=WG_NFT)
        yield lab
    finally:
        lab.down()
        env = vt_env_for(lab)
        remove_footprint(env["VIA_TUNNEL_STATE_DIR"], env["VIA_TUNNEL_CGROUP"])


@pytest.fixture
def env(wglab: Lab) -> Iterator[dict[str, str]]:
    """vt_env for the wg lab; and afterwards nothing of ours is left (the neighbour's rules,
    table and nft rules are all still there, exactly as before)."""
    before = canonical(wglab.snapshot(wglab.client))
    yield vt_env_for(wglab)
    wait_for(lambda: canonical(wglab.snapshot(wglab.client)) == before, timeout=5,
             what="the client's rules, routes and nft ruleset as before")


def fetch(lab: Lab) -> str:
    """An ordinary program (outside every group): the address the server sees."""
    return lab.run(lab.client, lab.fetch_argv()).stdout.strip()


def test_the_system_vpn_takes_ordinary_traffic_and_its_own_udp_stays_on_the_lan(
        wglab: Lab, env: dict[str, str]) -> None:
    with Capture(wglab, wglab.client, "eth0", SERVER_BPF) as lan, \
            Capture(wglab, wglab.client, "eth0", "udp port 1194") as vpn_udp:
        assert fetch(wglab) == Lab.CLIENT_TUN
    assert lan.packets() == []
    # The tunnel's own packets (marked 51820) kept going by the LAN, else nothing would work.
    assert any(f"{Lab.CLIENT_LAN}.1194 > {Lab.GW_WAN}.1194" in p for p in vpn_udp.packets())


def test_via_the_lan_bypasses_the_system_vpn(wglab: Lab, env: dict[str, str]) -> None:
    with Capture(wglab, wglab.client, "tun0", SERVER_BPF) as tunnel, \
            Capture(wglab, wglab.client, "eth0", SERVER_BPF) as lan:
        r = via(wglab, env, "eth0", "--", *wglab.fetch_argv())
        assert r.stdout.strip() == Lab.CLIENT_LAN, r.stderr
        r = via(wglab, env, "eth0", "--", *wglab.udp_argv())
        assert r.stdout.strip() == Lab.CLIENT_LAN, r.stderr
    assert tunnel.packets() == []
    seen = lan.packets()
    # Out with the LAN's source address, and the replies came back the same way.
    assert any(f"{Lab.CLIENT_LAN}." in p.split(" > ")[0] for p in seen), seen
    assert any(p.split(" > ")[0].endswith(f"{Lab.SERVER}.80") for p in seen), seen
    assert any(p.split(" > ")[0].endswith(f"{Lab.SERVER}.7") for p in seen), seen


def test_bypass_and_tunnel_groups_next_to_ordinary_traffic(
        wglab: Lab, env: dict[str, str]) -> None:
    # A bypassing program keeps running (a group for eth0 exists) while an ordinary program
    # still uses the system VPN and another group routes into tun0 itself.
    fetch_cmd = " ".join(wglab.fetch_argv(timeout=3))
    bypass = via_popen(wglab, env, "eth0", "--", "sh", "-c",
                       f"while read x; do {fetch_cmd} || echo FAIL; done",
                       stdin=subprocess.PIPE)
    assert bypass.stdin is not None and bypass.stdout is not None
    try:
        for _ in range(2):
            bypass.stdin.write("go\n")
            bypass.stdin.flush()
            assert bypass.stdout.readline().strip() == Lab.CLIENT_LAN
            assert fetch(wglab) == Lab.CLIENT_TUN
            r = via(wglab, env, "tun0", "--", *wglab.fetch_argv())
            assert r.stdout.strip() == Lab.CLIENT_TUN, r.stderr
            assert via(wglab, env, "tun0", "--", *wglab.udp_argv()).stdout.strip() \
                == Lab.CLIENT_TUN
        # The system VPN's own UDP is not taken by the eth0 group's inbound marking.
        r = wglab.run(wglab.client, wglab.ping_argv(Lab.GW_TUN, timeout=3), check=False)
        assert r.returncode == 0
    finally:
        bypass.stdin.close()
        assert bypass.wait(timeout=10) == 0


def _rules(lab: Lab) -> list[dict[str, object]]:
    return json.loads(lab.run(lab.client, ["ip", "-j", "-4", "rule", "show"]).stdout)


WG_RULES = (["not", "fwmark", str(WG), "table", str(WG)],
            ["table", "main", "suppress_prefixlength", "0"])


def test_wg_quick_restarted_while_a_group_runs_lands_after_our_entry_rule(
        wglab: Lab, env: dict[str, str]) -> None:
    """wg-quick adds its rules without a priority: the kernel gives them the priority of the
    second rule minus one, which once put them ahead of a group's rules. Now they land at 0,
    behind our entry rule, and the bypassing group keeps the LAN."""
    fetch_cmd = " ".join(wglab.fetch_argv(timeout=3))
    bypass = via_popen(wglab, env, "eth0", "--", "sh", "-c",
                       f"while read x; do {fetch_cmd} || echo FAIL; done",
                       stdin=subprocess.PIPE)
    assert bypass.stdin is not None and bypass.stdout is not None
    c = wglab.client
    try:
        wait_for(lambda: any(r.get("priority") == 0 and r.get("goto") for r in _rules(wglab)),
                 timeout=5, what="our entry rule")
        for rule in WG_RULES:  # `wg-quick down; wg-quick up` while the group runs
            wglab.run(c, ["ip", "-4", "rule", "del", *rule])
        for rule in WG_RULES:
            wglab.run(c, ["ip", "-4", "rule", "add", *rule])
        order = [(r.get("priority"), r.get("table"), r.get("goto")) for r in _rules(wglab)]
        entry = order.index((0, None, 5100))
        assert order[entry + 1:entry + 3] == [(0, str(WG), None), (0, "main", None)], order
        with Capture(wglab, c, "tun0", SERVER_BPF) as tunnel:
            bypass.stdin.write("go\n")
            bypass.stdin.flush()
            assert bypass.stdout.readline().strip() == Lab.CLIENT_LAN
        assert tunnel.packets() == []
        assert fetch(wglab) == Lab.CLIENT_TUN  # everything else still takes the full tunnel
    finally:
        bypass.stdin.close()
        assert bypass.wait(timeout=10) == 0
        for rule, prio in zip(WG_RULES, ("32765", "32764"), strict=True):  # as the fixture
            wglab.run(c, ["ip", "-4", "rule", "del", *rule], check=False)
            wglab.run(c, ["ip", "-4", "rule", "add", *rule, "priority", prio])


def test_the_hosts_other_packets_skip_the_groups_rules(wglab: Lab, env: dict[str, str]) -> None:
    """With groups up, a packet without our flag meets three rules of ours (priority 0, the
    skip at 5099 and the catch-all it jumps to), not one per group."""
    holders = [via_popen(wglab, env, iface, "--", "sleep", "30") for iface in ("eth0", "tun0")]
    try:
        def groups_rules() -> list[dict[str, object]]:
            return [r for r in _rules(wglab) if 5101 <= int(r.get("priority", 0)) < 5133]  # type: ignore[call-overload]

        wait_for(lambda: len(groups_rules()) == 2, timeout=5, what="two groups' rules")
        ours = [r for r in _rules(wglab) if r.get("priority") in (0, 5099, 5133)
                and r.get("table") != "local"]
        skip = next(r for r in ours if r.get("priority") == 5099)
        assert "not" in skip and skip.get("goto") == 5133, skip
        catch = next(r for r in ours if r.get("priority") == 5133)
        assert catch.get("action") == "unreachable", catch
    finally:
        for h in holders:
            h.kill()
            h.wait(timeout=5)
