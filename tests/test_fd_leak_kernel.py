"""CMD gets exactly the file descriptors it was started with: nothing via-tunnel opened
(libnftables' netlink socket, rtnetlink sockets, locks, the daemon's socket) may reach it.

The oracle is CMD itself: ``ls -l /proc/self/fd`` shows 0, 1, 2 and the directory ls reads.
Cold launch (the group is made by this run: libnftables and rtnetlink are used in the very
process that execs CMD), warm launch (the group exists), and through the daemon.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from daemon_lab import USER_PY, Daemon, as_nobody, daemon_env, readable_package
from helpers import via, via_popen, wait_for

from via_tunnel.lab.netlab import Lab

pytestmark = pytest.mark.kernel

LS = ("ls", "-l", "/proc/self/fd")


def open_fds(ls_output: str) -> dict[int, str]:
    """fd -> target from ``ls -l /proc/self/fd`` (the "total" line skipped)."""
    fds = {}
    for line in ls_output.splitlines():
        name, arrow, target = line.partition(" -> ")
        if arrow:
            fds[int(name.split()[-1])] = target
    return fds


def assert_only_stdio(fds: dict[int, str]) -> None:
    extra = {fd: target for fd, target in fds.items() if fd > 2}
    # ls's own read of the directory is its one extra descriptor
    assert len(extra) <= 1 and all(t.startswith("/proc/") and t.endswith("/fd")
                                   for t in extra.values()), fds


def groups_of(lab: Lab, env: dict[str, str]) -> str:
    return via(lab, env, "status").stdout


def test_cold_and_warm_launches_as_root_hand_cmd_only_its_stdio(
        lab: Lab, vt_env: dict[str, str]) -> None:
    assert "no active groups" in groups_of(lab, vt_env)
    cold = via(lab, vt_env, "vlan3", "--", *LS).stdout
    assert_only_stdio(open_fds(cold))
    holder = via_popen(lab, vt_env, "vlan3", "--", "sleep", "30")
    try:
        wait_for(lambda: "vlan3" in groups_of(lab, vt_env), what="the group")
        warm = via(lab, vt_env, "vlan3", "--", *LS).stdout
        assert_only_stdio(open_fds(warm))
    finally:
        holder.kill()
        holder.wait()
    wait_for(lambda: "no active groups" in groups_of(lab, vt_env), what="teardown")


def test_a_launch_through_the_daemon_hands_cmd_only_its_stdio(
        lab: Lab, vt_env: dict[str, str], tmp_path: Path) -> None:
    with readable_package() as package:
        env = daemon_env(vt_env, package, tmp_path / "config.toml", "vlan3")
        daemon = Daemon(lab, env, tmp_path / "daemon.log").start()

        def ls_as_nobody() -> dict[int, str]:
            return open_fds(lab.run(lab.client, as_nobody(USER_PY, "-m", "via_tunnel",
                                                          "vlan3", "--", *LS), env=env).stdout)
        try:
            assert_only_stdio(ls_as_nobody())  # the daemon makes the group
            holder = lab.popen(lab.client, as_nobody(USER_PY, "-m", "via_tunnel", "vlan3",
                                                     "--", "sleep", "30"),
                               env=env, stdin=subprocess.DEVNULL)
            try:
                wait_for(lambda: "vlan3" in groups_of(lab, vt_env), what="the group")
                assert_only_stdio(ls_as_nobody())  # joins the holder's group
            finally:
                holder.kill()
                holder.wait()
            wait_for(lambda: "no active groups" in groups_of(lab, vt_env), timeout=10,
                     what="teardown")
        finally:
            daemon.stop()
