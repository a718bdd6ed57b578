"""Where a group's creation, a warm join and a teardown spend their time, step by step.

Run as root: ``python bench/phases.py [--runs N] [--markdown]`` (see bench/README.md).

``run.py`` times whole launches from outside; this one runs the same library code
in-process, inside a throwaway lab's client namespace, with every kernel adapter of
:mod:`via_tunnel.group.adapters` (and lifecycle's record calls) wrapped by a timer, so
each step's share is known:

* create:   ``lifecycle.ensure_group`` for a ``sleep`` (the cold launch's work after its
            imports, lock and watcher);
* join:     ``state.enter`` in a forked child (a warm launch's kernel work: net_cls and
            cgroup2 migrations), while the ``sleep`` keeps the group up;
* status:   what ``status --json`` reads (its members are the other groups' ``sleep``);
* teardown: ``lifecycle.teardown_if_empty`` once the ``sleep`` was killed and its cgroup
            says unpopulated (what the watcher does on that event), with the instance's
            default drain (``VIA_TUNNEL_DRAIN_MAX`` unset).

With ``--groups G``, G-1 other groups are up meanwhile (each on a veth of its own, no
member), to see which step grows with the number of groups.

Every row is a median over ``--runs`` cycles; "other" is the step's total minus its timed
parts (Python between the calls). Also the import cost of the warm and cold launch paths
(``python -c 'import …'`` against ``python -c pass``, interleaved). The lab, state dir and
cgroup subtree are removed at the end, also on failure.
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import describe_machine, log, prologue

try:
    from via_tunnel.lab.footprint import remove_footprint
    from via_tunnel.lab.netlab import Lab
except ImportError:  # not installed in this interpreter: use the checkout's src/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from via_tunnel.lab.footprint import remove_footprint
    from via_tunnel.lab.netlab import Lab

IFACE = "vlan3"
WARM_IMPORTS = ("via_tunnel.cli.main", "via_tunnel.core.launch_form", "via_tunnel.launch.launcher",
                "via_tunnel.group.state", "via_tunnel.core.settings")
COLD_IMPORTS = (*WARM_IMPORTS, "via_tunnel.group.lifecycle", "via_tunnel.group.watcher",
                "via_tunnel.group.early_join", "via_tunnel.kernel.netlink",
                "via_tunnel.kernel.nft", "nftables")


class Timings:
    """Seconds per step name, collected over the runs."""

    def __init__(self) -> None:
        self.samples: dict[str, list[float]] = {}
        self.current: dict[str, float] = {}

    def add(self, name: str, seconds: float) -> None:
        self.current[name] = self.current.get(name, 0.0) + seconds

    def close_run(self, phase: str, total: float) -> None:
        parts = sum(self.current.values())
        self.current["(other)"] = max(0.0, total - parts)
        self.current["TOTAL"] = total
        for name, value in self.current.items():
            self.samples.setdefault(f"{phase}: {name}", []).append(value)
        self.current = {}


class Timed:
    """``target`` with every callable attribute timed into ``timings`` as ``label.name``."""

    def __init__(self, target: Any, label: str, timings: Timings) -> None:
        self._target, self._label, self._timings = target, label, timings

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._target, name)
        if not callable(value) or isinstance(value, type):
            return value

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return value(*args, **kwargs)
            finally:
                self._timings.add(f"{self._label}.{name}", time.perf_counter() - t0)
        return timed


@contextmanager
def instrumented(timings: Timings) -> Iterator[None]:
    """Every adapter, and lifecycle's record calls (``state``), timed. (``placement``
    is not: it is made of adapter calls, which are.)"""
    from via_tunnel.group import adapters, lifecycle

    real = adapters.current()
    kernel = adapters.Kernel(**{name: Timed(getattr(real, name), name, timings)
                                for name in adapters.Kernel.__slots__})
    saved = lifecycle.state
    lifecycle.state = Timed(saved, "state", timings)  # type: ignore[assignment]
    try:
        with adapters.replaced(kernel):
            yield
    finally:
        lifecycle.state = saved


def others_up(settings: Any, count: int) -> list[tuple[str, subprocess.Popen[bytes]]]:
    """``count`` more groups, each on a veth "tunnel" of its own (both ends in this
    namespace, a point-to-point address as on a real tunnel) with a ``sleep`` in it: the
    G-1 others of a measurement at G groups."""
    from via_tunnel.group import lifecycle, state

    names = [f"vo{i}" for i in range(count)]
    lines = []
    for i, name in enumerate(names):
        near, far = f"198.18.{i // 64}.{(i % 64) * 4 + 2}", f"198.18.{i // 64}.{(i % 64) * 4 + 1}"
        lines += [f"link add {name} type veth peer name vp{i}", f"link set vp{i} up",
                  f"link set {name} up", f"addr add {near} peer {far}/30 dev {name}"]
    subprocess.run(["ip", "-batch", "-"], input="\n".join(lines) + "\n", text=True, check=True)
    out = []
    for name in names:
        member = subprocess.Popen(["sleep", "3600"])
        out.append((name, member))
        with state.locked(settings):
            lifecycle.ensure_group(settings, name, first_pid=member.pid)
    return out


def inside(runs: int, groups: int) -> dict[str, list[float]]:
    """The measurements, with ``groups`` - 1 other groups up; runs in the lab's client
    namespace."""
    from via_tunnel.core.settings import Settings
    from via_tunnel.group import lifecycle, state
    from via_tunnel.kernel import cgroup

    settings = Settings.from_env()
    timings = Timings()
    others = others_up(settings, groups - 1)
    for _ in range(runs):
        status_run(timings)
    for _ in range(runs):
        sleep = subprocess.Popen(["sleep", "600"])
        try:
            with state.locked(settings), instrumented(timings):
                t0 = time.perf_counter()
                rec = lifecycle.ensure_group(settings, IFACE, first_pid=sleep.pid)
                timings.close_run("create", time.perf_counter() - t0)
            timings.add("state.enter", _join_in_child(settings, rec))
            timings.close_run("join", timings.current["state.enter"])
        finally:
            sleep.kill()
            sleep.wait()
        _wait_for(lambda path=rec.cgroup: not cgroup.populated(path), "the group to empty")
        with state.locked(settings), instrumented(timings):
            t0 = time.perf_counter()
            if not lifecycle.teardown_if_empty(settings, IFACE):
                raise RuntimeError("the group still had a member")
            timings.close_run("teardown", time.perf_counter() - t0)
        _wait_for(lambda: not _drain_may_be_live(settings), "the drain to end", 130)
        with state.locked(settings):
            lifecycle.cleanup(settings)  # the inert table of a drained group
    for name, member in others:
        member.kill()
        member.wait()
        with state.locked(settings):
            _wait_for(lambda n=name: lifecycle.teardown_if_empty(settings, n),
                      f"{name}'s group to empty")
    return timings.samples


STATUS_STEPS = {"via_tunnel.kernel.netlink": ("link_states",),
                "via_tunnel.kernel.nft": ("group_counters", "draining"),
                "via_tunnel.kernel.cgroup": ("members", "cgroup2_mount"),
                "via_tunnel.kernel.procs": ("command_line",),
                "via_tunnel.group.placement": ("moved_out", "netcls_root_of"),
                "via_tunnel.group.state": ("load_all", "watcher_pid", "drain_may_be_live")}


def status_run(timings: Timings) -> None:
    """One ``status --json`` (its data, not the printing), each kernel read timed."""
    import importlib

    from via_tunnel.cli import status_command

    saved = []
    for module_name, names in STATUS_STEPS.items():
        module = importlib.import_module(module_name)
        for name in names:
            saved.append((module, name, getattr(module, name)))
            setattr(module, name, getattr(Timed(module, module_name.rsplit(".", 1)[1],
                                                timings), name))
    try:
        t0 = time.perf_counter()
        status_command.group_info()
        status_command.draining_info()
        timings.close_run("status", time.perf_counter() - t0)
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def _drain_may_be_live(settings: Any) -> bool:
    from via_tunnel.group import state

    return state.drain_may_be_live(settings)


def _join_in_child(settings: Any, rec: Any) -> float:
    """Seconds a fresh process takes to enter the group (state.enter), timed by itself."""
    from via_tunnel.group import state

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: join, report, leave (its exit empties the group again)
        os.close(read)
        t0 = time.perf_counter()
        state.enter(settings, rec)
        os.write(write, repr(time.perf_counter() - t0).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as r:
        seconds = float(r.read() or "nan")
    os.waitpid(pid, 0)
    return seconds


def _wait_for(predicate: Callable[[], bool], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.001)


def import_costs(runs: int) -> dict[str, list[float]]:
    """Wall time of ``python -c 'import …'`` for the warm and the cold launch's modules,
    interleaved with ``python -c pass``."""
    out: dict[str, list[float]] = {}
    forms = {"python -c pass": "pass",
             "imports of a warm launch": "import " + ", ".join(WARM_IMPORTS),
             "imports of a cold launch": "import " + ", ".join(COLD_IMPORTS)}
    for _ in range(runs):
        for name, code in forms.items():
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True)
            out.setdefault(name, []).append(time.perf_counter() - t0)
    return out


def render(samples: dict[str, list[float]], markdown: bool) -> str:
    rows = [("step", "runs", "median ms", "p90 ms")]
    for name, values in samples.items():
        values = sorted(values)
        p90 = values[min(len(values) - 1, int(0.9 * len(values)))]
        rows.append((name, str(len(values)), f"{statistics.median(values) * 1e3:.2f}",
                     f"{p90 * 1e3:.2f}"))
    if markdown:
        lines = ["| " + " | ".join(r) + " |" for r in rows]
        lines.insert(1, "|---|---|---|---|")
        return "\n".join(lines)
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{r[0]:<{width}}  {r[1]:>5}  {r[2]:>10}  {r[3]:>8}" for r in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--runs", type=int, default=20, help="cycles (default 20)")
    parser.add_argument("--groups", type=int, default=1,
                        help="groups up while one is created and removed (default 1: alone)")
    parser.add_argument("--markdown", action="store_true", help="print Markdown tables")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.inside:  # in the client namespace, with the instance's environment
        import json

        print(json.dumps(inside(args.runs, args.groups)))
        return 0
    if not prologue("phases.py"):
        return 1
    lab = Lab("vp" + secrets.token_hex(3), openvpn=False)
    state_dir, subtree = f"/run/via-tunnel-bench-{lab.prefix}", f"via-tunnel-bench-{lab.prefix}"
    env = {**os.environ, "VIA_TUNNEL_STATE_DIR": state_dir, "VIA_TUNNEL_CGROUP": subtree}
    env.pop("VIA_TUNNEL_DRAIN_MAX", None)
    try:
        lab.up()
        log(f"lab {lab.prefix} up; {args.runs} cycles of create, join, teardown with "
            f"{args.groups - 1} other groups up")
        import json

        out = subprocess.run([*lab.nsenter(lab.client), sys.executable, __file__, "--inside",
                              "--runs", str(args.runs), "--groups", str(args.groups)],
                             env=env, check=True,
                             stdout=subprocess.PIPE, text=True, timeout=600 + 140 * args.runs
                             + args.groups)
        samples = json.loads(out.stdout)
        log("imports")
        samples.update(import_costs(args.runs))
    finally:
        problems = remove_footprint(state_dir, subtree)
        lab.down()
    print(f"via-tunnel phases — {describe_machine()}; {sys.executable}")
    print(render(samples, args.markdown))
    for p in problems:
        print(f"leftover removed: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
