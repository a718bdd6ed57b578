"""The hand-written parser of the launch form, and CMD resolution (126/127)."""

import stat

import pytest

from via_tunnel.errors import UsageError, ViaTunnelError
from via_tunnel.launch import parse, resolve


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
