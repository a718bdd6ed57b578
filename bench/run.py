"""Launch and cleanup benchmarks of via-tunnel, in a throwaway namespace lab.

Run as root: ``python bench/run.py [--runs N] [--markdown]`` (see bench/README.md).

Everything is measured in one run, against a baseline measured in the same run and under
the same conditions (``nsenter --net=CLIENT true``, interleaved with the runs it is compared
to), because on a small shared machine absolute times drift with whatever else is running:
compare ratios and overheads, not absolutes.

* baseline: ``nsenter --net=CLIENT true``, spawn to exit.
* python -c pass: the interpreter that runs via-tunnel, started the same way (a reference:
            the part of a launch that is Python starting, not via-tunnel).
* warm:     ``nsenter --net=CLIENT via-tunnel vlan3 -- true`` while another run keeps the
            group up (``via-tunnel vlan3 -- sleep 600``).
* cold:     the same with no group: before each run the previous group is completely gone
            (record, cgroup, the instance's cgroup subtree, and its watcher has exited).
* cleanup:  the group's last process is reaped -> the record, the group's cgroup and the
            instance's cgroup subtree are gone (the subtree's rmdir is teardown's last step).

Standard library only, plus :mod:`via_tunnel.lab`. Exit status 0 whatever the figures (it
is a report); 1 when something failed (a run exited non-zero, a leftover, a timeout).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import secrets
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

try:
    import via_tunnel
    from via_tunnel.lab import Lab, LabError, remove_footprint
except ImportError:  # not installed in this interpreter: use the checkout's src/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import via_tunnel
    from via_tunnel.lab import Lab, LabError, remove_footprint

IFACE = "vlan3"
RUN_TIMEOUT = 30.0  # one launch, generous: a launch normally takes well under a second
SETTLE_TIMEOUT = 10.0  # a group appearing or disappearing
POLL = 0.0002  # cleanup polling interval (0.2 ms)
PACKAGE_PARENT = str(Path(via_tunnel.__file__).resolve().parents[1])

# Targets: overhead over the baseline median (warm, cold) or absolute (cleanup), in ms.
TARGETS: dict[str, float] = {"warm launch": 50.0, "cold launch": 100.0, "cleanup": 20.0}


class BenchError(RuntimeError):
    """Something did not work: the figures would be meaningless."""


class Stats:
    """Samples of one metric, in seconds."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.samples: list[float] = []

    def add(self, seconds: float) -> None:
        self.samples.append(seconds)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples) * 1000

    @property
    def p90_ms(self) -> float:
        if len(self.samples) < 2:
            return self.median_ms
        return statistics.quantiles(self.samples, n=10, method="inclusive")[8] * 1000


# -- the instance under test --------------------------------------------------------------


class Bench:
    """A lab plus one via-tunnel instance (its own state dir and cgroup subtree)."""

    def __init__(self, lab: Lab, launcher: list[str], extra_env: Mapping[str, str]) -> None:
        self.lab = lab
        self.launcher = launcher
        self.python = interpreter_of(launcher)
        self.state_dir = f"/run/via-tunnel-bench-{lab.prefix}"
        self.cgroup_subtree = f"via-tunnel-bench-{lab.prefix}"
        self.env = {
            **os.environ,
            "VIA_TUNNEL_STATE_DIR": self.state_dir,
            "VIA_TUNNEL_CGROUP": self.cgroup_subtree,
            **extra_env,
        }
        mount = cgroup2_mount_or_fail()
        self.subtree_path = os.path.join(mount, self.cgroup_subtree)
        self.group_path = os.path.join(self.subtree_path, "if-" + IFACE)
        self.record_path = os.path.join(self.state_dir, "groups", f"{IFACE}.json")
        self.nsenter = lab.nsenter(lab.client)
        self.client_ns = os.stat(lab.ns_path(lab.client))
        self.holders: list[subprocess.Popen[bytes]] = []

    def via_argv(self, *args: str) -> list[str]:
        return [*self.nsenter, *self.launcher, IFACE, "--", *args]

    def timed(self, argv: list[str]) -> float:
        """Spawn ``argv``, wait for it to exit; the wall time in seconds. Fails unless 0."""
        start = time.perf_counter()
        proc = subprocess.Popen(argv, env=self.env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            _out, err = proc.communicate(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise BenchError(f"timed out after {RUN_TIMEOUT:g}s: {' '.join(argv)}") from None
        elapsed = time.perf_counter() - start
        if proc.returncode != 0:
            raise BenchError(f"exit {proc.returncode}: {' '.join(argv)}: "
                             f"{err.decode(errors='replace').strip()[:400]}")
        return elapsed

    def group_up(self) -> bool:
        return os.path.exists(self.record_path) and os.path.isdir(self.group_path)

    def footprint_gone(self) -> bool:
        """Record, group cgroup and the instance's cgroup subtree are all gone."""
        return not (os.path.exists(self.record_path) or os.path.exists(self.group_path)
                    or os.path.exists(self.subtree_path))

    def client_pids(self) -> list[int]:
        """Processes living in the lab's client namespace (launchers, CMDs, watchers)."""
        pids = []
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                st = os.stat(f"/proc/{name}/ns/net")
            except OSError:
                continue
            if (st.st_ino, st.st_dev) == (self.client_ns.st_ino, self.client_ns.st_dev) \
                    and not _is_zombie(int(name)):
                pids.append(int(name))
        return pids

    def wait_quiet(self, keep: tuple[int, ...] = ()) -> None:
        """Wait until no group is left and no process of ours (but ``keep``) runs."""
        wait_for(lambda: self.footprint_gone()
                 and not [p for p in self.client_pids() if p not in keep],
                 "the group to be torn down and its watcher to exit")

    def start_holder(self, argv: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        """Start a long-running ``via-tunnel IFACE -- ARGV`` and wait until it is in the
        group (so the group and its watcher are up)."""
        proc: subprocess.Popen[bytes] = subprocess.Popen(
            self.via_argv(*argv), env=self.env, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, **kw)
        self.holders.append(proc)

        def joined() -> bool:
            if proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                raise BenchError(f"the holder exited {proc.returncode}: {err.strip()[-300:]}")
            return self.group_up() and str(proc.pid) in _read(
                os.path.join(self.group_path, "cgroup.procs")).split()

        wait_for(joined, "the holder to join the group")
        return proc


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = SETTLE_TIMEOUT,
             interval: float = 0.002) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _is_zombie(pid: int) -> bool:
    stat = _read(f"/proc/{pid}/stat")
    return not stat or stat.rsplit(")", 1)[1].split()[0] == "Z"


def cgroup2_mount_or_fail() -> str:
    from via_tunnel.lab import cgroup2_mount

    mount = cgroup2_mount()
    if mount is None:
        raise BenchError("no cgroup2 filesystem is mounted")
    return mount


def interpreter_of(launcher: list[str]) -> str:
    """The Python that runs ``launcher`` (a console script's ``#!`` line, or argv[0])."""
    if len(launcher) == 1:
        first = _read_first_line(launcher[0])
        if first.startswith("#!") and first[2:].strip():
            return first[2:].split()[0]
        return sys.executable
    return launcher[0]


def _read_first_line(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.readline(4096).decode(errors="replace")
    except OSError:
        return ""


def choose_launcher(src: str | None = None) -> tuple[list[str], dict[str, str], str]:
    """The console script next to ``sys.executable`` if there is one, else ``python -m``;
    with ``src``, ``python -m via_tunnel`` of the package in that directory.

    Returns argv prefix, extra environment and a description."""
    if src is not None:
        src = os.path.abspath(src)
        if not os.path.isfile(os.path.join(src, "via_tunnel", "__init__.py")):
            raise BenchError(f"--src {src}: no via_tunnel package there")
        return ([sys.executable, "-m", "via_tunnel"], {"PYTHONPATH": src},
                f"{sys.executable} -m via_tunnel (PYTHONPATH={src})")
    script = Path(sys.executable).parent / "via-tunnel"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)], {}, f"console script {script}"
    pythonpath = os.pathsep.join(p for p in (PACKAGE_PARENT, os.environ.get("PYTHONPATH")) if p)
    return ([sys.executable, "-m", "via_tunnel"], {"PYTHONPATH": pythonpath},
            f"{sys.executable} -m via_tunnel (PYTHONPATH={PACKAGE_PARENT})")


# -- the measurements ---------------------------------------------------------------------


def measure(bench: Bench, runs: int, log: Callable[[str], None]) -> dict[str, Stats]:
    base, warm, cold, clean = (Stats("baseline"), Stats("warm launch"), Stats("cold launch"),
                               Stats("cleanup"))
    python = Stats("python -c pass")
    baseline_argv = [*bench.nsenter, "true"]
    python_argv = [*bench.nsenter, bench.python, "-c", "pass"]
    true_argv = bench.via_argv("true")

    # Warm-up (not counted): page cache, pyc files, the first nft/netlink use in the ns.
    bench.timed(baseline_argv)
    bench.timed(true_argv)
    bench.wait_quiet()

    log(f"warm: {runs} runs (a holder keeps the group up), baseline interleaved")
    holder = bench.start_holder(["sleep", "600"], stdin=subprocess.DEVNULL)
    bench.timed(true_argv)  # warm-up of the warm path
    for _ in range(runs):
        base.add(bench.timed(baseline_argv))
        warm.add(bench.timed(true_argv))
        python.add(bench.timed(python_argv))
    holder.kill()
    holder.wait(timeout=SETTLE_TIMEOUT)
    bench.wait_quiet()

    log(f"cold: {runs} runs (each waits until the previous group is gone), baseline "
        f"interleaved")
    for _ in range(runs):
        base.add(bench.timed(baseline_argv))
        cold.add(bench.timed(true_argv))
        bench.wait_quiet()

    log(f"cleanup: {runs} runs")
    for _ in range(runs):
        proc = bench.start_holder(["sh", "-c", "read x || :"], stdin=subprocess.PIPE)
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=SETTLE_TIMEOUT)
        t0 = time.perf_counter()
        deadline = t0 + SETTLE_TIMEOUT
        while not bench.footprint_gone():
            if time.perf_counter() > deadline:
                raise BenchError("the group was not torn down after its last process exited")
            time.sleep(POLL)
        clean.add(time.perf_counter() - t0)
        if proc.returncode != 0:
            raise BenchError(f"sh -c 'read x || :' exited {proc.returncode}")
        bench.wait_quiet()
    return {s.name: s for s in (base, python, warm, cold, clean)}


def leftovers(bench: Bench, before: dict[str, Any]) -> list[str]:
    """What differs in the client namespace from before the first run, and what is left of
    the instance on the host (checked once, not timed)."""
    lab = bench.lab
    problems = []
    after = snapshot(lab)
    for key in ("rules", "nft", "routes", "sysctl_src_valid_mark"):
        if after[key] != before[key]:
            problems.append(f"client namespace: {key} differ from before the benchmark: "
                            f"{json.dumps(after[key])[:400]}")
    if any(t.get("table", {}).get("name") == "via_tunnel"
           for t in after["nft"].get("nftables", [])):
        problems.append("nft table inet via_tunnel is still there")
    if bench.client_pids():
        problems.append(f"processes left in the client namespace: {bench.client_pids()}")
    if not bench.footprint_gone():
        problems.append("the group's record or cgroup is still there")
    errlog = os.path.join(bench.state_dir, "watcher-errors.log")
    if os.path.exists(errlog):
        problems.append(f"watcher errors: {_read(errlog).strip()[-300:]}")
    return problems


def snapshot(lab: Lab) -> dict[str, Any]:
    """``ip -j rule``, routes of all tables, ``nft -j list ruleset`` and src_valid_mark."""
    snap = lab.snapshot(lab.client)
    snap["routes"] = {fam: sorted(rs, key=lambda r: json.dumps(r, sort_keys=True))
                      for fam, rs in snap["routes"].items()}
    return snap


# -- the report ---------------------------------------------------------------------------


def rows(stats: dict[str, Stats]) -> list[list[str]]:
    base = stats["baseline"].median_ms
    out = []
    for name in ("baseline", "python -c pass", "warm launch", "cold launch", "cleanup"):
        s = stats[name]
        relative = name in ("python -c pass", "warm launch", "cold launch")
        overhead = s.median_ms - base if relative else None
        target = TARGETS.get(name)
        if target is None:
            target_txt, verdict = "—", "—"
        elif relative:
            assert overhead is not None
            target_txt, verdict = f"overhead ≤ {target:g} ms", "pass" if overhead <= target \
                else "MISS"
        else:
            target_txt, verdict = f"≤ {target:g} ms", "pass" if s.median_ms <= target else "MISS"
        out.append([
            name, f"{len(s.samples)}", f"{s.median_ms:.1f}", f"{s.p90_ms:.1f}",
            f"{s.median_ms / base:.1f}x" if relative else ("1.0x" if name == "baseline" else "—"),
            f"+{overhead:.1f}" if overhead is not None else "—", target_txt, verdict,
        ])
    return out


HEADER = ["metric", "runs", "median ms", "p90 ms", "ratio", "overhead ms", "target",
          "result"]


def render(table: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
        lines += ["| " + " | ".join(r) + " |" for r in table]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in [HEADER, *table]) for i in range(len(HEADER))]
    fmt = "  ".join(f"{{:{'<' if i == 0 else '>'}{w}}}" for i, w in enumerate(widths))
    return "\n".join(fmt.format(*r) for r in [HEADER, *table])


def describe_machine() -> str:
    cores = os.cpu_count()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{datetime.date.today().isoformat()}, {cores} cores, kernel {platform.release()}, "
            f"Python {platform.python_version()}, load average {load}")


# -- main -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--runs", type=int, default=30, help="runs per metric (default 30)")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    parser.add_argument("--src", metavar="DIR",
                        help="benchmark the via_tunnel package in DIR (python -m via_tunnel "
                             "with PYTHONPATH=DIR), e.g. to compare two versions")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if os.geteuid() != 0:
        print("bench/run.py: needs root (namespaces, cgroups, nftables)", file=sys.stderr)
        return 1

    def log(msg: str) -> None:
        print(f"# {msg}", file=sys.stderr, flush=True)

    # SIGTERM/SIGHUP unwind like Ctrl-C, so the finally below always removes the lab.
    def _stop(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _stop)

    try:
        launcher, extra_env, described = choose_launcher(args.src)
    except BenchError as exc:
        parser.error(str(exc))
    log(f"via-tunnel launched as: {described}")
    lab = Lab("vb" + secrets.token_hex(3), openvpn=False)
    bench: Bench | None = None
    failed: str | None = None
    stats: dict[str, Stats] = {}
    problems: list[str] = []
    started = time.monotonic()
    try:
        lab.up()
        log(f"lab {lab.prefix} up in {lab.up_seconds:.2f}s")
        bench = Bench(lab, launcher, extra_env)
        before = snapshot(lab)
        stats = measure(bench, args.runs, log)
        problems = leftovers(bench, before)
    except (BenchError, LabError, OSError, subprocess.SubprocessError) as exc:
        failed = f"{type(exc).__name__}: {exc}"
    except KeyboardInterrupt:
        failed = "interrupted"
    finally:
        if bench is not None:
            problems += shutdown(bench)
        lab.down()
        if bench is not None:
            problems += [f"could not remove {p}" for p in
                         remove_footprint(bench.state_dir, bench.cgroup_subtree)]
    log(f"done in {time.monotonic() - started:.1f}s")
    machine = describe_machine()
    if stats and failed is None:
        print(f"via-tunnel benchmarks — {machine}; launcher: {described}; "
              f"{args.runs} runs each\n")
        print(render(rows(stats), args.markdown))
    for problem in problems:
        print(f"bench/run.py: leftover: {problem}", file=sys.stderr)
    if failed is not None:
        print(f"bench/run.py: failed: {failed}", file=sys.stderr)
    return 1 if failed is not None or problems else 0


def shutdown(bench: Bench) -> list[str]:
    """Stop the holders, let the watcher tear the group down; if it does not, run
    ``via-tunnel cleanup``. Returns problems (empty when all went as it should)."""
    for proc in bench.holders:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=SETTLE_TIMEOUT)
        if proc.stderr is not None:
            proc.stderr.close()
    try:
        bench.wait_quiet()
        return []
    except BenchError as exc:
        problem = str(exc)
    argv = [*bench.nsenter, *bench.launcher, "cleanup"]
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run(argv, env=bench.env, capture_output=True, timeout=RUN_TIMEOUT,
                       check=False)
    return [f"{problem} (ran via-tunnel cleanup)"]


if __name__ == "__main__":
    sys.exit(main())
