"""via-tunnel on a real systemd host: the distribution's systemd as PID 1 in a throwaway
container (``sysd_container.py``), via-tunnel installed there with ``make install``, the
daemon socket-activated, an allowed user with logind sessions and a user manager.

The container has two links to one far-end namespace made here: ``vlan3`` (the "tunnel",
192.0.2.2, next hop 192.0.2.1) and ``eth0`` (the LAN and the main table's default route,
203.0.113.2). The far end (``sysd_far_end.py``) answers TCP on 198.51.100.10:7 and DNS on
198.51.100.53 with the caller's address: 192.0.2.2 means the traffic left by the tunnel,
203.0.113.2 that it leaked by the LAN.

One container for the whole module, ~15 s to set up on 2 cores (pip download of the wheels
~4 s, boot <1 s, make install ~9 s, of which ~4 s is ensurepip in the new venv), ~30 s in
all. Each test waits until its group is gone (``wait_clean``: ``ip -j``, ``nft -j`` and
cgroupfs back to the state before any launch). Oracles are packets and kernel state, never
via-tunnel's own modules (tests use it only through its installed CLI).

    .venv/bin/python -m pytest tests/test_systemd_kernel.py     # as root
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from conftest import require_kernel
from sysd_container import SystemdContainer, remove_stale_groups

pytestmark = pytest.mark.kernel

T = TypeVar("T")

REPO = Path(__file__).resolve().parents[1]
FAR_END = Path(__file__).with_name("sysd_far_end.py")
USER, OTHER_USER = "alice", "bob"
IFACE, LAN = "vlan3", "eth0"
TUN_ADDR, TUN_PEER = "192.0.2.2", "192.0.2.1"
LAN_ADDR, LAN_PEER = "203.0.113.2", "203.0.113.1"
ECHO, DNS = "198.51.100.10", "198.51.100.53"
FETCH = ["socat", "-T3", "-u", f"TCP:{ECHO}:7", "STDOUT"]
# FETCH, after printing the cgroup it runs in
FETCH_SHOWING_CGROUP = ["sh", "-c", f"grep ^0:: /proc/self/cgroup; exec {' '.join(FETCH)}"]
# For each line on stdin, FETCH; first prints its PID (as the container sees it).
PROBER = ["sh", "-c", f"echo $$; while read -r _; do {' '.join(FETCH)}; done"]
CONFIG = f"""\
[interface.{IFACE}]
allow_users = ["{USER}"]
gateway = "{TUN_PEER}"
"""
FAR_PREFIX = "vtsysd-far-"
PID1_WARNINGS = ("remains running after unit stopped", "Found left-over process")
# What the host's disk would show if the install or resolved leaked out of the overlay.
HOST_PATHS = ("/opt/via-tunnel", "/usr/local/bin/via-tunnel",
              "/usr/local/lib/systemd/system/via-tunnel.socket", "/etc/via-tunnel",
              "/lib/systemd/systemd-resolved", "/run/via-tunnel",
              "/etc/systemd/system/dbus-org.freedesktop.resolve1.service",
              str(REPO / "build"), str(REPO / "src" / "via_tunnel.egg-info"))


# -- the environment ---------------------------------------------------------------------

@dataclass
class Env:
    box: SystemdContainer
    far: str  # the far end's network namespace (a name in /run/netns)
    baseline: dict[str, Any]  # kernel state before any launch
    host_before: dict[str, Any]


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    require_kernel()
    _require_extras()
    _remove_stale()
    host_before = _host_state()
    with ExitStack() as stack:
        wheels = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="vtsysd-whl-")))
        _download_wheels(wheels)
        box = SystemdContainer("vtsysd")
        stack.callback(box.close)
        box.boot()
        _install(box, wheels)
        far = f"{FAR_PREFIX}{os.getpid()}"
        stack.callback(_remove_netns, far)
        _build_network(box, far)
        server = _start_far_end(far)
        stack.callback(_stop, server)
        yield Env(box, far, _kernel_state(box), host_before)
    assert not os.path.exists(box.group), f"host cgroup {box.group} left behind"
    assert not os.path.exists(f"/run/netns/{far}"), f"netns {far} left behind"


def _remove_stale() -> None:
    """What a killed run of this module left: host cgroups, far-end namespaces (their names
    end with the PID of the test process that made them, now gone)."""
    remove_stale_groups()
    for name in os.listdir("/run/netns") if os.path.isdir("/run/netns") else ():
        creator = name.removeprefix(FAR_PREFIX)
        if name.startswith(FAR_PREFIX) and creator.isdigit() \
                and not os.path.exists(f"/proc/{creator}"):
            _remove_netns(name)


def _require_extras() -> None:
    """What this module needs besides conftest's kernel prerequisites (scripts/lib.sh
    TEST_DEBS installs it): same rule, skipped outside CI, a failure in CI."""
    missing = [prog for prog in ("unshare", "setpriv", "dpkg-query", "apt-get", "make", "tar")
               if shutil.which(prog) is None]
    if not missing:
        missing = [pkg for pkg in ("systemd", "dbus", "libpam-systemd", "dbus-user-session")
                   if "ok installed" not in _host(["dpkg-query", "-W", "-f=${Status}", pkg],
                                                  check=False)]
    if missing:
        reason = "the systemd container needs " + ", ".join(missing)
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (CI is set: refusing to skip)", pytrace=False)
        pytest.skip(reason)


def _download_wheels(dest: Path) -> None:
    """What ``pip install .`` needs, as wheels, so that ``make install`` in the container
    (which has no network) can run with ``--no-index --find-links``. The versions of the
    running interpreter's environment, so pip's cache usually serves them."""
    pins = ["setuptools>=77"]
    for name in ("pyroute2", "psutil", "typer"):
        try:
            pins.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            pins.append(name)
    done = subprocess.run([sys.executable, "-m", "pip", "download", "-q",
                           "--disable-pip-version-check", "--only-binary=:all:",
                           "--dest", str(dest), *pins],
                          capture_output=True, text=True, timeout=300, check=False)
    if done.returncode != 0:
        pytest.fail(f"pip download of the install's wheels failed:\n{done.stderr}")


def _install(box: SystemdContainer, wheels: Path) -> None:
    """``make install`` from a copy of the checkout (build files stay in the container),
    offline: the container has only ``lo`` yet, pip gets ``--no-index``. Then the socket
    enabled (not the daemon: socket activation), the users, the policy, alice's manager."""
    box.copy_in(str(REPO), "/root/via-tunnel",
                exclude=(".venv", ".git", "__pycache__", "*.egg-info", "build"))
    box.copy_in(str(wheels), "/root/wheels")
    box.run(["make", "-C", "/root/via-tunnel", "install",
             "PIP_FLAGS=-q --disable-pip-version-check --no-index --find-links=/root/wheels"],
            timeout=300)
    box.run(["groupadd", "--system", "via-tunnel"])
    for user in (USER, OTHER_USER):
        box.add_user(user)
        box.run(["usermod", "-aG", "via-tunnel", user])
    box.write_file("/etc/via-tunnel/config.toml", CONFIG)
    box.run(["systemctl", "enable", "--now", "via-tunnel.socket"])
    box.start_user_manager(USER)


def _build_network(box: SystemdContainer, far: str) -> None:
    _host(["ip", "netns", "add", far])
    for inside, outside, addr, peer in ((IFACE, "far-tun", TUN_ADDR, TUN_PEER),
                                        (LAN, "far-lan", LAN_ADDR, LAN_PEER)):
        _host(["ip", "link", "add", inside, "netns", str(box.pid), "type", "veth",
               "peer", "name", outside, "netns", far])
        box.run(["ip", "addr", "add", f"{addr}/24", "dev", inside])
        box.run(["ip", "link", "set", inside, "up"])
        _far(far, ["ip", "addr", "add", f"{peer}/24", "dev", outside])
        _far(far, ["ip", "link", "set", outside, "up"])
    box.run(["ip", "route", "add", "default", "via", LAN_PEER, "dev", LAN])
    # A group that ends drains while conntrack keeps its closed flows (README, "Draining"):
    # the units run as installed, so draining is on; shorter timeouts for closed flows in
    # the container's namespace keep each drain to about a second (wait_clean).
    box.run(["sysctl", "-qw", *(f"net.netfilter.nf_conntrack_{name}=1" for name in CLOSED_FLOWS)])
    _far(far, ["ip", "link", "set", "lo", "up"])
    for addr in (ECHO, DNS):
        _far(far, ["ip", "addr", "add", f"{addr}/32", "dev", "lo"])


CLOSED_FLOWS = ("tcp_timeout_time_wait", "tcp_timeout_close", "tcp_timeout_fin_wait",
                "tcp_timeout_last_ack", "tcp_timeout_close_wait", "udp_timeout",
                "udp_timeout_stream")


def _start_far_end(far: str) -> subprocess.Popen[str]:
    server = subprocess.Popen(
        ["setpriv", "--pdeathsig", "KILL", "--", "nsenter", f"--net=/run/netns/{far}",
         "/usr/bin/python3", str(FAR_END), ECHO, DNS],
        stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    assert server.stdout is not None
    if server.stdout.readline().strip() != "ready":
        _stop(server)
        raise AssertionError("the far end's server did not start")
    return server


def _host(argv: Sequence[str], *, check: bool = True) -> str:
    return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=10).stdout


def _far(far: str, argv: Sequence[str]) -> str:
    return _host(["nsenter", f"--net=/run/netns/{far}", *argv])


def _remove_netns(name: str) -> None:
    if os.path.exists(f"/run/netns/{name}"):
        subprocess.run(["ip", "netns", "del", name], check=False, timeout=10)


def _stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _host_state() -> dict[str, Any]:
    def stat(path: str) -> tuple[int, int, int] | None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    return {path: stat(path) for path in HOST_PATHS}


# -- how a user starts something ------------------------------------------------------------

def in_session(box: SystemdContainer, argv: Sequence[str],
               user: str = USER) -> subprocess.CompletedProcess[str]:
    """From a logind session of ``user`` (``su -l``: session-N.scope)."""
    return box.run(argv, user=user, login=True, check=False)


def from_user_manager(box: SystemdContainer,
                      argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    """As a transient service of the user's manager (``systemd-run --user``)."""
    return box.run(box.user_manager_argv(USER, argv), check=False)


def from_uid_scope(box: SystemdContainer,
                   argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    """In a transient scope of PID 1 running as the user (``systemd-run --uid --scope``)."""
    return box.run(["systemd-run", f"--uid={USER}", "--scope", "--quiet", "--", *argv],
                   check=False)


def from_user_scope(box: SystemdContainer,
                    argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    """In a scope of the user's manager, as desktops start apps (``systemd-run --user
    --scope`` from a session: user@UID.service/app.slice/run-*.scope)."""
    return in_session(box, ["systemd-run", "--user", "--scope", "--quiet", "--", *argv])


def as_root(box: SystemdContainer, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    """From root's logind session (``su -l root``)."""
    return in_session(box, argv, user="root")


LAUNCHERS: dict[str, Callable[[SystemdContainer, Sequence[str]],
                              subprocess.CompletedProcess[str]]] = {
    "logind-session": in_session, "user-manager": from_user_manager,
    "user-manager-scope": from_user_scope, "systemd-run-uid-scope": from_uid_scope,
    "root": as_root}


def via(*argv: str) -> list[str]:
    return ["via-tunnel", IFACE, "--", *argv]


def output_of(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"exit {result.returncode}:\n{result.stdout}{result.stderr}"
    return result.stdout


# -- oracles ---------------------------------------------------------------------------------

def _kernel_state(box: SystemdContainer) -> dict[str, Any]:
    """Everything of the container's kernel state a group adds: ip rules, routes of every
    table (but the kernel's own), nft tables, and cgroups named after the interface."""
    def ip(*args: str) -> Any:
        rows = json.loads(box.run(["ip", "-j", *args]).stdout or "[]")
        # the kernel's own routes come and go with addresses (IPv6 link-local after DAD)
        return sorted(json.dumps(row, sort_keys=True) for row in rows
                      if row.get("protocol") != "kernel")

    groups = box.run(["find", "/sys/fs/cgroup", "-type", "d", "-name", f"*{IFACE}*"]).stdout
    return {"rules4": ip("-4", "rule"), "rules6": ip("-6", "rule"),
            "routes4": ip("-4", "route", "show", "table", "all"),
            "routes6": ip("-6", "route", "show", "table", "all"),
            "nft": json.loads(box.run(["nft", "-j", "list", "tables"]).stdout)["nftables"],
            "cgroups": groups.split()}


def draining(env: Env) -> list[dict[str, Any]]:
    out = env.box.run(["via-tunnel", "status", "--json"]).stdout
    return json.loads(out)["draining"]  # type: ignore[no-any-return]


def wait_clean(env: Env, timeout: float = 30) -> None:
    """Wait until the container's kernel state is back to the baseline (no group left)."""
    state: dict[str, Any] = {}

    def clean() -> bool:
        state.update(_kernel_state(env.box))
        if state == env.baseline:
            return True
        if [k for k in state if state[k] != env.baseline[k]] == ["nft"] and not draining(env):
            # The drain is over: the inert table goes with `cleanup` (or the next group's end).
            env.box.run(["via-tunnel", "cleanup"])
        return False

    try:
        wait_for(clean, timeout=timeout, what="the group's teardown")
    except AssertionError:
        diff = {k: v for k, v in state.items() if v != env.baseline[k]}
        why = env.box.run(["sh", "-c", "ls -la /run/via-tunnel/groups; "
                           "cat /run/via-tunnel/watcher-errors.log; "
                           "journalctl -b --no-pager -n 25 -u via-tunnel.service; "
                           "systemctl list-units --no-pager 'via-tunnel*'"],
                          check=False).stdout
        raise AssertionError(f"left behind after the last exit: {diff}\n{why}") from None


def wait_for(predicate: Callable[[], T], *, timeout: float = 10, what: str = "it") -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.05)


class Capture:
    """tcpdump on an interface of the far end, from before the block to after it."""

    def __init__(self, far: str, iface: str, bpf: str) -> None:
        self.argv = ["nsenter", f"--net=/run/netns/{far}", "tcpdump", "-l", "-n",
                     "--immediate-mode", "-i", iface, bpf]
        self.lines: list[str] = []

    def __enter__(self) -> Capture:
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        assert self.proc.stderr is not None
        said = ""
        while "listening on" not in said:  # tcpdump says so once it captures
            line = self.proc.stderr.readline()
            if not line:
                _stop(self.proc)
                raise AssertionError(f"tcpdump did not start: {said}")
            said += line
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(0.2)
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=10)
        self.lines = [line for line in out.splitlines() if line]


class Prober:
    """A long-running program: for every line on its stdin it asks the far end for the
    address it sees, and prints it. A context manager; ``returncode`` once it has exited."""

    def __init__(self, box: SystemdContainer, argv_prefix: Sequence[str], user: str) -> None:
        self.proc = box.popen([*argv_prefix, *PROBER], user=user, login=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, bufsize=1)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.pid = int(self.line())  # as the container sees it

    def __enter__(self) -> Prober:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """End it (its ``read`` fails) and wait; killed if it does not end."""
        assert self.proc.stdin is not None
        if not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.strip())

    def line(self, timeout: float = 10) -> str:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            exited = self.proc.poll()
            said = self.proc.stderr.read() if exited is not None and self.proc.stderr else ""
            raise AssertionError(f"the prober said nothing in {timeout:g}s "
                                 f"(exit {exited}): {said}") from None

    def ask(self) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write("\n")
        return self.line()


def status_json(box: SystemdContainer, user: str = "root") -> dict[str, Any]:
    result = in_session(box, ["via-tunnel", "status", "--json"], user=user)
    return json.loads(output_of(result))


def daemon_pid(box: SystemdContainer) -> int:
    out = box.run(["systemctl", "show", "-p", "MainPID", "--value", "via-tunnel.service"])
    return int(out.stdout)


def invocation(box: SystemdContainer) -> str:
    """The daemon's InvocationID: a new one for every start."""
    return box.run(["systemctl", "show", "-p", "InvocationID", "--value",
                    "via-tunnel.service"]).stdout.strip()


def unit_state(box: SystemdContainer, unit: str) -> str:
    return box.run(["systemctl", "is-active", unit], check=False).stdout.strip()


# -- the tests -------------------------------------------------------------------------------

def test_the_container_boots_systemd_clean_on_pure_cgroup_v2(env: Env) -> None:
    box = env.box
    assert box.boot_state == "running", box.failed_units
    assert box.run(["stat", "-f", "-c", "%T", "/sys/fs/cgroup"]).stdout.strip() == "cgroup2fs"
    assert box.run(["systemd-detect-virt", "--container"]).stdout.strip() == "container-other"
    assert box.run(["via-tunnel", "--version"]).stdout.strip()


def test_socket_activation_starts_the_daemon_on_first_connect(env: Env) -> None:
    box = env.box
    box.run(["systemctl", "stop", "via-tunnel.service"])
    assert unit_state(box, "via-tunnel.socket") == "active"
    assert unit_state(box, "via-tunnel.service") == "inactive"
    before = invocation(box)
    assert output_of(in_session(box, via(*FETCH))).strip() == TUN_ADDR
    assert invocation(box) not in ("", before), "the daemon was not started"
    wait_clean(env)


@pytest.mark.parametrize("how", LAUNCHERS)
def test_a_launch_leaves_by_the_interface(env: Env, how: str) -> None:
    result = LAUNCHERS[how](env.box, via(*FETCH_SHOWING_CGROUP))
    lines = output_of(result).split()
    assert lines[-1] == TUN_ADDR, f"the far end saw {lines[-1]} (program in {lines[0]})"
    wait_clean(env)


def test_a_root_group_lives_in_systemds_tree(env: Env) -> None:
    """A group outside every slice is a cgroup systemd does not know: it is none of its
    units, no resource control applies, and it escapes `systemctl` and `systemd-cgls`.
    A group is a scope unit of its own in via-tunnel.slice, for root's launches as for the
    daemon's."""
    scope = f"via-tunnel-{IFACE}.scope"
    cgroup = output_of(as_root(env.box, via(*FETCH_SHOWING_CGROUP))).split()[0]
    path = cgroup.removeprefix("0::")
    # (systemd reads the "-" of via-tunnel.slice as nesting: its cgroup is below via.slice)
    assert path == f"/via.slice/via-tunnel.slice/{scope}", \
        f"root's program ran in {path}, outside systemd's slices"
    with Prober(env.box, via(), "root") as prober:
        assert prober.ask() == TUN_ADDR
        assert unit_state(env.box, scope) == "active"
        shown = env.box.run(["systemctl", "show", "-p", "ControlGroup", "--value", scope])
        assert shown.stdout.strip() == path
        assert str(prober.pid) in env.box.run(["systemctl", "status", scope]).stdout
    wait_clean(env)


def test_doctor_says_groups_are_scopes_and_net_cls_is_there(env: Env) -> None:
    report = json.loads(output_of(as_root(env.box, ["via-tunnel", "doctor", "--json"])))
    checks = {c["name"]: c for c in report["checks"]}
    assert "pure v2" in checks["cgroup2"]["detail"]
    placement = checks["placement"]
    assert placement["status"] == "ok", placement
    assert "systemd is PID 1: each group is a scope unit via-tunnel-IFACE.scope in " \
        "via-tunnel.slice (/sys/fs/cgroup/via.slice/via-tunnel.slice)" in placement["detail"]
    assert checks["net_cls"]["status"] == "ok", checks["net_cls"]


def test_a_user_not_in_the_policy_is_refused(env: Env) -> None:
    with Capture(env.far, "far-tun", f"host {ECHO}") as tun, \
            Capture(env.far, "far-lan", f"host {ECHO}") as lan:
        result = in_session(env.box, via(*FETCH), user=OTHER_USER)
    assert result.returncode == 125, result
    assert result.stderr.startswith("via-tunnel: "), result.stderr
    assert tun.lines == [] and lan.lines == []


def test_status_as_the_user(env: Env) -> None:
    with Prober(env.box, via(), USER) as prober:
        assert prober.ask() == TUN_ADDR
        status = status_json(env.box, user=USER)
        group = next(g for g in status["groups"] if g["interface"] == IFACE)
        assert prober.pid in [m["pid"] for m in group["members"]]
    assert prober.returncode == 0
    wait_clean(env)


def test_cleanup_after_the_last_exit(env: Env) -> None:
    with Prober(env.box, via(), USER) as first, Prober(env.box, via(), USER) as second:
        assert first.ask() == second.ask() == TUN_ADDR
        first.close()
        assert first.returncode == 0
        assert second.ask() == TUN_ADDR, "the group went away with a member still in it"
        assert _kernel_state(env.box) != env.baseline
    assert second.returncode == 0
    wait_clean(env)
    assert status_json(env.box)["groups"] == []


@pytest.mark.parametrize("how", ["restart", "stop-start"])
def test_the_daemon_goes_away_and_back_with_programs_running(env: Env, how: str) -> None:
    box = env.box
    with Prober(box, via(), USER) as prober:
        assert prober.ask() == TUN_ADDR
        before, cursor = daemon_pid(box), box.journal_cursor()
        if how == "restart":
            box.run(["systemctl", "restart", "via-tunnel.service"])
        else:
            box.run(["systemctl", "stop", "via-tunnel.service"])
            assert prober.ask() == TUN_ADDR, "not routed while the daemon is stopped"
            box.run(["systemctl", "start", "via-tunnel.service"])
        after = daemon_pid(box)
        assert after not in (0, before)
        assert prober.returncode is None, "the program did not survive"
        assert prober.ask() == TUN_ADDR

        def adopted() -> dict[str, Any]:  # (Type=simple: `systemctl restart` returns
            group = next(g for g in status_json(box)["groups"]  # before the new daemon
                         if g["interface"] == IFACE)          # has read the records)
            return group if group["watcher"] == after else {}

        group = wait_for(adopted, what=f"the group adopted by the new daemon {after}")
        assert prober.pid in [m["pid"] for m in group["members"]]
        warnings = [line for line in box.journal(after=cursor).splitlines()
                    if any(w in line for w in PID1_WARNINGS)]
        assert warnings == [], "PID 1 warns about the groups:\n" + "\n".join(warnings)
    assert prober.returncode == 0
    wait_clean(env)  # the new daemon tears the adopted group down


@pytest.mark.parametrize("user", [USER, "root"])
def test_a_program_cannot_escape_with_systemd_run_scope(env: Env, user: str) -> None:
    """``systemd-run --scope`` (as Flatpak and snap do) moves the program into a new scope:
    its traffic must still leave by the interface, or not at all — never by the LAN."""
    user_flag = ["--user"] if user != "root" else []
    escape = ["systemd-run", *user_flag, "--scope", "--quiet", "--", *FETCH]
    with Capture(env.far, "far-lan", f"host {ECHO}") as lan:
        result = in_session(env.box, via(*escape), user=user)
    assert lan.lines == [], "packets left by the LAN:\n" + "\n".join(lan.lines)
    assert output_of(result).strip() == TUN_ADDR
    wait_clean(env)


@pytest.fixture(scope="module")
def resolved_debs() -> Iterator[str]:
    """systemd-resolved's package, the version of the installed systemd, downloaded (never
    installed on the host: it would take over its /etc/resolv.conf)."""
    version = _host(["dpkg-query", "-W", "-f=${Version}", "systemd"])
    download = ["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root",
                f"systemd-resolved={version}"]
    with tempfile.TemporaryDirectory(prefix="vtsysd-debs-") as tmp:
        done = subprocess.run(download, cwd=tmp, capture_output=True, text=True,
                              timeout=120, check=False)
        if done.returncode != 0:  # package lists missing or stale
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, timeout=300,
                           check=False)
            done = subprocess.run(download, cwd=tmp, capture_output=True, text=True,
                                  timeout=120, check=False)
        if done.returncode != 0:
            pytest.fail(f"apt-get download systemd-resolved={version} failed (the archive "
                        f"must still have the installed systemd's version; else upgrade "
                        f"systemd first):\n{done.stderr}")
        yield tmp


def test_dns_goes_to_the_per_link_servers_of_resolved(env: Env, resolved_debs: str) -> None:
    box = env.box
    box.copy_in(resolved_debs, "/root/debs")
    # (without man-db's auto-update flag its dpkg trigger skips a 4 s rebuild)
    box.run(["sh", "-c", "rm -f /var/lib/man-db/auto-update && "
             "DEBIAN_FRONTEND=noninteractive dpkg -i /root/debs/*.deb"], timeout=120)
    box.run(["systemctl", "start", "systemd-resolved.service"])
    box.run(["resolvectl", "dns", IFACE, DNS])
    assert DNS in box.run(["resolvectl", "dns", IFACE]).stdout
    assert "127.0.0.53" in box.run(["cat", "/etc/resolv.conf"]).stdout
    wait_clean(env)  # the group must be made now, with resolved's servers known
    result = in_session(box, via("getent", "ahostsv4", "probe.test"))
    answer = output_of(result).split()
    assert answer and answer[0] == TUN_ADDR, \
        f"the resolver at {DNS} saw the query from {answer[:1]}, not from {TUN_ADDR}"
    wait_clean(env)


def test_the_hosts_disk_and_run_stay_untouched(env: Env) -> None:
    assert _host_state() == env.host_before

