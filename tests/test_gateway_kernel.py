"""``via-tunnel gateway`` on a real kernel: the lab's gateway namespace as a VPS.

The lab's gateway forwards without NAT and the internet routes the tunnel subnets back to
it. This module first makes it a VPS that does neither (``vps`` fixture): forwarding off, no
return routes, so the client's traffic reaches the server only through the gateway's
masquerade, and a WAN port reaches the client only through its DNAT.

Oracles are independent of our code: what the far ends saw (the echo server answers with the
caller's address; the client's listener with the address it saw), tcpdump, ``nft -j list
ruleset``, ``ip -j`` and the sysctl tree read from /proc.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from helpers import via, via_popen

from via_tunnel.core.nftplan import base_ruleset, level_ruleset
from via_tunnel.core.settings import NFT_FAMILY, NFT_TABLE
from via_tunnel.lab.capture import Capture
from via_tunnel.lab.netlab import Lab

pytestmark = pytest.mark.kernel

WAN_ADDR = Lab.GW_WAN
INET = Lab.INET_WAN  # the internet namespace's address towards the gateway
# The internet's routes back to the tunnels' subnets through the gateway (family, net, via).
RETURN_ROUTES = (("-4", "192.0.2.32/28", WAN_ADDR), ("-4", "192.0.2.48/28", WAN_ADDR),
                 ("-6", "2001:db8:3::/64", Lab.GW_WAN6))

# A listener for the client: answers each TCP connection and UDP datagram on PORT with the
# protocol and the source address it saw (so the test sees that no SNAT hid the caller).
# Its UDP answers carry the address the datagram came to (IP_PKTINFO), as UDP servers bound
# to 0.0.0.0 should: without it the kernel picks the source by the client's main table (the
# LAN's address), and the client's masquerade on the tunnel then has to change the source
# port to avoid the inbound flow's tuple, so the caller drops the answer (seen here).
LISTENER = r"""
import select, socket, struct, sys
port = int(sys.argv[1])
IP_PKTINFO = 8  # <linux/in.h>; the socket module has it only from Python 3.12
t = socket.socket(); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind(("0.0.0.0", port)); t.listen()
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("0.0.0.0", port))
u.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
print("ready", flush=True)
while True:
    for s in select.select([t, u], [], [])[0]:
        if s is t:
            c, peer = t.accept(); c.recv(100); c.sendall(f"tcp {peer[0]}\n".encode()); c.close()
        else:
            _, anc, _, peer = u.recvmsg(100, socket.CMSG_SPACE(12))
            dst = next(d[8:12] for lvl, typ, d in anc if typ == IP_PKTINFO)
            info = struct.pack("I4s4s", 0, dst, bytes(4))
            u.sendmsg([f"udp {peer[0]}\n".encode()],
                      [(socket.IPPROTO_IP, IP_PKTINFO, info)], 0, peer)
"""


# Holds a table with `flags owner` until its stdin closes.
OWNED_TABLE = """
import sys, nftables
ctx = nftables.Nftables()
assert ctx.cmd("add table inet vt_owned { flags owner; }")[0] == 0
print("ready", flush=True)
sys.stdin.read()
"""


def gw(lab: Lab, env: dict[str, str], *args: str, check: bool = True,
       extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``via-tunnel gateway ARGS`` in the gateway namespace."""
    return lab.run(lab.gateway, [sys.executable, "-m", "via_tunnel", "gateway", *args],
                   env={**env, **(extra_env or {})}, check=check, timeout=30)


def sysctls(lab: Lab, ns: str) -> dict[str, str]:
    """Every IPv4/IPv6 per-interface sysctl and ip_forward of ``ns``, read from /proc."""
    out = lab.run(ns, ["grep", "-rs", ".", "/proc/sys/net/ipv4/conf", "/proc/sys/net/ipv6/conf",
                       "/proc/sys/net/ipv4/ip_forward"], check=False).stdout
    return dict(line.split(":", 1) for line in out.splitlines())


def gw_snapshot(lab: Lab) -> dict[str, Any]:
    snap = lab.snapshot(lab.gateway)
    snap["sysctls"] = sysctls(lab, lab.gateway)
    return snap


def ruleset(lab: Lab, ns: str) -> dict[str, Any]:
    return dict(json.loads(lab.run(ns, ["nft", "-j", "list", "ruleset"]).stdout))


def gw_status(lab: Lab, env: dict[str, str]) -> list[dict[str, Any]]:
    return list(json.loads(gw(lab, env, "status", "--json").stdout)["gateways"])


def from_internet(lab: Lab, proto: str, port: int) -> str:
    """Connect from the internet namespace to the gateway's WAN address; the answer."""
    r = lab.run(lab.inet, ["socat", "-T3", "-", f"{proto.upper()}:{WAN_ADDR}:{port}"],
                input="hi\n", check=False, timeout=10)
    return r.stdout.strip()


@pytest.fixture(scope="module")
def vps(lab: Lab) -> Iterator[Lab]:
    """The lab's gateway turned into a VPS with no NAT and forwarding off (see docstring)."""
    removed = []
    for fam, net, via_addr in RETURN_ROUTES:
        if lab.run(lab.inet, ["ip", fam, "route", "del", net], check=False).returncode == 0:
            removed.append((fam, net, via_addr))
    lab.run(lab.gateway, ["sysctl", "-q", "-w", "net.ipv4.ip_forward=0",
                          "net.ipv6.conf.all.forwarding=0"])
    try:
        yield lab
    finally:
        lab.run(lab.gateway, ["sysctl", "-q", "-w", "net.ipv4.ip_forward=1",
                              "net.ipv6.conf.all.forwarding=1"], check=False)
        for fam, net, via_addr in removed:
            lab.run(lab.inet, ["ip", fam, "route", "add", net, "via", via_addr], check=False)


@pytest.fixture
def clean(vps: Lab, vt_env: dict[str, str]) -> Iterator[dict[str, Any]]:
    """Require the gateway to be exactly as before the test (and no gateway state left)."""
    before = gw_snapshot(vps)
    yield before
    for g in gw_status(vps, vt_env):  # a failed test may leave some up: remove, then compare
        gw(vps, vt_env, "down", g["tunnel"], check=False)
    assert gw_snapshot(vps) == before
    gw_dir = os.path.join(vt_env["VIA_TUNNEL_STATE_DIR"], "gateway")
    assert not [n for n in os.listdir(gw_dir) if n.endswith(".json")] \
        if os.path.isdir(gw_dir) else True


def listener(lab: Lab, env: dict[str, str], iface: str, port: int) -> subprocess.Popen[str]:
    p = via_popen(lab, env, iface, "--", sys.executable, "-c", LISTENER, str(port))
    assert p.stdout is not None
    assert p.stdout.readline().strip() == "ready"
    return p


def test_without_the_gateway_nothing_gets_through(vps: Lab, vt_env: dict[str, str],
                                                  clean: Any) -> None:
    r = via(vps, vt_env, "tun0", "--", *vps.fetch_argv(timeout=2), check=False)
    assert r.returncode != 0  # the fixture's VPS really does no NAT and no forwarding


def test_gateway_masquerades_forwards_tcp_and_udp_and_down_restores_everything(
        vps: Lab, vt_env: dict[str, str], clean: dict[str, Any]) -> None:
    assert clean["sysctls"]["/proc/sys/net/ipv4/ip_forward"] == "0"
    r = gw(vps, vt_env, "up", "tun0", "--wan", "wan0",
           "--forward", "tcp:1000:192.0.2.50", "--forward", "udp:1000:192.0.2.50")
    assert "warning" not in r.stderr, r.stderr
    assert sysctls(vps, vps.gateway)["/proc/sys/net/ipv4/ip_forward"] == "1"

    # Outbound: the server sees the gateway's WAN address.
    assert via(vps, vt_env, "tun0", "--", *vps.fetch_argv()).stdout.strip() == WAN_ADDR
    udp = ["socat", "-T2", "-", f"UDP:{Lab.SERVER}:7"]
    assert via(vps, vt_env, "tun0", "--", *udp, input="hi\n").stdout.strip() == WAN_ADDR

    # Inbound: WAN port 1000 reaches the client's listener, which sees the real caller, and
    # its answers go back through the tunnel (never by the client's LAN).
    p = listener(vps, vt_env, "tun0", 1000)
    try:
        with Capture(vps, vps.client, "eth0", "port 1000") as lan, \
                Capture(vps, vps.client, "tun0", "port 1000") as tunnel:
            assert from_internet(vps, "tcp", 1000) == f"tcp {INET}"
            assert from_internet(vps, "udp", 1000) == f"udp {INET}"
        assert lan.packets() == []
        assert len(tunnel.packets()) >= 8
    finally:
        p.terminate()
        p.wait(timeout=5)

    (g,) = gw_status(vps, vt_env)
    assert (g["tunnel"], g["wan"], g["subnet"], g["active"]) == (
        "tun0", "wan0", "192.0.2.50/32", True)
    tcp, udp_fwd = g["forwards"]
    assert tcp["spec"] == "tcp:1000:192.0.2.50" and tcp["counter"]["packets"] >= 6
    assert udp_fwd["spec"] == "udp:1000:192.0.2.50" and udp_fwd["counter"]["packets"] == 2
    assert g["outbound"]["packets"] > 0 and g["inbound_replies"]["packets"] > 0
    text = gw(vps, vt_env, "status").stdout
    assert "tcp:1000:192.0.2.50" in text and "pkts" in text

    r = gw(vps, vt_env, "down", "tun0")
    assert r.returncode == 0
    assert gw_snapshot(vps) == clean  # nft, rules, routes, sysctls: exactly as before
    assert gw(vps, vt_env, "down", "tun0").stdout.strip() == "gateway tun0 is not up"


@pytest.mark.parametrize(("tun", "dest", "port", "gw_addr", "from_behind"), [
    # Through OpenVPN only from the VPS: the client's OpenVPN drops what a program sends
    # through the tunnel to the VPS's own public address (its endpoint: "recursive routing").
    ("tun0", Lab.CLIENT_TUN, 1000, Lab.GW_TUN, False),
    ("vlan3", Lab.CLIENT_VETH, 2000, Lab.GW_VETH, True),
])
def test_a_forwarded_port_answers_at_the_wan_address_from_the_vps_and_the_tunnel(
        vps: Lab, vt_env: dict[str, str], clean: dict[str, Any], tun: str, dest: str,
        port: int, gw_addr: str, from_behind: bool) -> None:
    """Hairpin: the public face works from the VPS itself (its own packets never pass
    prerouting) and from behind the tunnel, here the client calling its own public face.
    Both are masqueraded to the gateway's tunnel address: the listener would answer the
    caller directly, or answer the WAN address, which the client's OpenVPN drops."""
    gw(vps, vt_env, "up", tun, "--wan", "wan0",
       "--forward", f"tcp:{port}:{dest}", "--forward", f"udp:{port}:{dest}")
    p = listener(vps, vt_env, tun, port)
    try:
        for proto in ("tcp", "udp"):
            ask = ["socat", "-T3", "-", f"{proto.upper()}:{WAN_ADDR}:{port}"]
            here = vps.run(vps.gateway, ask, input="hi\n", timeout=10)
            assert here.stdout.strip() == f"{proto} {gw_addr}", here.stderr
            if from_behind:
                behind = via(vps, vt_env, tun, "--", *ask, input="hi\n")
                assert behind.stdout.strip() == f"{proto} {gw_addr}", behind.stderr
    finally:
        p.terminate()
        p.wait(timeout=5)
    (g,) = gw_status(vps, vt_env)
    assert g["active"]
    # Forwarded hairpin connections (tunnel to tunnel) are counted with their forward.
    assert (g["forwards"][0]["counter"]["packets"] > 0) == from_behind
    gw(vps, vt_env, "down", tun)
    assert gw_snapshot(vps) == clean


def test_up_twice_changes_nothing(vps: Lab, vt_env: dict[str, str], clean: Any) -> None:
    args = ("up", "tun0", "--wan", "wan0", "--forward", "tcp:1000-1005:192.0.2.50")
    gw(vps, vt_env, *args)
    first = (ruleset(vps, vps.gateway), sysctls(vps, vps.gateway))
    assert "already up" in gw(vps, vt_env, *args).stdout
    assert (ruleset(vps, vps.gateway), sysctls(vps, vps.gateway)) == first
    # A different setup of the same tunnel replaces the old one in place.
    gw(vps, vt_env, "up", "tun0", "--wan", "wan0", "--forward", "udp:1000:192.0.2.50")
    (g,) = gw_status(vps, vt_env)
    assert [f["spec"] for f in g["forwards"]] == ["udp:1000:192.0.2.50"]
    assert from_internet(vps, "tcp", 1000) == ""  # the old forward is gone
    # What a run killed while writing a tunnel's record leaves: swept under the lock.
    half = os.path.join(vt_env["VIA_TUNNEL_STATE_DIR"], "gateway", "tun9.json.tmp")
    with open(half, "w") as f:
        f.write('{"plan": {"tun"')
    gw(vps, vt_env, "down", "tun0")
    assert not os.path.exists(half)


def test_two_tunnels_and_down_of_one_leaves_the_other(vps: Lab, vt_env: dict[str, str],
                                                       clean: Any) -> None:
    gw(vps, vt_env, "up", "tun0", "--wan", "wan0", "--forward", "tcp:1000:192.0.2.50")
    gw(vps, vt_env, "up", "vlan3", "--wan", "wan0", "--forward", "tcp:2000:192.0.2.34")
    both = ruleset(vps, vps.gateway)["nftables"]
    gw(vps, vt_env, "down", "tun0")
    left = ruleset(vps, vps.gateway)["nftables"]

    def vlan3_objects(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for o in objs:
            body = next(iter(o.values()))
            if body.get("table") == "via_tunnel_gw" and "t2_" in json.dumps(body):
                out.append(o)
        return out

    assert vlan3_objects(left) == vlan3_objects(both) != []
    assert "t1_" not in json.dumps(left)
    assert sysctls(vps, vps.gateway)["/proc/sys/net/ipv4/ip_forward"] == "1"  # vlan3 needs it
    assert via(vps, vt_env, "vlan3", "--", *vps.fetch_argv()).stdout.strip() == WAN_ADDR
    p = listener(vps, vt_env, "vlan3", 2000)
    try:
        assert from_internet(vps, "tcp", 2000) == f"tcp {INET}"
    finally:
        p.terminate()
        p.wait(timeout=5)
    assert [g["tunnel"] for g in gw_status(vps, vt_env)] == ["vlan3"]
    gw(vps, vt_env, "down", "vlan3")


def test_the_config_file_supplies_the_settings(vps: Lab, vt_env: dict[str, str], clean: Any,
                                                tmp_path: Any) -> None:
    conf = tmp_path / "config.toml"
    conf.write_text('[gateway.tun0]\nwan = "wan0"\nsubnet = "192.0.2.48/28"\n'
                    'forward = ["tcp:1000:192.0.2.50", "udp:1000:192.0.2.50"]\n')
    env = {"VIA_TUNNEL_CONFIG": str(conf)}
    gw(vps, vt_env, "up", "tun0", extra_env=env)
    (g,) = gw_status(vps, vt_env)
    assert g["subnet"] == "192.0.2.48/28"
    assert [f["spec"] for f in g["forwards"]] == ["tcp:1000:192.0.2.50", "udp:1000:192.0.2.50"]
    assert via(vps, vt_env, "tun0", "--", *vps.fetch_argv()).stdout.strip() == WAN_ADDR
    # A flag overrides the file: the forward list is replaced.
    gw(vps, vt_env, "up", "tun0", "--forward", "tcp:3000:192.0.2.50", extra_env=env)
    assert [f["spec"] for f in gw_status(vps, vt_env)[0]["forwards"]] == ["tcp:3000:192.0.2.50"]
    gw(vps, vt_env, "down", "tun0", extra_env=env)


def test_warns_about_a_foreign_drop_policy_and_a_port_forwarded_elsewhere(
        vps: Lab, vt_env: dict[str, str], clean: Any) -> None:
    foreign = """
table ip vtfilter {
    chain FORWARD { type filter hook forward priority 0; policy drop; }
}
table ip vtnat {
    chain PREROUTING {
        type nat hook prerouting priority -100;
        tcp dport 1000 dnat to 192.0.2.34
    }
}
"""
    vps.run(vps.gateway, ["nft", "-f", "-"], input=foreign)
    # The host also runs groups of its own: our client table, which libnftables 1.0.6
    # cannot print as JSON (it writes "warning: stmt ops map have no json callback" to
    # the terminal when asked), so the scan for foreign tables must not ask for it.
    vps.run(vps.gateway, ["nft", "-f", "-"], input=base_ruleset() + level_ruleset(1))
    # And a table with `flags owner` (what a running `via-tunnel trace` has), whose flags
    # libnftables 1.0.6 prints as garbage or as nothing in JSON: the scan must survive it.
    owner = vps.popen(vps.gateway, [sys.executable, "-c", OWNED_TABLE],
                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert owner.stdout is not None and owner.stdout.readline().strip() == "ready"
    try:
        r = gw(vps, vt_env, "up", "tun0", "--wan", "wan0", "--forward", "tcp:1000:192.0.2.50")
        assert "table ip vtfilter chain FORWARD drops forwarded packets" in r.stderr
        assert "tcp port 1000 is also forwarded by table ip vtnat chain PREROUTING" in r.stderr
        assert "Traceback" not in r.stderr
        assert "json callback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 2, r.stderr  # the two warnings only
        # The warning is right: the foreign drop policy breaks the forwarded traffic.
        r = via(vps, vt_env, "tun0", "--", *vps.fetch_argv(timeout=2), check=False)
        assert r.returncode != 0
        gw(vps, vt_env, "down", "tun0")
    finally:
        owner.communicate("", timeout=10)  # its table goes with its netlink socket
        vps.run(vps.gateway, ["nft", "delete table ip vtfilter; delete table ip vtnat; "
                              f"delete table {NFT_FAMILY} {NFT_TABLE}"], check=False)


def test_warns_when_forwarding_cannot_be_enabled(vps: Lab, vt_env: dict[str, str],
                                                clean: Any) -> None:
    # A read-only /proc/sys (as in some containers), in a private mount namespace.
    script = ('mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys && '
              'exec "$@"')
    r = vps.run(vps.gateway, ["unshare", "-m", "--propagation", "private", "sh", "-c", script,
                              "sh", sys.executable, "-m", "via_tunnel", "gateway", "up", "tun0",
                              "--wan", "wan0"], env=vt_env, timeout=30)
    assert "cannot enable net.ipv4.ip_forward" in r.stderr
    assert "net.ipv4.conf.wan0.forwarding is 0" in r.stderr
    assert sysctls(vps, vps.gateway)["/proc/sys/net/ipv4/ip_forward"] == "0"
    gw(vps, vt_env, "down", "tun0")


def test_ipv6_is_masqueraded_when_both_sides_have_it(vps: Lab, vt_env: dict[str, str],
                                                     clean: dict[str, Any]) -> None:
    v6_forwarding = "/proc/sys/net/ipv6/conf/all/forwarding"
    assert clean["sysctls"][v6_forwarding] == "0"
    gw(vps, vt_env, "up", "tun0", "--wan", "wan0")  # tun0 has no IPv6: v6 left alone
    assert sysctls(vps, vps.gateway)[v6_forwarding] == "0"
    gw(vps, vt_env, "up", "vlan3", "--wan", "wan0")  # vlan3 and wan0 both have IPv6
    assert [g["subnet6"] for g in gw_status(vps, vt_env)] == [[], ["2001:db8:3::/64"]]
    assert sysctls(vps, vps.gateway)[v6_forwarding] == "1"
    r = via(vps, vt_env, "--ipv6", "tunnel", "vlan3", "--", *vps.fetch_argv(ipv6=True))
    assert r.stdout.strip() == Lab.GW_WAN6
    gw(vps, vt_env, "down", "vlan3")
    assert sysctls(vps, vps.gateway)[v6_forwarding] == "0"
    gw(vps, vt_env, "down", "tun0")


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["up", "nosuch0", "--wan", "wan0"], 125, "interface nosuch0 does not exist"),
        (["up", "tun0", "--wan", "nosuch0"], 125, "interface nosuch0 does not exist"),
        (["up", "tun0"], 2, "no WAN interface"),
        (["up", "tun0", "--wan", "wan0", "--forward", "tcp:70000:192.0.2.50"], 2,
         "out of range"),
        (["up", "tun0", "--wan", "wan0", "--forward", "tcp:1000:198.51.100.10"], 125,
         "not in the tunnel's subnet"),
        (["up", "tun0", "--wan", "wan0", "--forward", "tcp-1000-192.0.2.50"], 2, "malformed"),
        (["up", "tun0", "--wan", "wan0", "--subnet", "192.0.2.0/40"], 2, "not an IPv4 CIDR"),
        (["up", "bad/name", "--wan", "wan0"], 2, "forbids"),
        (["up", "tun0", "--wan", "wan0", "--bogus"], 2, "No such option"),
    ],
)
def test_bad_input_is_one_line_and_changes_nothing(
        vps: Lab, vt_env: dict[str, str], clean: Any,
        args: list[str], code: int, message: str) -> None:
    r = gw(vps, vt_env, *args, check=False, extra_env={"VIA_TUNNEL_CONFIG": "/nonexistent"})
    assert r.returncode == code, r.stderr
    assert message in r.stderr
    assert "Traceback" not in r.stderr
    assert gw_status(vps, vt_env) == []


def test_a_port_of_another_gateway_is_refused(vps: Lab, vt_env: dict[str, str],
                                              clean: Any) -> None:
    gw(vps, vt_env, "up", "tun0", "--wan", "wan0", "--forward", "tcp:1000:192.0.2.50")
    before = ruleset(vps, vps.gateway)
    r = gw(vps, vt_env, "up", "vlan3", "--wan", "wan0", "--forward", "tcp:999-1001:192.0.2.34",
           check=False)
    assert r.returncode == 125
    assert "already forwarded by gateway tun0" in r.stderr
    assert ruleset(vps, vps.gateway) == before
    gw(vps, vt_env, "down", "tun0")
