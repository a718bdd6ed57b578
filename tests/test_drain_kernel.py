"""A group that ended drains: late packets of its closed flows never leave by the LAN.

Once the last process of the last group exits, its routes, rules and cgroup go at once; but
conntrack keeps its flows (TIME_WAIT: 120 s), and a late packet of one (a FIN the far end
retransmits because it missed our last ACK) draws an answer from the kernel with the
group's mark. Without the drain that answer would leave by the LAN's default route with
the tunnel's source address. These tests provoke exactly that, with real packets.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable

import pytest
from helpers import CaptureElsewhere, via, via_popen, vt_env_for, wait_for

from via_tunnel.lab.netlab import Lab

pytestmark = pytest.mark.kernel

SERVER = Lab.SERVER
PORT = 8471

# The far end: accept one connection, read it to the end (our FIN), then drop every pure
# ACK that comes in (so our last ACK is lost) and close: the kernel retransmits its FIN
# with a growing timeout (0.2 s, 0.6 s, 1.4 s, 3 s, ...), long after our program exited.
FAR_END = f"""
import socket, subprocess, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", {PORT}))
s.listen(1)
print("ready", flush=True)
c, _ = s.accept()
while c.recv(4096):
    pass
subprocess.run(["nft", "add table inet latefin; "
                "add chain inet latefin input {{ type filter hook input priority 0; }}; "
                "add rule inet latefin input tcp dport {PORT} tcp flags == ack drop"], check=True)
c.close()
print("closed", flush=True)
time.sleep(60)
"""

# Our program: send, close its side, read to the end (the far end's FIN), close: its socket
# is in TIME_WAIT when it exits, and the far end never got the ACK of its FIN.
CLIENT = f"""
import socket
c = socket.create_connection(("{SERVER}", {PORT}), timeout=5)
c.sendall(b"hello")
c.shutdown(socket.SHUT_WR)
while c.recv(4096):
    pass
c.close()
"""


def status(lab: Lab, env: dict[str, str]) -> dict[str, list[dict[str, object]]]:
    return json.loads(via(lab, env, "status", "--json").stdout)  # type: ignore[no-any-return]


def kill_switch_drops(lab: Lab) -> int:
    """Packets our table's kill switch (postrouting's last rule) dropped, from ``nft -j``;
    0 without the table."""
    out = lab.run(lab.client, ["nft", "-j", "list", "chain", "inet", "via_tunnel",
                               "postrouting"], check=False).stdout
    rules = [o["rule"] for o in json.loads(out or '{"nftables": []}')["nftables"] if "rule" in o]
    return sum(e["counter"]["packets"] for r in rules for e in r["expr"]
               if "counter" in e and {"drop": None} in r["expr"])


def far_end(lab: Lab) -> subprocess.Popen[str]:
    proc = lab.popen(lab.inet, [sys.executable, "-c", FAR_END], stdout=subprocess.PIPE,
                     text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    return proc


def test_a_late_fin_after_the_last_group_ended_is_answered_by_nobody(
        lab_factory: Callable[..., Lab]) -> None:
    """Loose reverse-path filtering (rp_filter=2, systemd's default) lets the late FIN in
    once our rules are gone (strict filtering drops it on the way in: nothing to answer).
    Without the drain, the answer (an RST) left by eth0 from 192.0.2.50."""
    lab = lab_factory(rp_filter=2)
    vt_env = vt_env_for(lab, drain=True)
    server = far_end(lab)
    try:
        before = kill_switch_drops(lab)
        with CaptureElsewhere(lab, "tun0", f"tcp and port {PORT}") as elsewhere:
            via(lab, vt_env, "tun0", "--", sys.executable, "-c", CLIENT)
            wait_for(lambda: status(lab, vt_env)["groups"] == [], what="the group to end")
            # The group is gone: no rule, route or cgroup of it is left ...
            assert not any(r.get("priority", 0) >= 5099 and r.get("priority", 0) <= 5133
                           for r in lab.ip_json(lab.client, "rule", "show"))
            # ... and the far end's next FIN draws our TIME_WAIT socket's ACK, which the
            # draining table drops instead of sending it by eth0.
            wait_for(lambda: kill_switch_drops(lab) > before, timeout=15,
                     what="the answer to a late FIN dropped")
        assert elsewhere.packets() == {}
        draining = status(lab, vt_env)["draining"]
        assert len(draining) == 1 and draining[0]["interface"] == "tun0"
        assert 0 < draining[0]["seconds_left"] <= 120  # type: ignore[operator]
        text = via(lab, vt_env, "status").stdout
        assert "tun0  ended, draining" in text and "no active groups" not in text
        # The mark is not given to a new group while its flows live.
        holder = via_popen(lab, vt_env, "tun0", "--", "sleep", "30")
        try:
            groups = wait_for(lambda: status(lab, vt_env)["groups"], what="a new group")
            assert groups[0]["mark"] != draining[0]["mark"]
        finally:
            holder.terminate()
            holder.wait()
        wait_for(lambda: status(lab, vt_env)["groups"] == [], what="the new group to end")
    finally:
        server.kill()
        server.wait()
        lab.run(lab.inet, ["nft", "delete", "table", "inet", "latefin"], check=False)


def test_once_the_flows_are_gone_nothing_is_left(
        lab_factory: Callable[..., Lab]) -> None:
    """With conntrack's TIME_WAIT timeout shortened in the client's namespace, the drain
    ends by itself (the kernel expires its element) and the next `cleanup` leaves the
    client as it found it."""
    lab = lab_factory()
    env = vt_env_for(lab, drain=True)
    lab.run(lab.client, ["sysctl", "-qw", "net.netfilter.nf_conntrack_tcp_timeout_time_wait=2"])
    before = lab.snapshot(lab.client)
    via(lab, env, "tun0", "--", *lab.fetch_argv())
    wait_for(lambda: status(lab, env)["groups"] == [], what="the group to end")
    draining = status(lab, env)["draining"]
    assert [d["interface"] for d in draining] == ["tun0"]
    assert 0 <= draining[0]["seconds_left"] <= 2  # type: ignore[operator]
    wait_for(lambda: status(lab, env)["draining"] == [], timeout=10, interval=0.2,
             what="the drain to end")
    assert via(lab, env, "cleanup").stdout == "removed nft table inet via_tunnel\n"
    assert lab.snapshot(lab.client) == before
