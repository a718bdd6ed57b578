"""Which conntrack entries of a group escaped masquerade (pure logic of flows.py)."""
# ruff: noqa: E501  (conntrack prints one entry per line)

from via_tunnel.kernel.flows import parse_conntrack, parse_ss_ports, unmasqueraded

MARK, MASK = 0x81000000, 0xFF000000
OWN = ("192.0.2.50/32",)
CONNTRACK = """\
udp      17 29 src=192.0.2.2 dst=198.51.100.10 sport=50002 dport=7 src=198.51.100.10 dst=192.0.2.50 sport=7 dport=50002 mark=2164260864 use=1
udp      17 29 src=192.0.2.2 dst=198.51.100.10 sport=50003 dport=7 src=198.51.100.10 dst=192.0.2.2 sport=7 dport=50003 mark=0 use=1
udp      17 29 src=198.51.100.10 dst=192.0.2.2 sport=7 dport=50004 src=192.0.2.2 dst=198.51.100.10 sport=50004 dport=7 mark=0 use=1
tcp      6 431999 ESTABLISHED src=203.0.113.9 dst=192.0.2.50 sport=50002 dport=8080 src=192.0.2.50 dst=203.0.113.9 sport=8080 dport=50002 [ASSURED] mark=2164260864 use=1
udp      17 29 src=192.0.2.2 dst=198.51.100.10 sport=50005 dport=7 src=198.51.100.10 dst=192.0.2.2 sport=7 dport=50005 mark=2197815296 use=1
udp      17 29 src=192.0.2.2 dst=198.51.100.10 sport=40000 dport=7 src=198.51.100.10 dst=192.0.2.2 sport=7 dport=40000 mark=0 use=1
icmp     1 29 src=192.0.2.2 dst=198.51.100.10 type=8 code=0 id=1 src=198.51.100.10 dst=192.0.2.2 type=0 code=0 id=1 mark=0 use=1
"""
SS = """\
udp UNCONN 0      0      0.0.0.0:50002 0.0.0.0:*
udp UNCONN 0      0      0.0.0.0:50003 0.0.0.0:*
udp UNCONN 0      0      [::]:50004 [::]:*
tcp ESTAB  0      0      192.0.2.50:8080 203.0.113.9:50002
udp UNCONN 0      0      0.0.0.0:50005 0.0.0.0:*
"""


def test_only_the_groups_unmasqueraded_entries_are_picked() -> None:
    entries = parse_conntrack(CONNTRACK)
    assert len(entries) == 6  # icmp skipped
    ports = parse_ss_ports(SS)
    assert ("udp", 50004) in ports and ("tcp", 8080) in ports
    stale = {(e.proto, e.sport, e.dport) for e in unmasqueraded(entries, ports, MARK, MASK, OWN)}
    assert stale == {
        ("udp", 50003, 7),  # ours, unmarked, replies to the LAN address
        ("udp", 7, 50004),  # a late reply turned into an inbound flow to the LAN address
    }
    # Not picked: masqueraded (50002), a connection that came in by the tunnel (8080),
    # another group's mark (50005), a port the group does not hold (40000).
