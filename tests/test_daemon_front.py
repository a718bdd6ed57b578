"""The daemon's defences that need no root (issue "No escape, no cross-user influence",
§4): the log's escaping and per-user limit, a hostile config on reload, the records and
sysctl paths it trusts, the move that puts a reused PID back, and a thread that cannot
start. The kernel side, with real users: test_hostile_kernel.py."""

from __future__ import annotations

import json
import os
import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from via_tunnel.core.config import ConfigError, parse
from via_tunnel.core.errors import ViaTunnelError
from via_tunnel.core.settings import Settings
from via_tunnel.daemon import front as front_mod
from via_tunnel.daemon import log as log_mod
from via_tunnel.daemon import peer as peer_mod
from via_tunnel.group import state
from via_tunnel.group.state import GroupRecord
from via_tunnel.kernel import files, sysctl


def test_names_from_requests_are_escaped_in_the_log() -> None:
    assert log_mod.escape("vlan3") == "vlan3"
    assert log_mod.escape("a\u202eb\\c\nd\x1b[31m é") == "a\\u202eb\\\\c\\nd\\x1b[31m é"


def test_one_user_cannot_flood_the_log(capfd: pytest.CaptureFixture[str]) -> None:
    limiter = log_mod.Limiter(rate=0.0, burst=5)
    for i in range(1000):
        limiter.log(1000, f"busy {i}")
    limiter.log(1001, "other user")
    out = capfd.readouterr().err.splitlines()
    assert len(out) == 6 and "other user" in out[-1]
    assert limiter.pending() == 995
    limiter.rate = 1e9  # refilled: the count is reported in one line
    limiter.flush()
    assert capfd.readouterr().err.strip().endswith("uid=1000: 995 message(s) suppressed "
                                                   "(rate limit)")


def test_a_deeply_nested_config_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="nested too deeply"):
        parse("x = " + "[" * 100_000)


def test_sysctl_restore_takes_only_per_interface_keys_we_set() -> None:
    assert sysctl.restorable("/proc/sys/net/ipv4/conf/vlan3/route_localnet")
    for bad in ("/proc/sys/net/ipv4/conf/../../kernel/core_pattern",
                "/proc/sys/net/ipv4/conf/vlan3/../../../../kernel/x/route_localnet",
                "/proc/sys/net/ipv4/conf/all/route_localnet",
                "/proc/sys/net/ipv4/conf/vlan3/forwarding", "/etc/passwd",
                "/proc/sys/net/ipv4/conf/a b/route_localnet"):
        assert not sysctl.restorable(bad), bad


def test_records_are_trusted_only_when_only_root_may_write_them(tmp_path: Path) -> None:
    settings = Settings(state_dir=str(tmp_path))
    state.save(settings, state.GroupRecord(iface="vlan3", slot=1, mark=1, table=1, level=1,
                                           cgroup="/x", cgroup_nft_path="x", created=0.0))
    path = Path(state.record_path(settings, "vlan3"))
    assert oct(path.stat().st_mode & 0o777) == "0o644"
    assert state.load(settings, "vlan3") is not None
    path.chmod(0o666)
    with pytest.raises(ViaTunnelError, match="refusing to trust"):
        state.load(settings, "vlan3")
    assert state.load_all(settings) == []
    path.chmod(0o644)
    os.chown(path, 65534, 65534)
    with pytest.raises(ViaTunnelError, match="refusing to trust"):
        state.load(settings, "vlan3")
    path.unlink()
    other = tmp_path / "elsewhere.json"
    other.write_text("{}")
    path.symlink_to(other)
    with pytest.raises(ViaTunnelError, match="refusing to trust"):
        state.load(settings, "vlan3")
    path.unlink()
    path.write_text('{"iface": "eth0", "slot": 1, '
                    '"mark": 1, "table": 1, "level": 1, "cgroup": "/x", '
                    '"cgroup_nft_path": "x", "created": 0}')
    with pytest.raises(ViaTunnelError, match="names 'eth0'"):
        state.load(settings, "vlan3")


def test_the_state_dir_must_be_roots_alone(tmp_path: Path) -> None:
    files.check_private_dir(str(tmp_path / "ok"))
    (tmp_path / "open").mkdir(mode=0o777)
    (tmp_path / "open").chmod(0o777)
    with pytest.raises(ViaTunnelError, match="writable by root only"):
        files.check_private_dir(str(tmp_path / "open"))
    (tmp_path / "link").symlink_to(tmp_path / "ok")
    with pytest.raises(ViaTunnelError):
        files.check_private_dir(str(tmp_path / "link"))


def _record(cgroup: str) -> GroupRecord:
    return GroupRecord(iface="vlan3", slot=1, mark=0x8100_0000, table=0x7674_0001, level=2,
                       cgroup=cgroup, cgroup_nft_path="x", created=0.0, ready=True)


def test_a_pid_reused_during_the_move_is_moved_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """The caller exits between the checks and the write; its PID now names another
    process, which the write put into the group: it goes back where the caller was."""
    writes: list[tuple[str, int]] = []
    alive = iter([False, True])  # alive before the write, exited after it
    monkeypatch.setattr(peer_mod, "_exited", lambda fd: next(alive))
    monkeypatch.setattr(peer_mod.procs, "uids", lambda pid: (1000, 1000, 1000))
    monkeypatch.setattr(peer_mod.cgroup, "cgroup2_mount", lambda: "/cg")
    monkeypatch.setattr(peer_mod.cgroup, "own_cgroup", lambda mount, pid: "/cg/user.slice")
    monkeypatch.setattr(peer_mod.cgroup, "join", lambda path, pid: writes.append((path, pid)))
    monkeypatch.setattr(peer_mod.cgroup, "members", lambda path: [4242])
    monkeypatch.setattr(peer_mod.cgroup, "join_netcls", lambda rel, pid: False)
    peer = peer_mod.Peer(4242, 1000, 1000, -1, "alice", frozenset())
    with pytest.raises(ViaTunnelError, match="exited"):
        peer_mod.move(peer, Settings(), _record("/cg/via-tunnel/if-vlan3"))
    assert writes == [("/cg/via-tunnel/if-vlan3", 4242), ("/cg/user.slice", 4242)]


def test_a_setuid_exec_is_not_moved(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(peer_mod, "_exited", lambda fd: False)
    monkeypatch.setattr(peer_mod.procs, "uids", lambda pid: (1000, 0, 0))
    with pytest.raises(ViaTunnelError, match="changed its identity"):
        peer_mod.move(peer_mod.Peer(1, 1000, 1000, -1, None, frozenset()), Settings(),
                      _record("/cg/x"))


def _front(tmp_path: Path, spawn: Any) -> tuple[front_mod.Front, str]:
    path = str(tmp_path / "s.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(64)
    served = lambda sock, work: {"ok": True, "work": work}  # noqa: E731
    quick = lambda raw, uid, pid: {"ok": True, "ping": 1} if raw == b"ping" else (raw.decode(),)  # noqa: E731
    return front_mod.Front(listener, quick, served, log_mod.Limiter(), spawn), path


def _ask(path: str, data: bytes) -> dict[str, Any]:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    s.connect(path)
    s.sendall(data)
    s.shutdown(socket.SHUT_WR)
    try:
        return json.loads(s.recv(65536))  # type: ignore[no-any-return]
    finally:
        s.close()


def _pump(front: front_mod.Front, until: threading.Event) -> None:
    while not until.is_set():
        front.poll(0.05)


def test_a_thread_that_cannot_start_is_busy_not_death(tmp_path: Path) -> None:
    def no_threads(target: Any) -> None:
        raise RuntimeError("can't start new thread")

    front, path = _front(tmp_path, no_threads)
    done = threading.Event()
    loop = threading.Thread(target=_pump, args=(front, done))
    loop.start()
    try:
        assert _ask(path, b"work")["error"] == "the daemon is busy; try again"
        assert _ask(path, b"ping") == {"ok": True, "ping": 1}  # no thread needed: served
        front.spawn = lambda target: threading.Thread(target=target).start()
        assert _ask(path, b"work") == {"ok": True, "work": "work"}
    finally:
        done.set()
        loop.join()
    assert front.open_connections() == 0


def test_a_silent_connection_is_dropped_fast(tmp_path: Path) -> None:
    front, path = _front(tmp_path, lambda target: threading.Thread(target=target).start())
    done = threading.Event()
    loop = threading.Thread(target=_pump, args=(front, done))
    loop.start()
    try:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(5)
        s.connect(path)
        s.sendall(b'{"iface": "vl')
        answer = json.loads(s.recv(65536))
        s.close()
        assert answer["error"] == "request timed out"
    finally:
        done.set()
        loop.join()
    assert front.open_connections() == 0
