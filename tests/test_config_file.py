"""The config file is parsed in one place (core.config) for the daemon's policy and the
gateway alike: the same file gets the same verdict from both. Pure, no root."""

from __future__ import annotations

from pathlib import Path

import pytest

from via_tunnel.core import config, policy
from via_tunnel.core.config import ConfigError
from via_tunnel.gateway import apply

PATH = "/etc/via-tunnel/config.toml"


def test_sections_come_back_as_parsed() -> None:
    conf = config.parse('[daemon]\nsocket_group = "vt"\n[interface.vlan3]\nallow_users = ["a"]\n'
                        '[gateway.tun0]\nwan = "eth0"\n', PATH)
    assert conf.path == PATH
    assert conf.daemon == {"socket_group": "vt"}
    assert conf.interfaces == {"vlan3": {"allow_users": ["a"]}}
    assert conf.gateways == {"tun0": {"wan": "eth0"}}
    assert config.parse("", PATH) == config.ConfigFile(PATH)


@pytest.mark.parametrize(("text", "message"), [
    ("[gateway.tun0\n", "Expected ']'"),
    ("[gatway.tun0]\nwan = 'eth0'\n", "unknown section [gatway]"),
    ("gateway = 3\n", "[gateway] must be a table of [gateway.NAME] tables"),
    ("[gateway]\ntun0 = 'eth0'\n", "[gateway.tun0] must be a table"),
    ('[gateway."bad/name"]\nwan = "eth0"\n', "forbids"),
    ("daemon = 1\n", "[daemon] must be a table"),
])
def test_both_readers_refuse_a_malformed_file_alike(
        text: str, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "config.toml"
    path.write_text(text)
    monkeypatch.setenv("VIA_TUNNEL_CONFIG", str(path))
    with pytest.raises(ConfigError) as daemon:
        policy.load(str(path))
    with pytest.raises(ConfigError) as gateway:
        apply.load_gateway_table("tun0")
    assert daemon.value.message == gateway.value.message
    assert daemon.value.message.startswith(f"{path}: ")
    assert message in daemon.value.message


def test_a_file_that_is_not_utf8_is_one_clean_error(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "config.toml"
    path.write_bytes(b"[gateway.tun0]\nwan = '\xff'\n")
    monkeypatch.setenv("VIA_TUNNEL_CONFIG", str(path))
    with pytest.raises(ConfigError, match="not UTF-8"):
        apply.load_gateway_table("tun0")


def test_each_reader_checks_its_own_sections(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Keys and values are checked by the section's reader: the gateway does not refuse
    a file for the daemon's settings, nor the daemon for the gateway's."""
    path = tmp_path / "config.toml"
    path.write_text("[interface.vlan3]\ndns = ['resolver']\n[gateway.tun0]\nwan = 'eth0'\n")
    monkeypatch.setenv("VIA_TUNNEL_CONFIG", str(path))
    assert apply.load_gateway_table("tun0") == ({"wan": "eth0"}, str(path))
    assert apply.load_gateway_table("tun1") == ({}, str(path))
    with pytest.raises(ConfigError, match="not an IP address"):
        policy.load(str(path))
    path.write_text("[gateway.tun0]\nwna = 'eth0'\n")
    assert policy.load(str(path)) == policy.Policy()


def test_a_missing_file_is_empty(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VIA_TUNNEL_CONFIG", str(tmp_path / "none.toml"))
    assert apply.load_gateway_table("tun0") == ({}, str(tmp_path / "none.toml"))
    assert config.load(str(tmp_path / "none.toml")) == config.ConfigFile(
        str(tmp_path / "none.toml"))


def test_the_launch_section_lists_single_instance_programs() -> None:
    from via_tunnel.core.config import ConfigError, launch_section, parse

    parse('[launch]\nsingle_instance = ["myapp"]\n')
    assert launch_section({"single_instance": ["myapp"]}, "c") == frozenset({"myapp"})
    for bad in ('[launch]\nsingle_instance = "myapp"\n', '[launch]\nsingle_instance = ["/x"]\n',
                '[launch]\nsingle = ["x"]\n', 'launch = 3\n'):
        with pytest.raises(ConfigError):
            parse(bad)
