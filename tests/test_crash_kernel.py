"""Crash safety: SIGKILL a via-tunnel process at 50 random moments and nothing leaks.

The points are spread over the moments where a crash hurts: the root launcher during a cold
start-up (20), the watcher while it tears a group down (20), and the daemon in the middle of
a request (10). Offsets are drawn uniformly inside the durations this test first measures in
the lab, from a seeded generator (the seed is printed and named in every failure; set
``VT_CRASH_SEED`` to replay a run).

Invariants, each proven by an independent oracle:
* no member of a group ever sends by another interface: every launched program sends UDP
  datagrams with a marker payload; a capture on every other interface of the client sees
  none of them (and one on vlan3 shows that they did flow);
* other programs are never affected: a program outside every group sends a datagram every
  10 ms by the LAN for the whole test and gets every answer, from its LAN address;
* after a launcher is killed, the watcher it started first removes what it left, alone;
* after each point, once the members are gone, ``cleanup`` (even points) or the next launch
  (odd points; it must route correctly itself) brings ip rules, routes of all tables, the
  nft ruleset, sysctls, our cgroups and the state directory back exactly to what they were
  (``ip -j``/``nft -j`` snapshots, the directory listings); a restarted daemon does it by
  adopting the groups its predecessor left.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon_lab import (
    USER_PY,
    Daemon,
    as_nobody,
    daemon_env,
    readable_package,
    require_setpriv,
)
from helpers import (
    CaptureElsewhere,
    canonical,
    cgroup_leftovers,
    state_files,
    via,
    via_popen,
    wait_for,
)

from via_tunnel.lab.capture import Capture
from via_tunnel.lab.netlab import Lab

pytestmark = pytest.mark.kernel

SEED = int(os.environ.get("VT_CRASH_SEED") or random.randrange(2**32))
MARKER = b"VTCRASH"
# Datagrams to the UDP echo whose payload starts with "VTCR".
MARKER_BPF = f"udp dst port {Lab.UDP_PORT} and udp[8:4] = 0x{MARKER[:4].hex()}"

# CMD of every launch: datagrams with the marker every 5 ms. With argument "stdin" it stops
# when its stdin closes, with "brief" after 10 datagrams; otherwise it runs until killed.
# "up" once it runs.
SENDER = f"""
import socket, sys, threading, time
done = threading.Event()
if sys.argv[1:] == ["stdin"]:
    threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
if sys.argv[1:] == ["brief"]:
    threading.Timer(0.05, done.set).start()
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
print("up", flush=True)
while not done.is_set():
    try:
        s.sendto({MARKER!r}, ("{Lab.SERVER}", {Lab.UDP_PORT}))
    except OSError:
        pass
    time.sleep(0.005)
"""

# Outside every group: a datagram every 10 ms until stdin closes, then a JSON summary.
PROBER = f"""
import json, os, select, socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect(("{Lab.SERVER}", {Lab.UDP_PORT}))
sent = got = 0
wrong = []
def receive():
    global got
    while True:
        try:
            data = s.recv(100)
        except BlockingIOError:
            return
        except OSError as exc:
            wrong.append(str(exc))
            return
        got += 1
        if data.decode().strip() != "{Lab.CLIENT_LAN}":
            wrong.append(data.decode())
s.setblocking(False)
print("up", flush=True)
next_send = time.monotonic()
while True:
    r, _, _ = select.select([0, s], [], [], max(0.0, next_send - time.monotonic()))
    if 0 in r and not os.read(0, 100):
        break
    if s in r:
        receive()
    if time.monotonic() >= next_send:
        s.send(b"VTOUTSIDE")
        sent += 1
        next_send += 0.01
time.sleep(0.3)
receive()
print(json.dumps({{"sent": sent, "got": got, "wrong": wrong[:5]}}), flush=True)
"""


def say(text: str) -> None:
    print(f"[crash seed={SEED}] {text}", file=sys.stderr, flush=True)


def sender_argv(*mode: str) -> list[str]:
    return [sys.executable, "-c", SENDER, *mode]


class Traffic:
    """The traffic oracles of one test: captures of the markers and the outside prober."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.elsewhere = CaptureElsewhere(lab, "vlan3", MARKER_BPF)
        self.tunnel = Capture(lab, lab.client, "vlan3", MARKER_BPF)
        self.prober: subprocess.Popen[str] | None = None

    def __enter__(self) -> Traffic:
        self.elsewhere.__enter__()
        self.tunnel.start()
        self.prober = self.lab.popen(self.lab.client, [sys.executable, "-c", PROBER],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.prober.stdout is not None
        assert self.prober.stdout.readline().strip() == "up"
        return self

    def __exit__(self, *exc: object) -> None:
        if self.prober is not None and self.prober.poll() is None:
            self.prober.kill()
        self.elsewhere.__exit__()
        self.tunnel.stop()

    def check(self) -> None:
        """Stop everything and assert the traffic invariants."""
        assert self.prober is not None
        out, _ = self.prober.communicate(timeout=10)  # closes its stdin: the prober stops
        outside = json.loads(out.strip().splitlines()[-1])
        leaked = self.elsewhere.packets()
        self.elsewhere.__exit__()
        through = self.tunnel.stop()
        say(f"outside program: {outside['got']}/{outside['sent']} answered; "
            f"group datagrams through vlan3: {len(through)}, elsewhere: {leaked}")
        assert self.elsewhere.captures, "nothing captured elsewhere: no oracle"
        assert leaked == {}, f"seed {SEED}: group datagrams left by another interface"
        assert through, "no group datagram went through vlan3: the test proved nothing"
        assert outside["wrong"] == [], f"seed {SEED}: outside traffic affected: {outside}"
        assert outside["sent"] > 100 and outside["got"] == outside["sent"], (
            f"seed {SEED}: outside traffic lost datagrams: {outside}")


# What the state dir keeps once used (the global lock, the records' directory, the daemon's
# socket): not leftovers of a group.
PERMANENT = {"lock", "groups", "daemon.sock", "daemon.sock.lock"}


class Footprint:
    """What via-tunnel may change, as it is when nothing of ours exists."""

    def __init__(self, lab: Lab, env: dict[str, str]) -> None:
        self.lab = lab
        self.env = env
        self.state_dir = Path(env["VIA_TUNNEL_STATE_DIR"])
        self.baseline = self.take()

    def take(self) -> dict[str, Any]:
        files = sorted(name for name in state_files(self.state_dir) if name not in PERMANENT)
        return {"kernel": canonical(self.lab.snapshot(self.lab.client)),
                "cgroups": cgroup_leftovers(self.env), "state_dir": files}

    def wait_clean(self, what: str) -> None:
        last: dict[str, Any] = {}

        def clean() -> bool:
            last["now"] = self.take()
            return bool(last["now"] == self.baseline)

        try:
            wait_for(clean, timeout=5, what=f"a clean state after {what}")
        except AssertionError:
            now = last["now"]
            diff = {k: now[k] for k in now if now[k] != self.baseline[k]}
            errors = self.state_dir / "watcher-errors.log"
            if errors.exists():
                diff["watcher-errors.log"] = errors.read_text()[-1000:]
            raise AssertionError(f"seed {SEED}: {what}: left behind {_short(diff)}") from None


def _short(diff: dict[str, Any]) -> str:
    text = json.dumps(diff)
    return text if len(text) < 3000 else text[:3000] + "..."


def kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def dead(pid: int) -> bool:
    """Gone, or a zombie (a watcher's parent is init, which may reap it late)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


def wait_gone(pid: int) -> None:
    wait_for(lambda: dead(pid), timeout=5, what=f"pid {pid} to die")


def offsets(rng: random.Random, count: int, duration: float) -> list[float]:
    return [rng.uniform(0, duration) for _ in range(count)]


@pytest.fixture
def footprint(lab: Lab, vt_env: dict[str, str]) -> Footprint:
    fp = Footprint(lab, vt_env)
    assert fp.baseline["state_dir"] == [] and fp.baseline["cgroups"] == []
    return fp


def recover(lab: Lab, env: dict[str, str], point: int, fp: Footprint, what: str) -> None:
    """Even points: `cleanup`. Odd points: the next launch, which must route through vlan3
    itself (its server's view, and marker datagrams for the captures), and then clean up
    after itself as usual."""
    if point % 2 == 0:
        r = via(lab, env, "cleanup", check=False)
        assert r.returncode == 0, f"seed {SEED}: {what}: cleanup failed: {r.stderr}"
    else:
        cmd = " ".join([*lab.fetch_argv(), ";", *map(shlex.quote, sender_argv("brief"))])
        r = via(lab, env, "vlan3", "--", "sh", "-c", cmd, check=False)
        got = r.stdout.split()
        assert got == [Lab.CLIENT_VETH, "up"], \
            f"seed {SEED}: {what}: next launch: {r.stdout!r} {r.stderr!r}"
    fp.wait_clean(what)


def test_sigkill_of_the_launcher_during_start_up(lab: Lab, vt_env: dict[str, str],
                                                 footprint: Footprint) -> None:
    rng = random.Random(SEED)
    # How long a cold start-up takes here (until CMD runs).
    took = []
    for _ in range(3):
        t0 = time.monotonic()
        p = via_popen(lab, vt_env, "vlan3", "--", *sender_argv("stdin"), stdin=subprocess.PIPE)
        assert p.stdout is not None and p.stdin is not None
        assert p.stdout.readline().strip() == "up"
        took.append(time.monotonic() - t0)
        p.stdin.close()
        p.wait(timeout=10)
        footprint.wait_clean("a measured start-up")
    duration = max(took)
    say(f"launcher: a cold start-up takes {1000 * duration:.0f} ms; 20 kills inside it")
    with Traffic(lab) as traffic:
        for point, delay in enumerate(offsets(rng, 20, duration)):
            what = f"launcher killed {1000 * delay:.0f} ms into start-up (point {point})"
            p = via_popen(lab, vt_env, "vlan3", "--", *sender_argv())
            time.sleep(delay)
            kill(p.pid)  # the launcher, or CMD if it got that far
            p.wait(timeout=10)
            # The watcher starts before anything is made, so it removes whatever the
            # launcher left, alone...
            footprint.wait_clean(f"{what}, by its watcher alone")
            # ...and cleanup or the next launch find nothing to trip over.
            recover(lab, vt_env, point, footprint, what)
        traffic.check()


def test_sigkill_of_the_watcher_during_teardown(lab: Lab, vt_env: dict[str, str],
                                               footprint: Footprint) -> None:
    rng = random.Random(SEED + 1)
    groups = Path(vt_env["VIA_TUNNEL_STATE_DIR"]) / "groups"
    lock = Path(vt_env["VIA_TUNNEL_STATE_DIR"]) / "watch.lock"

    def watcher_pid() -> str:
        try:
            return lock.read_text().strip()
        except FileNotFoundError:
            return ""

    def start() -> tuple[subprocess.Popen[str], int]:
        p = via_popen(lab, vt_env, "vlan3", "--", *sender_argv("stdin"), stdin=subprocess.PIPE)
        assert p.stdout is not None
        assert p.stdout.readline().strip() == "up"
        pid = wait_for(watcher_pid, timeout=5, what="the watcher's pid")
        return p, int(pid)

    took = []
    for _ in range(3):
        p, _pid = start()
        assert p.stdin is not None
        p.stdin.close()
        p.wait(timeout=10)
        t0 = time.monotonic()
        wait_for(lambda: not (groups / "vlan3.json").exists(), timeout=5, what="teardown",
                 interval=0.001)
        took.append(time.monotonic() - t0)
        footprint.wait_clean("a measured teardown")
    duration = max(took)
    say(f"watcher: a teardown takes {1000 * duration:.0f} ms; 20 kills inside it")
    with Traffic(lab) as traffic:
        for point, delay in enumerate(offsets(rng, 20, duration)):
            what = f"watcher killed {1000 * delay:.0f} ms into teardown (point {point})"
            p, watcher = start()
            time.sleep(0.03)  # a few datagrams through the tunnel
            assert p.stdin is not None
            p.stdin.close()
            p.wait(timeout=10)  # the last member is gone: the watcher starts its teardown
            time.sleep(delay)
            kill(watcher)
            wait_gone(watcher)
            recover(lab, vt_env, point, footprint, what)
        traffic.check()


# -- the daemon ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def package() -> Iterator[str]:
    with readable_package() as top:
        yield top


def test_sigkill_of_the_daemon_mid_request(lab: Lab, vt_env: dict[str, str],
                                           footprint: Footprint, package: str,
                                           tmp_path: Path) -> None:
    require_setpriv()
    rng = random.Random(SEED + 2)
    env = daemon_env(vt_env, package, tmp_path / "config.toml", "vlan3")
    daemon = Daemon(lab, env, tmp_path / "daemon.log")

    def client(*mode: str) -> subprocess.Popen[str]:
        return lab.popen(lab.client, as_nobody(USER_PY, "-m", "via_tunnel", "vlan3", "--",
                                               USER_PY, "-c", SENDER, *mode),
                         env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)

    def fetch_through_daemon() -> list[str]:
        """The next launch: the server's view of it, then marker datagrams."""
        brief = [USER_PY, "-c", SENDER, "brief"]
        cmd = " ".join([*lab.fetch_argv(), ";", *map(shlex.quote, brief)])
        r = lab.run(lab.client, as_nobody(USER_PY, "-m", "via_tunnel", "vlan3", "--",
                                          "sh", "-c", cmd), env=env, check=False)
        return r.stdout.split() or [r.stderr.strip()]

    daemon.start()
    try:
        took = []
        for _ in range(3):
            t0 = time.monotonic()
            p = client("stdin")
            assert p.stdout is not None and p.stdin is not None
            assert p.stdout.readline().strip() == "up", p.stderr.read() if p.stderr else ""
            took.append(time.monotonic() - t0)
            p.stdin.close()
            p.wait(timeout=10)
            footprint.wait_clean("a measured launch through the daemon")
        duration = max(took)
        say(f"daemon: a cold launch through it takes {1000 * duration:.0f} ms "
            f"(client start-up included); 10 kills inside it")
        with Traffic(lab) as traffic:
            for point, delay in enumerate(offsets(rng, 10, duration)):
                what = f"daemon killed {1000 * delay:.0f} ms into a request (point {point})"
                p = client()
                time.sleep(delay)
                assert daemon.proc is not None
                kill(daemon.proc.pid)
                daemon.proc.wait(timeout=5)
                time.sleep(0.03)  # if CMD got to run, it sends a few datagrams
                kill(p.pid)
                p.communicate(timeout=10)
                # The successor adopts whatever its predecessor left and tears it down
                # once empty: no cleanup needed.
                daemon.start()
                footprint.wait_clean(f"{what}, then a restart")
                if point % 2:
                    got = fetch_through_daemon()
                    assert got == [Lab.CLIENT_VETH, "up"], \
                        f"seed {SEED}: {what}: next launch: {got}"
                    footprint.wait_clean(f"{what}, then the next launch")
            traffic.check()
    finally:
        daemon.stop()
    assert "Traceback" not in daemon.log()
