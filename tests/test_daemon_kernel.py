"""Unprivileged use on a real kernel: the daemon, its policy, and the sudo drop.

Two throwaway users (and a group) are created for the module and removed after it. They must
be able to run the code under test, but the checkout or the venv may sit where other users
cannot read (a CI runner's home is often 0700). So the package is copied to a world-readable
temporary directory and the users run it with Debian's ``/usr/bin/python3``: the
unprivileged launcher needs nothing beyond the standard library. The daemon runs the same
copy, as root, with the suite's interpreter, in the lab's client namespace.
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_lab import USER_PY, Daemon, cli_dependencies, readable_package
from helpers import PACKAGE_PARENT, cgroup_leftovers, via, wait_for

from via_tunnel.lab.netlab import Lab

pytestmark = pytest.mark.kernel

VETH, TUN = Lab.CLIENT_VETH, Lab.CLIENT_TUN


class Users:
    def __init__(self) -> None:
        tag = secrets.token_hex(3)
        self.allowed = f"vtu1{tag}"
        self.other = f"vtu2{tag}"
        self.group = f"vtg{tag}"


@pytest.fixture(scope="module")
def user_pythonpath() -> Iterator[str]:
    """A world-readable copy of the package under test and of what its subcommands import
    (see the module docstring)."""
    with readable_package(*cli_dependencies()) as top:
        yield top


@pytest.fixture(scope="module")
def users() -> Iterator[Users]:
    missing = [p for p in ("useradd", "userdel", "groupadd", "groupdel", "setpriv", "getent")
               if shutil.which(p) is None]
    if missing:
        reason = f"the daemon tests need {', '.join(missing)}"
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (CI is set: refusing to skip)", pytrace=False)
        pytest.skip(reason)
    u = Users()
    made: list[list[str]] = []
    try:
        for name in (u.allowed, u.other):
            subprocess.run(["useradd", "--no-create-home", "--user-group", "--shell", "/bin/sh",
                            name], check=True)
            made.append(["userdel", name])
        subprocess.run(["groupadd", u.group], check=True)
        made.append(["groupdel", u.group])
        yield u
    finally:
        for argv in reversed(made):
            subprocess.run(argv, check=False)


@pytest.fixture
def denv(vt_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory,
         users: Users, user_pythonpath: str) -> dict[str, str]:
    """vt_env plus the daemon's socket (in the instance's state dir) and a policy that lets
    only the first user (and members of the test group) use vlan3."""
    config = tmp_path_factory.mktemp("daemon") / "config.toml"
    config.write_text(f'[interface.vlan3]\nallow_users = ["{users.allowed}"]\n'
                      f'allow_groups = ["{users.group}"]\n')
    return {**vt_env, "VIA_TUNNEL_SOCKET": vt_env["VIA_TUNNEL_STATE_DIR"] + "/daemon.sock",
            "VIA_TUNNEL_CONFIG": str(config), "PYTHONPATH": user_pythonpath}


@pytest.fixture
def daemon(lab: Lab, denv: dict[str, str], tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(lab, denv, tmp_path / "daemon.log").start()
    try:
        yield d
    finally:
        d.stop()


@pytest.fixture
def clean(lab: Lab, vt_env: dict[str, str]) -> Iterator[None]:
    before = lab.snapshot(lab.client)
    yield
    wait_for(lambda: not cgroup_leftovers(vt_env), timeout=10, what="groups to be removed")
    assert lab.snapshot(lab.client) == before
    groups_dir = os.path.join(vt_env["VIA_TUNNEL_STATE_DIR"], "groups")
    if os.path.isdir(groups_dir):
        assert not [n for n in os.listdir(groups_dir) if n.endswith(".json")]


def as_user(user: str, *argv: str, groups: str | None = None) -> list[str]:
    """Argv that runs ``argv`` as ``user`` (its own uid, gid and supplementary groups, or
    exactly ``groups``), as a login would; no privilege left."""
    ids = ["--groups", groups] if groups else ["--init-groups"]
    return ["setpriv", "--reuid", user, "--regid", user, *ids, "--", *argv]


def via_as(lab: Lab, env: dict[str, str], user: str, *args: str, groups: str | None = None,
           timeout: float = 30) -> subprocess.CompletedProcess[str]:
    argv = as_user(user, USER_PY, "-m", "via_tunnel", *args, groups=groups)
    return lab.run(lab.client, argv, env=env, check=False, timeout=timeout)


def fetch_cmd(lab: Lab) -> str:
    return " ".join(lab.fetch_argv())


def uid(name: str) -> int:
    return pwd.getpwnam(name).pw_uid


def test_allowed_user_runs_cmd_as_itself_through_the_tunnel(
        lab: Lab, denv: dict[str, str], users: Users, daemon: Daemon, clean: None) -> None:
    r = via_as(lab, denv, users.allowed, "vlan3", "--", "sh", "-c", f"id -u; {fetch_cmd(lab)}")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(uid(users.allowed)), VETH]
    assert r.stderr == ""
    assert f"allow uid={uid(users.allowed)}({users.allowed})" in daemon.log()
    # In place: the PID the user started is CMD's.
    p = lab.popen(lab.client, as_user(users.allowed, USER_PY, "-m", "via_tunnel",
                                      "vlan3", "--", "sh", "-c", "echo $$"),
                  env=denv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = p.communicate(timeout=20)
    assert (p.returncode, out.strip()) == (0, str(p.pid)), err


def test_second_user_and_other_interface_are_refused_in_one_line(
        lab: Lab, denv: dict[str, str], users: Users, daemon: Daemon, clean: None) -> None:
    r = via_as(lab, denv, users.other, "vlan3", "--", "sh", "-c", "echo ran")
    assert r.returncode == 125 and r.stdout == ""
    assert r.stderr.count("\n") == 1
    assert "vlan3" in r.stderr and users.other in r.stderr and "not allowed" in r.stderr
    r = via_as(lab, denv, users.allowed, "tun0", "--", "sh", "-c", "echo ran")
    assert r.returncode == 125 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "tun0" in r.stderr
    log = daemon.log()
    assert f"refuse uid={uid(users.other)}({users.other})" in log
    assert "iface=tun0" in log
    assert not os.path.exists(os.path.join(denv["VIA_TUNNEL_STATE_DIR"], "groups",
                                           "tun0.json"))


def test_group_membership_comes_from_the_callers_process(
        lab: Lab, denv: dict[str, str], users: Users, daemon: Daemon, clean: None) -> None:
    # The second user holding the allowed group (SO_PEERGROUPS) gets in; without it, not.
    gid = subprocess.run(["getent", "group", users.group], capture_output=True, text=True,
                         check=True).stdout.split(":")[2]
    r = via_as(lab, denv, users.other, "vlan3", "--", *lab.fetch_argv(), groups=gid)
    assert (r.returncode, r.stdout.strip()) == (0, VETH), r.stderr
    assert f"is in group {users.group}" in daemon.log()


def test_commands_are_resolved_before_asking_the_daemon(
        lab: Lab, denv: dict[str, str], users: Users, daemon: Daemon, clean: None) -> None:
    r = via_as(lab, denv, users.allowed, "vlan3", "--", "no-such-command-xyz")
    assert r.returncode == 127
    assert "iface=vlan3" not in daemon.log()


def test_no_daemon_is_one_clear_line(lab: Lab, denv: dict[str, str], users: Users,
                                     clean: None) -> None:
    env = {**denv, "VIA_TUNNEL_SOCKET": denv["VIA_TUNNEL_STATE_DIR"] + "/none.sock"}
    r = via_as(lab, env, users.allowed, "vlan3", "--", "true")
    assert r.returncode == 125
    assert r.stderr == ("via-tunnel: via-tunnel needs root or the daemon (start `via-tunnel "
                        "daemon`, or systemctl enable --now via-tunnel.socket)\n")
    r = via_as(lab, env, users.allowed, "--user", "root", "vlan3", "--", "true")
    assert r.returncode == 125 and "--user needs root" in r.stderr


LIAR = """
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.sendall(json.dumps({"iface": "vlan3", "pid": int(sys.argv[2]), "uid": 0}).encode())
s.shutdown(socket.SHUT_WR)
print(s.recv(65536).decode())
print([ln for ln in open("/proc/self/cgroup") if ln.startswith("0::")][0].strip())
"""


def test_a_client_lying_about_its_pid_moves_only_itself(
        lab: Lab, denv: dict[str, str], users: Users, daemon: Daemon, clean: None) -> None:
    victim = lab.popen(lab.client, ["sleep", "30"])
    time.sleep(0.1)  # nsenter has exec'd sleep
    before = Path(f"/proc/{victim.pid}/cgroup").read_text()
    r = lab.run(lab.client, as_user(users.allowed, USER_PY, "-c", LIAR,
                                    denv["VIA_TUNNEL_SOCKET"], str(victim.pid)), env=denv)
    answer, own_cgroup = r.stdout.strip().splitlines()
    assert json.loads(answer)["ok"] is True
    assert own_cgroup.endswith("/if-vlan3")  # the liar itself was moved, as it asked...
    assert Path(f"/proc/{victim.pid}/cgroup").read_text() == before  # ...and nobody else
    victim.kill()
    victim.wait()


def _send(path: str, payload: bytes, *, shut: bool = True) -> bytes:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(path)
    try:
        s.sendall(payload)
        if shut:
            s.shutdown(socket.SHUT_WR)
        return s.recv(65536)
    except (BrokenPipeError, ConnectionResetError):
        return b""
    finally:
        s.close()


def test_a_thousand_malformed_requests_leave_the_daemon_serving(
        lab: Lab, denv: dict[str, str], users: Users, daemon: Daemon, clean: None) -> None:
    path = denv["VIA_TUNNEL_SOCKET"]
    # Slow clients: connect and send nothing. They hold a thread each for the request
    # timeout, while everybody else is still served.
    slow = []
    for _ in range(5):
        s = socket.socket(socket.AF_UNIX)
        s.connect(path)
        s.sendall(b'{"iface": "vl')
        slow.append(s)
    garbage = [b"", b"garbage", b"{", b'{"iface": ', b"[]", b"null", b'{"iface": 3}',
               b'{"iface": "bad/name"}', b'{"iface": "x", "ipv6": "maybe"}',
               b"\xff\xfe\x00", b"[" * 50_000, b'{"iface": "\\ud800"}',
               b'{"iface": "' + b"a" * 70_000 + b'"}',  # more than 64 KiB
               b'{"iface": "nosuch0"}', b'{"iface": "vlan3", "gateway": "bogus"}']
    for i in range(1000):
        payload = garbage[i % len(garbage)]
        raw = _send(path, payload)
        if len(payload) > 64 * 1024 and not raw:
            continue  # cut off while still sending: refused too
        answer = json.loads(raw)
        assert answer["ok"] is False and answer["code"] in (2, 125), (payload[:40], answer)
    assert daemon.proc is not None and daemon.proc.poll() is None
    # A request the client never finishes is answered with a timeout, not held forever.
    t0 = time.monotonic()
    r = via_as(lab, denv, users.allowed, "vlan3", "--", *lab.fetch_argv())
    assert (r.returncode, r.stdout.strip()) == (0, VETH), r.stderr
    assert time.monotonic() - t0 < 5
    for s in slow:
        s.settimeout(5)
        assert b"timed out" in s.recv(65536)
        s.close()
    assert "Traceback" not in daemon.log()


def test_killed_daemon_loses_no_routing_and_its_successor_cleans_up(
        lab: Lab, denv: dict[str, str], users: Users, daemon: Daemon, clean: None) -> None:
    p = lab.popen(lab.client, as_user(users.allowed, USER_PY, "-m", "via_tunnel",
                                      "vlan3", "--", "sh", "-c", f"sleep 3; {fetch_cmd(lab)}"),
                  env=denv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    record = Path(denv["VIA_TUNNEL_STATE_DIR"]) / "groups" / "vlan3.json"
    # Once CMD runs (the launcher exec'd sh), the daemon has answered: kill it now.
    wait_for(lambda: Path(f"/proc/{p.pid}/comm").read_text().strip() == "sh", timeout=10,
             what="CMD to start")
    assert record.exists()
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait(timeout=5)
    time.sleep(0.5)
    assert record.exists()  # nobody tore the group down...
    # What a daemon killed while writing another group's first record leaves.
    half = record.parent / "eth0.json.tmp"
    half.write_text('{"iface": "eth0", "sl')
    daemon.start()  # ...and the new daemon adopts it, and sweeps the half-written record
    assert "adopted group vlan3" in daemon.log()
    assert f"removed half-written {half}" in daemon.log() and not half.exists()
    out, err = p.communicate(timeout=20)
    assert (p.returncode, out.strip()) == (0, VETH), err
    wait_for(lambda: not record.exists(), timeout=10, what="the successor's teardown")


def test_sighup_reloads_the_policy_and_keeps_it_when_the_new_one_is_broken(
        lab: Lab, denv: dict[str, str], users: Users, daemon: Daemon, clean: None) -> None:
    config = Path(denv["VIA_TUNNEL_CONFIG"])
    original = config.read_text()
    try:
        config.write_text(f'[interface.vlan3]\nallow_users = ["{users.other}"]\n')
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "config reloaded" in daemon.log(), timeout=5, what="reload")
        assert via_as(lab, denv, users.other, "vlan3", "--", "true").returncode == 0
        assert via_as(lab, denv, users.allowed, "vlan3", "--", "true").returncode == 125
        config.write_text("[interface.vlan3\n")
        daemon.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "keeping the previous one" in daemon.log(), timeout=5,
                 what="refused reload")
        assert via_as(lab, denv, users.other, "vlan3", "--", "true").returncode == 0
        assert daemon.proc.poll() is None
    finally:
        config.write_text(original)


def test_broken_config_or_taken_socket_stop_the_daemon_in_one_line(
        lab: Lab, denv: dict[str, str], daemon: Daemon, tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[interface.vlan3]\nallow_user = ["x"]\n')
    argv = [sys.executable, "-m", "via_tunnel", "daemon"]
    r = lab.run(lab.client, [*argv, "--config", str(bad)], env=denv, check=False)
    assert r.returncode == 125
    assert r.stderr.count("\n") == 1 and "allow_user" in r.stderr and str(bad) in r.stderr
    r = lab.run(lab.client, argv, env=denv, check=False)  # the fixture's daemon has it
    assert r.returncode == 125 and "already serving" in r.stderr


def test_socket_activation_uses_the_socket_systemd_passes(
        lab: Lab, denv: dict[str, str], users: Users, tmp_path: Path, clean: None) -> None:
    path = denv["VIA_TUNNEL_STATE_DIR"] + "/activated.sock"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    os.chmod(path, 0o666)
    listener.listen(8)
    # As systemd does: the socket as fd 3, LISTEN_PID = the daemon's own pid (the shell
    # execs nsenter, which execs python: one pid all along).
    script = 'export LISTEN_PID=$$ LISTEN_FDS=1; exec "$@"'
    log = tmp_path / "activated.log"
    with open(log, "w") as out:
        p = subprocess.Popen(
            ["sh", "-c", script, "sh", *lab.nsenter(lab.client), sys.executable, "-m",
             "via_tunnel", "daemon"],
            env={**os.environ, **denv, "VIA_TUNNEL_SOCKET": "/nonexistent/not-this.sock"},
            stdout=out, stderr=out, pass_fds=(3,),
            preexec_fn=lambda: os.dup2(listener.fileno(), 3))
    try:
        wait_for(lambda: "listening on the socket from systemd" in log.read_text(),
                 timeout=10, what="the activated daemon")
        r = via_as(lab, {**denv, "VIA_TUNNEL_SOCKET": path}, users.allowed, "vlan3", "--",
                   *lab.fetch_argv())
        assert (r.returncode, r.stdout.strip()) == (0, VETH), r.stderr + log.read_text()
        record = Path(denv["VIA_TUNNEL_STATE_DIR"]) / "groups" / "vlan3.json"
        wait_for(lambda: not record.exists(), timeout=10, what="teardown")
    finally:
        p.terminate()
        p.wait(timeout=10)
        listener.close()
        os.unlink(path)


def test_sudo_runs_cmd_as_the_invoking_user(lab: Lab, vt_env: dict[str, str], users: Users,
                                            clean: None) -> None:
    pw = pwd.getpwnam(users.allowed)
    env = {**vt_env, "SUDO_UID": str(pw.pw_uid), "SUDO_GID": str(pw.pw_gid),
           "SUDO_USER": users.allowed, "SUDO_COMMAND": "/usr/local/bin/via-tunnel",
           "HOME": "/root", "USER": "root", "LOGNAME": "root", "VT_KEPT": "yes"}
    show = 'id -u; id -g; id -G; echo "$HOME $USER $LOGNAME $VT_KEPT"; '
    r = lab.run(lab.client, [sys.executable, "-m", "via_tunnel", "vlan3", "--", "sh", "-c",
                             show + fetch_cmd(lab)], env=env)
    uid_, gid_, groups, names, addr = r.stdout.strip().splitlines()
    assert (int(uid_), int(gid_), addr) == (pw.pw_uid, pw.pw_gid, VETH)
    assert groups.split() == [str(pw.pw_gid)]  # initgroups: the user's own, not root's
    assert names == f"{pw.pw_dir} {users.allowed} {users.allowed} yes"
    # --user (really root) picks another user, and wins over SUDO_UID.
    r = lab.run(lab.client, [sys.executable, "-m", "via_tunnel", "--user", users.other,
                             "vlan3", "--", "id", "-un"], env=env)
    assert r.stdout.strip() == users.other
    r = lab.run(lab.client, [sys.executable, "-m", "via_tunnel", "--user", "no-such-user-vt",
                             "vlan3", "--", "true"], env=env, check=False)
    assert r.returncode == 125 and "no such user" in r.stderr


def test_real_sudo_by_a_user_runs_cmd_as_that_user(
        lab: Lab, vt_env: dict[str, str], users: Users, clean: None) -> None:
    """The real thing: the test user types `sudo via-tunnel ...` (NOPASSWD for the test)."""
    if shutil.which("sudo") is None:
        reason = "sudo is not installed (scripts/test.sh installs it)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (CI is set: refusing to skip)", pytrace=False)
        pytest.skip(reason)
    pw = pwd.getpwnam(users.allowed)
    rule = Path(f"/etc/sudoers.d/vt-test-{users.allowed}")
    rule.write_text(f"{users.allowed} ALL=(root) NOPASSWD: ALL\n")
    rule.chmod(0o440)
    try:
        # sudo resets the environment: `env` (run by sudo, as root) passes our test settings.
        settings = [f"{k}={v}" for k, v in vt_env.items() if k.startswith("VIA_TUNNEL_")]
        # The root side runs the suite's interpreter (it has pyroute2), as an install would.
        argv = as_user(users.allowed, "sudo", "-n", "env", f"PYTHONPATH={PACKAGE_PARENT}",
                       *settings, sys.executable, "-m", "via_tunnel", "vlan3", "--", "sh", "-c",
                       'id -u; id -G; echo "$HOME $USER"; ' + fetch_cmd(lab))
        r = lab.run(lab.client, argv, env={"HOME": pw.pw_dir})
    finally:
        rule.unlink()
    uid_, groups, names, addr = r.stdout.strip().splitlines()
    assert (int(uid_), addr) == (pw.pw_uid, VETH)
    assert groups.split() == [str(pw.pw_gid)]
    assert names == f"{pw.pw_dir} {users.allowed}"


def test_single_instance_warning(lab: Lab, denv: dict[str, str], users: Users,
                                 daemon: Daemon, clean: None) -> None:
    # A copy of `sleep` under another name stands in for a browser already running (in a
    # directory the test user can reach: pytest's tmp_path is private to root).
    app_dir = Path(tempfile.mkdtemp(prefix="vt-app-"))
    os.chmod(app_dir, 0o755)
    app = app_dir / "fakebrowser"
    app.write_bytes(Path("/bin/sleep").read_bytes())
    app.chmod(0o755)
    # The launcher reads [launch] itself, as the user: a config it can read (the daemon keeps
    # its own, named when it started).
    config = app_dir / "config.toml"
    config.write_text(Path(denv["VIA_TUNNEL_CONFIG"]).read_text())
    config.chmod(0o644)
    lenv = {**denv, "VIA_TUNNEL_CONFIG": str(config)}
    elsewhere = lab.popen(lab.gateway, as_user(users.allowed, str(app), "30"))
    running = None
    try:
        # Not a single-instance program (as far as via-tunnel knows): no warning.
        running = lab.popen(lab.client, as_user(users.allowed, str(app), "30"))
        r = via_as(lab, denv, users.allowed, "vlan3", "--", str(app), "0")
        assert (r.returncode, r.stderr) == (0, "")
        # Listed in the config: the instance in this network namespace is named...
        config.write_text(config.read_text() + '[launch]\nsingle_instance = ["fakebrowser"]\n')
        r = via_as(lab, lenv, users.allowed, "vlan3", "--", str(app), "0")
        assert r.returncode == 0
        assert r.stderr.count("\n") == 1
        assert "fakebrowser is already running outside vlan3's group" in r.stderr
        assert str(running.pid) in r.stderr and "--user-data-dir" in r.stderr
        # ...and the one in another network namespace never is (it gets no requests).
        running.kill()
        running.wait()
        r = via_as(lab, lenv, users.allowed, "vlan3", "--", str(app), "0")
        assert (r.returncode, r.stderr) == (0, "")
    finally:
        for proc in (running, elsewhere):
            if proc is not None:
                proc.kill()
                proc.wait()
        shutil.rmtree(app_dir)


def test_concurrent_users_share_one_group(lab: Lab, denv: dict[str, str], users: Users,
                                          daemon: Daemon, clean: None) -> None:
    results: list[subprocess.CompletedProcess[str]] = []

    def one() -> None:
        results.append(via_as(lab, denv, users.allowed, "vlan3", "--", *lab.fetch_argv()))

    threads = [threading.Thread(target=one) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [(r.returncode, r.stdout.strip()) for r in results] == [(0, VETH)] * 10


def test_status_as_an_allowed_user_shows_the_group_without_root_only_fields(
        lab: Lab, denv: dict[str, str], users: Users, daemon: Daemon, clean: None) -> None:
    p = lab.popen(lab.client, as_user(users.allowed, USER_PY, "-m", "via_tunnel", "vlan3",
                                      "--", "sleep", "30"), env=denv)
    try:
        wait_for(lambda: json.loads(via(lab, denv, "status", "--json").stdout)["groups"],
                 timeout=10, what="the group")
        r = via_as(lab, denv, users.allowed, "status", "--json")
        assert r.returncode == 0 and r.stderr == "", r.stderr
        data = json.loads(r.stdout)
        assert data["format"] == 2
        (g,) = data["groups"]
        assert (g["interface"], g["ipv6"], g["watcher"], g["counters"]) == \
            ("vlan3", "auto", None, None)
        assert isinstance(g["ipv6_routed"], bool)
        assert [m["pid"] for m in g["members"]] == [p.pid]
        text = via_as(lab, denv, users.allowed, "status")
        assert text.returncode == 0 and "vlan3" in text.stdout, text.stderr
        assert "shown to root only" in text.stdout
    finally:
        p.terminate()
        p.wait(timeout=5)


def test_no_user_takes_or_sets_another_users_routing(
        lab: Lab, denv: dict[str, str], users: Users, daemon: Daemon, clean: None) -> None:
    """Issue "No escape, no cross-user influence" (A): a user's --ipv6/--dns/--gateway need
    user_options; a plain run never joins a group started with other options (and a
    config default is the same for everyone: both users share that group)."""
    config = Path(denv["VIA_TUNNEL_CONFIG"])
    original = config.read_text()
    gid = subprocess.run(["getent", "group", users.group], capture_output=True, text=True,
                         check=True).stdout.split(":")[2]
    assert daemon.proc is not None

    def reload(text: str) -> None:
        seen = daemon.log().count("config reloaded")
        config.write_text(text)
        daemon.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        wait_for(lambda: daemon.log().count("config reloaded") > seen, timeout=5,
                 what="reload")

    a = None
    try:
        r = via_as(lab, denv, users.allowed, "--ipv6", "block", "vlan3", "--", "true")
        assert r.returncode == 125 and "user_options" in r.stderr, r.stderr
        assert f"refuse uid={uid(users.allowed)}({users.allowed}) pid=" in daemon.log()
        reload(original + 'user_options = ["ipv6"]\n')
        a = lab.popen(lab.client, as_user(users.allowed, USER_PY, "-m", "via_tunnel",
                                          "--ipv6", "block", "vlan3", "--", "sleep", "30"),
                      env=denv)
        record = Path(denv["VIA_TUNNEL_STATE_DIR"]) / "groups" / "vlan3.json"
        wait_for(record.exists, timeout=10, what="A's group")
        r = via_as(lab, denv, users.other, "vlan3", "--", *lab.fetch_argv(), groups=gid)
        assert r.returncode == 125 and r.stdout == "", r.stdout
        assert "vlan3 is in use with other routing options" in r.stderr, r.stderr
        assert (f"refuse uid={uid(users.other)}({users.other}) pid=") in daemon.log()
        a.kill()
        a.wait()
        wait_for(lambda: not record.exists(), timeout=10, what="A's group to go")
        # A default from the config is everyone's: A's plain run and B's share the group.
        reload(original + 'dns = ["198.51.100.53"]\n')
        a = lab.popen(lab.client, as_user(users.allowed, USER_PY, "-m", "via_tunnel",
                                          "vlan3", "--", "sleep", "30"), env=denv)
        wait_for(record.exists, timeout=10, what="A's group")
        r = via_as(lab, denv, users.other, "vlan3", "--", *lab.fetch_argv(), groups=gid)
        assert (r.returncode, r.stdout.strip()) == (0, VETH), r.stderr
    finally:
        if a is not None:
            a.kill()
            a.wait()
        config.write_text(original)


INHERITS = """
import os, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.set_inheritable(True)
os.execv(sys.executable, [sys.executable, "-m", "via_tunnel", "vlan3", "--", "true"])
"""


def test_a_socket_opened_before_the_launch_is_named_in_one_line(
        lab: Lab, denv: dict[str, str], users: Users, daemon: Daemon, clean: None) -> None:
    r = lab.run(lab.client, as_user(users.allowed, USER_PY, "-c", INHERITS), env=denv,
                check=False)
    assert r.returncode == 0 and r.stderr.count("\n") == 1, r.stderr
    assert "inherits socket(s) opened outside vlan3's group: fd 3 (IPv4)" in r.stderr
