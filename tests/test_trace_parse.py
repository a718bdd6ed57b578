"""Pure parts of `via-tunnel trace`: NFLOG messages, packet headers, /proc/net socket tables,
the trace table's JSON and the output line. No root, no kernel."""

from __future__ import annotations

import ipaddress
import re
import socket
import struct
from importlib.resources import files

import pytest

from via_tunnel.core import launch_form
from via_tunnel.group.state import GroupRecord
from via_tunnel.kernel import nflog as nl
from via_tunnel.kernel.nflog import Flow, attr, flow_of, parse_messages
from via_tunnel.trace import rules as trace_rules
from via_tunnel.trace.session import format_line
from via_tunnel.trace.unrouted import unrouted_families
from via_tunnel.trace.who import SocketRow, Who, best_row, parse_table


def ipv4_tcp(src: str, sport: int, dst: str, dport: int, frag: int = 0) -> bytes:
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 1, frag, 64, 6, 0,
                         ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
    return header + struct.pack("!HHIIHHHH", sport, dport, 0, 0, 0x5002, 0, 0, 0)


def ipv6_udp(src: str, sport: int, dst: str, dport: int) -> bytes:
    header = struct.pack("!IHBB16s16s", 6 << 28, 8, 17, 64, ipaddress.IPv6Address(src).packed,
                         ipaddress.IPv6Address(dst).packed)
    return header + struct.pack("!HHHH", sport, dport, 8, 0)


def nflog_packet(prefix: str, mark: int, outdev: int, payload: bytes) -> bytes:
    body = struct.pack("!BBH", socket.AF_INET, 0, 30324)
    body += attr(nl.NFULA_MARK, struct.pack("!I", mark))
    body += attr(nl.NFULA_IFINDEX_OUTDEV, struct.pack("!I", outdev))
    body += attr(nl.NFULA_PREFIX, prefix.encode() + b"\0")
    body += attr(nl.NFULA_PAYLOAD, payload)
    kind = (nl.NFNL_SUBSYS_ULOG << 8) | nl.NFULNL_MSG_PACKET
    return struct.pack("=IHHII", 16 + len(body), kind, 0, 0, 0) + body


def test_nflog_messages_are_split_and_read() -> None:
    pkt = ipv4_tcp("192.0.2.50", 40000, "198.51.100.10", 80)
    ack = struct.pack("=IHHII", 36, nl.NLMSG_ERROR, 0, 1, 0) + struct.pack("=i", 0) + bytes(16)
    data = nflog_packet("via-tunnel new", 0x81000000, 7, pkt) + ack
    packets, errors = parse_messages(data)
    assert errors == [0]
    assert len(packets) == 1
    got = packets[0]
    assert (got.prefix, got.mark, got.outdev, got.indev) == ("via-tunnel new", 0x81000000, 7, 0)
    assert got.payload == pkt


def test_truncated_message_is_ignored_not_misread() -> None:
    data = nflog_packet("via-tunnel new", 1, 2, ipv4_tcp("192.0.2.1", 1, "192.0.2.2", 2))
    assert parse_messages(data[:-10]) == ([], [])


def test_config_message_names_the_group_big_endian() -> None:
    msg = nl.config_message(0x7674, attr(nl.NFULA_CFG_CMD, bytes([nl.NFULNL_CFG_CMD_BIND])), 5)
    length, kind, flags, seq, _pid = struct.unpack_from("=IHHII", msg)
    assert length == len(msg) and seq == 5
    assert kind == 0x0401 and flags == nl.NLM_F_REQUEST | nl.NLM_F_ACK
    assert msg[16:20] == bytes([0, 0, 0x76, 0x74])


def test_flows_of_ipv4_ipv6_and_fragments() -> None:
    assert flow_of(ipv4_tcp("192.0.2.50", 40000, "198.51.100.10", 80)) == \
        Flow("tcp", "192.0.2.50", 40000, "198.51.100.10", 80)
    assert flow_of(ipv6_udp("2001:db8:3::34", 5353, "2001:db8:ff::10", 7)) == \
        Flow("udp", "2001:db8:3::34", 5353, "2001:db8:ff::10", 7)
    later_fragment = ipv4_tcp("192.0.2.50", 1, "198.51.100.10", 2, frag=185)
    assert flow_of(later_fragment) == Flow("tcp", "192.0.2.50", None, "198.51.100.10", None)
    assert flow_of(b"") is None and flow_of(b"\x45" + bytes(5)) is None


PROC_TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0200000A:9C40 0A6433C6:0050 01 00000000:00000000 00:00000000 00000000     0        0 4242 1
   1: 00000000:0035 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 77 1
"""
PROC_TCP6 = """\
  sl  local_address                         remote_address                        st
   0: 0000000000000000FFFF00000200000A:9C41 B80D0120000000000000000010000000:0050 01 \
00000000:00000000 00:00000000 00000000     0        0 4343 1
"""


def test_proc_net_tables_decode_host_order_and_v4_mapped() -> None:
    rows = parse_table(PROC_TCP)
    assert rows[0] == SocketRow("10.0.0.2", 40000, "198.51.100.10", 80, 4242)
    assert rows[1] == SocketRow("0.0.0.0", 53, "0.0.0.0", 0, 77)
    (row6,) = parse_table(PROC_TCP6)
    assert row6 == SocketRow("10.0.0.2", 40001, "2001:db8::10", 80, 4343)


def test_best_row_prefers_the_connected_socket_and_only_the_groups() -> None:
    flow = Flow("udp", "192.0.2.50", 5000, "198.51.100.10", 7)
    unconnected = SocketRow("0.0.0.0", 5000, "0.0.0.0", 0, 1)
    connected = SocketRow("192.0.2.2", 5000, "198.51.100.10", 7, 2)
    dnat = SocketRow("192.0.2.2", 5000, "127.0.0.53", 53, 3)
    other_port = SocketRow("192.0.2.2", 5001, "198.51.100.10", 7, 4)
    rows = [dnat, unconnected, connected, other_port]
    assert best_row(flow, rows, {1, 2, 3, 4}) == connected
    assert best_row(flow, rows, {1, 3}) == unconnected
    assert best_row(flow, rows, {3}) == dnat
    assert best_row(flow, rows, {4}) is None  # another port is another socket
    assert best_row(flow, rows, set()) is None  # not the group's


def test_table_json_carries_names_as_data_and_brackets_the_kill_switch() -> None:
    name = "a\"b;c}"  # valid for Linux; would break nft text
    elements = trace_rules.group_elements(0x81000000, name, "add")
    assert {"concat": [0x81000000, name]} in elements[1]["add"]["element"]["elem"]
    commands = trace_rules.table_commands(30324)
    logs = [e["log"] for c in commands if "rule" in c["add"]
            for e in c["add"]["rule"]["expr"] if "log" in e]
    assert logs == [{"prefix": trace_rules.PREFIX_DROP, "group": 30324},
                    {"prefix": trace_rules.PREFIX_NEW, "group": 30324},
                    {"prefix": trace_rules.PREFIX_UNROUTED_DNS, "group": 30324},
                    {"prefix": trace_rules.PREFIX_UNROUTED, "group": 30324}]
    assert all(c["add"][kind]["table"] == "via_tunnel_trace"
               for c in commands for kind in c["add"])
    # Drops are seen before via-tunnel's postrouting filter drops them; new connections
    # after its masquerade (the priorities in ruleset.nft: filter = 0, srcnat = 100).
    ruleset = files("via_tunnel.core").joinpath("ruleset.nft").read_text()
    hooks = re.findall(r"type (\w+) hook postrouting priority (\w+);", ruleset)
    assert ("filter", "filter") in hooks and ("nat", "srcnat") in hooks
    assert trace_rules.PRIO_DROPS < 0 < 100 < trace_rules.PRIO_NEW


def test_output_lines() -> None:
    when = 1_700_000_000.123
    flow = Flow("tcp", "192.0.2.50", 40000, "198.51.100.10", 80)
    who = Who(4242, "curl", "192.0.2.2", 40000)
    line = format_line(when, flow, who, via="tun0")
    assert re.fullmatch(r"\d\d:\d\d:\d\d\.123  pid 4242 curl  tcp 192\.0\.2\.2:40000 -> "
                        r"198\.51\.100\.10:80  via tun0 from 192\.0\.2\.50", line), line
    v6 = Flow("udp", "2001:db8:3::34", 53, "2001:db8:ff::10", 7)
    line = format_line(when, v6, None, dropped="would leave by eth0")
    assert line.endswith("  DROPPED by kill switch  pid ?  udp [2001:db8:3::34]:53 -> "
                         "[2001:db8:ff::10]:7  (would leave by eth0)")
    line = format_line(when, flow, who, dropped="tun0 is gone")
    assert line.endswith("  DROPPED by kill switch  pid 4242 curl  tcp 192.0.2.2:40000 -> "
                         "198.51.100.10:80  (tun0 is gone)")
    unbound = Who(7, "dig", "0.0.0.0", 53)  # unconnected: the packet's source is shown
    assert "udp 192.0.2.50:40000 ->" in format_line(when, flow._replace(proto="udp"),
                                                     unbound, via="tun0")


def test_unrouted_chain_is_integers_only_and_runs_before_the_route_chain() -> None:
    text = trace_rules.arm_text(3, frozenset({socket.AF_INET, socket.AF_INET6}))
    assert text == (
        "add chain inet via_tunnel_trace unrouted { type filter hook output priority -151; "
        "policy accept; }\n"
        "flush chain inet via_tunnel_trace unrouted\n"
        "add rule inet via_tunnel_trace unrouted meta nfproto ipv4 socket cgroupv2 level 3 "
        "@cgroups_l3 goto unrouted_log\n"
        "add rule inet via_tunnel_trace unrouted meta nfproto ipv6 socket cgroupv2 level 3 "
        "@cgroups_l3 goto unrouted_log\n")
    assert "ipv6" not in trace_rules.arm_text(3, frozenset({socket.AF_INET}))
    assert trace_rules.disarm_text().endswith("delete chain inet via_tunnel_trace unrouted\n")
    with pytest.raises(ValueError):
        trace_rules.cgroups_set(0)
    # The cgroup travels as JSON data, never as text.
    path = 'via-tunnel/if-a"b;c}'
    assert trace_rules.cgroup_element(3, path) == {"add": {"element": {
        "family": "inet", "table": "via_tunnel_trace", "name": "cgroups_l3", "elem": [path]}}}
    # Before ruleset.nft's route chain re-routes (and drops what its table cannot route).
    ruleset = files("via_tunnel.core").joinpath("ruleset.nft").read_text()
    assert re.search(r"type route hook output priority mangle;", ruleset)
    assert trace_rules.PRIO_UNROUTED == -150 - 1  # mangle - 1


def route_rows(*defaults: int) -> list[tuple[int, int]]:
    """A group table's routes as (dst_len, type): a link route, the unreachable default,
    and the given defaults (type 1: unicast)."""
    return [(28, 1), (0, 7), *((0, kind) for kind in defaults)]


def test_unrouted_families_follow_the_tables_default_routes() -> None:
    rec = GroupRecord(iface="tun0", slot=1, mark=0x80000001, table=7001, level=3,
                      cgroup="/x", cgroup_nft_path="x", created=0.0, ipv6="tunnel")
    up = {socket.AF_INET: route_rows(1), socket.AF_INET6: route_rows(1)}
    assert unrouted_families(rec, up) == frozenset()
    down = {socket.AF_INET: [(0, 7)], socket.AF_INET6: [(0, 7)]}
    assert unrouted_families(rec, down) == {socket.AF_INET, socket.AF_INET6}
    assert unrouted_families(rec, {socket.AF_INET: route_rows(1)}) == {socket.AF_INET6}
    rec.ipv6 = "block"  # refused in the route chain whatever the link does: not a drop
    assert unrouted_families(rec, down) == {socket.AF_INET}


TRACE_USAGE = ("usage: via-tunnel trace [--gateway ADDR] [--dns ADDR]... "
               "[--ipv6 auto|tunnel|block] [--user NAME] [--debug] IFACE [-- CMD [ARG...]]")


def test_trace_usage_is_the_launch_forms_with_cmd_optional() -> None:
    assert launch_form.usage("trace", require_cmd=False) == TRACE_USAGE
    assert TRACE_USAGE.replace(" trace", "").replace(
        "IFACE [-- CMD [ARG...]]", "IFACE -- CMD [ARG...]") == launch_form.USAGE


def trace_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
              *args: str) -> tuple[int, str, list[launch_form.LaunchArgs]]:
    """Run `via-tunnel trace ARGS` through the CLI with the session replaced: its exit
    code, stderr, and what the session was given."""
    from via_tunnel.cli.commands import run_app
    from via_tunnel.trace import session

    given: list[launch_form.LaunchArgs] = []
    monkeypatch.setattr(session, "run", lambda a: given.append(a) or 0)
    rc = run_app(["trace", *args])
    return rc, capsys.readouterr().err, given


def test_trace_reads_the_launch_forms_options_before_iface(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    rc, err, given = trace_cli(monkeypatch, capsys, "--dns", "192.0.2.53", "--dns=2001:db8::53",
                               "--ipv6", "block", "--gateway", "192.0.2.1", "--user", "nobody",
                               "--debug", "wg0", "--", "curl", "--dns", "x", "--")
    assert (rc, err) == (0, "")
    (a,) = given
    assert (a.iface, a.argv) == ("wg0", ["curl", "--dns", "x", "--"])  # CMD untouched
    assert (a.dns, a.ipv6, a.gateway, a.user, a.debug) == (
        ("192.0.2.53", "2001:db8::53"), "block", "192.0.2.1", "nobody", True)
    # What trace passes on to the launcher reads back the same.
    again = launch_form.parse([*launch_form.options_argv(a), "wg0", "--", "true"])
    assert [getattr(again, k) for k in ("dns", "ipv6", "gateway", "user", "debug")] == \
        [getattr(a, k) for k in ("dns", "ipv6", "gateway", "user", "debug")]
    assert launch_form.options_argv(launch_form.parse(["wg0", "--", "x"])) == []
    for args in (["wg0"], ["wg0", "--"], ["wg0", "--", "sleep", "1"], ["wg0", "sleep", "1"]):
        rc, err, given = trace_cli(monkeypatch, capsys, *args)
        assert (rc, err, given[0].iface) == (0, "", "wg0"), args
        assert given[0].argv == [w for w in args[1:] if w != "--"]


@pytest.mark.parametrize(("args", "message"), [
    (["--bogus", "wg0"], "unknown option '--bogus'"),
    (["wg0", "--dns", "192.0.2.53", "--", "true"], "--dns goes before IFACE"),
    (["wg0", "-x"], "unknown option '-x'"),
    (["--dns"], "option --dns needs a value"),
    (["--dns", "192.0.2.53"], "missing interface"),
    ([], "missing interface"),
    (["--dns", "192.0.2.53", "wg0"], "--dns applies to the launch of CMD: give -- CMD"),
    (["--user", "nobody", "wg0", "--"], "--user applies to the launch of CMD"),
])
def test_trace_usage_errors_exit_2_with_the_launchers_wording(
        capsys: pytest.CaptureFixture[str], args: list[str], message: str) -> None:
    """(The session's own checks come first: nothing is changed before these errors.)"""
    from via_tunnel.cli.commands import run_app

    rc = run_app(["trace", *args])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith(f"via-tunnel: {message}"), err
    assert err.endswith(f"\n{TRACE_USAGE}\n"), err


def test_trace_help_still_works(capsys: pytest.CaptureFixture[str]) -> None:
    from via_tunnel.cli.commands import run_app

    assert run_app(["trace", "--help"]) == 0
    out = capsys.readouterr().out
    assert all(o.name in out for o in launch_form.LAUNCH_OPTIONS)


def test_a_trace_line_is_one_write_so_cmds_output_cannot_split_it() -> None:
    """CMD shares trace's stdout; with PYTHONUNBUFFERED, print() writes the text and the
    newline in two calls and CMD's output could land in between (seen in CI)."""
    import io

    from via_tunnel.trace.session import say

    calls: list[str] = []

    class Writes(io.StringIO):
        def write(self, s: str) -> int:
            calls.append(s)
            return len(s)

    say("12:00:00.000  pid 7 curl  tcp 10.0.0.1:5 -> 10.0.0.2:80  via tun0", Writes())
    assert calls == ["12:00:00.000  pid 7 curl  tcp 10.0.0.1:5 -> 10.0.0.2:80  via tun0\n"]
