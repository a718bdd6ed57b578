"""`via-tunnel trace`: what it prints is checked against independent observers (what the far
end saw, `ip -j addr`, the kill switch's own nft counter), and what it adds to the kernel is
gone after every kind of exit (`nft -j list ruleset`, the namespace's NFLOG listeners)."""

from __future__ import annotations

import contextlib
import json
import queue
import re
import signal
import subprocess
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from helpers import CaptureElsewhere, via, via_popen, wait_for

from via_tunnel.lab.netlab import Lab
from via_tunnel.lab.programs import DNS_ANSWER

pytestmark = pytest.mark.kernel

SERVER = re.escape(Lab.SERVER)
_running: list[Trace] = []


@pytest.fixture(autouse=True)
def _no_trace_outlives_its_test() -> Iterator[None]:
    """A failed assertion must not leave a trace running into the next test."""
    yield
    while _running:
        _running.pop().stop(signal.SIGKILL)


class Trace:
    """A running `via-tunnel trace ARGS` in the client namespace, its output read in threads."""

    def __init__(self, lab: Lab, env: dict[str, str], *args: str) -> None:
        self.proc = via_popen(lab, env, "trace", *args)
        _running.append(self)
        self.out: queue.Queue[str] = queue.Queue()
        self.err: list[str] = []
        self.seen: list[str] = []
        started = threading.Event()

        def pump(stream: Any, sink: Any) -> None:
            for line in stream:
                sink(line.rstrip("\n"))
                if "via-tunnel: tracing" in line:
                    started.set()
            started.set()  # EOF: it ended before tracing (the test says why)

        assert self.proc.stdout is not None and self.proc.stderr is not None
        for stream, sink in ((self.proc.stdout, self.out.put), (self.proc.stderr,
                                                                  self.err.append)):
            threading.Thread(target=pump, args=(stream, sink), daemon=True).start()
        assert started.wait(10) and self.proc.poll() is None, f"trace did not start: {self.err}"

    def expect(self, pattern: str, timeout: float = 5) -> re.Match[str]:
        """The first output line (from now on) that matches ``pattern``; fail after
        ``timeout`` seconds, showing what was printed."""
        rx = re.compile(pattern)
        while True:
            try:
                line = self.out.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"no line like {pattern!r}; printed: {self.seen}, "
                                     f"stderr: {self.err}") from None
            self.seen.append(line)
            match = rx.search(line)
            if match:
                return match

    def expect_err(self, text: str, timeout: float = 5) -> None:
        """Wait until trace has said ``text`` on stderr."""
        wait_for(lambda: any(text in line for line in self.err), timeout=timeout,
                 what=f"trace to say {text!r} (it said {self.err})")

    def stop(self, sig: int = signal.SIGINT) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=10)


def trace_tables(lab: Lab) -> list[str]:
    ruleset = json.loads(lab.run(lab.client, ["nft", "-j", "list", "ruleset"]).stdout)
    return [o["table"]["name"] for o in ruleset["nftables"]
            if "table" in o and o["table"]["name"].startswith("via_tunnel_trace")]


def unrouted_chain(lab: Lab) -> bool:
    """Whether trace's output chain for a group without route exists (a hook on every
    packet the host sends: it must be there only while the group's table has no route)."""
    return lab.run(lab.client, ["nft", "list", "chain", "inet", "via_tunnel_trace",
                                "unrouted"], check=False).returncode == 0


def nflog_listeners(lab: Lab) -> str:
    """The NFLOG groups bound in the client namespace (the kernel's own list)."""
    return lab.run(lab.client, ["cat", "/proc/net/netfilter/nfnetlink_log"]).stdout.strip()


def kill_switch_drops(lab: Lab) -> int:
    """Packets counted by the kill switch's drop rule in via-tunnel's postrouting chain."""
    out = lab.run(lab.client, ["nft", "-j", "list", "chain", "inet", "via_tunnel",
                               "postrouting"]).stdout
    for obj in json.loads(out)["nftables"]:
        exprs = obj.get("rule", {}).get("expr", [])
        if any("drop" in e for e in exprs) and not any("match" in e for e in exprs):
            return sum(e["counter"]["packets"] for e in exprs if "counter" in e)
    raise AssertionError("no kill-switch drop rule found")


def addresses(lab: Lab, dev: str | None = None) -> set[str]:
    args = ["addr", "show"] + (["dev", dev] if dev else [])
    return {a["local"] for link in lab.ip_json(lab.client, *args)
            for a in link.get("addr_info", [])}


@contextlib.contextmanager
def group_running(lab: Lab, env: dict[str, str], iface: str,
                  *options: str) -> Iterator[list[subprocess.Popen[Any]]]:
    """An active group of ``iface`` (a sleeping member, launched with ``options``). Yields
    its members, to which a test adds those it starts; afterwards they are killed and the
    group and everything of trace is gone again."""
    before = lab.snapshot(lab.client)["nft"]
    members = [via_popen(lab, env, *options, iface, "--", "sleep", "120")]
    try:
        wait_for(lambda: iface in via(lab, env, "status").stdout, what=f"{iface} group")
        yield members
    finally:
        for proc in members:
            proc.kill()
            proc.wait()
    wait_for(lambda: lab.snapshot(lab.client)["nft"] == before, timeout=5,
             what="nft ruleset as before")
    assert trace_tables(lab) == [] and nflog_listeners(lab) == ""


@pytest.fixture
def holder(lab: Lab, vt_env: dict[str, str]) -> Iterator[subprocess.Popen[Any]]:
    """An active tun0 group (see group_running)."""
    with group_running(lab, vt_env, "tun0") as members:
        yield members[0]


def test_new_connection_names_program_destination_interface_and_source(
        lab: Lab, vt_env: dict[str, str], holder: subprocess.Popen[Any]) -> None:
    trace = Trace(lab, vt_env, "tun0")
    try:
        client = via_popen(lab, vt_env, "tun0", "--", "socat", "-t", "0.2", "-",
                           f"TCP:{Lab.SERVER}:{Lab.HTTP_PORT}", stdin=subprocess.PIPE)
        assert client.stdin is not None and client.stdout is not None
        client.stdin.write("GET / HTTP/1.0\r\n\r\n")
        client.stdin.flush()
        far_end_saw = client.stdout.read().strip().splitlines()[-1]
        client.stdin.close()
        assert client.wait(timeout=5) == 0
        line = trace.expect(rf"  pid {client.pid} socat  tcp (\S+):(\d+) -> {SERVER}:80  "
                            rf"via (\S+) from (\S+)$")
        local, _port, via_dev, source = line.groups()
        assert via_dev == "tun0"
        assert source == far_end_saw == Lab.CLIENT_TUN
        assert source in addresses(lab, "tun0")
        assert local in addresses(lab)  # the program's own address, before masquerade
    finally:
        assert trace.stop() == 0
    assert trace_tables(lab) == []


def test_kill_switch_drop_is_shown(lab: Lab, vt_env: dict[str, str],
                                   holder: subprocess.Popen[Any]) -> None:
    """A route that sends the server's traffic around the tunnel (as a careless neighbour
    might add to the group's table) makes the kill switch drop the group's packets to it."""
    trace = Trace(lab, vt_env, "tun0")
    (group,) = json.loads(via(lab, vt_env, "status", "--json").stdout)["groups"]
    route = [f"{Lab.SERVER}/32", "dev", "eth0", "table", str(group["table"])]
    lab.run(lab.client, ["ip", "route", "add", *route])
    try:
        drops = kill_switch_drops(lab)
        with CaptureElsewhere(lab, "tun0", f"host {Lab.SERVER}") as elsewhere:
            # TCP: connect() keeps retrying, so the program is still there to be named. (A
            # UDP sendto fails at once with EPERM; a program that exits on it can be gone
            # before trace looks, and is shown as "pid ?".)
            sender = via_popen(lab, vt_env, "tun0", "--", *lab.fetch_argv(timeout=1.5))
            line = trace.expect(rf"  DROPPED by kill switch  pid {sender.pid} curl  "
                                rf"tcp (\S+):\d+ -> {SERVER}:80  \(would leave by (\S+)\)$")
            assert sender.wait(timeout=10) != 0  # no answer: nothing got through
        assert line.group(2) == "eth0"
        assert kill_switch_drops(lab) > drops  # the kill switch itself counted it
        assert elsewhere.packets() == {}
    finally:
        lab.run(lab.client, ["ip", "route", "del", *route])
        assert trace.stop() == 0
    assert trace_tables(lab) == []


def test_sigterm_and_sigkill_leave_nothing_and_a_stale_table_is_swept(
        lab: Lab, vt_env: dict[str, str], holder: subprocess.Popen[Any]) -> None:
    trace = Trace(lab, vt_env, "tun0")
    assert trace_tables(lab) == ["via_tunnel_trace"] and nflog_listeners(lab) != ""
    second = via(lab, vt_env, "trace", "tun0", check=False)
    assert second.returncode == 125 and "another via-tunnel trace" in second.stderr
    assert trace.stop(signal.SIGTERM) == 0
    assert trace_tables(lab) == [] and nflog_listeners(lab) == ""

    trace = Trace(lab, vt_env, "tun0")
    trace.stop(signal.SIGKILL)  # no cleanup of its own: the kernel removes the owned table
    wait_for(lambda: trace_tables(lab) == [], what="owned table removed with its owner")

    # A table nobody owns (as an older trace could leave) is swept at the next start.
    lab.run(lab.client, ["nft", "add", "table", "inet", "via_tunnel_trace"])
    trace = Trace(lab, vt_env, "tun0")
    assert trace.stop() == 0
    assert trace_tables(lab) == []


def test_trace_with_cmd_sees_its_first_connection_and_returns_its_status(
        lab: Lab, vt_env: dict[str, str]) -> None:
    before = lab.snapshot(lab.client)["nft"]
    r = via(lab, vt_env, "trace", "tun0", "--", *lab.fetch_argv())
    lines = r.stdout.splitlines()
    assert Lab.CLIENT_TUN in lines  # CMD's own output: what the far end saw
    # No group existed: CMD's very first packet is already traced.
    assert any(re.search(rf"  tcp \S+ -> {SERVER}:80  via tun0 from "
                         rf"{re.escape(Lab.CLIENT_TUN)}$", ln) for ln in lines), r.stdout
    assert via(lab, vt_env, "trace", "tun0", "--", "sh", "-c", "exit 7",
               check=False).returncode == 7
    r = via(lab, vt_env, "trace", "tun0", "--", "no-such-program-x", check=False)
    assert r.returncode == 127 and "command not found" in r.stderr
    wait_for(lambda: lab.snapshot(lab.client)["nft"] == before, timeout=5,
             what="nft ruleset as before")
    assert nflog_listeners(lab) == ""


def test_clear_errors(lab: Lab, vt_env: dict[str, str]) -> None:
    r = via(lab, vt_env, "trace", "nosuch0", check=False)
    assert (r.returncode, r.stderr) == (125, "via-tunnel: no such interface nosuch0\n")
    r = via(lab, vt_env, "trace", "vlan3", check=False)
    assert r.returncode == 125
    assert r.stderr.startswith("via-tunnel: no active group for vlan3; start one with")
    assert "-- CMD" in r.stderr and "Traceback" not in r.stderr
    r = lab.run(lab.client, ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                             *via_argv_tail(), "trace", "tun0"], env=vt_env, check=False)
    assert r.returncode == 125 and "trace needs root" in r.stderr
    assert trace_tables(lab) == []


def via_argv_tail() -> list[str]:
    import sys

    return [sys.executable, "-m", "via_tunnel"]


def test_ipv6_connection_through_vlan3(lab: Lab, vt_env: dict[str, str]) -> None:
    r = via(lab, vt_env, "trace", "vlan3", "--", *lab.fetch_argv(ipv6=True))
    lines = r.stdout.splitlines()
    assert Lab.CLIENT_VETH6 in lines  # what the far end saw
    server6, src6 = re.escape(Lab.SERVER6), re.escape(Lab.CLIENT_VETH6)
    assert any(re.search(rf"  tcp \[\S+\]:\d+ -> \[{server6}\]:80  via vlan3 from {src6}$", ln)
               for ln in lines), r.stdout


def waiting_fetch(lab: Lab, env: dict[str, str], iface: str, *options: str,
                  before: str = "") -> subprocess.Popen[Any]:
    """A program in the group of ``iface`` that waits for a line on its stdin, then runs
    ``before`` (shell) and becomes curl fetching from the server (the same pid): started
    while the interface is up, it sends once the test says so. Returned once it is in."""
    proc = via_popen(lab, env, *options, iface, "--", "sh", "-c",
                     f'read x; {before or ":"}; exec "$@"', "sh", *lab.fetch_argv(timeout=1.5),
                     stdin=subprocess.PIPE)

    def joined() -> bool:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        groups = json.loads(via(lab, env, "status", "--json").stdout)["groups"]
        return any(m["pid"] == proc.pid and m["command"].startswith("sh ")
                   for g in groups for m in g["members"])

    wait_for(joined, what=f"the sender in the group of {iface}")
    return proc


def go(proc: subprocess.Popen[Any]) -> None:
    assert proc.stdin is not None
    proc.stdin.write("go\n")
    proc.stdin.close()


def restore_vlan3(lab: Lab) -> None:
    """Up again, with what going down took along (see test_killswitch_kernel.py)."""
    lab.run(lab.client, ["ip", "link", "set", "vlan3", "up"])
    lab.run(lab.client, ["ip", "addr", "replace", f"{Lab.CLIENT_VETH6}/64", "dev", "vlan3",
                         "nodad"])
    lab.run(lab.client, ["ip", "route", "replace", Lab.VETH_ROUTE, "via", Lab.GW_VETH,
                         "dev", "vlan3"])
    wait_for(lambda: lab.run(lab.client, [
        "ip", "-6", "route", "replace", Lab.VETH_ROUTE6, "via", Lab.GW_VETH6, "dev", "vlan3"],
        check=False).returncode == 0, timeout=5, what="v6 route back")


def test_drops_while_the_interface_is_down_are_shown_and_cost_nothing_once_it_is_up(
        lab: Lab, vt_env: dict[str, str]) -> None:
    """With vlan3 down the kernel removed the group's route: its packets are dropped by the
    re-route of via-tunnel's output route chain, before the kill switch's postrouting
    chain. trace shows them, and hooks nothing into the path while vlan3 is up."""
    with group_running(lab, vt_env, "vlan3") as members:
        sender = waiting_fetch(lab, vt_env, "vlan3")
        members.append(sender)
        trace = Trace(lab, vt_env, "vlan3")
        assert not unrouted_chain(lab)
        lab.run(lab.client, ["ip", "link", "set", "vlan3", "down"])
        try:
            trace.expect_err("vlan3 is down: the group's packets are dropped")
            assert unrouted_chain(lab)
            with CaptureElsewhere(lab, "vlan3", f"host {Lab.SERVER}") as elsewhere:
                go(sender)
                trace.expect(rf"  DROPPED by kill switch  pid {sender.pid} curl  "
                             rf"tcp \S+:\d+ -> {SERVER}:80  \(vlan3 is down\)$")
                assert sender.wait(timeout=10) != 0  # nothing got through
            assert elsewhere.captures and elsewhere.packets() == {}
        finally:
            restore_vlan3(lab)
        trace.expect_err("vlan3 carries the group's packets again")
        assert not unrouted_chain(lab)
        # The group is back to normal, and so is trace.
        r = via(lab, vt_env, "vlan3", "--", *lab.fetch_argv())
        assert r.stdout.strip() == Lab.CLIENT_VETH
        line = trace.expect(rf"  tcp \S+ -> {SERVER}:80  via (\S+) from (\S+)$")
        assert line.groups() == ("vlan3", Lab.CLIENT_VETH)
        assert trace.stop() == 0


def test_trace_starts_while_the_interface_is_gone_and_shows_the_drops(
        lab: Lab, vt_env: dict[str, str]) -> None:
    """OpenVPN crashed: tun0 is gone, its group lives on, closed. trace starts all the same,
    shows what the group sends (its DNS to a local stub too: --dns makes that a query
    through tun0), and the group's normal traffic once tun0 is back."""
    stub_query = " ".join(lab.dns_argv("127.0.0.53", "gone.test", timeout=1))
    with group_running(lab, vt_env, "tun0", "--dns", "198.51.100.53") as members:
        sender = waiting_fetch(lab, vt_env, "tun0", "--dns", "198.51.100.53",
                               before=stub_query)
        members.append(sender)
        lab.kill_client_vpn()
        try:
            trace = Trace(lab, vt_env, "tun0")
            trace.expect_err("tun0 is gone: the group's packets are dropped")
            with CaptureElsewhere(lab, "tun0", f"host {Lab.SERVER} or port 53") as elsewhere:
                go(sender)
                trace.expect(r"  DROPPED by kill switch  pid (\d+ \S+|\?)  udp \S+ -> "
                             r"127\.0\.0\.53:53  \(tun0 is gone\)$")
                trace.expect(rf"  DROPPED by kill switch  pid {sender.pid} curl  "
                             rf"tcp \S+:\d+ -> {SERVER}:80  \(tun0 is gone\)$")
                assert sender.wait(timeout=10) != 0
            assert "eth0" in elsewhere.captures and elsewhere.packets() == {}
        finally:
            lab.start_client_vpn()
        trace.expect_err("tun0 carries the group's packets again")
        assert not unrouted_chain(lab)
        r = via(lab, vt_env, "--dns", "198.51.100.53", "tun0", "--", *lab.fetch_argv())
        assert r.stdout.strip() == Lab.CLIENT_TUN
        trace.expect(rf"  tcp \S+ -> {SERVER}:80  via tun0 from {re.escape(Lab.CLIENT_TUN)}$")
        assert trace.stop() == 0


def test_launch_options_of_trace_reach_the_group_of_cmd(lab: Lab, vt_env: dict[str, str]
                                                        ) -> None:
    """`trace --dns ADDR tun0 -- CMD`: CMD's group sends its DNS to ADDR through tun0;
    `trace --user NAME`: CMD runs as NAME."""
    resolver = "198.51.100.53"
    lab.run(lab.inet, ["ip", "addr", "add", f"{resolver}/32", "dev", "lo"])
    try:
        log = lab.start_dns(lab.inet, resolver)
        r = via(lab, vt_env, "trace", "--dns", resolver, "tun0", "--",
                *lab.dns_argv(Lab.LAN_GW, "trace.test"))
    finally:
        lab.run(lab.inet, ["ip", "addr", "del", f"{resolver}/32", "dev", "lo"])
    assert DNS_ANSWER in r.stdout.splitlines()
    assert log.read_text().splitlines() == [f"udp {Lab.CLIENT_TUN} trace.test"]
    assert any(re.search(rf"  udp \S+ -> {re.escape(resolver)}:53  via tun0 from "
                         rf"{re.escape(Lab.CLIENT_TUN)}$", ln) for ln in r.stdout.splitlines())
    r = via(lab, vt_env, "trace", "--user", "nobody", "tun0", "--", "id", "-u")
    assert r.stdout.splitlines()[0] == "65534"  # CMD ran as that user
    r = via(lab, vt_env, "trace", "tun0", "--dns", resolver, "--", "true", check=False)
    assert (r.returncode, r.stderr.splitlines()[0]) == (2, "via-tunnel: --dns goes before IFACE")
