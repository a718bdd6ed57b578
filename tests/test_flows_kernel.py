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


# A program in the cgroup whose connection ends in LAST_ACK: the server (outside) sends and
# closes, the program reads to the end and closes; the server's ACK of that FIN is dropped.
LAST_ACK_SCRIPT = r"""
import json, os, socket, subprocess, sys, time
from via_tunnel.kernel import flows, sockdiag
cg = sys.argv[1]
server = socket.socket(); server.bind(("127.0.0.1", 0)); server.listen()
port = server.getsockname()[1]
child = subprocess.Popen([sys.executable, "-c", f'''
import socket, sys
c = socket.create_connection(("127.0.0.1", {port}))
while c.recv(4096):
    pass
print("eof", flush=True)
sys.stdin.readline()
c.close()
print("closed", flush=True)
sys.stdin.readline()
'''], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
     preexec_fn=lambda: open(os.path.join(cg, "cgroup.procs"), "w").write("0"))
conn, _ = server.accept()
conn.sendall(b"answer")
conn.shutdown(socket.SHUT_WR)
assert child.stdout.readline().strip() == "eof"
subprocess.run(["nft", "add rule inet vt_flows_test output tcp sport " + str(port)
                + " tcp flags == ack drop"], check=True)
child.stdin.write("\n"); child.stdin.flush()
assert child.stdout.readline().strip() == "closed"
deadline = time.monotonic() + 5
while not [s for s in sockdiag.sockets(cg) if s.awaits_ack_of_fin()]:
    assert time.monotonic() < deadline, sockdiag.sockets(cg)
    time.sleep(0.01)
states = sorted(s.state for s in sockdiag.sockets(cg) if s.proto == "tcp")
start = time.monotonic()
flows.kill_sockets(cg)
took = time.monotonic() - start
print(json.dumps({"states": states, "took": took, "after": len(sockdiag.sockets(cg))}))
child.stdin.write("\n"); child.stdin.flush(); child.wait()
"""


def test_a_socket_waiting_for_the_ack_of_its_fin_gets_a_grace_then_goes(
        netns_and_cgroup: tuple[str, str]) -> None:
    """The far end's ACK never comes here: kill_sockets waits CLOSING_GRACE for it (a
    LAST_ACK socket destroyed at once would answer the late ACK with a reset, by the LAN
    once our rules are gone), then destroys the socket all the same."""
    from via_tunnel.kernel.flows import CLOSING_GRACE
    from via_tunnel.kernel.sockdiag import TCP_LAST_ACK

    name, path = netns_and_cgroup
    argv = ["nsenter", f"--net=/var/run/netns/{name}", sys.executable, "-c", LAST_ACK_SCRIPT,
            path]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=30,
                         env={**os.environ, "PYTHONPATH": PACKAGE_PARENT})
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["states"] == [TCP_LAST_ACK]  # sock_diag's state, read by parse_sock
    assert CLOSING_GRACE <= got["took"] < CLOSING_GRACE + 2, got
    assert got["after"] == 0
