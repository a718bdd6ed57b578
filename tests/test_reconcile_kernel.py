"""Reconcile: while a group lives, whatever of ours a neighbour removes comes back by itself
(``nft flush ruleset``, ip rules deleted as systemd-networkd does, routes flushed, the
interface deleted and re-created), and the group's traffic is observed while it happens.
Also: the status counters against the interface's own counters, and an idle watcher."""

from __future__ import annotations

import json
import os
import select
import sys
import time
from collections.abc import Iterator

import pytest
from helpers import CaptureElsewhere, via, via_popen, wait_for

from via_tunnel.lab import probe as lab_probe
from via_tunnel.lab.capture import Capture
from via_tunnel.lab.netlab import Lab

pytestmark = pytest.mark.kernel

SERVER = Lab.SERVER
STREAM_INTERVAL = 0.002  # seconds between two datagrams of the stream

# A member of the group that sends a numbered datagram to the UDP echo every 2 ms (for at
# most 60 s) and reports on stdout, five times a second, how many echoes came back.
STREAM = f"""
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setblocking(False)
back, seq, end, report = 0, 0, time.monotonic() + 60, time.monotonic()
while time.monotonic() < end:
    seq += 1
    try:
        s.sendto(b"vtstream %d" % seq, ({SERVER!r}, {Lab.UDP_PORT}))
    except OSError:  # EPERM while the kill switch drops: an application would retry
        pass
    try:
        while s.recv(100):
            back += 1
    except BlockingIOError:
        pass
    if time.monotonic() - report > 0.2:
        print(seq, back, flush=True)
        report = time.monotonic()
    time.sleep({STREAM_INTERVAL})
"""


class Stream:
    """The streaming member, and a way to see that its echoes keep coming back."""

    def __init__(self, lab: Lab, env: dict[str, str], iface: str) -> None:
        self.proc = via_popen(lab, env, iface, "--", sys.executable, "-c", STREAM)

    def echoes(self) -> int:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().split()
        assert line, "the stream stopped"
        return int(line[1])

    def flowing(self) -> bool:
        """Echoes are coming back now: more between two fresh reports (older, buffered
        reports are skipped)."""
        assert self.proc.stdout is not None
        while select.select([self.proc.stdout], [], [], 0)[0]:
            self.echoes()
        first = self.echoes()
        self.echoes()
        return self.echoes() > first

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


@pytest.fixture
def stream(lab: Lab, vt_env: dict[str, str]) -> Iterator[Stream]:
    s = Stream(lab, vt_env, "tun0")
    try:
        wait_for(s.flowing, timeout=10, what="the stream to flow through tun0")
        yield s
    finally:
        s.close()
        wait_for(lambda: groups(lab, vt_env) == [], timeout=5, what="the group to go")


def groups(lab: Lab, env: dict[str, str]) -> list[dict[str, object]]:
    return json.loads(via(lab, env, "status", "--json").stdout)["groups"]  # type: ignore[no-any-return]


def probe(lab: Lab, kind: str, table: int) -> dict[str, float | None]:
    argv = lab_probe.command(kind, table)
    return json.loads(lab.run(lab.client, argv, timeout=10).stdout)  # type: ignore[no-any-return]


def lan_packets_of_stream(cap: Capture) -> list[str]:
    return [p for p in cap.packets() if f"> {SERVER}.{Lab.UDP_PORT}" in p]


def assert_stream_through_the_tunnel(lab: Lab, stream: Stream) -> None:
    """Both directions of the stream by tun0 with the tunnel's address, none by the LAN.

    (After a repair this is not a given: a flow that started while the table was missing
    escaped masquerade, and would keep the LAN address inside the tunnel, with its
    replies coming back by the LAN, unless its conntrack entry is reset.)"""
    wait_for(stream.flowing, timeout=2, what="the stream to flow")
    bpf = f"udp and host {SERVER}"
    with Capture(lab, lab.client, "eth0", bpf) as lan, Capture(lab, lab.client, "tun0", bpf) as tun:
        time.sleep(0.3)
    assert lan.packets() == []
    seen = tun.packets()
    assert len(seen) > 50
    assert all(f" {Lab.CLIENT_TUN}." in p for p in seen), seen[:5]


def test_nft_flush_ruleset_is_repaired_and_the_leak_is_confined_to_the_window(
        lab: Lab, vt_env: dict[str, str], stream: Stream) -> None:
    table = int(groups(lab, vt_env)[0]["table"])  # type: ignore[call-overload]
    with Capture(lab, lab.client, "eth0", f"udp and host {SERVER}") as lan:
        result = probe(lab, "nft", table)
        restored = result["restored_ms"]
        assert restored is not None, "our table did not come back"
        assert restored < 100, result
        time.sleep(0.3)  # after the repair: nothing more may leave by the LAN
        late = lan_packets_of_stream(lan)
    # What leaked is what the stream sent while the table was gone (plus the datagram in
    # flight): measured here, reported in the README. Unmarked, such a datagram takes the
    # main table: by the LAN, with the LAN address.
    window_budget = int(restored / 1000 / STREAM_INTERVAL) + 3
    assert len(late) <= window_budget, (result, late)
    assert all(p.split()[2].startswith(Lab.CLIENT_LAN + ".") for p in late), late
    assert_stream_through_the_tunnel(lab, stream)
    counters = groups(lab, vt_env)[0]["counters"]
    assert counters is not None  # the counters came back with the group's elements
    print(f"nft flush ruleset: restored after {restored} ms, {len(late)} datagram(s) of a "
          f"stream every {STREAM_INTERVAL * 1000:g} ms left by the LAN meanwhile")


def test_flushing_only_our_table_rules_is_repaired_too(lab: Lab, vt_env: dict[str, str],
                                                       stream: Stream) -> None:
    lab.run(lab.client, ["nft", "flush", "table", "inet", "via_tunnel"])  # rules, not sets
    wait_for(lambda: nft_rule_count(lab) > 10, timeout=1, what="the rules to come back")
    assert_stream_through_the_tunnel(lab, stream)


@pytest.mark.parametrize("where", ["group_oifs", "iif_marks"])
def test_a_groups_deleted_element_comes_back(lab: Lab, vt_env: dict[str, str],
                                             stream: Stream, where: str) -> None:
    """The watcher reads which group's element went (its mark, in the notification); an
    element removal that names another mark (a teardown's own) costs it nothing."""
    group = groups(lab, vt_env)[0]
    element = (f'{group["mark"]} . "tun0"' if where == "group_oifs" else '"tun0"')
    before = set_elements(lab, where)
    assert before, f"{where} is empty before the test"
    lab.run(lab.client, ["nft", "delete", "element", "inet", "via_tunnel", where,
                         "{ " + element + " }"])
    wait_for(lambda: set_elements(lab, where) == before, timeout=1,
             what=f"the element of {where} to come back")
    assert_stream_through_the_tunnel(lab, stream)


def set_elements(lab: Lab, name: str) -> list[object]:
    out = lab.run(lab.client, ["nft", "-j", "list", "set" if name == "group_oifs" else "map",
                               "inet", "via_tunnel", name], check=False).stdout
    found = [o for o in json.loads(out or '{"nftables": []}')["nftables"]
             if "set" in o or "map" in o]
    return (found[0].get("set") or found[0].get("map")).get("elem", []) if found else []


def nft_rule_count(lab: Lab) -> int:
    out = lab.run(lab.client, ["nft", "-j", "list", "table", "inet", "via_tunnel"],
                  check=False).stdout
    return sum(1 for o in json.loads(out or '{"nftables": []}')["nftables"] if "rule" in o)


@pytest.mark.parametrize("kind", ["rules", "routes"])
def test_deleted_ip_rules_and_flushed_routes_come_back(
        lab: Lab, vt_env: dict[str, str], stream: Stream, kind: str) -> None:
    table = int(groups(lab, vt_env)[0]["table"])  # type: ignore[call-overload]
    before = lab.ip_json(lab.client, "rule", "show")
    with CaptureElsewhere(lab, "tun0", f"udp and host {SERVER}") as elsewhere:
        result = probe(lab, kind, table)
        assert result["restored_ms"] is not None and result["restored_ms"] < 100, result
    # Without the rule or the route the group's packets are still marked: the kill switch
    # (and the table's unreachable default) keep them off every other interface.
    assert elsewhere.packets() == {}
    assert lab.ip_json(lab.client, "rule", "show") == before
    assert_stream_through_the_tunnel(lab, stream)


def test_interface_deleted_and_recreated_while_streaming(lab: Lab, vt_env: dict[str, str],
                                                         stream: Stream) -> None:
    table = int(groups(lab, vt_env)[0]["table"])  # type: ignore[call-overload]
    with CaptureElsewhere(lab, "tun0", f"udp and host {SERVER}") as elsewhere:
        lab.kill_client_vpn()  # tun0 is deleted
        time.sleep(0.2)
        lab.start_client_vpn()  # and created again, with a new index
        wait_for(lambda: any(r.get("dst") == "default" and r.get("dev") == "tun0"
                             for r in lab.ip_json(lab.client, "route", "show", "table",
                                                  str(table))),
                 timeout=2, interval=0.005, what="the default route via the new tun0")
        wait_for(stream.flowing, timeout=10, what="the stream to flow again")
    assert "eth0" in elsewhere.captures and elsewhere.packets() == {}
    assert_stream_through_the_tunnel(lab, stream)


def connection_in_flight(lab: Lab) -> bool:
    """Whether a TCP socket of the client to the server is in a state that still sends or
    expects packets (anything but TIME-WAIT, which only answers a retransmitted FIN)."""
    out = lab.run(lab.client, ["ss", "-Htan", "dst", SERVER]).stdout
    return any(line.split()[0] != "TIME-WAIT" for line in out.splitlines() if line.strip())


def quiet_reading(lab: Lab, vt_env: dict[str, str]
                  ) -> tuple[dict[str, int], dict[str, object]] | None:
    """tun0's counters and the group's status, if no packet crossed tun0 meanwhile."""
    first = lab.link_stats(lab.client, "tun0")
    g = groups(lab, vt_env)[0]
    return (first, g) if lab.link_stats(lab.client, "tun0") == first else None


def test_status_counts_both_directions_like_the_interface_does(
        lab: Lab, vt_env: dict[str, str]) -> None:
    """The group's counters against tun0's own (nothing else uses tun0 in the lab)."""
    holder = via_popen(lab, vt_env, "tun0", "--", "sleep", "30")
    try:
        wait_for(lambda: groups(lab, vt_env), what="the group")
        before = lab.link_stats(lab.client, "tun0")
        status_before = groups(lab, vt_env)[0]
        size = 200_000
        r = via(lab, vt_env, "tun0", "--", "curl", "-s", "-o", "/dev/null", "-w",
                "%{size_download}", f"http://{SERVER}/bytes/{size}")
        assert r.stdout == str(size)
        # curl's exit does not end the connection: the last FIN and ACK cross tun0 after it.
        # Read once the connection is over (its socket gone or in TIME-WAIT), and with tun0's
        # counters unchanged across the read of the group's.
        wait_for(lambda: not connection_in_flight(lab), timeout=10,
                 what="curl's connection to close")
        after, g = wait_for(lambda: quiet_reading(lab, vt_env), timeout=10,
                            what="a reading with no packet crossing tun0")
        text = via(lab, vt_env, "status").stdout
    finally:
        holder.terminate()
        holder.wait()
    sent, received = g["counters"]["sent"], g["counters"]["received"]  # type: ignore[index]
    old = status_before["counters"]
    assert isinstance(old, dict)
    assert received["bytes"] - old["received"]["bytes"] == after["rx_bytes"] - before["rx_bytes"]
    assert received["packets"] - old["received"]["packets"] \
        == after["rx_packets"] - before["rx_packets"]
    assert sent["bytes"] - old["sent"]["bytes"] == after["tx_bytes"] - before["tx_bytes"]
    assert received["bytes"] > size
    assert g["link"] == {"state": "up", "mtu": 1500,  # type: ignore[comparison-overlap]
                         "addresses": [f"{Lab.CLIENT_TUN}/32"]}
    assert "link up  mtu 1500" in text and "sent" in text and "received" in text
    wait_for(lambda: groups(lab, vt_env) == [], timeout=5, what="the group to go")


def test_the_watcher_sleeps_while_nothing_happens(lab: Lab, vt_env: dict[str, str]) -> None:
    """A watcher per group must cost nothing while idle (it once spun on cgroup.events)."""
    holder = via_popen(lab, vt_env, "vlan3", "--", "sleep", "30")
    try:
        pid = wait_for(lambda: groups(lab, vt_env) and groups(lab, vt_env)[0]["watcher"],
                       what="the watcher")
        time.sleep(0.3)  # past its start-up
        first = cpu_seconds(int(pid))  # type: ignore[call-overload]
        time.sleep(1.0)
        assert cpu_seconds(int(pid)) - first < 0.05  # type: ignore[call-overload]
    finally:
        holder.terminate()
        holder.wait()
    wait_for(lambda: groups(lab, vt_env) == [], timeout=5, what="the group to go")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
