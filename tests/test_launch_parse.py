"""The hand-written parser of the launch form, and CMD resolution (126/127)."""

import stat

import pytest

from via_tunnel.core.errors import UsageError, ViaTunnelError
from via_tunnel.core.launch_form import parse
from via_tunnel.kernel.execs import resolve


def test_parses_options_iface_and_command() -> None:
    a = parse(["--gateway", "192.0.2.1", "--ipv6=block", "vlan3", "--", "curl", "-s", "--", "x"])
    assert (a.iface, a.gateway, a.ipv6, a.argv) == ("vlan3", "192.0.2.1", "block",
                                                   ["curl", "-s", "--", "x"])


def test_double_dash_is_optional_and_command_options_stay_untouched() -> None:
    assert parse(["tun0", "ls", "--debug"]).argv == ["ls", "--debug"]
    assert parse(["--debug", "tun0", "--", "--weird"]).argv == ["--weird"]


BAD = [[], ["--"], ["vlan3"], ["vlan3", "--"], ["--bogus", "v", "--", "x"],
       ["--ipv6", "maybe", "v", "--", "x"], ["--gateway"], ["bad/name", "--", "x"]]


@pytest.mark.parametrize("argv", BAD)
def test_usage_errors(argv: list[str]) -> None:
    with pytest.raises(UsageError):
        parse(argv)


def test_resolve_follows_path_and_reports_126_127(tmp_path) -> None:  # type: ignore[no-untyped-def]
    exe = tmp_path / "tool"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    noexec = tmp_path / "data"
    noexec.write_text("x")
    noexec.chmod(stat.S_IRUSR)
    assert resolve("tool", path_env=str(tmp_path)) == str(exe)
    assert resolve(str(exe)) == str(exe)
    with pytest.raises(ViaTunnelError) as e127:
        resolve("no-such-tool", path_env=str(tmp_path))
    assert e127.value.exit_code == 127
    with pytest.raises(ViaTunnelError) as e126:
        resolve(str(noexec))
    assert e126.value.exit_code == 126
    with pytest.raises(ViaTunnelError) as edir:
        resolve(str(tmp_path))
    assert edir.value.exit_code == 126


def test_loopback_resolvers_are_recognised_without_ipaddress(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from via_tunnel.kernel.resolvers import (
        _is_loopback,
        parse_resolvectl_dns,
        system_uses_local_stub,
    )

    for text in ("127.0.0.53", "127.0.0.1", "::1", "0:0:0:0:0:0:0:1", "0::1"):
        assert _is_loopback(text), text
    for text in ("10.0.0.1", "::", "fe80::1", "2001:db8::1", "1::1", "::2"):
        assert not _is_loopback(text), text
    conf = tmp_path / "resolv.conf"
    conf.write_text("# c\nnameserver 127.0.0.53\noptions edns0\n")
    assert system_uses_local_stub(str(conf))
    conf.write_text("nameserver 127.0.0.53\nnameserver 192.0.2.1\n")
    assert not system_uses_local_stub(str(conf))
    assert system_uses_local_stub(str(tmp_path / "missing"))
    assert parse_resolvectl_dns("Global:\nLink 5 (tun0): 192.0.2.1 2001:db8::53#x.test\n") \
        == ("192.0.2.1", "2001:db8::53")
