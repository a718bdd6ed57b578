"""flows.py against the kernel: the group's sockets found by cgroup and destroyed
(sock_diag), its stale conntrack entries found by mark and deleted (ctnetlink), both
families, nothing else touched.

A bare network namespace with loopback is enough; an nft rule there turns conntrack on and
marks the flows of another "group". The script runs in the namespace through ``nsenter``
(``ip netns exec`` would hide the cgroup tree).
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator

import pytest
from helpers import PACKAGE_PARENT

from via_tunnel.kernel import cgroup

pytestmark = pytest.mark.kernel

RULES = """
table inet vt_flows_test {
    chain output {
        type filter hook output priority 0; policy accept;
        udp dport 9 ct state new counter
        udp dport 10 ct mark set 0x82000000
    }
}
"""
# In the namespace: a program in the cgroup holds UDP sockets (v4 and v6) that sent to port
# 9 (unmarked flows that replies would take to 127.0.0.1 / ::1, not the interface's address)
# and to port 10 (another group's mark); one socket outside the cgroup sends too.
SCRIPT = r"""
import json, os, socket, subprocess, sys
from via_tunnel.kernel import conntrack, flows, sockdiag
cg = sys.argv[1]
child = subprocess.Popen([sys.executable, "-c", '''
import socket, sys, time
held = []
for fam, addr in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
    for port in (9, 10):
        s = socket.socket(fam, socket.SOCK_DGRAM); s.sendto(b"x", (addr, port)); held.append(s)
t = socket.socket(); t.bind(("127.0.0.1", 0)); t.listen(); held.append(t)
print("ready", flush=True); time.sleep(30)
'''], stdout=subprocess.PIPE, text=True,
     preexec_fn=lambda: open(os.path.join(cg, "cgroup.procs"), "w").write("0"))
assert child.stdout.readline().strip() == "ready"
outside = socket.socket(); outside.bind(("127.0.0.1", 0)); outside.listen()
other = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); other.sendto(b"x", ("::1", 9))
found = sockdiag.sockets(cg)
removed = flows.reset_unmasqueraded(cg, 0x81000000, 0xFF000000, ("192.0.2.50/32",))
with conntrack.open_socket() as nl:
    left = conntrack.dump(nl, 0, 0)
flows.kill_sockets(cg)
after = sockdiag.sockets(cg)
socket.create_connection(outside.getsockname(), timeout=1).close()  # still listening
child.kill(); child.wait()
print(json.dumps({
    "found": sorted([s.family, s.proto] for s in found),
    "removed": sorted([e.family, e.dport, e.mark] for e in removed),
    "left": sorted([e.family, e.dport, e.mark] for e in left),
    "after_kill": len(after),
}))
"""


@pytest.fixture
def netns_and_cgroup() -> Iterator[tuple[str, str]]:
    name = f"vtflows{secrets.token_hex(3)}"
    path = os.path.join(cgroup.cgroup2_mount(), f"via-tunnel-test-{name}")
    subprocess.run(["ip", "netns", "add", name], check=True)
    os.makedirs(path)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        subprocess.run(["ip", "netns", "exec", name, "nft", "-f", "-"], input=RULES, text=True,
                       check=True)
        yield name, path
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)
        for pid in cgroup.members(path):
            os.kill(pid, 9)
        cgroup.remove(path)


def test_stale_entries_of_both_families_are_reset_and_sockets_found_by_cgroup(
        netns_and_cgroup: tuple[str, str]) -> None:
    name, path = netns_and_cgroup
    argv = ["nsenter", f"--net=/var/run/netns/{name}", sys.executable, "-c", SCRIPT, path]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=30,
                         env={**os.environ, "PYTHONPATH": PACKAGE_PARENT})
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    v4, v6 = 2, 10
    # four UDP sockets (two per family) and a TCP listener, nothing from outside the cgroup
    assert got["found"] == [[v4, "tcp"], [v4, "udp"], [v4, "udp"], [v6, "udp"], [v6, "udp"]]
    # the group's unmarked flows of both families; not another group's (port 10)
    assert got["removed"] == [[v4, 9, 0], [v6, 9, 0]]
    # what stays: the other group's flows and the flow of a socket outside the group
    assert got["left"] == [[v4, 10, 0x82000000], [v6, 9, 0], [v6, 10, 0x82000000]]
    # kill_sockets: every socket of the cgroup, and only those (the outside listener lives)
    assert got["after_kill"] == 0
