"""Interface-name validation mirrors the kernel's dev_valid_name()."""

import pytest

from via_tunnel.core.errors import UsageError
from via_tunnel.core.names import validate_ifname


@pytest.mark.parametrize("name", ["vlan3", "tun0", "a", "x" * 15, "wg-home.1", 'q"uote;', "é"])
def test_accepts_names_linux_accepts(name: str) -> None:
    assert validate_ifname(name) == name


@pytest.mark.parametrize(
    "name",
    ["", ".", "..", "x" * 16, "a/b", "a:b", "a b", "a\tb", "a\nb", "a\x01", "a\x7f", "é" * 8],
)
def test_rejects_names_linux_rejects(name: str) -> None:
    with pytest.raises(UsageError):
        validate_ifname(name)
