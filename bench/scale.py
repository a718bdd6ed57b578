"""Scale benchmark of via-tunnel: N tunnels, N groups, in a throwaway namespace lab.

Run as root: ``python bench/scale.py [N ...] [--quick]`` (see bench/README.md).

For each N (default 1 100 1000): N veth "tunnels" (bench/scalelab.py), G = min(N, cap)
groups where cap is via-tunnel's limit of active groups (``MAX_SLOT``, read from
``via_tunnel.core.settings``), each with one long-lived member (``sleep``); G - 1 of them
are brought up first, in parallel (``--parallel`` launches in flight), the G-th is the one
measured (``vt0``, created last: its ip rule is the last of the groups' rules). Measured:

* bring-up: the seconds until G - 1 groups run, and until their watchers are idle again;
* create / remove the G-th group: ``via-tunnel vt0 -- true`` spawn to exit (a cold launch:
  it creates the group) with G - 1 others up, then exit -> record and cgroup gone (teardown
  deletes the record last, after rules, routes and nft elements); the CPU the other
  watchers spend meanwhile, and how long until they are idle; ``--reps`` times, each after
  a ``nsenter true`` baseline run;
* ``via-tunnel status --json`` with G groups, each after a baseline run;
* TCP request/response rate (1 byte each way over one connection) and connection rate
  (connect, 1 byte each way, close) to the echo server on the far end, for ``--seconds``
  each: a program in vt0's group, a program in no group (same client namespace, same path
  through vt0), and the baseline: the same program in a namespace with no via-tunnel at
  all (N = 0), interleaved, ``--rounds`` rounds in rotating order, medians;
* memory: /proc/meminfo kernel lines before and after the G - 1 groups (host-wide: other
  users' activity is in it; it includes the member and the watcher processes), the
  watchers' PSS, and counts of kernel objects (ip rules, routes, nft elements, cgroups);
* N > cap: one more launch (``vt<cap>``) must be refused with "too many active groups";
* the seconds until all G groups are gone once their members end.

A column "0" comes first: the no-group program and the baseline before any group exists.
Exit status 0 whatever the figures; 1 when something failed or was left behind.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import BenchError, choose_launcher, describe_machine, log, prologue
from scalelab import (
    POLL,
    PORT,
    SERVER,
    TCPRR,
    LabError,
    ScaleLab,
    cpu_ticks,
    meminfo,
    memory_of,
    tunnel_name,
    wait_for,
)

from via_tunnel.core import settings as vt_settings

HOLDER_SECONDS = 3600  # a member's sleep: far longer than a run, killed at the end anyway
NFT_LISTING_MAX_GROUPS = 1000  # above, the `nft list` timing rows are not measured
Log = Callable[[str], None]


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def p90(xs: list[float]) -> float:
    if len(xs) < 2:
        return median(xs)
    return statistics.quantiles(xs, n=10, method="inclusive")[8]


class Level:
    """The figures of one N."""

    def __init__(self, n: int, groups: int) -> None:
        self.n = n
        self.groups = groups
        self.f: dict[str, Any] = {}
        self.samples: dict[str, list[float]] = {}

    def add(self, key: str, value: float) -> None:
        self.samples.setdefault(key, []).append(value)


# -- the measurements ---------------------------------------------------------------------


def data_path(sl: ScaleLab, level: Level, rounds: int, seconds: float, group: bool,
              log: Log) -> None:
    """RR and CRR: baseline namespace, no group, and (``group``) in vt0's group."""
    py = sys.executable
    variants = {"baseline": [*sl.lab.nsenter(sl.base_ns), py, "-I", TCPRR],
                "no group": [*sl.nsenter, py, "-I", TCPRR]}
    if group:
        variants["in group"] = sl.via_argv(tunnel_name(0), py, "-I", TCPRR)
    names = list(variants)
    log(f"  data path: {rounds} rounds x {len(names)} variants x rr, crr, {seconds:g}s each")
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for mode in ("rr", "crr"):
            for name in order:
                _t, res = sl.timed([*variants[name], mode, SERVER, str(PORT), f"{seconds:g}"])
                out = json.loads(res.stdout.decode().strip().splitlines()[-1])
                in_group = out["cgroup"].endswith("/if-" + tunnel_name(0))
                if in_group != (name == "in group"):
                    raise BenchError(f"{name}: the client ran in cgroup {out['cgroup']}")
                level.add(f"{mode} {name}", out["rate"])


def create_remove(sl: ScaleLab, level: Level, reps: int, log: Log) -> None:
    """The G-th group (vt0): cold launch of ``true``, then its teardown; the other
    watchers' CPU and settle time per cycle. One baseline run before each."""
    iface = tunnel_name(0)
    others = len(sl.watchers())
    log(f"  create/remove the group of {iface} with {others} others up: {reps} times")
    for _ in range(reps):
        t, _res = sl.timed([*sl.nsenter, "true"])
        level.add("baseline", t)
        watchers = sl.watchers()
        before = cpu_ticks(watchers)
        t, _res = sl.timed(sl.via_argv(iface, "true"))
        level.add("create", t)
        t0 = time.perf_counter()
        deadline = t0 + 600
        while not sl.group_gone(iface):
            if time.perf_counter() > deadline:
                raise BenchError(f"the group of {iface} was not removed after its exit")
            time.sleep(POLL)
        level.add("remove", time.perf_counter() - t0)
        wait_for(lambda: len(sl.watchers()) <= others, f"the watcher of {iface} to exit", 60)
        level.add("settle after remove", sl.settle(timeout=600))
        after = cpu_ticks(watchers)
        ticks = sum(after.get(p, v) - v for p, v in before.items())
        level.add("watcher cpu", ticks / os.sysconf("SC_CLK_TCK"))


def status_time(sl: ScaleLab, level: Level, reps: int, log: Log) -> None:
    log(f"  status --json: {reps} times")
    argv = [*sl.nsenter, *sl.launcher, "status", "--json"]
    for _ in range(reps):
        t, _res = sl.timed([*sl.nsenter, "true"])
        level.add("baseline", t)
        t, res = sl.timed(argv)
        level.add("status", t)
        listed = len(json.loads(res.stdout)["groups"])
        if listed != level.groups:
            raise BenchError(f"status --json listed {listed} groups, {level.groups} are up")


def refused(sl: ScaleLab, cap: int, log: Log) -> str:
    """One launch more than the cap: its error message (it must fail, leave nothing)."""
    iface = tunnel_name(cap)
    watchers = len(sl.watchers())
    _t, res = sl.timed(sl.via_argv(iface, "true"), check=False)
    err = res.stderr.decode(errors="replace").strip()
    log(f"  launch #{cap + 1} ({iface}): exit {res.returncode}: {err}")
    if res.returncode == 0:
        raise BenchError(f"launch #{cap + 1} succeeded past the cap of {cap}")
    wait_for(lambda: len(sl.watchers()) <= watchers, f"the watcher of {iface} to exit", 30)
    if not sl.group_gone(iface):
        raise BenchError(f"the refused launch on {iface} left a record or cgroup")
    return f"refused at {cap + 1}: {err.splitlines()[-1] if err else '(no message)'}"


def run_level(sl: ScaleLab, level: Level, cap: int, args: argparse.Namespace, log: Log,
              problems: list[str]) -> None:
    """Fill ``level`` (already in the report: a failure half-way keeps what was measured)."""
    n, g = level.n, level.groups
    log(f"N={n}: {n} tunnels, {g} groups (cap {cap})")
    level.f["make tunnels s"] = sl.add_tunnels(n)
    before = sl.snapshot()
    mem0 = meminfo()
    if g > 1:
        ifaces = [tunnel_name(i) for i in range(1, g)]
        log(f"  bring-up of {g - 1} groups, {args.parallel} launches in flight")
        level.f["bring-up s"] = sl.start_holders(ifaces, args.parallel, HOLDER_SECONDS,
                                                 timeout=args.bringup_timeout, log=log)
        level.f["settle after bring-up s"] = sl.settle(timeout=args.bringup_timeout)
        mem1 = meminfo()
        level.f["meminfo delta"] = {k: mem1[k] - mem0[k] for k in mem0}
        watchers = sl.watchers()
        pss, rss = memory_of(watchers)
        level.f["watchers"] = len(watchers)
        level.f["watcher pss KiB"] = pss / max(1, len(watchers))
        level.f["watcher rss KiB"] = rss / max(1, len(watchers))
    cycles = args.cycle_reps if args.cycle_reps is not None else (args.reps if g <= 10 else 1)
    create_remove(sl, level, cycles, log)
    sl.start_holders([tunnel_name(0)], 1, HOLDER_SECONDS, timeout=120)
    sl.settle(timeout=args.bringup_timeout)
    level.f["objects"] = sl.kernel_objects()
    if g <= NFT_LISTING_MAX_GROUPS:  # (the nft CLI prints a cgroupsv2 element by walking
        # the cgroup tree: seconds at 1000 groups, hours at 4096; via-tunnel never lists one)
        level.f["nft list table s"] = sl.nft_list_seconds("table", "inet", "via_tunnel")
        for name in level.f["objects"]["cgroup maps"]:
            level.f["nft list cgroup map s"] = sl.nft_list_seconds("map", "inet",
                                                                   "via_tunnel", name)
    status_time(sl, level, args.reps, log)
    if n > cap:
        level.f["refused"] = refused(sl, cap, log)
    if args.rounds:
        data_path(sl, level, args.rounds, args.seconds, True, log)
    log(f"  teardown of {g} groups")
    level.f["teardown all s"] = sl.stop_holders(timeout=args.bringup_timeout)
    problems += [f"N={n}: {p}" for p in sl.leftovers(before)]
    level.f["complete"] = True


def run_zero(sl: ScaleLab, level: Level, args: argparse.Namespace, log: Log) -> None:
    """Before any group: the no-group program against the baseline, and status."""
    log("N=0: no group yet")
    level.f["make tunnels s"] = sl.add_tunnels(1)
    status_time(sl, level, args.reps, log)
    data_path(sl, level, args.rounds, args.seconds, False, log)
    level.f["complete"] = True


# -- the report ---------------------------------------------------------------------------


def ms(x: float) -> str:
    return f"{x * 1000:.1f}"


def table(levels: list[Level], cap: int) -> list[list[str]]:
    cols = levels
    by_n = {lv.n: lv for lv in levels}
    rows: list[list[str]] = []

    def row(name: str, fn: Callable[[Level], str | None]) -> None:
        cells = []
        for lv in cols:
            try:
                v = fn(lv)
            except (KeyError, ZeroDivisionError, ValueError):
                v = None
            cells.append("—" if v is None else v)
        rows.append([name, *cells])

    def sm(lv: Level, key: str) -> list[float]:
        return lv.samples[key]

    row("groups up (G)", lambda lv: f"{lv.groups}")
    row("make the missing tunnels, s", lambda lv: f"{lv.f['make tunnels s']:.1f}")
    row("bring-up of G-1 groups, s", lambda lv: f"{lv.f['bring-up s']:.1f}")
    row("  per group, ms", lambda lv: f"{lv.f['bring-up s'] / (lv.groups - 1) * 1000:.0f}")
    row("  watchers idle again after, s", lambda lv: f"{lv.f['settle after bring-up s']:.1f}")
    row("baseline nsenter true, ms (median)", lambda lv: ms(median(sm(lv, "baseline"))))
    row("create G-th group (cold launch), ms", lambda lv: ms(median(sm(lv, "create"))))
    row("  ratio to baseline",
        lambda lv: f"{median(sm(lv, 'create')) / median(sm(lv, 'baseline')):.1f}x")
    def to_n1(lv: Level, key: str) -> str | None:
        if 1 not in by_n or not lv.n:
            return None
        return f"{median(sm(lv, key)) / median(sm(by_n[1], key)):.2f}x"

    row("  ratio to N=1", lambda lv: to_n1(lv, "create"))
    row("remove G-th group (exit -> gone), ms", lambda lv: ms(median(sm(lv, "remove"))))
    row("  ratio to N=1", lambda lv: to_n1(lv, "remove"))
    row("other watchers' CPU per create+remove, ms",
        lambda lv: ms(median(sm(lv, "watcher cpu"))) if lv.n else None)
    row("create/remove cycles measured", lambda lv: f"{len(sm(lv, 'create'))}")
    row("  watchers idle again after remove, s",
        lambda lv: f"{median(sm(lv, 'settle after remove')):.2f}" if lv.n else None)
    row("status --json, ms", lambda lv: ms(median(sm(lv, "status"))))
    row("  ratio to baseline",
        lambda lv: f"{median(sm(lv, 'status')) / median(sm(lv, 'baseline')):.1f}x")
    for mode, what in (("rr", "TCP RR/s"), ("crr", "TCP conn/s")):
        row(f"{what}, baseline ns (N=0)",
            lambda lv, m=mode: f"{median(sm(lv, f'{m} baseline')):.0f}")
        for variant in ("no group", "in group"):
            row(f"{what}, {variant}", lambda lv, m=mode, v=variant:
                f"{median(sm(lv, f'{m} {v}')):.0f}")
            row("  ratio to baseline", lambda lv, m=mode, v=variant:
                f"{median(sm(lv, f'{m} {v}')) / median(sm(lv, f'{m} baseline')):.2f}")
    row("kernel Slab delta per group, KiB",
        lambda lv: f"{lv.f['meminfo delta']['Slab'] / (lv.groups - 1):.0f}")
    row("  Slab+KernelStack+PageTables+Percpu, KiB", lambda lv: "{:.0f}".format(
        sum(lv.f["meminfo delta"][k] for k in ("Slab", "KernelStack", "PageTables", "Percpu"))
        / (lv.groups - 1)))
    row("  MemAvailable drop per group, KiB",
        lambda lv: f"{-lv.f['meminfo delta']['MemAvailable'] / (lv.groups - 1):.0f}")
    row("watcher process PSS, KiB (RSS)",
        lambda lv: f"{lv.f['watcher pss KiB']:.0f} ({lv.f['watcher rss KiB']:.0f})")
    for key in ("ip rules", "routes in our tables", "nft elements", "cgroups"):
        row(f"{key} at G" + (" (not the cgroup maps)" if key == "nft elements" else ""),
            lambda lv, k=key: f"{lv.f['objects'][k]}")
    row("`nft list table inet via_tunnel` at G, s", lambda lv: f"{lv.f['nft list table s']:.2f}")
    row("  of it the cgroup map alone, s", lambda lv: f"{lv.f['nft list cgroup map s']:.2f}")
    row(f"launch #{cap + 1}", lambda lv: "refused" if "refused" in lv.f else
        ("—" if lv.n <= cap else "NOT refused"))
    row("teardown of all G groups, s", lambda lv: f"{lv.f['teardown all s']:.1f}")
    return rows


def render(levels: list[Level], rows: list[list[str]], markdown: bool) -> str:
    header = ["N", *(f"{lv.n}" + ("" if lv.f.get("complete") else " (incomplete)")
                     for lv in levels)]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:{'<' if i == 0 else '>'}{w}}}" for i, w in enumerate(widths))
    return "\n".join(fmt.format(*r) for r in [header, *rows])


# -- main -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("n", nargs="*", type=int, help="tunnel counts (default 1 100 1000; "
                        "--quick: 1 100)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: N=1,100, 2 rounds of 1 s, 3 reps")
    parser.add_argument("--rounds", type=int,
                        help="data-path rounds (default 3; 0: no data path at N > 0)")
    parser.add_argument("--seconds", type=float, help="seconds per data-path run (default 2)")
    parser.add_argument("--reps", type=int, help="create/remove and status runs (default 5)")
    parser.add_argument("--cycle-reps", type=int,
                        help="create/remove cycles (default --reps while G <= 10, else 1: "
                             "at G = 100 one cycle keeps the watchers busy for minutes; 0: "
                             "none)")
    parser.add_argument("--parallel", type=int, default=8,
                        help="launches in flight during bring-up (default 8)")
    parser.add_argument("--bringup-timeout", type=float, default=900,
                        help="seconds allowed for bringing up / tearing down one N (900)")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = parser.parse_args(argv)
    ns = sorted(set(args.n or ([1, 100] if args.quick else [1, 100, 1000])))
    if args.rounds is None:
        args.rounds = 2 if args.quick else 3
    args.seconds = args.seconds or (1.0 if args.quick else 2.0)
    args.reps = args.reps or (3 if args.quick else 5)
    if ns[0] < 1 or args.reps < 1 or args.parallel < 1:
        parser.error("N, --reps and --parallel must be at least 1")
    if args.rounds < 0 or (args.cycle_reps or 0) < 0:
        parser.error("--rounds and --cycle-reps must be at least 0")
    if not prologue("scale.py"):
        return 1
    cap = vt_settings.MAX_SLOT

    launcher, extra_env, described = choose_launcher(None)
    log(f"via-tunnel launched as: {described}; cap of active groups (MAX_SLOT): {cap}")
    sl = ScaleLab("vs" + secrets.token_hex(3), launcher, extra_env)
    levels: list[Level] = []
    problems: list[str] = []
    failed: str | None = None
    started = time.monotonic()
    try:
        sl.up()
        levels.append(Level(0, 0))
        run_zero(sl, levels[-1], args, log)
        for n in ns:
            levels.append(Level(n, min(n, cap)))
            run_level(sl, levels[-1], cap, args, log, problems)
            log(f"N={n} done after {time.monotonic() - started:.0f}s")
    except (BenchError, LabError, OSError, subprocess.SubprocessError, ValueError) as exc:
        failed = f"{type(exc).__name__}: {exc}"
    except KeyboardInterrupt:
        failed = "interrupted"
    finally:
        problems += [f"could not remove {p}" for p in sl.down()]
    log(f"done in {time.monotonic() - started:.0f}s")
    if levels:
        print(f"via-tunnel scale benchmark — {describe_machine()}; launcher: {described}; "
              f"cap {cap}; {args.rounds} rounds x {args.seconds:g}s, {args.reps} reps, "
              f"bring-up {args.parallel} in flight\n")
        print(render(levels, table(levels, cap), args.markdown))
        for lv in levels:
            if "refused" in lv.f:
                print(f"\nN={lv.n}: {lv.f['refused']}")
    for problem in problems:
        print(f"bench/scale.py: leftover: {problem}", file=sys.stderr)
    if failed is not None:
        print(f"bench/scale.py: failed: {failed}", file=sys.stderr)
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    return 1 if failed is not None or problems else 0


if __name__ == "__main__":
    sys.exit(main())
