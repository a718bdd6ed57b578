"""The lab itself: before trusting what via-tunnel does in it, check that it is what it claims.

Each fact is checked with an independent oracle (the echo server's view of the source address,
``ip -j``, packet counters, tcpdump), never with via-tunnel's own code.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator

import pytest

from via_tunnel.lab.namespaces import netns_names
from via_tunnel.lab.netlab import Lab
from via_tunnel.lab.procs import LabError

pytestmark = pytest.mark.kernel


def fetch(lab: Lab, ns: str, *extra: str, ipv6: bool = False) -> str:
    argv = lab.fetch_argv(ipv6=ipv6)
    return lab.run(ns, [argv[0], *extra, *argv[1:]]).stdout.strip()


def test_up_is_fast(lab: Lab) -> None:
    assert lab.up_seconds is not None
    assert lab.up_seconds < 3


def test_namespaces_carry_the_prefix(lab: Lab) -> None:
    names = set(netns_names())
    assert {lab.client, lab.gateway, lab.inet} <= names
    assert all(ns.startswith(lab.prefix + "-") for ns in lab.namespaces)


def test_client_reaches_server_by_the_lan(lab: Lab) -> None:
    assert fetch(lab, lab.client) == Lab.CLIENT_LAN
    assert fetch(lab, lab.client, ipv6=True) == Lab.CLIENT_LAN6


def test_gateway_reaches_server_with_its_wan_address(lab: Lab) -> None:
    assert fetch(lab, lab.gateway) == Lab.GW_WAN


def test_udp_echo_answers_with_the_source(lab: Lab) -> None:
    assert lab.run(lab.client, lab.udp_argv()).stdout.strip() == Lab.CLIENT_LAN
    assert lab.run(lab.client, lab.udp_argv(ipv6=True)).stdout.strip() == Lab.CLIENT_LAN6


def test_openvpn_tunnel_passes_a_ping(lab: Lab) -> None:
    with lab.capture(lab.gateway, "tun0", "icmp") as cap:
        lab.run(lab.client, lab.ping_argv(Lab.GW_TUN, timeout=5))
    lab.run(lab.gateway, lab.ping_argv(Lab.CLIENT_TUN, timeout=5))
    assert any(f"{Lab.CLIENT_TUN} > {Lab.GW_TUN}: ICMP echo request" in p for p in cap.packets())
    (tun,) = lab.ip_json(lab.client, "addr", "show", "dev", "tun0")
    assert "POINTOPOINT" in tun["flags"]
    assert tun.get("link_type") == "none"  # L3 only: no MAC, no neighbours
    assert [(a["local"], a.get("address")) for a in tun["addr_info"] if a["family"] == "inet"] == [
        (Lab.CLIENT_TUN, Lab.GW_TUN)
    ]


def test_ping_helper_fails_without_an_answer(lab: Lab) -> None:
    proc = lab.run(lab.client, lab.ping_argv("192.0.2.40", timeout=0.3), check=False)
    assert proc.returncode == 1


def test_client_main_table(lab: Lab) -> None:
    main = lab.ip_json(lab.client, "route", "show", "table", "main")
    defaults = [(r.get("gateway"), r["dev"]) for r in main if r["dst"] == "default"]
    assert defaults == [(Lab.LAN_GW, "eth0")]
    assert {"dst": Lab.VETH_ROUTE, "gateway": Lab.GW_VETH, "dev": "vlan3"}.items() <= next(
        r for r in main if r["dst"] == Lab.VETH_ROUTE
    ).items()
    # tun0 appears only in the kernel's host route to the tunnel peer
    assert [r["dst"] for r in main if r["dev"] == "tun0"] == [Lab.GW_TUN]
    (got,) = lab.ip_json(lab.client, "route", "get", Lab.SERVER)
    assert (got["dev"], got["prefsrc"]) == ("eth0", Lab.CLIENT_LAN)
    (v6,) = lab.ip_json(lab.client, "-6", "route", "get", Lab.SERVER6)
    assert v6["dev"] == "eth0"


def test_extra_client_links(lab: Lab) -> None:
    links = {link["ifname"]: link for link in lab.ip_json(lab.client, "link", "show")}
    assert "UP" not in links["eth1dead"]["flags"]
    assert "UP" in links["vnohop"]["flags"]
    main = lab.ip_json(lab.client, "route", "show", "table", "main")
    assert [r["dst"] for r in main if r["dev"] == "vnohop"] == ["192.0.2.80/28"]
    assert [r["dst"] for r in main if r["dev"] == "eth1dead"] == []


def test_client_rp_filter_is_strict(lab: Lab) -> None:
    keys = [f"net.ipv4.conf.{name}.rp_filter" for name in ("all", "vlan3", "tun0")]
    out = lab.run(lab.client, ["sysctl", "-n", *keys])
    assert out.stdout.split() == ["1", "1", "1"]


@pytest.fixture
def source_routes(lab: Lab) -> Iterator[None]:
    """Policy routes by source address (what a careful user does by hand), removed after."""
    before = lab.snapshot(lab.client)
    added = [
        ["route", "add", "default", "via", Lab.GW_VETH, "dev", "vlan3", "table", "100"],
        ["route", "add", "default", "dev", "tun0", "table", "101"],
        ["rule", "add", "from", Lab.CLIENT_VETH, "table", "100", "priority", "100"],
        ["rule", "add", "from", Lab.CLIENT_TUN, "table", "101", "priority", "101"],
        ["route", "add", "default", "via", Lab.GW_NOHOP, "dev", "vnohop", "table", "102"],
        ["rule", "add", "from", Lab.CLIENT_NOHOP, "table", "102", "priority", "102"],
    ]
    for args in added:
        lab.run(lab.client, ["ip", *args])
    try:
        yield
    finally:
        for args in reversed(added):
            lab.run(lab.client, ["ip", args[0], "del", *args[2:]])
        assert lab.snapshot(lab.client) == before


def test_gateway_forwards_without_nat(lab: Lab, source_routes: None) -> None:
    """The far end sees the client's tunnel addresses: a leak or a wrong source is visible."""
    before = {ifname: lab.link_stats(lab.client, ifname) for ifname in ("eth0", "vlan3", "tun0")}
    assert fetch(lab, lab.client, "--interface", Lab.CLIENT_VETH) == Lab.CLIENT_VETH
    assert fetch(lab, lab.client, "--interface", Lab.CLIENT_TUN) == Lab.CLIENT_TUN
    assert fetch(lab, lab.client, "--interface", Lab.CLIENT_NOHOP) == Lab.CLIENT_NOHOP
    after = {ifname: lab.link_stats(lab.client, ifname) for ifname in ("eth0", "vlan3", "tun0")}
    assert after["vlan3"]["tx_packets"] > before["vlan3"]["tx_packets"]
    assert after["tun0"]["tx_packets"] > before["tun0"]["tx_packets"]
    assert after["tun0"]["rx_bytes"] > before["tun0"]["rx_bytes"]


def test_capture_sees_packets_and_proves_silence(lab: Lab) -> None:
    stats = lab.link_stats(lab.client, "eth0")
    with (
        lab.capture(lab.client, "eth0", f"host {Lab.SERVER} and tcp port 80") as lan,
        lab.capture(lab.client, "vlan3", f"host {Lab.SERVER}") as veth,
    ):
        assert fetch(lab, lab.client) == Lab.CLIENT_LAN
    assert any(f"{Lab.CLIENT_LAN}." in p and f"> {Lab.SERVER}.80:" in p for p in lan.packets())
    assert veth.packets() == []
    assert lan.dropped == 0 and veth.dropped == 0
    assert lab.link_stats(lab.client, "eth0")["tx_packets"] >= stats["tx_packets"] + 3


def test_capture_fails_loudly_on_a_missing_interface(lab: Lab) -> None:
    with pytest.raises(LabError, match="tcpdump did not start"), lab.capture(lab.client, "nope0"):
        pass


def test_snapshot(lab: Lab) -> None:
    snap = lab.snapshot(lab.client)
    assert set(snap) == {"rules", "routes", "nft", "sysctl_src_valid_mark"}
    assert [r["priority"] for r in snap["rules"]["4"]] == [0, 32766, 32767]
    assert snap["sysctl_src_valid_mark"] == 1  # conftest.host_like
    assert snap["nft"]["nftables"][0].get("metainfo")  # an empty ruleset still has metainfo
    assert any(r.get("dev") == "vlan3" for r in snap["routes"]["4"])
    assert snap == lab.snapshot(lab.client)


def test_ip_json_of_a_missing_table_is_empty(lab: Lab) -> None:
    assert lab.ip_json(lab.client, "route", "show", "table", "12345") == []
    with pytest.raises(LabError, match="nope0"):
        lab.ip_json(lab.client, "link", "show", "dev", "nope0")


def test_run_reports_failures(lab: Lab) -> None:
    with pytest.raises(LabError, match="exit 1"):
        lab.run(lab.client, ["false"])
    assert lab.run(lab.client, ["false"], check=False).returncode == 1
    with pytest.raises(LabError, match="timed out"):
        lab.run(lab.client, ["sleep", "5"], timeout=0.2)
    out = lab.run(lab.client, ["sh", "-c", 'echo "$LABVAR"'], env={"LABVAR": "x y"})
    assert out.stdout == "x y\n"


def _pids(ns: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=5)
    return [int(p) for p in out.stdout.split()]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_down_leaves_nothing_behind() -> None:
    new = Lab(openvpn=True)
    with new:
        stray = new.run(new.client, ["sh", "-c", "sleep 60 >/dev/null 2>&1 & echo $!"])
        pids = [p for ns in new.namespaces for p in _pids(ns)]
        assert int(stray.stdout) in pids
        assert len(pids) >= 4  # echo server, two openvpn, the stray sleep
        assert new.workdir.is_dir()
    names = netns_names()
    assert not [n for n in names if n.startswith(new.prefix + "-")]
    assert not [p for p in pids if _alive(p)]
    assert not new.workdir.exists()
    new.down()  # idempotent


def test_failed_up_removes_what_it_made() -> None:
    new = Lab()
    subprocess.run(["ip", "netns", "add", new.gateway], check=True, timeout=5)
    try:
        with pytest.raises(LabError, match=new.gateway):
            new.up()
        names = netns_names()
        assert new.client not in names
        assert new.gateway in names  # not ours: left alone
    finally:
        subprocess.run(["ip", "netns", "del", new.gateway], check=True, timeout=5)


def test_rp_filter_and_no_openvpn(lab_factory: Callable[..., Lab]) -> None:
    new = lab_factory(openvpn=False, rp_filter=2)
    out = new.run(new.client, ["sysctl", "-n", "net.ipv4.conf.all.rp_filter"])
    assert out.stdout.strip() == "2"
    assert "tun0" not in [link["ifname"] for link in new.ip_json(new.client, "link", "show")]
    assert fetch(new, new.client) == Lab.CLIENT_LAN


def test_prefix_validation() -> None:
    with pytest.raises(ValueError):
        Lab("bad prefix")
    with pytest.raises(ValueError):
        Lab("x" * 13)
    assert Lab().prefix.startswith("vt")
    assert os.path.basename(Lab("ab12").ns_path(Lab("ab12").client)) == "ab12-c"
