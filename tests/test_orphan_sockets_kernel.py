"""Teardown cannot leak the tail of a group's connections: an exited program's orphaned TCP
socket (unacknowledged data, FIN) would keep retransmitting, and by the LAN once our rules
are gone. via-tunnel destroys the group's sockets before it removes the rules."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from helpers import via, via_popen, wait_for

from via_tunnel.lab.capture import Capture
from via_tunnel.lab.netlab import Lab

pytestmark = pytest.mark.kernel

PORT = 9100
BLOCK = """
table inet vt_test_block {
    chain forward {
        type filter hook forward priority 0; policy accept;
        tcp dport 9100 drop
    }
}
"""
# Connect, wait for the go, send data that will never be acknowledged, exit at once.
CLIENT = f"""
import socket, sys
s = socket.create_connection(("{Lab.SERVER}", {PORT}))
print("connected", flush=True)
sys.stdin.readline()
s.send(b"x" * 2000)
"""


def test_orphaned_socket_does_not_retransmit_by_the_lan_after_teardown(
        lab: Lab, vt_env: dict[str, str]) -> None:
    listener = lab.popen(lab.inet, ["socat", f"TCP-LISTEN:{PORT},reuseaddr", "SYSTEM:sleep 30"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: lab.run(lab.inet, ["ss", "-ltnH", "sport", f"= :{PORT}"]).stdout,
                 timeout=5, what="listener")
        prog = via_popen(lab, vt_env, "vlan3", "--", sys.executable, "-c", CLIENT,
                         stdin=subprocess.PIPE)
        assert prog.stdout is not None and prog.stdin is not None
        assert prog.stdout.readline().strip() == "connected"
        # From now on the gateway drops the flow: the data stays unacknowledged.
        lab.run(lab.gateway, ["nft", "-f", "-"], input=BLOCK)
        with Capture(lab, lab.client, "eth0", f"tcp port {PORT}") as lan:
            prog.stdin.write("go\n")
            prog.stdin.close()
            assert prog.wait(timeout=5) == 0
            wait_for(lambda: not json.loads(via(lab, vt_env, "status", "--json").stdout)
                     ["groups"], timeout=5, what="teardown")
            time.sleep(2.5)  # several retransmission timeouts
        assert lan.packets() == []
        orphans = lab.run(lab.client, ["ss", "-tanH", "dport", f"= :{PORT}"]).stdout
        assert orphans.strip() == ""
    finally:
        lab.run(lab.gateway, ["nft", "delete", "table", "inet", "vt_test_block"], check=False)
        listener.kill()
        listener.wait()
