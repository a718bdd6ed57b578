"""The shipped systemd units agree with the code (no systemd here to `systemd-analyze verify`
them: this checks their shape and the values the code depends on)."""

from __future__ import annotations

from pathlib import Path

from via_tunnel.core.wire import DEFAULT_SOCKET
from via_tunnel.daemon.listen import SD_LISTEN_FDS_START

UNITS = Path(__file__).resolve().parents[1] / "systemd"


def parse(path: Path) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> values (systemd allows repeated keys)."""
    out: dict[str, dict[str, list[str]]] = {}
    section = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            out.setdefault(section, {})
            continue
        assert section is not None, f"{path.name}: {line!r} outside a section"
        key, sep, value = line.partition("=")
        assert sep and key == key.strip() and key.isalnum(), f"{path.name}: bad line {line!r}"
        out[section].setdefault(key, []).append(value)
    return out


def test_socket_unit_listens_where_the_client_looks() -> None:
    unit = parse(UNITS / "via-tunnel.socket")
    assert set(unit) == {"Unit", "Socket", "Install"}
    assert unit["Socket"]["ListenStream"] == [DEFAULT_SOCKET]
    # The policy in config.toml is the one gate, whatever the caller's session: no group.
    assert unit["Socket"]["SocketMode"] == ["0666"]
    assert "SocketGroup" not in unit["Socket"]
    assert SD_LISTEN_FDS_START == 3  # one ListenStream: the daemon takes fd 3


def test_service_unit_runs_the_daemon_with_only_what_it_needs() -> None:
    unit = parse(UNITS / "via-tunnel.service")
    assert set(unit) == {"Unit", "Service", "Install"}
    service = unit["Service"]
    assert service["ExecStart"][0].split()[1:] == ["daemon"]
    # Groups are scopes of their own (via-tunnel.slice), not part of the service: no
    # delegation, no KillMode trickery, nothing that moves them below the service's cgroup.
    assert "Delegate" not in service and "KillMode" not in service
    assert not any(e.startswith("VIA_TUNNEL_CGROUP=") for e in service.get("Environment", []))
    # CAP_SYS_ADMIN (and DAC_OVERRIDE: its root is 0555) only for the net_cls hierarchy,
    # mounted in its own mount namespace.
    assert service["CapabilityBoundingSet"] == ["CAP_NET_ADMIN CAP_SYS_ADMIN CAP_DAC_OVERRIDE"]
    assert service["NoNewPrivileges"] == ["yes"]
    assert service["ProtectSystem"] == ["strict"]
    assert "/run/via-tunnel" in service["ReadWritePaths"][0].split()
    # These would break it: cgroupfs and the net sysctls must stay writable.
    assert "ProtectControlGroups" not in service
    assert "ProtectKernelTunables" not in service


def test_slice_unit_names_the_slice_the_code_puts_groups_in() -> None:
    from via_tunnel.core.settings import SCOPE_SLICE

    unit = parse(UNITS / SCOPE_SLICE)
    assert set(unit) == {"Unit"}
