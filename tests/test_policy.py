"""The daemon's policy: config parsing, decisions and request validation (pure, no root)."""

from __future__ import annotations

import json

import pytest

from via_tunnel.core.policy import (
    ConfigError,
    InterfacePolicy,
    Policy,
    Request,
    RequestError,
    decide,
    effective,
    load,
    parse,
    parse_request,
)

GOOD = """
[daemon]
socket_group = "via-tunnel"

[interface.vlan3]
allow_users  = ["alice"]
allow_groups = ["vpn"]
dns  = ["198.51.100.53", "2001:db8::53"]
ipv6 = "block"

[interface.tun0]
allow_users = ["bob"]

[gateway.tun0]
wan = "eth0"
"""


def test_parses_interfaces_and_daemon_section_and_tolerates_gateway_section() -> None:
    p = parse(GOOD)
    assert p.socket_group == "via-tunnel"
    assert p.interfaces["vlan3"] == InterfacePolicy(
        allow_users=frozenset({"alice"}), allow_groups=frozenset({"vpn"}),
        dns=("198.51.100.53", "2001:db8::53"), ipv6="block")
    assert p.interfaces["tun0"].allow_groups == frozenset()


def test_missing_file_is_root_only(tmp_path) -> None:  # type: ignore[no-untyped-def]
    p = load(str(tmp_path / "none.toml"))
    assert p == Policy()
    assert decide(p, "vlan3", 0, "root", []).allowed
    assert not decide(p, "vlan3", 1000, "alice", ["alice"]).allowed


@pytest.mark.parametrize(("text", "message"), [
    ("[interface.vlan3\n", "config.toml"),
    ("[interfaces.vlan3]\nallow_users=['a']\n", "unknown section [interfaces]"),
    ("[interface.vlan3]\nallow_user=['a']\n", "unknown key 'allow_user'"),
    ("[interface.vlan3]\nallow_users='alice'\n", "must be a list of names"),
    ("[interface.vlan3]\nallow_groups=[1]\n", "must be a list of names"),
    ("[interface.vlan3]\ndns=['resolver']\n", "not an IP address"),
    ("[interface.vlan3]\nipv6='maybe'\n", "ipv6 must be one of"),
    ("[interface.vlan3]\ngateway='::1'\n", "not an IPv4 address"),
    ('[interface."bad/name"]\nallow_users=["a"]\n', "forbids"),
    ("[daemon]\nsocket_mode='0777'\n", "unknown key 'socket_mode'"),
    ("interface = 3\n", "must be a table"),
])
def test_config_errors_name_file_and_problem(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse(text, "/etc/via-tunnel/config.toml")
    assert message in exc.value.message
    assert "\n" not in exc.value.message
    assert exc.value.message.startswith("/etc/via-tunnel/config.toml")


def test_decisions() -> None:
    p = parse(GOOD)
    assert decide(p, "vlan3", 0, "root", []) .allowed  # root, always
    assert decide(p, "nosuch", 0, "root", []).allowed
    d = decide(p, "vlan3", 1000, "alice", ["alice"])
    assert d.allowed and "allow_users" in d.reason
    d = decide(p, "vlan3", 1001, "carol", ["carol", "vpn"])
    assert d.allowed and "group vpn" in d.reason
    d = decide(p, "vlan3", 1002, "bob", ["bob"])
    assert not d.allowed and "bob" in d.reason and "vlan3" in d.reason
    d = decide(p, "eth0", 1000, "alice", ["alice"])
    assert not d.allowed and "eth0 is not configured" in d.reason
    d = decide(p, "tun0", 1000, "alice", ["vpn"])  # vpn is allowed on vlan3 only
    assert not d.allowed
    d = decide(p, "vlan3", 4242, None, [])  # a uid without a name
    assert not d.allowed and "uid 4242" in d.reason


def test_request_parsing_ignores_claims_of_identity() -> None:
    raw = json.dumps({"iface": "vlan3", "pid": 1, "uid": 0, "ipv6": "block",
                      "gateway": "192.0.2.33", "dns": ["198.51.100.53"]}).encode()
    assert parse_request(raw) == Request("vlan3", "192.0.2.33", "block", ("198.51.100.53",))
    assert parse_request(b'{"iface": "tun0"}') == Request("tun0")


@pytest.mark.parametrize("raw", [
    b"", b"garbage", b"{", b"[]", b"null", b'"vlan3"', b"{}", b'{"iface": 3}',
    b'{"iface": "bad/name"}', b'{"iface": "x", "ipv6": "maybe"}',
    b'{"iface": "x", "gateway": 7}', b'{"iface": "x", "dns": "1.2.3.4"}',
    b'{"iface": "x", "dns": ["1.2.3.4"' + b', "1.2.3.4"' * 20 + b"]}",
    b"[" * 100_000, b"\xff\xfe", b'{"iface": "\\ud800"}',
])
def test_malformed_requests_raise_request_errors_only(raw: bytes) -> None:
    with pytest.raises(RequestError):
        parse_request(raw)


def test_configured_defaults_fill_what_the_caller_left_at_default() -> None:
    rules = parse(GOOD).interfaces["vlan3"]
    assert effective(Request("vlan3"), rules) == Request(
        "vlan3", None, "block", ("198.51.100.53", "2001:db8::53"))
    mine = Request("vlan3", "192.0.2.33", "tunnel", ("192.0.2.1",))
    assert effective(mine, rules) == mine
    assert effective(Request("vlan3"), None) == Request("vlan3")


def test_a_users_routing_options_come_from_the_config_unless_granted() -> None:
    from via_tunnel.core.policy import check_user_options

    rules = parse('[interface.vlan3]\nallow_users = ["a"]\nuser_options = ["dns"]\n'
                  ).interfaces["vlan3"]
    assert rules.user_options == frozenset({"dns"})
    check_user_options(Request("vlan3", dns=("198.51.100.53",)), rules, uid=1000)  # granted
    check_user_options(Request("vlan3"), rules, uid=1000)  # nothing asked
    for req, name in ((Request("vlan3", gateway="192.0.2.33"), "gateway"),
                      (Request("vlan3", ipv6="block"), "ipv6")):
        with pytest.raises(RequestError, match=f"user_options .*{name}"):
            check_user_options(req, rules, uid=1000)
        check_user_options(req, rules, uid=0)  # root sets what it likes
    with pytest.raises(RequestError, match="dns"):
        check_user_options(Request("tun0", dns=("198.51.100.53",)), None, uid=1000)


def test_user_options_must_name_known_options() -> None:
    with pytest.raises(ConfigError, match="unknown option 'mtu'"):
        parse('[interface.vlan3]\nuser_options = ["mtu"]\n')
