"""Inbound connections and MTU: a server run through a tunnel answers each client by the
interface its connection came in on (strict rp_filter on), and TCP through a smaller-MTU
tunnel gets a clamped MSS and carries bulk data."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest
from helpers import via, via_popen

from via_tunnel.lab.capture import Capture
from via_tunnel.lab.netlab import Lab
from via_tunnel.lab.procs import helper_argv

pytestmark = pytest.mark.kernel

PORT = 8080


@pytest.fixture
def server(lab: Lab, vt_env: dict[str, str]) -> Iterator[subprocess.Popen[str]]:
    """The lab's echo server, listening on every address of the client, run via vlan3."""
    proc = via_popen(lab, vt_env, "vlan3", "--", *helper_argv(
        "serve", "0.0.0.0", "::1", "--http-port", str(PORT), "--udp-port", str(PORT + 1)),
        stdout=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    yield proc
    proc.terminate()
    proc.wait(timeout=5)


def test_inbound_answers_go_back_the_way_they_came(lab: Lab, server: subprocess.Popen[str]
                                                   ) -> None:
    rp = lab.run(lab.client, ["cat", "/proc/sys/net/ipv4/conf/all/rp_filter"]).stdout
    assert rp.strip() == "1"  # strict: replies must be routed back where they came from
    curl = ["curl", "-s", "--max-time", "5"]
    # Through the tunnel: from the internet (203.0.113.1), forwarded by the gateway to vlan3.
    with Capture(lab, lab.client, "eth0", f"port {PORT}") as lan:
        got = lab.run(lab.inet, [*curl, f"http://{Lab.CLIENT_VETH}:{PORT}/"]).stdout
    assert got.strip() == Lab.INET_WAN
    assert lan.packets() == []
    # Through the LAN, to the same listener: answered through the LAN, not the tunnel.
    with Capture(lab, lab.client, "vlan3", f"port {PORT}") as tunnel:
        got = lab.run(lab.inet, [*curl, f"http://{Lab.CLIENT_LAN}:{PORT}/"]).stdout
    assert got.strip() == Lab.LAN_GW
    assert tunnel.packets() == []


@pytest.fixture
def small_mtu(lab: Lab) -> Iterator[None]:
    for ns in (lab.client, lab.gateway):
        lab.run(ns, ["ip", "link", "set", "vlan3", "mtu", "1400"])
    yield
    for ns in (lab.client, lab.gateway):
        lab.run(ns, ["ip", "link", "set", "vlan3", "mtu", "1500"])


def test_mss_is_clamped_and_bulk_tcp_flows_through_a_1400_mtu_tunnel(
        lab: Lab, vt_env: dict[str, str], small_mtu: None) -> None:
    size = 4_000_000
    url = f"http://{Lab.SERVER}/bytes/{size}"
    with Capture(lab, lab.client, "vlan3", "tcp[tcpflags] & tcp-syn != 0") as syns:
        proc = via_popen(lab, vt_env, "vlan3", "--", "curl", "-s", "-o", "/dev/null",
                         "--max-time", "20", "-w", "%{size_download}", url)
        out, _ = proc.communicate(timeout=30)
    assert (proc.returncode, out) == (0, str(size))
    outgoing = [p for p in syns.packets() if f"{Lab.CLIENT_VETH}." in p.split(">")[0]]
    assert outgoing and all("mss 1360" in p for p in outgoing), outgoing


def test_udp_server_on_the_wildcard_answers_through_the_tunnel_from_the_right_port(
        lab: Lab, server: subprocess.Popen[str]) -> None:
    """The reply's source is picked by the main table (the LAN's address) before any mark
    exists; via-tunnel gives it back the address the client sent to, so the reply matches its
    flow: right interface, right address, right port."""
    with Capture(lab, lab.client, "eth0", f"udp port {PORT + 1}") as lan:
        got = lab.run(lab.inet, ["socat", "-T3", "-", f"UDP:{Lab.CLIENT_VETH}:{PORT + 1}"],
                      input="hi\n").stdout
    assert got.strip() == Lab.INET_WAN
    assert lan.packets() == []
    got = lab.run(lab.inet, ["socat", "-T3", "-", f"UDP:{Lab.CLIENT_LAN}:{PORT + 1}"],
                  input="hi\n").stdout
    assert got.strip() == Lab.LAN_GW


def test_a_veth_with_a_peer_address_routes_through_the_peer(
        lab: Lab, vt_env: dict[str, str]) -> None:
    """``ip addr add A peer P dev vlan4`` on a broadcast interface: P is the next hop, no
    --gateway needed; the far end sees A."""
    c, g = lab.client, lab.gateway
    far = "203.0.113.99"
    lab.run(c, ["ip", "link", "add", "vlan4", "type", "veth", "peer", "name", "vlan4g",
                "netns", lab.ns_path(g)])
    try:
        lab.run(c, ["ip", "addr", "add", "10.0.4.3", "peer", "10.0.4.1", "dev", "vlan4"])
        lab.run(g, ["ip", "addr", "add", "10.0.4.1", "peer", "10.0.4.3", "dev", "vlan4g"])
        lab.run(g, ["ip", "addr", "add", f"{far}/32", "dev", "lo"])
        lab.run(c, ["ip", "link", "set", "vlan4", "up"])
        lab.run(g, ["ip", "link", "set", "vlan4g", "up"])
        with Capture(lab, g, "vlan4g", f"icmp and host {far}") as seen, \
                Capture(lab, c, "eth0", f"host {far}") as lan:
            r = via(lab, vt_env, "vlan4", "--", *lab.ping_argv(far), check=False)
        assert r.returncode == 0, r.stderr
        assert any(p.startswith("IP 10.0.4.3 > 203.0.113.99") or "10.0.4.3 > 203.0.113.99"
                   in p for p in seen.packets()), seen.packets()
        assert lan.packets() == []
    finally:
        lab.run(c, ["ip", "link", "del", "vlan4"], check=False)
        lab.run(g, ["ip", "addr", "del", f"{far}/32", "dev", "lo"], check=False)
