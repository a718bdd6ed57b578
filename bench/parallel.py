"""Parallel launches of via-tunnel: many at once on one interface, and on as many interfaces.

Run as root: ``python bench/parallel.py [--launches 100] [--rounds 3]`` (see bench/README.md).

In the lab of bench/scalelab.py (``--launches`` veth tunnels), each round starts, as fast as
it can spawn them:

* baseline: ``--launches`` x ``nsenter --net=CLIENT true`` at once;
* one interface: ``--launches`` x ``via-tunnel vt0 -- true`` at once (the first creates the
  group, the others join it or, once it emptied and was torn down, create it again);
* many interfaces: ``via-tunnel vt<i> -- true`` for i = 0 .. launches-1, at once (as many
  groups created concurrently; at most via-tunnel's cap of active groups).

Each launch's latency is spawn -> exit, measured by a thread per launch. Every launch must
exit 0; after each batch everything must be gone (records, cgroups, watchers, and the
client namespace's rules, routes and nft ruleset back to what they were before). Reports
median, p90, p99 and max per kind over all rounds, the batch's wall time (first spawn ->
last exit) and the time from the last exit until nothing of via-tunnel was left.

Exit status 0 whatever the figures; 1 when a launch failed or something was left behind.
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import BenchError, choose_launcher, describe_machine, log, prologue
from scalelab import LabError, ScaleLab, tunnel_name, wait_for

from via_tunnel.core import settings as vt_settings

LAUNCH_TIMEOUT = 300.0
KINDS = ("baseline", "one interface", "many interfaces")


def batch(sl: ScaleLab, argvs: list[list[str]]) -> tuple[list[float], float, list[str]]:
    """Start every argv at once; (latencies, wall seconds, failures)."""
    latencies: list[float] = [0.0] * len(argvs)
    failures: list[str] = []
    lock = threading.Lock()

    def wait(i: int, proc: subprocess.Popen[bytes], start: float) -> None:
        try:
            _out, err = proc.communicate(timeout=LAUNCH_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            _out, err = proc.communicate()
            err = b"timed out; " + err
        latencies[i] = time.perf_counter() - start
        if proc.returncode != 0:
            with lock:
                failures.append(f"{' '.join(argvs[i][-3:])}: exit {proc.returncode}: "
                                f"{err.decode(errors='replace').strip()[-300:]}")

    threads = []
    first = time.perf_counter()
    for i, argv in enumerate(argvs):
        start = time.perf_counter()
        proc = subprocess.Popen(argv, env=sl.env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        t = threading.Thread(target=wait, args=(i, proc, start), daemon=True)
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    wall = time.perf_counter() - first
    return latencies, wall, failures


def pct(xs: list[float], q: int) -> float:
    if len(xs) < 2:
        return xs[0]
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--launches", type=int, default=100, help="launches per batch (100)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the three batches (3)")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = parser.parse_args(argv)
    cap = vt_settings.MAX_SLOT
    if not 1 <= args.launches <= cap:
        parser.error(f"--launches must be 1..{cap} (via-tunnel's cap of active groups)")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")

    if not prologue("parallel.py"):
        return 1

    launcher, extra_env, described = choose_launcher(None)
    log(f"via-tunnel launched as: {described}")
    sl = ScaleLab("vp" + secrets.token_hex(3), launcher, extra_env)
    lat: dict[str, list[float]] = {k: [] for k in KINDS}
    walls: dict[str, list[float]] = {k: [] for k in KINDS}
    gone: dict[str, list[float]] = {k: [] for k in KINDS}
    problems: list[str] = []
    failed: str | None = None
    started = time.monotonic()
    n = args.launches
    try:
        sl.up()
        sl.add_tunnels(n)
        before = sl.snapshot()
        # warm-up (not counted): page cache, pyc, the first nft/netlink use
        sl.timed(sl.via_argv(tunnel_name(0), "true"))
        wait_for(lambda: sl.footprint_gone() and not sl.client_pids(), "the warm-up group", 30)
        argvs = {
            "baseline": [[*sl.nsenter, "true"] for _ in range(n)],
            "one interface": [sl.via_argv(tunnel_name(0), "true") for _ in range(n)],
            "many interfaces": [sl.via_argv(tunnel_name(i), "true") for i in range(n)],
        }
        for r in range(args.rounds):
            for kind in KINDS:
                log(f"round {r + 1}/{args.rounds}: {n} x {kind}")
                latencies, wall, failures = batch(sl, argvs[kind])
                end = time.perf_counter()
                wait_for(lambda: sl.footprint_gone() and not sl.client_pids(),
                         "every group to be torn down and its watcher to exit", 600)
                gone[kind].append(time.perf_counter() - end)
                lat[kind] += latencies
                walls[kind].append(wall)
                problems += [f"{kind}: {f}" for f in failures]
                problems += [f"after {kind}: {p}" for p in sl.leftovers(before)]
    except (BenchError, LabError, OSError, subprocess.SubprocessError) as exc:
        failed = f"{type(exc).__name__}: {exc}"
    except KeyboardInterrupt:
        failed = "interrupted"
    finally:
        problems += [f"could not remove {p}" for p in sl.down()]
    log(f"done in {time.monotonic() - started:.0f}s")
    if all(lat.values()):
        base = statistics.median(lat["baseline"])
        header = ["batch", "launches", "ok", "median ms", "p90 ms", "p99 ms", "max ms",
                  "median ratio", "batch wall s", "all gone after s"]
        rows = []
        for kind in KINDS:
            xs = lat[kind]
            bad = sum(1 for p in problems if p.startswith(f"{kind}: "))
            rows.append([kind, str(len(xs)), str(len(xs) - bad),
                         f"{statistics.median(xs) * 1000:.1f}", f"{pct(xs, 90) * 1000:.1f}",
                         f"{pct(xs, 99) * 1000:.1f}", f"{max(xs) * 1000:.1f}",
                         f"{statistics.median(xs) / base:.1f}x",
                         f"{statistics.median(walls[kind]):.2f}",
                         f"{statistics.median(gone[kind]):.2f}"])
        print(f"via-tunnel parallel launches — {describe_machine()}; launcher: {described}; "
              f"{n} at once, {args.rounds} rounds\n")
        if args.markdown:
            print("| " + " | ".join(header) + " |")
            print("|" + "---|" * len(header))
            for r in rows:
                print("| " + " | ".join(r) + " |")
        else:
            widths = [max(len(x[i]) for x in [header, *rows]) for i in range(len(header))]
            fmt = "  ".join(f"{{:{'<' if i == 0 else '>'}{w}}}" for i, w in enumerate(widths))
            for r in [header, *rows]:
                print(fmt.format(*r))
    for problem in problems:
        print(f"bench/parallel.py: {problem}", file=sys.stderr)
    if failed is not None:
        print(f"bench/parallel.py: failed: {failed}", file=sys.stderr)
    return 1 if failed is not None or problems else 0


if __name__ == "__main__":
    sys.exit(main())
