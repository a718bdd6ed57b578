"""Fail closed: when the interface goes down or away mid-run, the group's traffic is dropped
(never sent by the LAN), and routing resumes by itself when the interface comes back."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator

import pytest
from helpers import CaptureElsewhere, canonical, via, via_popen, wait_for

from via_tunnel.lab.netlab import Lab

pytestmark = pytest.mark.kernel


class Asker:
    """A program inside the group that fetches the server's view of it on demand, so one
    running program can be observed before, during and after an outage."""

    def __init__(self, lab: Lab, env: dict[str, str], iface: str) -> None:
        fetch = " ".join(lab.fetch_argv(timeout=2))
        self.proc = via_popen(lab, env, iface, "--", "sh", "-c",
                              f"while read x; do {fetch} || echo FAIL; done",
                              stdin=subprocess.PIPE)

    def ask(self) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=10)


@pytest.fixture
def clean(lab: Lab, vt_env: dict[str, str]) -> Iterator[None]:
    """Nothing of ours left. Routes are compared without the kernel's fe80 ones: a re-created
    tun0 gets a new random link-local address, which is not a change of ours."""
    before = ours(lab)
    yield
    wait_for(lambda: ours(lab) == before, timeout=5, what="state restored")


def ours(lab: Lab) -> object:
    snap = canonical(lab.snapshot(lab.client))
    snap["routes"]["6"] = [r for r in snap["routes"]["6"] if not r["dst"].startswith("fe80")]
    return snap


def group_table(lab: Lab, env: dict[str, str]) -> int:
    groups = json.loads(via(lab, env, "status", "--json").stdout)["groups"]
    return int(groups[0]["table"])


def default_via(lab: Lab, table: int, dev: str) -> bool:
    routes = lab.ip_json(lab.client, "route", "show", "table", str(table))
    return any(r.get("dst") == "default" and r.get("dev") == dev for r in routes)


def test_interface_down_drops_traffic_and_up_restores_it(lab: Lab, vt_env: dict[str, str],
                                                        clean: None) -> None:
    asker = Asker(lab, vt_env, "vlan3")
    try:
        assert asker.ask() == Lab.CLIENT_VETH
        table = group_table(lab, vt_env)
        lab.run(lab.client, ["ip", "link", "set", "vlan3", "down"])
        try:
            servers = f"host {Lab.SERVER} or host {Lab.SERVER6} or port 53"
            with CaptureElsewhere(lab, "vlan3", servers) as elsewhere:
                assert asker.ask() == "FAIL"
            assert elsewhere.captures and elsewhere.packets() == {}
            r = via(lab, vt_env, "vlan3", "--", "true", check=False)
            assert r.returncode == 125 and "vlan3 is down" in r.stderr
        finally:
            lab.run(lab.client, ["ip", "link", "set", "vlan3", "up"])
            # Going down took the lab's own routes via vlan3 with it, and the IPv6 address
            # (keep_addr_on_down=0); put them back.
            lab.run(lab.client, ["ip", "addr", "replace", f"{Lab.CLIENT_VETH6}/64",
                                 "dev", "vlan3", "nodad"])
            lab.run(lab.client, ["ip", "route", "replace", Lab.VETH_ROUTE,
                                 "via", Lab.GW_VETH, "dev", "vlan3"])
            wait_for(lambda: lab.run(lab.client, [
                "ip", "-6", "route", "replace", Lab.VETH_ROUTE6, "via", Lab.GW_VETH6,
                "dev", "vlan3"], check=False).returncode == 0, timeout=5, what="v6 route back")
        wait_for(lambda: default_via(lab, table, "vlan3"), timeout=5, what="route re-added")
        assert asker.ask() == Lab.CLIENT_VETH
    finally:
        asker.close()


def test_tunnel_killed_mid_run_then_restored(lab: Lab, vt_env: dict[str, str],
                                            clean: None) -> None:
    asker = Asker(lab, vt_env, "tun0")
    try:
        assert asker.ask() == Lab.CLIENT_TUN
        table = group_table(lab, vt_env)
        lab.kill_client_vpn()
        try:
            servers = f"host {Lab.SERVER} or host {Lab.SERVER6} or port 53"
            with CaptureElsewhere(lab, "tun0", servers) as elsewhere:
                assert asker.ask() == "FAIL"
            assert "vlan3" in elsewhere.captures and elsewhere.packets() == {}
        finally:
            lab.start_client_vpn()
        wait_for(lambda: default_via(lab, table, "tun0"), timeout=5, what="route re-added")
        assert asker.ask() == Lab.CLIENT_TUN
    finally:
        asker.close()
