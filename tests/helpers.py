"""Helpers shared by the kernel tests (a plain module; conftest.py imports it)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import via_tunnel
from via_tunnel.lab.footprint import cgroup2_mount
from via_tunnel.lab.netlab import Lab

T = TypeVar("T")

# The directory that holds the via_tunnel package this test process imported: children get it
# on PYTHONPATH so that they run the same code, installed or not.
PACKAGE_PARENT = str(Path(via_tunnel.__file__).resolve().parents[1])

REQUIRED_PROGRAMS = ("ip", "nsenter", "nft", "openvpn", "curl", "tcpdump", "socat", "sysctl")


def missing_prerequisites() -> list[str]:
    """What the kernel tests need and this machine lacks (empty when all is there)."""
    missing = [f"program {name!r}" for name in REQUIRED_PROGRAMS if shutil.which(name) is None]
    if os.geteuid() != 0:
        missing.insert(0, "root")
    if not os.path.exists("/dev/net/tun"):
        missing.append("/dev/net/tun")
    return missing


def vt_env_for(lab: Lab, *, drain: bool = False) -> dict[str, str]:
    """Environment for via-tunnel runs in ``lab``: its own state dir and cgroup subtree, so
    neither a real install nor a lab running side by side is touched.

    Without ``drain``, a group that ends does not drain (``VIA_TUNNEL_DRAIN_MAX=0``): most
    tests compare the client with its state before the group right after the group ends,
    which a drain (up to 120 s of the kept table) would defer. test_drain_kernel.py tests
    draining as it runs on a host."""
    return {
        "VIA_TUNNEL_STATE_DIR": f"/run/via-tunnel-test-{lab.prefix}",
        "VIA_TUNNEL_CGROUP": f"via-tunnel-test-{lab.prefix}",
        **({} if drain else {"VIA_TUNNEL_DRAIN_MAX": "0"}),
        "PYTHONPATH": os.pathsep.join(
            p for p in (PACKAGE_PARENT, os.environ.get("PYTHONPATH")) if p
        ),
    }


def via_argv(lab: Lab, *args: str) -> list[str]:
    """Full argv of ``python -m via_tunnel ARGS`` in the lab's client namespace (for callers
    that start it themselves; pass ``vt_env`` in its environment)."""
    return [*lab.nsenter(lab.client), sys.executable, "-m", "via_tunnel", *args]


def via(
    lab: Lab,
    env: Mapping[str, str],
    *args: str,
    timeout: float = 30,
    check: bool = True,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m via_tunnel ARGS`` in the lab's client namespace and wait.

    ``env`` (normally the ``vt_env`` fixture) is added to the current environment. Text mode,
    stdout and stderr captured. A non-zero exit raises ``LabError`` unless ``check=False``.
    """
    argv = [sys.executable, "-m", "via_tunnel", *args]
    return lab.run(lab.client, argv, env=env, timeout=timeout, check=check, input=input)


def via_popen(lab: Lab, env: Mapping[str, str], *args: str, **kw: Any) -> subprocess.Popen[Any]:
    """Like :func:`via` but in the background: by default stdin is /dev/null and stdout and
    stderr are text pipes (override with ``kw``). Tracked and killed by ``lab.down()``. The
    Popen's pid is via-tunnel's, and so CMD's once via-tunnel execs it."""
    kw.setdefault("stdin", subprocess.DEVNULL)
    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stderr", subprocess.PIPE)
    kw.setdefault("text", True)
    argv = [sys.executable, "-m", "via_tunnel", *args]
    return lab.popen(lab.client, argv, env=env, **kw)


def wait_for(
    predicate: Callable[[], T],
    *,
    timeout: float = 5,
    what: str = "condition",
    interval: float = 0.02,
) -> T:
    """Poll ``predicate`` until it returns something truthy (returned) or fail the test after
    ``timeout`` seconds with "timed out waiting for WHAT"."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def process_group(pgid: int) -> str:
    """What each process of a process group is doing (state, blocked and ignored signals,
    where it sleeps in the kernel, its command line): why a signal did not end it."""
    lines = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[2]) != pgid:
                    continue
            with open(f"/proc/{entry}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{entry}/wchan") as f:
                wchan = f.read()
        except (OSError, ValueError, IndexError):
            continue
        lines.append(f"{entry} {fields['State'].strip()} blk={fields['SigBlk'].strip()} "
                     f"ign={fields['SigIgn'].strip()} pnd={fields['ShdPnd'].strip()} "
                     f"threads={fields['Threads'].strip()} wchan={wchan} {cmd}")
    return "\n".join(lines) or f"no process in group {pgid}"


def cgroup_leftovers(env: Mapping[str, str]) -> list[str]:
    """Cgroups still present below the instance's cgroup subtree (``VIA_TUNNEL_CGROUP``),
    deepest first; the subtree's own directory does not count."""
    mount = cgroup2_mount()
    if mount is None:
        return []
    top = os.path.join(mount, env["VIA_TUNNEL_CGROUP"].strip("/"))
    if not os.path.isdir(top):
        return []
    return [d for d, _dirs, _files in os.walk(top, topdown=False) if d != top]


def canonical(snapshot: Any) -> Any:
    """A snapshot with every route list sorted: an interface going down and up re-adds the
    kernel's own routes in another order, which is not a change of ours."""
    routes = {fam: sorted(rs, key=lambda r: json.dumps(r, sort_keys=True))
              for fam, rs in snapshot["routes"].items()}
    return {**snapshot, "routes": routes}


class CaptureElsewhere:
    """Capture on every interface of the client except ``tunnel`` and ``lo``: proof that the
    program's packets (``bpf``) left by no other interface. ``packets()`` maps interface ->
    packets seen there (only non-empty entries)."""

    def __init__(self, lab: Lab, tunnel: str, bpf: str) -> None:
        from via_tunnel.lab.capture import Capture

        names = [link["ifname"] for link in lab.ip_json(lab.client, "link", "show")]
        self.captures = {name: Capture(lab, lab.client, name, bpf) for name in names
                         if name not in (tunnel, "lo") and _is_up(lab, name)}

    def __enter__(self) -> CaptureElsewhere:
        for cap in self.captures.values():
            cap.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for cap in self.captures.values():
            cap.stop()

    def packets(self) -> dict[str, list[str]]:
        seen = {name: cap.packets() for name, cap in self.captures.items()}
        return {name: pkts for name, pkts in seen.items() if pkts}


def _is_up(lab: Lab, name: str) -> bool:
    link = lab.ip_json(lab.client, "link", "show", "dev", name)
    return bool(link) and "UP" in link[0].get("flags", [])


def state_files(state_dir: Path) -> list[str]:
    """The state dir's files and folders, relative to it; the net_cls hierarchy mounted in
    it is one entry (its cgroups change under other labs' feet)."""
    found: list[str] = []
    for top, dirs, names in os.walk(state_dir):
        rel = os.path.relpath(top, state_dir)
        if os.path.ismount(top) and rel != ".":
            dirs.clear()
            continue
        found.extend(os.path.normpath(os.path.join(rel, n)) for n in (*dirs, *names))
    return found
