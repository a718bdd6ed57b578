"""The launcher's line about internet sockets CMD would inherit from outside its group
(issue "No escape, no cross-user influence", §5)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from via_tunnel.kernel import inherited


def test_inheritable_internet_sockets_are_named_and_nothing_else() -> None:
    v4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    v6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    closed_at_exec = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    unix = socket.socket(socket.AF_UNIX)
    try:
        for s in (v4, v6, unix):
            s.set_inheritable(True)
        found = dict(inherited.inet_sockets())
        assert found.get(v4.fileno()) == "IPv4" and found.get(v6.fileno()) == "IPv6"
        assert closed_at_exec.fileno() not in found and unix.fileno() not in found
        line = inherited.warning("vlan3")
        assert line is not None and f"fd {v4.fileno()} (IPv4)" in line
        assert "main route, not vlan3" in line
        v4.fileno()  # still open: the check did not close it
        assert os.fstat(v4.fileno())
    finally:
        for s in (v4, v6, closed_at_exec, unix):
            s.close()


def test_a_clean_process_has_no_warning() -> None:
    code = "from via_tunnel.kernel import inherited; print(inherited.warning('vlan3'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, close_fds=True).stdout
    assert out.strip() == "None"
