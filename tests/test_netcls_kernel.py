"""A member moved out of its group's cgroup2 group stays routed (cgroup v1 net_cls), on a real
kernel in a namespace lab (no systemd here: the move is done by hand, as PID 1 would do it
for ``systemd-run --scope``: the PID written into another cgroup's ``cgroup.procs``).

Oracles: what the far end saw (the echo server answers with the caller's address), tcpdump
on the LAN, ``status``, mountinfo and the cgroup trees for "nothing left behind".
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from helpers import cgroup_leftovers, via, via_popen, wait_for

from via_tunnel.lab.capture import Capture
from via_tunnel.lab.footprint import cgroup2_mount
from via_tunnel.lab.netlab import Lab

pytestmark = pytest.mark.kernel

VETH = Lab.CLIENT_VETH


def _status(lab: Lab, env: dict[str, str]) -> list[dict]:  # type: ignore[type-arg]
    return list(json.loads(via(lab, env, "status", "--json").stdout)["groups"])


def _netcls_mounts(state_dir: str) -> list[str]:
    """The net_cls mounts but other via-tunnel instances' (a lab running side by side
    mounts and unmounts its own as its groups come and go); ``state_dir``: this one's."""
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f
                  if " - cgroup " in line and "net_cls" in line.split(" - ")[1]]
    return [p for p in points
            if not p.startswith("/run/via-tunnel-") or p.startswith(state_dir + "/")]


@pytest.fixture
def sibling(vt_env: dict[str, str]) -> Iterator[str]:
    """A cgroup2 group beside ours, outside via-tunnel's subtree (as a systemd scope is)."""
    mount = cgroup2_mount()
    assert mount is not None
    path = os.path.join(mount, vt_env["VIA_TUNNEL_CGROUP"].strip("/") + "-elsewhere")
    os.makedirs(path)
    try:
        yield path
    finally:
        wait_for(lambda: _rmdir(path), timeout=5, what=f"{path} to be empty")


def _rmdir(path: str) -> bool:
    try:
        os.rmdir(path)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


def test_a_member_moved_out_of_its_cgroup_keeps_the_interface(
        lab: Lab, vt_env: dict[str, str], sibling: str) -> None:
    before = lab.snapshot(lab.client)
    mounts_before = _netcls_mounts(vt_env["VIA_TUNNEL_STATE_DIR"])
    fetch = " ".join(lab.fetch_argv())
    # prints its PID, then for each line on stdin fetches once; ends when stdin closes
    prober = via_popen(lab, vt_env, "vlan3", "--", "sh", "-c",
                       f"echo $$; while read -r _; do {fetch}; done",
                       stdin=subprocess.PIPE, bufsize=1)
    assert prober.stdin is not None and prober.stdout is not None
    pid = int(prober.stdout.readline())
    try:
        prober.stdin.write("\n")
        assert prober.stdout.readline().strip() == VETH
        with open(os.path.join(sibling, "cgroup.procs"), "w") as f:
            f.write(str(pid))  # what systemd does to `systemd-run --scope`
        with open(f"/proc/{pid}/cgroup") as f:
            assert f"::/{os.path.relpath(sibling, cgroup2_mount() or '/')}" \
                in f.read()
        with Capture(lab, lab.client, "eth0", f"host {Lab.SERVER}") as lan:
            prober.stdin.write("\n")
            assert prober.stdout.readline().strip() == VETH
        assert lan.packets() == []
        # the group's cgroup2 group is empty, its member lives on: the group stays
        time.sleep(0.3)
        groups = _status(lab, vt_env)
        assert [g["interface"] for g in groups] == ["vlan3"]
        # status lists it, with where it went
        assert [(m["pid"], m.get("moved_to")) for m in groups[0]["members"]] \
            == [(pid, sibling)]
        assert f"(moved to {sibling}; still in the group)" in via(lab, vt_env, "status").stdout
        prober.stdin.write("\n")
        assert prober.stdout.readline().strip() == VETH
    finally:
        prober.stdin.close()
        assert prober.wait(timeout=10) == 0
    # once it exits, everything goes: routing, records, cgroups of both kinds, our mount
    wait_for(lambda: not _status(lab, vt_env), timeout=5, what="the group's teardown")
    wait_for(lambda: lab.snapshot(lab.client) == before, timeout=5, what="a clean client")
    assert not cgroup_leftovers(vt_env)
    assert _netcls_mounts(vt_env["VIA_TUNNEL_STATE_DIR"]) == mounts_before


# Prints its PID; at the first line on stdin connects to the lab's HTTP server and keeps the
# socket open; ends at the second.
CONNECTOR = f"""
import os, socket, sys
print(os.getpid(), flush=True)
sys.stdin.readline()
s = socket.create_connection(("{Lab.SERVER}", {Lab.HTTP_PORT}), timeout=5)
print("connected", flush=True)
sys.stdin.readline()
"""


def test_trace_names_a_member_moved_out_of_its_cgroup(
        lab: Lab, vt_env: dict[str, str], sibling: str) -> None:
    from test_trace_kernel import Trace

    member = via_popen(lab, vt_env, "vlan3", "--", sys.executable, "-c", CONNECTOR,
                       stdin=subprocess.PIPE, bufsize=1)
    assert member.stdin is not None and member.stdout is not None
    pid = int(member.stdout.readline())
    trace = None
    try:
        with open(os.path.join(sibling, "cgroup.procs"), "w") as f:
            f.write(str(pid))
        trace = Trace(lab, vt_env, "vlan3")
        member.stdin.write("\n")
        assert member.stdout.readline().strip() == "connected"
        trace.expect(rf"  pid {pid} \S+  tcp \S+ -> {Lab.SERVER}:{Lab.HTTP_PORT}  via vlan3 ")
    finally:
        if trace is not None:
            assert trace.stop() == 0
        member.stdin.close()
        member.wait(timeout=10)
    wait_for(lambda: not _status(lab, vt_env), timeout=5, what="the group's teardown")
