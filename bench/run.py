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
* warm/cold launch (daemon, user): the same two runs by a throwaway unprivileged user
            (``setpriv``), through ``via-tunnel daemon`` running as root in the namespace;
            the daemon's watcher thread tears the group down between cold runs.
            ``--no-daemon`` skips them.

Standard library only, plus :mod:`via_tunnel.lab`. Exit status 0 whatever the figures (it
is a report); 1 when something failed (a run exited non-zero, a leftover, a timeout).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import grp
import json
import os
import platform
import pwd
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

try:
    import via_tunnel
    from via_tunnel.lab.footprint import remove_footprint
    from via_tunnel.lab.netlab import Lab
    from via_tunnel.lab.procs import LabError
except ImportError:  # not installed in this interpreter: use the checkout's src/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import via_tunnel
    from via_tunnel.lab.footprint import remove_footprint
    from via_tunnel.lab.netlab import Lab
    from via_tunnel.lab.procs import LabError

IFACE = "vlan3"
RUN_TIMEOUT = 30.0  # one launch, generous: a launch normally takes well under a second
SETTLE_TIMEOUT = 10.0  # a group appearing or disappearing
POLL = 0.0002  # cleanup polling interval (0.2 ms)
PACKAGE_PARENT = str(Path(via_tunnel.__file__).resolve().parents[1])

# The rows of the report, in order; those compared with the baseline (ratio, overhead).
DAEMON = " (daemon, user)"
ROWS = ("baseline", "python -c pass", "warm launch", "cold launch", "warm launch" + DAEMON,
        "cold launch" + DAEMON, "cleanup")
RELATIVE = frozenset(ROWS[1:-1])
# Targets (issue 14): overhead over the baseline median (launches) or absolute (cleanup),
# in ms.
TARGETS: dict[str, float] = {"warm launch": 20.0, "cold launch": 70.0,
                             "warm launch" + DAEMON: 20.0, "cold launch" + DAEMON: 40.0,
                             "cleanup": 10.0}
# The interpreter the throwaway user runs (as the daemon tests do): it needs only the
# standard library, and the checkout or venv may not be readable by other users.
USER_PY = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
USER_TOOLS = ("useradd", "userdel", "groupdel", "setpriv")


class BenchError(RuntimeError):
    """Something did not work: the figures would be meaningless."""

def run_timed(argv: list[str], env: Mapping[str, str], *, capture: bool = True,
              check: bool = True, timeout: float = RUN_TIMEOUT
              ) -> tuple[float, subprocess.CompletedProcess[bytes]]:
    """Spawn ``argv`` and wait for it (at most ``timeout``): (wall seconds, result, with
    stdout when ``capture``). BenchError when it times out, or exits non-zero and
    ``check``."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise BenchError(f"timed out after {timeout:g}s: {' '.join(argv)}") from None
    elapsed = time.perf_counter() - start
    result = subprocess.CompletedProcess(argv, proc.returncode, out, err)
    if check and proc.returncode != 0:
        raise BenchError(f"exit {proc.returncode}: {' '.join(argv)}: "
                         f"{err.decode(errors='replace').strip()[-400:]}")
    return elapsed, result


def log(msg: str) -> None:
    """A progress line on stderr (the report goes to stdout)."""
    print(f"# {msg}", file=sys.stderr, flush=True)


def prologue(prog: str) -> bool:
    """Common start of every benchmark: False (after saying why) unless root; SIGTERM and
    SIGHUP then unwind like Ctrl-C, so the caller's ``finally`` always removes its lab."""
    if os.geteuid() != 0:
        print(f"bench/{prog}: needs root (namespaces, cgroups, nftables)", file=sys.stderr)
        return False

    def _stop(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _stop)
    return True



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


class Variant:
    """How a launch is started: the argv before ``IFACE -- CMD``, its environment, and the
    processes of ours that stay in the client namespace meanwhile (the daemon)."""

    def __init__(self, prefix: list[str], env: Mapping[str, str],
                 keep: tuple[int, ...] = ()) -> None:
        self.prefix = prefix
        self.env = dict(env)
        self.keep = keep


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
        self.baseline_argv = [*self.nsenter, "true"]
        # Where the package under test is (copied for the daemon rows' user).
        self.package_parent = extra_env.get("PYTHONPATH", PACKAGE_PARENT).split(os.pathsep)[0]
        self.client_ns = os.stat(lab.ns_path(lab.client))
        self.holders: list[subprocess.Popen[bytes]] = []
        self.root = Variant([*self.nsenter, *launcher], self.env)
        self.problems: list[str] = []  # found while stopping what a measurement started

    def via_argv(self, *args: str, variant: Variant | None = None) -> list[str]:
        return [*(variant or self.root).prefix, IFACE, "--", *args]

    def timed(self, argv: list[str], env: Mapping[str, str] | None = None) -> float:
        """Spawn ``argv``, wait for it to exit; the wall time in seconds. Fails unless 0."""
        elapsed, _result = run_timed(argv, env or self.env, capture=False)
        return elapsed

    def group_up(self) -> bool:
        return os.path.exists(self.record_path) and os.path.isdir(self.group_path)

    def footprint_gone(self) -> bool:
        """Record, group cgroup and the instance's cgroup subtree are all gone."""
        return not (os.path.exists(self.record_path) or os.path.exists(self.group_path)
                    or os.path.exists(self.subtree_path))

    def client_pids(self) -> list[int]:
        """Processes living in the lab's client namespace (launchers, CMDs, watchers)."""
        return pids_in_netns(self.client_ns)

    def wait_quiet(self, keep: tuple[int, ...] = ()) -> None:
        """Wait until no group is left and no process of ours (but ``keep``) runs, and the
        processes in ``keep`` (the daemon) are down to their main thread: their watcher
        and connection threads have exited too."""
        wait_for(lambda: self.footprint_gone()
                 and not [p for p in self.client_pids() if p not in keep]
                 and all(_threads(p) <= 1 for p in keep),
                 "the group to be torn down and its watcher to exit")

    def start_holder(self, argv: list[str], variant: Variant | None = None,
                     **kw: Any) -> subprocess.Popen[bytes]:
        """Start a long-running ``via-tunnel IFACE -- ARGV`` and wait until it is in the
        group (so the group and its watcher are up)."""
        variant = variant or self.root
        proc: subprocess.Popen[bytes] = subprocess.Popen(
            self.via_argv(*argv, variant=variant), env=variant.env,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kw)
        self.holders.append(proc)

        def joined() -> bool:
            if proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                raise BenchError(f"the holder exited {proc.returncode}: {err.strip()[-300:]}")
            return self.group_up() and str(proc.pid) in _read(
                os.path.join(self.group_path, "cgroup.procs")).split()

        wait_for(joined, "the holder to join the group")
        return proc

    def stop_holders(self) -> None:
        """Kill every holder still running and reap it."""
        for proc in self.holders:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=SETTLE_TIMEOUT)
            if proc.stderr is not None:
                proc.stderr.close()


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


def pids_in_netns(ns: os.stat_result) -> list[int]:
    """Live (not zombie) processes whose network namespace is ``ns`` (its stat)."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{name}/ns/net")
        except OSError:
            continue
        if (st.st_ino, st.st_dev) == (ns.st_ino, ns.st_dev) and not _is_zombie(int(name)):
            pids.append(int(name))
    return pids


def _is_zombie(pid: int) -> bool:
    stat = _read(f"/proc/{pid}/stat")
    return not stat or stat.rsplit(")", 1)[1].split()[0] == "Z"


def _threads(pid: int) -> int:
    """How many threads ``pid`` has (0 once it is gone)."""
    for line in _read(f"/proc/{pid}/status").splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return 0


def cgroup2_mount_or_fail() -> str:
    from via_tunnel.lab.footprint import cgroup2_mount

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


def measure(bench: Bench, runs: int, log: Callable[[str], None],
            daemon: bool = True) -> dict[str, Stats]:
    """All the rows, in one run; the daemon rows unless ``daemon`` is false."""
    stats = {name: Stats(name) for name in ROWS}
    base, root = stats["baseline"], bench.root

    # Warm-up (not counted): page cache, pyc files, the first nft/netlink use in the ns.
    bench.timed(bench.baseline_argv)
    bench.timed(bench.via_argv("true"))
    bench.wait_quiet()

    python_argv = [*bench.nsenter, bench.python, "-c", "pass"]
    measure_warm(bench, root, runs, base, stats["warm launch"], log,
                 also=[(stats["python -c pass"], python_argv)])
    measure_cold(bench, root, runs, base, stats["cold launch"], log)
    measure_cleanup(bench, runs, stats["cleanup"], log)
    if daemon:
        served = Served(bench)
        try:
            user = served.start(log)
            bench.timed(bench.via_argv("true", variant=user), user.env)  # warm-up
            bench.wait_quiet(user.keep)
            measure_warm(bench, user, runs, base, stats["warm launch" + DAEMON], log)
            measure_cold(bench, user, runs, base, stats["cold launch" + DAEMON], log)
        finally:
            bench.problems += served.close()
    return {name: st for name, st in stats.items() if st.samples}


def measure_warm(bench: Bench, variant: Variant, runs: int, base: Stats, warm: Stats,
                 log: Callable[[str], None],
                 also: Sequence[tuple[Stats, list[str]]] = ()) -> None:
    """``via-tunnel IFACE -- true`` while a holder (``-- sleep 600``, started the same way)
    keeps the group up; one baseline run before each, and one run of each of ``also``
    after each."""
    log(f"{warm.name}: {runs} runs (a holder keeps the group up), baseline interleaved")
    true_argv = bench.via_argv("true", variant=variant)
    holder = bench.start_holder(["sleep", "600"], variant, stdin=subprocess.DEVNULL)
    bench.timed(true_argv, variant.env)  # warm-up of the warm path
    for _ in range(runs):
        base.add(bench.timed(bench.baseline_argv))
        warm.add(bench.timed(true_argv, variant.env))
        for stats, argv in also:
            stats.add(bench.timed(argv))
    holder.kill()
    holder.wait(timeout=SETTLE_TIMEOUT)
    bench.wait_quiet(variant.keep)


def measure_cold(bench: Bench, variant: Variant, runs: int, base: Stats, cold: Stats,
                 log: Callable[[str], None]) -> None:
    """``via-tunnel IFACE -- true`` with no group: each run waits until the previous group
    is gone and its watcher has exited; one baseline run before each."""
    log(f"{cold.name}: {runs} runs (each waits until the previous group is gone), "
        f"baseline interleaved")
    true_argv = bench.via_argv("true", variant=variant)
    for _ in range(runs):
        base.add(bench.timed(bench.baseline_argv))
        cold.add(bench.timed(true_argv, variant.env))
        bench.wait_quiet(variant.keep)


def measure_cleanup(bench: Bench, runs: int, clean: Stats, log: Callable[[str], None]) -> None:
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


# -- the daemon rows: a throwaway user, a root daemon ---------------------------------------


CONSOLE_SCRIPT = """#!{python}
import sys
from via_tunnel.cli.main import main
if __name__ == "__main__":
    sys.exit(main())
"""


class Served:
    """A throwaway unprivileged user allowed on IFACE by ``via-tunnel daemon``.

    The daemon is the same via-tunnel as the root rows, run as root in the client namespace
    with its socket in the instance's state dir. The user runs a world-readable, compiled
    copy of the package with :data:`USER_PY` (as the daemon tests do), through ``setpriv``,
    in the same form as the root rows: a console script (the copy's directory is its
    ``sys.path[0]``) or ``-m via_tunnel`` with ``PYTHONPATH``. :meth:`close` undoes all of
    it, whatever :meth:`start` got to do."""

    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.top: str | None = None
        self.user: str | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> str:
        assert self.top is not None
        return os.path.join(self.top, "daemon.log")

    def start(self, log: Callable[[str], None]) -> Variant:
        missing = [t for t in USER_TOOLS if shutil.which(t) is None]
        if missing:
            raise BenchError(f"the daemon rows need {', '.join(missing)} (--no-daemon skips "
                             f"them)")
        bench = self.bench
        self.top = tempfile.mkdtemp(prefix="vt-bench-")
        launcher, user_env = world_readable_copy(bench.package_parent, self.top,
                                                 as_module=len(bench.launcher) > 1)
        name = "vtb" + secrets.token_hex(4)
        if _exists(pwd.getpwnam, name) or _exists(grp.getgrnam, name):
            raise BenchError(f"user or group {name} already exists")  # not ours: keep it
        self.user = name  # from here on, close() removes it (useradd may be interrupted)
        add_user(name)
        config = os.path.join(self.top, "daemon.toml")
        with open(config, "w") as f:
            f.write(f'[interface.{IFACE}]\nallow_users = ["{self.user}"]\n')
        env = {**bench.env, "VIA_TUNNEL_SOCKET": os.path.join(bench.state_dir, "daemon.sock"),
               "VIA_TUNNEL_CONFIG": config}
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen([*bench.nsenter, *bench.launcher, "daemon"], env=env,
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        wait_for(self._listening, "the daemon to listen")
        how = " ".join(launcher) + "".join(f" ({k}={v})" for k, v in user_env.items())
        log(f"daemon rows: user {self.user} runs {how} through setpriv; daemon pid "
            f"{self.proc.pid}")
        env.pop("PYTHONPATH", None)
        prefix = [*bench.nsenter, "setpriv", "--reuid", self.user, "--regid", self.user,
                  "--init-groups", "--", *launcher]
        return Variant(prefix, {**env, **user_env}, keep=(self.proc.pid,))

    def _listening(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise BenchError(f"the daemon exited {self.proc.returncode}: "
                             f"{_read(self.log_path).strip()[-300:]}")
        return "listening on" in _read(self.log_path)

    def close(self) -> list[str]:
        """Stop the holders, let the daemon tear the group down, stop the daemon, remove the
        user and the copy. Returns problems (empty when all went as it should)."""
        problems: list[str] = []
        self.bench.stop_holders()
        if self.proc is not None:
            try:
                self.bench.wait_quiet(keep=(self.proc.pid,))
            except BenchError as exc:
                problems.append(f"daemon rows: {exc}")
            problems += stop_daemon(self.proc, self.log_path)
        if self.user is not None:
            problems += remove_user(self.user)
        if self.top is not None:
            shutil.rmtree(self.top, ignore_errors=True)
            if os.path.exists(self.top):
                problems.append(f"could not remove {self.top}")
        return problems


def world_readable_copy(parent: str, top: str, as_module: bool
                        ) -> tuple[list[str], dict[str, str]]:
    """Copy the package in ``parent`` to ``top``, compiled (the user could not write its
    ``__pycache__``: it would compile every module on every run) and readable by all.
    Returns the user's launcher argv and the environment it needs."""
    shutil.copytree(os.path.join(parent, "via_tunnel"), os.path.join(top, "via_tunnel"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([USER_PY, "-m", "compileall", "-q", os.path.join(top, "via_tunnel")],
                   check=True, capture_output=True, timeout=RUN_TIMEOUT)
    script = os.path.join(top, "via-tunnel")
    with open(script, "w") as f:
        f.write(CONSOLE_SCRIPT.format(python=USER_PY))
    for dirpath, _dirs, files in os.walk(top):
        os.chmod(dirpath, 0o755)
        for name in files:
            os.chmod(os.path.join(dirpath, name), 0o644)
    os.chmod(script, 0o755)
    if as_module:
        return [USER_PY, "-m", "via_tunnel"], {"PYTHONPATH": top}
    return [script], {}


def add_user(name: str) -> None:
    """Create the user ``name`` (and its own group), with no home and no login shell."""
    r = subprocess.run(["useradd", "--no-create-home", "--user-group", "--shell",
                        "/usr/sbin/nologin", name], capture_output=True, text=True,
                       timeout=RUN_TIMEOUT, check=False)
    if r.returncode != 0:
        raise BenchError(f"useradd {name} failed: {r.stderr.strip()[-300:]}")


def remove_user(name: str) -> list[str]:
    """Remove the user ``name`` and its group, if there. Returns what is left."""
    for lookup, argv in ((pwd.getpwnam, ["userdel", name]), (grp.getgrnam, ["groupdel", name])):
        if _exists(lookup, name):
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                subprocess.run(argv, capture_output=True, timeout=RUN_TIMEOUT, check=False)
    return [f"could not remove the {what} {name}" for what, lookup in
            (("user", pwd.getpwnam), ("group", grp.getgrnam)) if _exists(lookup, name)]


def _exists(lookup: Callable[[str], object], name: str) -> bool:
    try:
        lookup(name)
    except KeyError:
        return False
    return True


def stop_daemon(proc: subprocess.Popen[bytes], log_path: str) -> list[str]:
    """SIGTERM the daemon and reap it; problems: it had to be killed, it did not exit 0, or
    it logged a failure."""
    problems = []
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout=SETTLE_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        problems.append("the daemon did not stop on SIGTERM (killed)")
    log = _read(log_path)
    if proc.returncode != 0 and not problems:
        problems.append(f"the daemon exited {proc.returncode}: {log.strip()[-300:]}")
    problems += [f"daemon: {line}" for line in log.splitlines()
                 if any(w in line for w in ("failed", "internal error", "Traceback"))]
    return problems


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
    for name in (n for n in ROWS if n in stats):
        s = stats[name]
        relative = name in RELATIVE
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
    parser.add_argument("--no-daemon", action="store_true",
                        help="skip the daemon rows (no throwaway user, no daemon)")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if not prologue("run.py"):
        return 1

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
        # The first group raises src_valid_mark and nothing lowers it (kernel/sysctl.py, as
        # wg-quick): start from a host where it is raised, so "before" is what must be left.
        lab.run(lab.client, ["sysctl", "-qw", "net.ipv4.conf.all.src_valid_mark=1"])
        before = snapshot(lab)
        stats = measure(bench, args.runs, log, daemon=not args.no_daemon)
        problems = leftovers(bench, before)
    except (BenchError, LabError, OSError, subprocess.SubprocessError) as exc:
        failed = f"{type(exc).__name__}: {exc}"
    except KeyboardInterrupt:
        failed = "interrupted"
    finally:
        if bench is not None:
            problems += bench.problems + shutdown(bench)
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
    bench.stop_holders()
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
