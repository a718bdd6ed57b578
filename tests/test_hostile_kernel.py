"""Hostile users against the daemon as started in production (issue "No escape, no
cross-user influence"): real users, the real kernel, bounded loads, figures.

Five throwaway users are created for the module (four attackers, one allowed user) and
removed after it. The daemon runs as `via-tunnel daemon` in the lab's client namespace
(its own socket, the policy of a config file). While the attackers

* hold as many silent connections as they can, reconnecting whenever one is dropped,
* send fuzzed JSON, oversize requests, slow requests, requests closed half-way, requests
  carrying file descriptors (SCM_RIGHTS),

the allowed user launches programs that send datagrams through vlan3 and root pings the
daemon (what doctor does): none of them may fail (users locked out: 0). Then: a caller that
execs a setuid program, and one that exits, while its request waits; a config nested too
deeply (SIGHUP); an interface name with U+202E. Figures (requests and connections tried,
users locked out, daemon fds and RSS before/after, packets leaked, leftovers) are printed
(``pytest -s``) and carried in every assertion message.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon_lab import USER_PY, Daemon, readable_package, require_setpriv
from helpers import CaptureElsewhere, canonical, cgroup_leftovers, wait_for

from via_tunnel.lab.capture import Capture
from via_tunnel.lab.netlab import Lab

pytestmark = pytest.mark.kernel

ATTACKERS = 4
ATTACK_SECONDS = 4.0
FUZZ_REQUESTS = 600  # per attacker
LAUNCHES = 8
PINGS = 40
RSS_TOLERANCE_KIB = 4096  # see test_endurance_kernel.py: the allocator moves in ~1 MiB steps
MARKER = b"VTHOSTILE"
MARKER_BPF = f"udp dst port {Lab.UDP_PORT} and udp[8:4] = 0x{MARKER[:4].hex()}"

# As an attacker: keep up to N silent connections open for S seconds, reconnecting each
# one the daemon drops. Prints {"connections": tried, "busy": answered busy, ...}.
HOLDER = """
import json, selectors, socket, sys, time
path, n, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
sel = selectors.DefaultSelector()
tried = busy = other = 0
end = time.monotonic() + seconds
def connect():
    global tried
    s = socket.socket(socket.AF_UNIX)
    s.setblocking(False)
    tried += 1
    try:
        s.connect(path)
    except (BlockingIOError, OSError):
        s.close()
        return
    sel.register(s, selectors.EVENT_READ)
for _ in range(n):
    connect()
while time.monotonic() < end:
    for key, _ in sel.select(0.05):
        try:
            data = key.fileobj.recv(4096)
        except OSError:
            data = b""
        if b"busy" in data:
            busy += 1
        elif data:
            other += 1
        sel.unregister(key.fileobj)
        key.fileobj.close()
    while len(sel.get_map()) < n and time.monotonic() < end:
        connect()
print(json.dumps({"connections": tried, "busy": busy, "answered": other}))
"""

# As an attacker: hostile requests of every kind. Prints counts.
FUZZER = """
import array, json, os, random, socket, sys, threading, time
path, n, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(seed)
valid = json.dumps({"iface": "vlan3", "gateway": None, "ipv6": "auto", "dns": []}).encode()
counts = {"fuzzed": 0, "oversize": 0, "closed_mid_request": 0, "fd_passing": 0, "slow": 0,
          "answered": 0, "accepted": 0}
def mutate():
    b = bytearray(valid)
    for _ in range(rng.randint(1, 8)):
        op = rng.random()
        i = rng.randrange(len(b) + 1)
        if op < 0.4 and b:
            b[min(i, len(b) - 1)] = rng.randrange(256)
        elif op < 0.7:
            b[i:i] = rng.choice([b"[", b"{", b'"', b"\\\\u202e", b"\\x00", b"1e999", b",",
                                 b'"pid": 1,', b'"uid": 0,', b"\\xff", b"null"])
        else:
            del b[i:i + rng.randint(1, 4)]
    return bytes(b)
def exchange(data, shut=True, fds=None, close_early=False):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    try:
        s.connect(path)
        if fds is not None:
            s.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        else:
            s.sendall(data)
        if close_early:
            return
        if shut:
            s.shutdown(socket.SHUT_WR)
        raw = s.recv(65536)
        if raw:
            counts["answered"] += 1
            if json.loads(raw).get("ok"):
                counts["accepted"] += 1
    except (OSError, ValueError):
        pass
    finally:
        s.close()
def slow():
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    try:
        for ch in valid:
            s.send(bytes([ch]))
            time.sleep(0.3)
    except OSError:
        pass
    s.close()
slows = [threading.Thread(target=slow) for _ in range(4)]
for t in slows:
    t.start()
counts["slow"] = len(slows)
devnull = os.open("/dev/null", os.O_RDONLY)
for i in range(n):
    kind = i % 10
    if kind < 6:
        counts["fuzzed"] += 1
        exchange(mutate())
    elif kind == 6:
        counts["oversize"] += 1
        exchange(b'{"iface": "' + b"a" * 70000 + b'"}')
    elif kind == 7:
        counts["closed_mid_request"] += 1
        exchange(valid[: rng.randrange(1, len(valid))], close_early=True)
    else:
        counts["fd_passing"] += 1
        pair = socket.socketpair()
        exchange(valid, fds=[0, 1, 2, devnull, pair[0].fileno()])
        pair[0].close(); pair[1].close()
for t in slows:
    t.join()
print(json.dumps(counts))
"""

# CMD of the allowed user's launches: marker datagrams through vlan3, then the address the
# echo server saw.
SENDER = f"""
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
for _ in range(5):
    s.sendto({MARKER!r}, ("{Lab.SERVER}", {Lab.UDP_PORT}))
print(s.recv(100).decode().strip())
"""

# Connect, send a valid request, then exec argv[2:] (the socket stays open in it).
EXEC_AFTER_ASKING = """
import json, os, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
os.set_inheritable(s.fileno(), True)
s.sendall(json.dumps({"iface": "vlan3"}).encode())
s.shutdown(socket.SHUT_WR)
print(os.getpid(), flush=True)
if sys.argv[2:]:
    os.execv(sys.argv[2], sys.argv[3:])
"""


class Users:
    def __init__(self) -> None:
        tag = secrets.token_hex(3)
        self.attackers = [f"vth{i}{tag}" for i in range(ATTACKERS)]
        self.allowed = f"vthok{tag}"


@pytest.fixture(scope="module")
def users() -> Iterator[Users]:
    require_setpriv()
    u = Users()
    made = []
    try:
        for name in (*u.attackers, u.allowed):
            subprocess.run(["useradd", "--no-create-home", "--user-group", "--shell",
                            "/bin/sh", name], check=True)
            made.append(name)
        # An unlocked account: sudo then waits for the password instead of refusing at once
        # (the setuid program that must outlive the daemon's wait).
        subprocess.run(["chpasswd"], input=f"{u.allowed}:{secrets.token_hex(16)}\n",
                       text=True, check=True)
        yield u
    finally:
        for name in reversed(made):
            subprocess.run(["userdel", name], check=False)


@pytest.fixture(scope="module")
def package() -> Iterator[str]:
    with readable_package() as top:
        yield top


def as_user(user: str, *argv: str) -> list[str]:
    return ["setpriv", "--reuid", user, "--regid", user, "--init-groups", "--", *argv]


def usage(pid: int) -> dict[str, int]:
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text()
                  .splitlines())
    return {"fds": len(os.listdir(f"/proc/{pid}/fd")), "threads": int(status["Threads"]),
            "rss_kib": int(status["VmRSS"].split()[0])}


def quiet_usage(pid: int, threads: int) -> dict[str, int]:
    def settled() -> dict[str, int] | None:
        first = usage(pid)
        time.sleep(0.1)
        now = usage(pid)
        return now if now["threads"] <= threads and now["fds"] == first["fds"] else None

    return wait_for(settled, timeout=10, what="the daemon to be quiet")


def ping(path: str) -> bool:
    from via_tunnel.group import client

    try:
        answer = client.ping(path, 5)
    except OSError:
        return False
    return isinstance(answer, dict) and answer.get("ok") is True


def test_hostile_users_lock_nobody_out_leak_nothing_and_leave_nothing(
        lab: Lab, vt_env: dict[str, str], users: Users, package: str,
        tmp_path: Path) -> None:
    state_dir = vt_env["VIA_TUNNEL_STATE_DIR"]
    config = tmp_path / "config.toml"
    config.write_text(f'[interface.vlan3]\nallow_users = ["{users.allowed}"]\n')
    config.chmod(0o644)
    env = {**vt_env, "PYTHONPATH": package, "VIA_TUNNEL_CONFIG": str(config),
           "VIA_TUNNEL_SOCKET": state_dir + "/daemon.sock"}
    path = env["VIA_TUNNEL_SOCKET"]
    record = Path(state_dir) / "groups" / "vlan3.json"
    before_kernel = canonical(lab.snapshot(lab.client))
    daemon = Daemon(lab, env, tmp_path / "daemon.log").start()
    figures: dict[str, Any] = {}
    try:
        def launch() -> subprocess.CompletedProcess[str]:
            return lab.run(lab.client, as_user(users.allowed, USER_PY, "-m", "via_tunnel",
                                               "vlan3", "--", USER_PY, "-c", SENDER),
                           env=env, check=False, timeout=30)

        r = launch()  # warm-up: the daemon has served once
        assert (r.returncode, r.stdout.strip()) == (0, Lab.CLIENT_VETH), r.stderr
        wait_for(lambda: not record.exists(), timeout=10, what="the warm-up's teardown")
        # ... and has met a short attack of each kind: its allocator's arenas are grown.
        warm = [lab.popen(lab.client, as_user(users.attackers[0], USER_PY, "-c", HOLDER, path,
                                              "64", "1"), stdout=subprocess.DEVNULL),
                lab.popen(lab.client, as_user(users.attackers[1], USER_PY, "-c", FUZZER, path,
                                              "100", "99"), stdout=subprocess.DEVNULL)]
        for p in warm:
            p.wait(timeout=60)
        idle_threads = usage(daemon.pid)["threads"]
        before = quiet_usage(daemon.pid, idle_threads)
        figures["daemon_before"] = before

        # -- attacks, while the allowed user and root are served --------------------------
        attackers = [lab.popen(lab.client, as_user(name, USER_PY, "-c", HOLDER, path, "64",
                                                   str(ATTACK_SECONDS)),
                               env=env, stdout=subprocess.PIPE, text=True)
                     for name in users.attackers[:2]]
        attackers += [lab.popen(lab.client, as_user(name, USER_PY, "-c", FUZZER, path,
                                                    str(FUZZ_REQUESTS), str(i)),
                                env=env, stdout=subprocess.PIPE, text=True)
                      for i, name in enumerate(users.attackers[2:])]
        failures: list[str] = []
        pings_ok = [0]

        def root_pings() -> None:
            for _ in range(PINGS):
                if ping(path):
                    pings_ok[0] += 1
                else:
                    failures.append("root's ping")
                time.sleep(ATTACK_SECONDS / PINGS)

        pinger = threading.Thread(target=root_pings)
        with CaptureElsewhere(lab, "vlan3", MARKER_BPF) as elsewhere, \
                Capture(lab, lab.client, "vlan3", MARKER_BPF) as on_tunnel:
            pinger.start()
            time.sleep(0.3)  # the attackers are at it
            t0 = time.monotonic()
            for _ in range(LAUNCHES):
                r = launch()
                if (r.returncode, r.stdout.strip()) != (0, Lab.CLIENT_VETH):
                    failures.append(f"launch: {r.returncode} {r.stderr.strip()}")
            figures["launch_seconds_under_attack"] = round(time.monotonic() - t0, 2)
            pinger.join()
            outputs = [p.communicate(timeout=60)[0] for p in attackers]
        summaries = [json.loads(out.strip().splitlines()[-1]) for out in outputs]
        figures["holders"] = summaries[:2]
        figures["fuzzers"] = summaries[2:]
        figures["connections_tried"] = sum(s["connections"] for s in summaries[:2])
        figures["requests_tried"] = sum(sum(v for k, v in s.items()
                                            if k not in ("answered", "accepted"))
                                        for s in summaries[2:])
        figures["hostile_requests_accepted"] = sum(s["accepted"] for s in summaries[2:])
        figures["launches_ok"] = LAUNCHES - sum(f.startswith("launch") for f in failures)
        figures["root_pings_ok"] = pings_ok[0]
        figures["users_locked_out"] = len({f.split(":")[0] for f in failures})
        figures["packets_leaked"] = sum(len(p) for p in elsewhere.packets().values())
        figures["packets_through_vlan3"] = len(on_tunnel.packets())

        # -- a setuid exec, and a caller that exits, while the request waits ------------
        lock = os.open(os.path.join(state_dir, "lock"), os.O_RDWR)
        fcntl.flock(lock, fcntl.LOCK_EX)  # the daemon's worker waits for it
        setuid = lab.popen(lab.client, as_user(users.allowed, USER_PY, "-c",
                                               EXEC_AFTER_ASKING, path, "/usr/bin/sudo",
                                               "sudo", "-S", "-p", "", "true"),
                           env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
        assert setuid.stdout is not None
        setuid_pid = int(setuid.stdout.readline())
        wait_for(lambda: Path(f"/proc/{setuid_pid}/comm").read_text().strip() == "sudo",
                 timeout=10, what="sudo to run")
        gone = lab.run(lab.client, as_user(users.allowed, USER_PY, "-c", EXEC_AFTER_ASKING,
                                           path), env=env)
        gone_pid = int(gone.stdout.strip())
        time.sleep(0.2)
        assert setuid.poll() is None, setuid.communicate()
        fcntl.flock(lock, fcntl.LOCK_UN)
        os.close(lock)
        wait_for(lambda: f"pid={setuid_pid} iface=vlan3: the calling process changed its "
                         f"identity" in daemon.log(), timeout=10, what="the setuid refusal")
        wait_for(lambda: f"pid={gone_pid} iface=vlan3: the calling process exited"
                 in daemon.log(), timeout=10, what="the exited caller's refusal")
        figures["setuid_moved"] = int("if-vlan3" in Path(f"/proc/{setuid_pid}/cgroup")
                                      .read_text())
        setuid.kill()
        setuid.communicate(timeout=10)

        # -- hostile names and a hostile config -----------------------------------------
        from via_tunnel.group import client

        with pytest.raises(Exception, match="does not exist"):
            client.request({"iface": "vl\u202e3"}, path)
        config.write_text("x = " + "[" * 100_000 + "]" * 100_000 + "\n")
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "nested too deeply" in daemon.log(), timeout=10, what="the reload")
        assert ping(path), daemon.log()[-2000:]

        # -- afterwards ----------------------------------------------------------------
        wait_for(lambda: not record.exists(), timeout=10, what="the last teardown")
        after = quiet_usage(daemon.pid, before["threads"])
        figures["daemon_after"] = after
        log = daemon.log()
        figures["log_lines"] = log.count("\n")
        figures["busy_lines_logged"] = log.count(": busy: ")
        figures["suppressed_reported"] = log.count("suppressed (rate limit)")
        left = {"cgroups": cgroup_leftovers(env),
                "kernel_changed": canonical(lab.snapshot(lab.client)) != before_kernel,
                "records": sorted(p.name for p in (Path(state_dir) / "groups").iterdir()
                                  if p.suffix == ".json")}
        figures["leftovers"] = len(left["cgroups"]) + int(left["kernel_changed"]) + \
            len(left["records"])
        print("\nhostile figures: " + json.dumps(figures, indent=1))
        facts = json.dumps(figures)
        assert figures["users_locked_out"] == 0, (failures, facts)
        assert figures["hostile_requests_accepted"] == 0, facts
        assert figures["packets_leaked"] == 0, (elsewhere.packets(), facts)
        assert figures["packets_through_vlan3"] >= 5 * LAUNCHES, facts
        assert figures["setuid_moved"] == 0, facts
        assert after["fds"] <= before["fds"], facts
        assert after["rss_kib"] - before["rss_kib"] < RSS_TOLERANCE_KIB, facts
        assert figures["leftovers"] == 0, (left, facts)
        assert "\u202e" not in log and "vl\\u202e3" in log, facts
        # One user's flood is a bounded number of lines plus counts, never 100,000 lines.
        assert figures["busy_lines_logged"] < 4 * (100 + 20 * 30), facts
        assert "Traceback" not in log, log[-3000:]
        assert daemon.proc.poll() is None, facts
    finally:
        daemon.stop()


def test_a_state_dir_others_may_write_stops_the_daemon(
        lab: Lab, vt_env: dict[str, str], package: str, tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    state_dir.chmod(0o777)
    env = {**vt_env, "PYTHONPATH": package, "VIA_TUNNEL_STATE_DIR": str(state_dir),
           "VIA_TUNNEL_CONFIG": str(tmp_path / "none.toml"),
           "VIA_TUNNEL_SOCKET": str(tmp_path / "d.sock")}
    import sys

    r = lab.run(lab.client, [sys.executable, "-m", "via_tunnel", "daemon"], env=env,
                check=False, timeout=20)
    assert r.returncode == 125 and "refusing to trust" in r.stderr, r.stderr
    shutil.rmtree(state_dir)
