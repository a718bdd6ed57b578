"""`via-tunnel doctor` on a real kernel: each problem it claims to detect is planted in the
lab's client namespace, seen reported with the right status, and removed again; a clean lab
reports no FAIL, and doctor itself changes nothing (snapshot, and `nft monitor` as a
witness that the kernel probe commits nothing)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon_lab import readable_package
from helpers import via, via_popen, wait_for

from via_tunnel import __version__
from via_tunnel.core.settings import MARK_MASK, bucket_priority
from via_tunnel.lab.footprint import cgroup2_mount
from via_tunnel.lab.netlab import Lab

pytestmark = pytest.mark.kernel

OUR_TABLE_5 = 0x7674_0005
OUR_MARK_5 = 0x8500_0000


@pytest.fixture
def denv(vt_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """The lab's env, plus a daemon socket, a config and a networkd config dir of this test
    (so nothing of the host's /etc or /run is read or touched)."""
    (tmp_path / "networkd").mkdir()
    return {**vt_env, "VIA_TUNNEL_SOCKET": str(tmp_path / "d.sock"),
            "VIA_TUNNEL_CONFIG": str(tmp_path / "config.toml"),
            "VIA_TUNNEL_NETWORKD_CONF_DIR": str(tmp_path / "networkd")}


def doctor(lab: Lab, env: dict[str, str], *args: str) -> tuple[int, list[dict[str, Any]]]:
    """Run doctor --json in the client; check the report's shape; (exit status, checks)."""
    r = via(lab, env, "doctor", "--json", *args, check=False)
    assert r.stderr == "", r.stderr  # never a traceback, never a stray message
    data = json.loads(r.stdout)
    checks = data["checks"]
    assert data["version"] == 1
    assert all(set(c) == {"name", "status", "detail", "fix"} for c in checks)
    assert all(c["status"] in ("ok", "warn", "fail") for c in checks)
    assert data["ok"] == (r.returncode == 0) == all(c["status"] != "fail" for c in checks)
    return r.returncode, checks


def named(checks: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [c for c in checks if c["name"] == name]


def one(checks: list[dict[str, Any]], name: str) -> dict[str, Any]:
    found = named(checks, name)
    assert len(found) == 1, (name, checks)
    return found[0]


def fails(checks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [c for c in checks if c["status"] == "fail"]


def ip(lab: Lab, *args: str) -> None:
    lab.run(lab.client, ["ip", *args])


@pytest.fixture
def group(lab: Lab, denv: dict[str, str]) -> Iterator[subprocess.Popen[Any]]:
    """A program running in tun0's group (removed, and the group gone, after the test)."""
    proc = via_popen(lab, denv, "tun0", "--", "sleep", "60")
    wait_for(lambda: _groups(lab, denv), what="tun0's group")
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=10)
        via(lab, denv, "cleanup")
        wait_for(lambda: not _groups(lab, denv), timeout=10, what="group removed")


def _groups(lab: Lab, env: dict[str, str]) -> list[dict[str, Any]]:
    groups = json.loads(via(lab, env, "status", "--json").stdout)["groups"]
    return [g for g in groups if g["members"]] or groups


# ----------------------------------------------------------------- clean lab, read-only


def test_clean_lab_no_fail_and_doctor_changes_nothing(lab: Lab, denv: dict[str, str]) -> None:
    before = lab.snapshot(lab.client)
    monitor = lab.popen(lab.client, ["nft", "monitor"], stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(0.3)  # let the monitor subscribe
        start = time.monotonic()
        rc, checks = doctor(lab, denv, "tun0")
        elapsed = time.monotonic() - start
        # Control: the monitor does see a change that is committed.
        lab.run(lab.client, ["nft", "add table inet vtwitness; delete table inet vtwitness"])
        time.sleep(0.3)
    finally:
        monitor.terminate()
        seen, _ = monitor.communicate(timeout=5)
    assert "vtwitness" in seen, seen
    assert "via_tunnel_doctor" not in seen, seen
    assert lab.snapshot(lab.client) == before
    assert not os.path.exists(denv["VIA_TUNNEL_STATE_DIR"])
    print(f"doctor took {elapsed * 1000:.0f} ms (python start included)")
    assert elapsed < 3
    assert rc == 0 and fails(checks) == []
    names = {c["name"] for c in checks}
    for want in ("cgroup2", "placement", "net_cls", "nft-binding", "kernel:socket-cgroupv2",
                 "kernel:nat",
                 "kernel:conntrack-marks", "kernel:ruleset", "rp_filter", "ip-rules",
                 "nft-marks",
                 "networkd", "leftovers", "daemon", "iface:up", "iface:ipv4", "iface:ipv6",
                 "iface:nexthop", "iface:mtu", "iface:rp_filter"):
        assert want in names
    assert all(c["status"] == "ok" for c in checks if c["name"].startswith("kernel:"))
    assert one(checks, "cgroup2")["detail"].startswith(f"cgroup2 mounted at {cgroup2_mount()}")
    # no systemd on this machine, and the lab names its own subtree
    subtree = f"{cgroup2_mount()}/{denv['VIA_TUNNEL_CGROUP']}/if-IFACE"
    assert f"no systemd as PID 1: groups are plain cgroups {subtree}" \
        in one(checks, "placement")["detail"]
    netcls = one(checks, "net_cls")
    assert netcls["status"] == "ok" and "net_cls available" in netcls["detail"]
    # The lab's client is strict with src_valid_mark 1: fine, and explained.
    rp = one(checks, "rp_filter")
    assert rp["status"] == "ok" and "strict" in rp["detail"]
    assert "takes the mark into account" in rp["detail"]
    lab.run(lab.client, ["sysctl", "-qw", "net.ipv4.conf.all.src_valid_mark=0"])
    try:  # at 0 and no group: fine too, and explained
        _rc, checks = doctor(lab, denv, "tun0")
    finally:
        lab.run(lab.client, ["sysctl", "-qw", "net.ipv4.conf.all.src_valid_mark=1"])
    assert "src_valid_mark=1 when a group starts" in one(checks, "rp_filter")["detail"]
    assert one(checks, "iface:nexthop")["detail"] == "tun0 is point-to-point: no next hop needed"


def test_text_report_one_line_per_check(lab: Lab, denv: dict[str, str]) -> None:
    r = via(lab, denv, "doctor", "eth1dead", check=False)
    assert r.returncode == 1 and r.stderr == ""
    lines = r.stdout.splitlines()
    assert all(line[:6] in ("OK    ", "WARN  ", "FAIL  ") for line in lines), lines
    assert any(line.startswith("FAIL  iface:up: eth1dead is down") and "-- fix: " in line
               for line in lines)


# ----------------------------------------------------------------- the interface


def test_interface_problems(lab: Lab, denv: dict[str, str]) -> None:
    rc, checks = doctor(lab, denv, "eth1dead")
    assert rc == 1 and one(checks, "iface:up")["status"] == "fail"
    assert "ip link set eth1dead up" in one(checks, "iface:up")["fix"]

    rc, checks = doctor(lab, denv, "vnohop")
    assert rc == 0 and one(checks, "iface:nexthop")["status"] == "warn"
    assert "--gateway" in one(checks, "iface:nexthop")["fix"]

    rc, checks = doctor(lab, denv, "vlan3")
    assert rc == 0
    assert one(checks, "iface:nexthop")["detail"].startswith(f"next hop {Lab.GW_VETH} ")
    assert Lab.CLIENT_VETH6 in one(checks, "iface:ipv6")["detail"]
    assert one(checks, "iface:mtu")["detail"].startswith("MTU 1500 ")

    rc, checks = doctor(lab, denv, "nosuch0")
    assert rc == 1 and one(checks, "iface:up")["detail"] == "interface nosuch0 does not exist"

    ip(lab, "link", "add", "vtnoaddr", "type", "veth", "peer", "name", "vtnoaddr-p")
    try:
        ip(lab, "link", "set", "vtnoaddr-p", "up")
        ip(lab, "link", "set", "vtnoaddr", "up", "mtu", "1200")
        rc, checks = doctor(lab, denv, "vtnoaddr")
        assert rc == 1
        assert one(checks, "iface:up")["status"] == "ok"
        assert one(checks, "iface:ipv4")["status"] == "fail"
        assert one(checks, "iface:mtu")["status"] == "warn"
    finally:
        ip(lab, "link", "del", "vtnoaddr")


# ----------------------------------------------------------------- ip rules


@pytest.mark.parametrize(("rule", "name", "status"), [
    # A foreign rule at our priority that catches everything.
    (["priority", "5100", "lookup", "100"], "ip-rules:priority", "fail"),
    # A foreign rule at our priority that cannot match our marks.
    (["priority", "5100", "fwmark", "0x1/0x1", "lookup", "100"], "ip-rules:priority", "warn"),
    # A foreign rule using one of our routing tables.
    (["priority", "6000", "fwmark", "0x1", "lookup", str(OUR_TABLE_5)], "ip-rules:table", "fail"),
    # Tailscale-like, but with a mark in our bits.
    (["priority", "5230", "fwmark", "0x80000000/0xff000000", "lookup", "52"],
     "ip-rules:marks", "fail"),
    # A catch-all at priority 0 before our entry rule (no group yet: it would come first).
    (["priority", "0", "lookup", "100"], "ip-rules:before", "warn"),
])
def test_foreign_rules_are_reported(lab: Lab, denv: dict[str, str], rule: list[str],
                                    name: str, status: str) -> None:
    for fam in ("-4", "-6"):
        ip(lab, fam, "rule", "add", *rule)
    try:
        rc, checks = doctor(lab, denv)
        found = named(checks, name)
        assert [c["status"] for c in found] == [status, status], checks  # v4 and v6
        assert all(c["fix"] for c in found)
        assert rc == (1 if status == "fail" else 0)
        assert named(checks, "ip-rules") == []  # no "all clear" line beside a finding
    finally:
        for fam in ("-4", "-6"):
            ip(lab, fam, "rule", "del", *rule)


def test_neighbours_coexist(lab: Lab, denv: dict[str, str]) -> None:
    """wg-quick's full tunnel (its own table, `not fwmark`, suppress_prefixlength) and
    Tailscale's rules: OK lines that explain why they do not collide."""
    rules = [["not", "fwmark", "51820", "table", "51820", "priority", "32764"],
             ["table", "main", "suppress_prefixlength", "0", "priority", "32763"],
             ["fwmark", "0x80000/0xff0000", "table", "main", "priority", "5210"],
             ["table", "52", "priority", "5270"]]
    ip(lab, "route", "add", "default", "dev", "tun0", "table", "51820")
    for rule in rules:
        ip(lab, "rule", "add", *rule)
    try:
        rc, checks = doctor(lab, denv, "eth0")
        assert rc == 0, fails(checks)
        wg = one(checks, "neighbour:wg-quick")
        assert wg["status"] == "ok" and "bypass" in wg["detail"]
        assert one(checks, "neighbour:tailscale")["status"] == "ok"
        assert one(checks, "ip-rules")["status"] == "ok"
    finally:
        for rule in rules:
            ip(lab, "rule", "del", *rule)
        ip(lab, "route", "del", "default", "dev", "tun0", "table", "51820")


@pytest.mark.parametrize(("statement", "which"), [
    ("meta mark set 0x80000001", "packet"),
    ("ct mark set ct mark or 0x80000000", "connection"),
])
def test_a_foreign_table_setting_our_mark_bit_is_reported(
        lab: Lab, denv: dict[str, str], statement: str, which: str) -> None:
    """A table that sets bit 31 makes our kill switch drop its packets; the same table
    setting marks outside our bits, and our own table (a live group's), are fine."""
    rc, checks = doctor(lab, denv)
    assert one(checks, "nft-marks")["status"] == "ok" and rc == 0
    ruleset = f"""
table ip vtmarker {{
    chain out {{
        type route hook output priority mangle; policy accept;
        udp dport 9 meta mark set 0x00080000
        tcp dport 9 {statement}
    }}
}}
"""
    lab.run(lab.client, ["nft", "-f", "-"], input=ruleset)
    holder = via_popen(lab, denv, "tun0", "--", "sleep", "30")  # our table is there too
    try:
        wait_for(lambda: lab.run(lab.client, ["nft", "list", "table", "inet", "via_tunnel"],
                                 check=False).returncode == 0, what="a group's table")
        rc, checks = doctor(lab, denv)
        found = named(checks, "nft-marks")
        assert [c["status"] for c in found] == ["fail"], found
        assert found[0]["detail"].startswith("table ip vtmarker chain out (handle ")
        assert f"sets bit 31 of the {which} mark" in found[0]["detail"] and found[0]["fix"]
        assert rc == 1
    finally:
        holder.terminate()
        holder.wait(timeout=10)
        lab.run(lab.client, ["nft", "delete", "table", "ip", "vtmarker"])


# ----------------------------------------------------------------- rp_filter


def test_src_valid_mark_reset_under_an_active_group_fails(
        lab: Lab, denv: dict[str, str], group: subprocess.Popen[Any]) -> None:
    rc, checks = doctor(lab, denv, "tun0")
    assert rc == 0 and one(checks, "rp_filter")["status"] == "ok"  # via-tunnel set it
    lab.run(lab.client, ["sysctl", "-qw", "net.ipv4.conf.all.src_valid_mark=0"])
    try:
        rc, checks = doctor(lab, denv, "tun0")
        assert rc == 1
        for name in ("rp_filter", "iface:rp_filter"):
            c = one(checks, name)
            assert c["status"] == "fail" and "1 group(s) are active" in c["detail"]
            assert c["fix"] == "sysctl -w net.ipv4.conf.all.src_valid_mark=1"
    finally:
        lab.run(lab.client, ["sysctl", "-qw", "net.ipv4.conf.all.src_valid_mark=1"])


# ----------------------------------------------------------------- leftovers


def test_crashed_run_leaves_a_stale_record(lab: Lab, denv: dict[str, str],
                                           group: subprocess.Popen[Any]) -> None:
    rc, checks = doctor(lab, denv)
    assert rc == 0 and one(checks, "leftovers")["status"] == "ok"
    watcher = _groups(lab, denv)[0]["watcher"]
    assert watcher
    os.kill(watcher, signal.SIGKILL)
    group.kill()
    group.wait(timeout=10)
    wait_for(lambda: not _groups(lab, denv)[0]["members"], what="group empty")
    rc, checks = doctor(lab, denv)
    found = one(checks, "leftovers")
    assert rc == 0 and found["status"] == "warn" and "group tun0" in found["detail"]
    assert "crashed run" in found["detail"] and found["fix"] == "via-tunnel cleanup"
    via(lab, denv, "cleanup")
    _rc, checks = doctor(lab, denv)
    assert one(checks, "leftovers")["status"] == "ok"


def test_stray_objects_in_our_ranges(lab: Lab, denv: dict[str, str]) -> None:
    """A rule and a table route of ours with no record, our nft table with no group, a
    cgroup with no record: each a WARN whose fix is cleanup, which then finds them all."""
    table = str(OUR_TABLE_5)
    ip(lab, "rule", "add", "priority", str(bucket_priority(5)), "fwmark",
       f"0x{OUR_MARK_5:x}/0x{MARK_MASK:x}", "lookup", table)
    ip(lab, "route", "add", "unreachable", "default", "table", table)
    lab.run(lab.client, ["nft", "add", "table", "inet", "via_tunnel"])
    mount = cgroup2_mount()
    assert mount is not None
    ghost = os.path.join(mount, denv["VIA_TUNNEL_CGROUP"], "if-ghost")
    os.makedirs(ghost)
    try:
        rc, checks = doctor(lab, denv)
        assert rc == 0
        found = named(checks, "leftovers")
        assert all(c["status"] == "warn" and c["fix"] == "via-tunnel cleanup" for c in found)
        text = " | ".join(c["detail"] for c in found)
        assert "1 ip rule(s) (0x76740005)" in text and "routes in table(s) 0x76740005" in text
        assert "nft table inet via_tunnel exists but no group" in text
        assert f"cgroup {ghost} has no group record" in text
        assert named(checks, "ip-rules")[0]["status"] == "ok"  # ours, not a foreign rule
        done = via(lab, denv, "cleanup").stdout
        assert "stray" in done, done
        rc, checks = doctor(lab, denv)
        assert one(checks, "leftovers")["status"] == "ok"
    finally:
        lab.run(lab.client, ["ip", "rule", "del", "priority", str(bucket_priority(5)),
                             "lookup", table], check=False)
        lab.run(lab.client, ["ip", "route", "flush", "table", table], check=False)
        lab.run(lab.client, ["nft", "delete", "table", "inet", "via_tunnel"], check=False)
        if os.path.isdir(ghost):
            os.rmdir(ghost)


# ----------------------------------------------------------------- networkd


def test_networkd_foreign_rules_setting(lab: Lab, denv: dict[str, str]) -> None:
    conf = Path(denv["VIA_TUNNEL_NETWORKD_CONF_DIR"])
    (conf / "networkd.conf").write_text("[Network]\nManageForeignRoutingPolicyRules=yes\n")
    rc, checks = doctor(lab, denv)
    if one(checks, "networkd")["status"] == "ok":  # networkd is not running here: enable it
        wants = conf / "system" / "multi-user.target.wants"
        wants.mkdir(parents=True)
        (wants / "systemd-networkd.service").symlink_to("/lib/systemd/system/x.service")
    rc, checks = doctor(lab, denv)
    c = one(checks, "networkd")
    assert c["status"] == "warn" and "ManageForeignRoutingPolicyRules=yes" in c["detail"]
    assert "ManageForeignRoutingPolicyRules=no" in c["fix"] and rc == 0
    (conf / "networkd.conf.d").mkdir()
    (conf / "networkd.conf.d" / "via-tunnel.conf").write_text(
        "[Network]\nManageForeignRoutingPolicyRules=no\nManageForeignRoutes=no\n")
    rc, checks = doctor(lab, denv)
    c = one(checks, "networkd")
    assert c["status"] == "ok" and "leaves foreign rules and routes alone" in c["detail"]


# ----------------------------------------------------------------- the daemon


def test_daemon_socket(lab: Lab, denv: dict[str, str]) -> None:
    path = denv["VIA_TUNNEL_SOCKET"]
    rc, checks = doctor(lab, denv)
    c = one(checks, "daemon")
    assert c["status"] == "warn" and "no daemon socket" in c["detail"] and rc == 0

    daemon = via_popen(lab, denv, "daemon")
    try:
        wait_for(lambda: os.path.exists(path), what="daemon socket")
        rc, checks = doctor(lab, denv)
        assert one(checks, "daemon") == {
            "name": "daemon", "status": "ok", "fix": None,
            "detail": f"a daemon (version {__version__}) answers at {path}"}
    finally:
        daemon.terminate()
        _out, log = daemon.communicate(timeout=10)
    assert not os.path.exists(path)
    # The probe is a ping: the daemon neither decides nor logs a bad request for it.
    assert "bad request" not in log and "allow" not in log and "refuse" not in log, log

    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)  # bound, never listening: what a killed daemon leaves
    stale.close()
    try:
        rc, checks = doctor(lab, denv)
        c = one(checks, "daemon")
        assert c["status"] == "warn" and "nothing listens" in c["detail"]
    finally:
        os.unlink(path)

    Path(path).write_text("")
    try:
        rc, checks = doctor(lab, denv)
        assert one(checks, "daemon")["status"] == "fail" and rc == 1
    finally:
        os.unlink(path)


# ----------------------------------------------------------------- the probe itself


def test_kernel_probe_reports_what_the_kernel_refuses(lab: Lab, denv: dict[str, str]) -> None:
    """The probe's verdict comes from the kernel's answers: a message the kernel refuses
    (deleting a chain that does not exist) is a FAIL, and nothing is ever committed."""
    code = (
        "from via_tunnel.doctor.netfilter import PROBE_TABLE, run_probe\n"
        "t = f'add table inet {PROBE_TABLE}\\n'\n"
        "print(run_probe('nat', t).status)\n"
        "print(run_probe('nat', t + f'delete chain inet {PROBE_TABLE} nosuch\\n').status)\n"
    )
    out = lab.run(lab.client, [sys.executable, "-c", code], env=denv).stdout.split()
    assert out == ["ok", "fail"]
    assert lab.run(lab.client, ["nft", "list", "tables"]).stdout == ""


# ----------------------------------------------------------------- without root


@pytest.fixture(scope="module")
def readable_copy() -> Iterator[str]:
    """via_tunnel, pyroute2 and psutil copied where an unprivileged user can read them (the
    checkout or the venv may not be readable by others)."""
    import psutil
    import pyroute2

    with readable_package(*(os.path.dirname(m.__file__ or "") for m in (pyroute2, psutil))
                          ) as top:
        yield top


def test_without_root_checks_what_it_can(lab: Lab, denv: dict[str, str],
                                         readable_copy: str) -> None:
    if shutil.which("setpriv") is None or not os.path.exists("/usr/bin/python3"):
        pytest.fail("this test needs setpriv and /usr/bin/python3 (util-linux, python3)")
    # Straight to doctor.run (the typer CLI around it is exercised by the tests above, and
    # copying typer and its dependencies here would test nothing more).
    code = "from via_tunnel.doctor import run; raise SystemExit(run.run('tun0', json_out=True))"
    argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
            "/usr/bin/python3", "-c", code]
    r = lab.run(lab.client, argv, env={**denv, "PYTHONPATH": readable_copy}, check=False)
    assert r.stderr == ""
    data = json.loads(r.stdout)
    checks = data["checks"]
    assert r.returncode == 0 and data["ok"] is True, fails(checks)
    assert one(checks, "nft-binding")["status"] == "warn"
    assert one(checks, "kernel")["detail"] == "kernel features not probed (needs root)"
    assert "nft table not checked (needs root)" in one(checks, "leftovers")["detail"]
    # What needs no root still ran.
    assert one(checks, "ip-rules")["status"] == "ok"
    assert one(checks, "iface:up")["status"] == "ok"
    assert one(checks, "cgroup2")["status"] == "ok"
