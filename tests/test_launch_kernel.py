"""The core launcher on a real kernel, proven with real packets in a namespace lab.

Oracles are independent of our code: what the far end saw (the echo server answers with the
caller's source address), interface counters and tcpdump for where packets went, and
``ip -j`` / ``nft -j`` / the cgroup tree for "nothing left behind".
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import cgroup_leftovers, process_group, via, via_argv, via_popen, wait_for

from via_tunnel.lab.capture import Capture
from via_tunnel.lab.netlab import Lab

pytestmark = pytest.mark.kernel

LAN, VETH, TUN = Lab.CLIENT_LAN, Lab.CLIENT_VETH, Lab.CLIENT_TUN


@pytest.fixture
def clean(lab: Lab, vt_env: dict[str, str]):  # type: ignore[no-untyped-def]
    """Snapshot the client before a test and require the same state after it."""
    before = lab.snapshot(lab.client)
    yield
    wait_for(lambda: not cgroup_leftovers(vt_env), timeout=5, what="groups to be removed")
    after = lab.snapshot(lab.client)
    assert after == before
    assert not cgroup_leftovers(vt_env)
    groups_dir = os.path.join(vt_env["VIA_TUNNEL_STATE_DIR"], "groups")
    assert not [n for n in os.listdir(groups_dir) if n.endswith(".json")] \
        if os.path.isdir(groups_dir) else True


def test_far_end_sees_each_tunnel_address_and_plain_traffic_is_untouched(
        lab: Lab, vt_env: dict[str, str], clean: None) -> None:
    assert lab.run(lab.client, lab.fetch_argv()).stdout.strip() == LAN
    assert via(lab, vt_env, "vlan3", "--", *lab.fetch_argv()).stdout.strip() == VETH
    assert via(lab, vt_env, "tun0", "--", *lab.fetch_argv()).stdout.strip() == TUN


def test_two_interfaces_at_once_and_the_rest_of_the_machine_unaffected(
        lab: Lab, vt_env: dict[str, str], clean: None) -> None:
    # Both groups live while each fetches; a plain process in between still uses the LAN.
    script = "sleep 0.5; {fetch}; sleep 1"
    fetch = " ".join(lab.fetch_argv())
    a = via_popen(lab, vt_env, "vlan3", "--", "sh", "-c", script.format(fetch=fetch))
    b = via_popen(lab, vt_env, "tun0", "--", "sh", "-c", script.format(fetch=fetch))
    wait_for(lambda: len(status(lab, vt_env)) == 2, timeout=5, what="two groups")
    assert lab.run(lab.client, lab.fetch_argv()).stdout.strip() == LAN
    out_a, _ = a.communicate(timeout=15)
    out_b, _ = b.communicate(timeout=15)
    assert (a.returncode, out_a.strip()) == (0, VETH)
    assert (b.returncode, out_b.strip()) == (0, TUN)


def test_packets_cross_the_tunnel_not_the_lan(lab: Lab, vt_env: dict[str, str],
                                              clean: None) -> None:
    with Capture(lab, lab.client, "eth0", f"host {Lab.SERVER}") as lan, \
            Capture(lab, lab.client, "vlan3", f"host {Lab.SERVER}") as tunnel:
        assert via(lab, vt_env, "vlan3", "--", *lab.fetch_argv()).stdout.strip() == VETH
    leaked = lan.packets()
    assert leaked == [], leaked
    assert len(tunnel.packets()) >= 6  # handshake, request, answer, close: both ways


def test_ipv6_of_a_group_without_v6_never_leaves_and_fails_at_once(
        lab: Lab, vt_env: dict[str, str], clean: None) -> None:
    url = f"http://[{Lab.SERVER6}]/"
    assert lab.run(lab.client, ["curl", "-s", "--max-time", "5", url]).stdout.strip()
    with Capture(lab, lab.client, "eth0", "ip6 and not icmp6") as lan:
        t0 = time.monotonic()
        r = via(lab, vt_env, "tun0", "--", "curl", "-s", "--max-time", "5", url, check=False)
        elapsed = time.monotonic() - t0
    assert r.returncode != 0
    assert elapsed < 3, "blocked IPv6 must fail at once, not time out"
    assert lan.packets() == []


def test_ipv6_goes_through_a_tunnel_that_has_it(lab: Lab, vt_env: dict[str, str],
                                                clean: None) -> None:
    url = f"http://[{Lab.SERVER6}]/"
    assert lab.run(lab.client, ["curl", "-s", "--max-time", "5", url]).stdout.strip() \
        == Lab.CLIENT_LAN6
    with Capture(lab, lab.client, "eth0", "ip6 and not icmp6") as lan:
        r = via(lab, vt_env, "vlan3", "--", "curl", "-s", "--max-time", "5", url)
    assert r.stdout.strip() == Lab.CLIENT_VETH6
    assert lan.packets() == []
    r = via(lab, vt_env, "--ipv6", "block", "tun0", "--", "curl", "-s", "--max-time", "5", url,
            check=False)
    assert r.returncode != 0
    # While that group lingers (its watcher tears it down a few ms after curl exits), asking
    # for the opposite IPv6 routing is refused rather than silently joining it.
    holder = via_popen(lab, vt_env, "--ipv6", "block", "tun0", "--", "sleep", "30")
    try:
        wait_for(lambda: holder.pid in group_members(lab, vt_env, "tun0"),
                 what="the holder in the tun0 group")
        r = via(lab, vt_env, "--ipv6", "tunnel", "tun0", "--", "true", check=False)
        assert r.returncode == 125 and "already in use with IPv6 blocked" in r.stderr
    finally:
        holder.terminate()
        holder.wait()
    wait_for(lambda: not cgroup_leftovers(vt_env), what="the tun0 group to go")
    r = via(lab, vt_env, "--ipv6", "tunnel", "tun0", "--", "true", check=False)
    assert r.returncode == 125 and "no global IPv6" in r.stderr


def test_loopback_keeps_working_for_the_group(lab: Lab, vt_env: dict[str, str],
                                              clean: None) -> None:
    server = lab.popen(lab.client, ["socat", "TCP-LISTEN:8099,bind=127.0.0.1,reuseaddr",
                                    "SYSTEM:echo loop"], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: lab.run(lab.client, ["ss", "-ltnH", "sport", "= :8099"]).stdout,
                 timeout=5, what="listener")
        r = via(lab, vt_env, "vlan3", "--", "socat", "-T2", "-", "TCP:127.0.0.1:8099")
        assert r.stdout.strip() == "loop"
    finally:
        server.kill()
        server.wait()


def test_udp_goes_through_the_tunnel_too(lab: Lab, vt_env: dict[str, str], clean: None) -> None:
    argv = ["socat", "-T2", "-", f"UDP:{Lab.SERVER}:7"]
    r = via(lab, vt_env, "tun0", "--", *argv, input="hi\n")
    assert r.stdout.strip() == TUN


def test_exit_status_signals_pid_and_stdio_are_cmds_own(lab: Lab, vt_env: dict[str, str],
                                                         clean: None) -> None:
    assert via(lab, vt_env, "vlan3", "--", "sh", "-c", "exit 7", check=False).returncode == 7
    r = via(lab, vt_env, "vlan3", "--", "sh", "-c", "cat; echo err >&2", input="data\n")
    assert (r.stdout, r.stderr) == ("data\n", "err\n")
    p = via_popen(lab, vt_env, "vlan3", "--", "sh", "-c", "echo $$; exec sleep 30")
    assert p.stdout is not None
    assert int(p.stdout.readline()) == p.pid  # exec'd in place: the PID we started
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=5) == -signal.SIGTERM


def test_cmd_not_found_or_not_executable_change_nothing(lab: Lab, vt_env: dict[str, str],
                                                        clean: None) -> None:
    r = via(lab, vt_env, "vlan3", "--", "no-such-command-xyz", check=False)
    assert r.returncode == 127 and "not found" in r.stderr
    r = via(lab, vt_env, "vlan3", "--", "/etc/hostname", check=False)
    assert r.returncode == 126
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["nosuch0", "--", "true"], 125, "does not exist"),
        (["bad/name", "--", "true"], 2, "forbids"),
        (["x" * 16, "--", "true"], 2, "longer than 15"),
        (["--bogus", "vlan3", "--", "true"], 2, "unknown option"),
        (["vlan3"], 2, "missing command"),
        (["--gateway", "198.51.100.77", "vlan3", "--", "true"], 125, "not on a subnet"),
        (["--gateway", "nonsense", "vlan3", "--", "true"], 125, "not an IPv4"),
        (["eth1dead", "--", "true"], 125, "down"),
        (["vnohop", "--", "true"], 125, "--gateway"),
    ],
)
def test_bad_input_is_one_line_and_changes_nothing(
        lab: Lab, vt_env: dict[str, str], clean: None,
        args: list[str], code: int, message: str) -> None:
    r = via(lab, vt_env, *args, check=False)
    assert r.returncode == code, r.stderr
    assert message in r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) <= 2  # the message (+ usage line)


def test_short_run_exiting_does_not_take_the_long_runs_routing(
        lab: Lab, vt_env: dict[str, str], clean: None) -> None:
    fetch = " ".join(lab.fetch_argv())
    long = via_popen(lab, vt_env, "vlan3", "--", "sh", "-c", f"sleep 1.5; {fetch}")
    wait_for(lambda: len(status(lab, vt_env)) == 1, timeout=5, what="group")
    assert via(lab, vt_env, "vlan3", "--", *lab.fetch_argv()).stdout.strip() == VETH
    time.sleep(0.2)
    assert len(status(lab, vt_env)) == 1  # the long run still holds the group
    out, _ = long.communicate(timeout=15)
    assert out.strip() == VETH


def test_backgrounded_grandchild_keeps_the_group_alive(lab: Lab, vt_env: dict[str, str],
                                                       clean: None, tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "answer"
    fetch = " ".join(lab.fetch_argv())
    r = via(lab, vt_env, "vlan3", "--", "sh", "-c",
            f"setsid sh -c 'sleep 1; {fetch} > {out}' </dev/null >/dev/null 2>&1 &")
    assert r.returncode == 0
    assert len(status(lab, vt_env)) == 1  # the launcher exited, the grandchild did not
    wait_for(lambda: out.exists() and out.read_text().strip(), timeout=10, what="answer")
    assert out.read_text().strip() == VETH


def test_twenty_concurrent_launches(lab: Lab, vt_env: dict[str, str], clean: None) -> None:
    procs = [via_popen(lab, vt_env, "vlan3" if i % 2 else "tun0", "--", *lab.fetch_argv())
             for i in range(20)]
    answers = [(p.communicate(timeout=30)[0].strip(), p.returncode) for p in procs]
    assert answers == [((VETH if i % 2 else TUN), 0) for i in range(20)]


def test_group_survives_the_terminal_closing(lab: Lab, vt_env: dict[str, str],
                                             clean: None) -> None:
    # A new session stands in for a terminal; SIGHUP to it is what closing the terminal does.
    # In a terminal SIGHUP is not ignored; the test's own environment may ignore it (a run
    # under nohup), and CMD keeps what it inherits (exec in place): start from the default.
    p = subprocess.Popen(via_argv(lab, "vlan3", "--", "sh", "-c", "sleep 30"),
                         env={**os.environ, **vt_env}, start_new_session=True,
                         preexec_fn=_hangup_default,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: status(lab, vt_env) and status(lab, vt_env)[0]["members"], timeout=5,
             what="group")
    watcher = status(lab, vt_env)[0]["watcher"]
    assert watcher
    os.killpg(p.pid, signal.SIGHUP)
    try:
        rc = p.wait(timeout=5)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"SIGHUP did not end the session:\n{process_group(p.pid)}") from None
    assert rc == -signal.SIGHUP
    # The watcher was in no way part of that session: it removes the group.
    wait_for(lambda: not status(lab, vt_env), timeout=5, what="teardown by the watcher")


def _hangup_default() -> None:
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def test_status_lists_groups_members_and_since(lab: Lab, vt_env: dict[str, str],
                                               clean: None) -> None:
    p = via_popen(lab, vt_env, "tun0", "--", "sleep", "30")
    wait_for(lambda: status(lab, vt_env), timeout=5, what="group")
    (g,) = status(lab, vt_env)
    assert g["interface"] == "tun0"
    assert [m["pid"] for m in g["members"]] == [p.pid]
    assert g["members"][0]["command"] == "sleep 30"
    assert abs(g["since"] - time.time()) < 30
    text = via(lab, vt_env, "status").stdout
    assert "tun0" in text and str(p.pid) in text
    p.terminate()
    p.wait(timeout=5)


def test_cleanup_recovers_from_a_dead_watcher_and_spares_live_groups(
        lab: Lab, vt_env: dict[str, str], clean: None) -> None:
    p = via_popen(lab, vt_env, "vlan3", "--", "sleep", "30")
    wait_for(lambda: status(lab, vt_env) and status(lab, vt_env)[0]["watcher"], timeout=5,
             what="watcher")
    os.kill(status(lab, vt_env)[0]["watcher"], signal.SIGKILL)
    wait_for(lambda: not status(lab, vt_env)[0]["watcher"], timeout=5, what="watcher death")
    assert via(lab, vt_env, "cleanup").returncode == 0
    assert len(status(lab, vt_env)) == 1  # members left: untouched
    assert via(lab, vt_env, "vlan3", "--", *lab.fetch_argv()).stdout.strip() == VETH
    p.terminate()
    p.wait(timeout=5)
    # The launch above started a new watcher (the old one was dead), so it cleans up;
    # kill that one too and prove `cleanup` removes an orphaned group by itself.
    p2 = via_popen(lab, vt_env, "vlan3", "--", "sleep", "30")
    wait_for(lambda: status(lab, vt_env) and status(lab, vt_env)[0]["watcher"], timeout=5,
             what="watcher")
    os.kill(status(lab, vt_env)[0]["watcher"], signal.SIGKILL)
    time.sleep(0.2)
    p2.terminate()
    p2.wait(timeout=5)
    time.sleep(0.2)
    assert len(status(lab, vt_env)) == 1  # nobody removed it...
    r = via(lab, vt_env, "cleanup")
    assert "removed group vlan3" in r.stdout  # ...until cleanup did


def test_one_watcher_serves_every_group_and_leaves_with_the_last(
        lab: Lab, vt_env: dict[str, str], clean: None) -> None:
    """Three groups, one watcher process (it takes each new group over, woken by the cold
    launch); each group goes when its member exits, the watcher with the last one, and its
    files with it."""
    state_dir = vt_env["VIA_TUNNEL_STATE_DIR"]
    holders = [via_popen(lab, vt_env, iface, "--", "sleep", "30")
               for iface in ("vlan3", "tun0", "eth0")]
    try:
        groups = wait_for(lambda: len(status(lab, vt_env)) == 3 and status(lab, vt_env),
                          timeout=10, what="three groups")
        watchers = {g["watcher"] for g in groups}
        assert len(watchers) == 1 and None not in watchers, groups
        (pid,) = watchers
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            assert b"via_tunnel" in f.read()
        for g in groups:  # it is in none of them
            assert str(pid) not in Path(g["cgroup"], "cgroup.procs").read_text().split()
        for left, holder in zip((2, 1, 0), holders, strict=True):
            holder.terminate()
            holder.wait(timeout=5)
            wait_for(lambda n=left: len(status(lab, vt_env)) == n, timeout=5,  # type: ignore[misc]
                     what=f"{left} group(s) left")
            assert all(g["watcher"] == pid for g in status(lab, vt_env))
        wait_for(lambda: not os.path.exists(f"/proc/{pid}") or _zombie(pid), timeout=5,
                 what="the watcher to leave")
        assert not os.path.exists(os.path.join(state_dir, "watch.lock"))
        assert not os.path.exists(os.path.join(state_dir, "groups", ".wake"))
    finally:
        for holder in holders:
            holder.kill()
            holder.wait()


def test_a_group_set_up_while_the_watcher_runs_is_not_taken_for_leftovers(
        lab: Lab, vt_env: dict[str, str], clean: None) -> None:
    """A cold launch wakes the live watcher, which then sweeps what dead launches left.
    The new group is not watched yet at that moment, but it is recorded: its cgroup is not
    a leftover. (Taken for one, the sweep held the global lock until the group emptied, up
    to 2 s, stalling every launch, then removed its cgroup under its record, and the
    group's teardown had to rebuild the other groups' cgroup map: `nft monitor` saw the
    other group's element deleted and added back.)"""
    monitor = lab.popen(lab.client, ["nft", "monitor", "elements"], stdout=subprocess.PIPE,
                        text=True)
    holder = None
    try:
        seen: list[str] = []
        assert monitor.stdout is not None
        holder = via_popen(lab, vt_env, "eth0", "--", "sleep", "30")
        # The monitor listens once it has seen eth0's group come (its elements added).
        while not any(ln.startswith("add element") and '"eth0"' in ln for ln in seen):
            assert select.select([monitor.stdout], [], [], 10)[0], f"nft monitor: {seen}"
            seen.append(monitor.stdout.readline())
        (first,) = wait_for(lambda: status(lab, vt_env), timeout=10, what="eth0's group")
        via(lab, vt_env, "vlan3", "--", "true")
        wait_for(lambda: [g["interface"] for g in status(lab, vt_env)] == ["eth0"],
                 timeout=5, what="vlan3's group to go")
        monitor.terminate()
        lines = monitor.communicate(timeout=5)[0].splitlines()
        deleted = [ln for ln in lines if ln.startswith("delete element")]
        assert any('"vlan3"' in ln for ln in deleted), lines
        assert not [ln for ln in deleted if first["mark"] in ln], deleted
    finally:
        if monitor.poll() is None:
            monitor.kill()
            monitor.wait()
        if holder is not None:
            holder.terminate()
            holder.wait(timeout=5)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def status(lab: Lab, env: dict[str, str]) -> list[dict]:  # type: ignore[type-arg]
    return list(json.loads(via(lab, env, "status", "--json").stdout)["groups"])


def test_a_name_with_quotes_and_semicolons_is_data_not_nft_syntax(
        lab: Lab, vt_env: dict[str, str], clean: None) -> None:
    """Linux allows `"` and `;` in interface names; nft text would break (or worse) if a name
    were spliced into it. It travels as JSON data, so this just works."""
    name, peer = 'q"t;1', "qpeer"
    lab.run(lab.client, ["ip", "link", "add", name, "type", "veth", "peer", "name", peer,
                         "netns", lab.gateway])
    try:
        lab.run(lab.client, ["ip", "addr", "add", "192.0.2.98/30", "dev", name])
        lab.run(lab.client, ["ip", "link", "set", name, "up"])
        lab.run(lab.gateway, ["ip", "addr", "add", "192.0.2.97/30", "dev", peer])
        lab.run(lab.gateway, ["ip", "link", "set", peer, "up"])
        lab.run(lab.inet, ["ip", "route", "add", "192.0.2.96/30", "via", Lab.GW_WAN])
        r = via(lab, vt_env, "--gateway", "192.0.2.97", name, "--", *lab.fetch_argv())
        assert r.stdout.strip() == "192.0.2.98"
    finally:
        lab.run(lab.inet, ["ip", "route", "del", "192.0.2.96/30"], check=False)
        wait_for(lambda: not cgroup_leftovers(vt_env), timeout=5, what="teardown")
        lab.run(lab.client, ["ip", "link", "del", name], check=False)


HALF_BUILT = """
import os, sys, time
from via_tunnel.kernel import cgroup
from via_tunnel.group import lifecycle
from via_tunnel.group import state
from via_tunnel.core.settings import Settings, mark_for_slot, table_for_slot
settings = Settings.from_env()
mount = cgroup.cgroup2_mount()
path = lifecycle.group_path(settings, mount, "vlan3")
os.makedirs(path)
state.save(settings, state.GroupRecord(
    iface="vlan3", slot=1, mark=mark_for_slot(1), table=table_for_slot(1),
    level=cgroup.level_of(path, mount), cgroup=path, cgroup_nft_path=cgroup.nft_path(path),
    created=time.time()))  # the intent log of a setup that died before routes and nft
"""


def test_a_half_built_group_left_by_a_crash_is_rebuilt_not_joined(
        lab: Lab, vt_env: dict[str, str], clean: None) -> None:
    lab.run(lab.client, [sys.executable, "-c", HALF_BUILT], env=vt_env)
    with Capture(lab, lab.client, "eth0", f"host {Lab.SERVER}") as lan:
        assert via(lab, vt_env, "vlan3", "--", *lab.fetch_argv()).stdout.strip() == VETH
    assert lan.packets() == []


def group_members(lab: Lab, env: dict[str, str], iface: str) -> list[int]:
    groups = json.loads(via(lab, env, "status", "--json").stdout)["groups"]
    return [m["pid"] for g in groups if g["interface"] == iface for m in g["members"]]



# What a warm launch (the group exists) imports, besides what `python -c pass` does: the
# contract of the hot path (tests/test_layers.py keeps the layers; this keeps the weight).
WARM_LAUNCH_MODULES = [
    "via_tunnel", "via_tunnel.cli", "via_tunnel.core", "via_tunnel.core.errors",
    "via_tunnel.cli.main", "via_tunnel.core.names", "via_tunnel.core.wire",
    "via_tunnel.core.launch_form", "via_tunnel.launch", "via_tunnel.kernel",
    "via_tunnel.kernel.execs", "via_tunnel.kernel.ifflags", "via_tunnel.launch.launcher",
    "via_tunnel.core.settings", "via_tunnel.group", "via_tunnel.core.fastjson",
    "via_tunnel.kernel.files",
    "via_tunnel.group.state", "via_tunnel.launch.privdrop", "via_tunnel.kernel.cgroup",
    "via_tunnel.kernel.resolvers", "via_tunnel.kernel.instances",
    "via_tunnel.kernel.inherited",
]
# Standard modules a warm launch may not pull in (each costs more than the launch itself,
# or means a subcommand's or a cold launch's machinery leaked onto the hot path). The record
# is read with core/fastjson.py: json would bring re and enum (~10 ms).
NOT_ON_THE_WARM_PATH = {"typing", "subprocess", "dataclasses", "socket", "signal", "asyncio",
                        "json", "re", "enum",
                        "threading", "tomllib", "ipaddress", "pyroute2", "nftables", "typer",
                        "psutil", "logging", "argparse", "contextlib", "collections"}


CONSOLE_SCRIPT = "import sys; from via_tunnel.cli.main import main; sys.exit(main())"


def _imported(lab: Lab, argv: list[str], env: dict[str, str]) -> list[str]:
    i = argv.index(sys.executable) + 1
    argv = [*argv[:i], "-X", "importtime", *argv[i:]]
    r = lab.run(lab.client, argv, env=env, check=False)
    assert r.returncode == 0, r.stderr
    return [ln.rsplit("|", 1)[1].strip() for ln in r.stderr.splitlines()
            if ln.startswith("import time:") and "|" in ln]


def test_a_warm_launch_imports_only_the_hot_path(lab: Lab, vt_env: dict[str, str],
                                                 clean: None) -> None:
    holder = via_popen(lab, vt_env, "vlan3", "--", "sleep", "30")
    try:
        wait_for(lambda: status(lab, vt_env), timeout=5, what="group")
        base = set(_imported(lab, [*lab.nsenter(lab.client), sys.executable, "-c", "pass"],
                             vt_env))
        # As the console script runs it (`python -m` would add runpy's imports: contextlib)
        mods = [m for m in _imported(lab, [*lab.nsenter(lab.client), sys.executable, "-c",
                                           CONSOLE_SCRIPT, "vlan3", "--", "true"], vt_env)
                if m not in base]
        assert [m for m in mods if m.startswith("via_tunnel")] == WARM_LAUNCH_MODULES
        assert not NOT_ON_THE_WARM_PATH & {m.split(".")[0] for m in mods}, \
            sorted(NOT_ON_THE_WARM_PATH & {m.split(".")[0] for m in mods})
    finally:
        holder.terminate()
        holder.wait(timeout=5)


# What a cold launch may not import: pyroute2's message classes alone cost ~28 ms (rtnl.py
# builds requests and rtmsg.py decodes answers with struct), the others far more.
NOT_ON_THE_COLD_PATH = {"pyroute2", "asyncio", "typer", "psutil", "ssl", "multiprocessing"}


def test_a_cold_launch_imports_no_pyroute2(lab: Lab, vt_env: dict[str, str],
                                           clean: None) -> None:
    mods = _imported(lab, [*lab.nsenter(lab.client), sys.executable, "-c", CONSOLE_SCRIPT,
                           "vlan3", "--", "true"], vt_env)
    assert "via_tunnel.kernel.rtnl" in mods, "not a cold launch"
    assert not NOT_ON_THE_COLD_PATH & {m.split(".")[0] for m in mods}, \
        sorted(NOT_ON_THE_COLD_PATH & {m.split(".")[0] for m in mods})


# What `status` may not import, groups or not: it is run by prompts and scripts, often.
NOT_IN_STATUS = {"pyroute2", "psutil", "typer", "asyncio", "dataclasses",
                 "via_tunnel.core.plan", "via_tunnel.group.lifecycle"}


def test_status_imports_no_planner_psutil_or_pyroute2(lab: Lab, vt_env: dict[str, str],
                                                      clean: None) -> None:
    holder = via_popen(lab, vt_env, "vlan3", "--", "sleep", "30")
    try:
        wait_for(lambda: status(lab, vt_env), timeout=5, what="group")
        mods = _imported(lab, [*lab.nsenter(lab.client), sys.executable, "-c", CONSOLE_SCRIPT,
                               "status", "--json"], vt_env)
        assert "via_tunnel.kernel.netlink" in mods, "status read no link: not with a group"
        found = {m for m in mods if m in NOT_IN_STATUS or m.split(".")[0] in NOT_IN_STATUS}
        assert not found, sorted(found)
    finally:
        holder.terminate()
        holder.wait(timeout=5)


def test_a_missing_nft_binding_changes_nothing(lab: Lab, vt_env: dict[str, str],
                                              clean: None, tmp_path: Path) -> None:
    """Every prerequisite is checked before the first change: no rule, route, cgroup or
    record is left by a launch that cannot complete."""
    (tmp_path / "nftables.py").write_text("raise ImportError('no binding (test)')\n")
    env = {**vt_env, "PYTHONPATH": f"{tmp_path}:{vt_env['PYTHONPATH']}"}
    r = via(lab, env, "vlan3", "--", "true", check=False)
    assert r.returncode == 125 and "libnftables Python binding is missing" in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1
    groups_dir = os.path.join(vt_env["VIA_TUNNEL_STATE_DIR"], "groups")
    # The watcher started before setup finds no record and leaves, its files and all.
    wait_for(lambda: not os.path.isdir(groups_dir) or not os.listdir(groups_dir), timeout=5,
             what="an empty state directory")


# One datagram to the UDP echo from local port PORT; prints the source the server saw.
UDP_FROM_PORT = f"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.settimeout(3)
s.sendto(b"x", ("{Lab.SERVER}", {Lab.UDP_PORT}))
print(s.recv(100).decode().strip())
"""


def test_a_flow_of_an_ended_group_is_not_inherited_by_a_program_in_no_group(
        lab: Lab, vt_env: dict[str, str], clean: None) -> None:
    """A group's UDP flow outlives the group in conntrack (30-120 s). A program in no group
    that gets the same port and talks to the same server must not be taken for that flow
    and carry its mark: here the mark belongs to the next group on vlan3 by then, which
    would route the program through vlan3 (the crash test saw it: its outside prober
    answered from the tunnel's address)."""
    port = "40999"
    udp = [sys.executable, "-c", UDP_FROM_PORT, port]
    assert via(lab, vt_env, "vlan3", "--", *udp).stdout.strip() == Lab.CLIENT_VETH
    wait_for(lambda: not status(lab, vt_env), timeout=5, what="the group to end")
    holder = via_popen(lab, vt_env, "vlan3", "--", "sleep", "30")  # the same slot, mark
    try:
        wait_for(lambda: status(lab, vt_env), timeout=5, what="the next group")
        out = lab.run(lab.client, udp).stdout.strip()
        assert out == Lab.CLIENT_LAN, f"a program in no group left as {out}"
    finally:
        holder.terminate()
        holder.wait(timeout=5)


def test_a_run_with_other_options_replaces_a_group_whose_last_member_just_exited(
        lab: Lab, vt_env: dict[str, str], clean: None) -> None:
    """`via-tunnel vlan3 -- a; via-tunnel --ipv6 block vlan3 -- b`: the first group's last
    member is gone but its watcher has not torn it down yet (held still here: SIGSTOP).
    The second run gets a group with its own options, not "already in use"."""
    holder = via_popen(lab, vt_env, "vlan3", "--", "sleep", "30")
    groups = wait_for(lambda: status(lab, vt_env), timeout=5, what="group")
    watcher = int(groups[0]["watcher"])
    os.kill(watcher, signal.SIGSTOP)
    try:
        holder.kill()
        holder.wait(timeout=5)
        r = via(lab, vt_env, "--ipv6", "block", "vlan3", "--", "true", check=False)
        assert r.returncode == 0, r.stderr
    finally:
        os.kill(watcher, signal.SIGCONT)
    wait_for(lambda: not status(lab, vt_env), timeout=5, what="the group to end")
