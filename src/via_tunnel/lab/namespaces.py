"""The lab's three network namespaces: naming them, running programs in them, observing
them, and removing them with everything left inside.

:class:`Namespaces` is the part of :class:`via_tunnel.lab.netlab.Lab` that knows nothing of
the topology: ``PREFIX-c`` (client), ``PREFIX-g`` (gateway) and ``PREFIX-i`` (internet), a
work directory, and the processes started in them. Programs run through ``nsenter --net``
(only the network namespace changes: /sys and the cgroup tree stay the host's). Observation
is independent of via-tunnel's own code: ``ip -j``, ``nft -j`` and ``/proc``.

Module functions: :func:`ip` and :func:`ip_batch` run ``ip`` on the host;
:func:`netns_names` lists the named namespaces; :func:`remove_namespace` kills every process
in one and deletes it. Every failure is a :class:`~via_tunnel.lab.procs.LabError`.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from via_tunnel.lab.procs import (
    KILL_GRACE,
    LabError,
    merged_env,
    parse_json,
    show,
    stop_all,
    wait_gone,
)

NETNS_DIR = "/var/run/netns"
IP_TIMEOUT = 10.0


class Namespaces:
    """The client, gateway and internet namespaces of one lab (not created here).

    ``down()`` is idempotent: it kills the processes started with :meth:`popen` and every
    other process still inside the namespaces this object created, then deletes those
    namespaces (never one that existed before) and the work directory.
    """

    def __init__(self, prefix: str | None = None) -> None:
        """``prefix``: 1-12 characters of ``[a-z0-9]`` (default ``"vt"`` + 4 random hex)."""
        prefix = prefix if prefix is not None else "vt" + secrets.token_hex(2)
        if not (1 <= len(prefix) <= 12 and prefix.isascii() and prefix.isalnum()):
            raise ValueError(f"bad lab prefix {prefix!r}: use 1-12 characters [a-z0-9]")
        self.prefix = prefix.lower()
        self.client = f"{self.prefix}-c"
        self.gateway = f"{self.prefix}-g"
        self.inet = f"{self.prefix}-i"
        self.workdir = Path(tempfile.gettempdir()) / f"via-tunnel-lab-{self.prefix}"
        self._created: list[str] = []
        self._procs: list[subprocess.Popen[Any]] = []
        self._lock = threading.Lock()

    @property
    def namespaces(self) -> tuple[str, str, str]:
        """The lab's namespace names: client, gateway, internet."""
        return (self.client, self.gateway, self.inet)

    @property
    def created(self) -> bool:
        """Whether this object created namespaces that :meth:`down` has not removed yet."""
        return bool(self._created)

    def create(self) -> None:
        """Create the three namespaces (each remembered for :meth:`down` once made)."""
        for ns in self.namespaces:
            ip(["netns", "add", ns], what=f"create namespace {ns} (is it taken?)")
            self._created.append(ns)

    def down(self) -> None:
        """Remove the lab; safe to call any number of times, also after a failed ``up()``."""
        with self._lock:
            procs, self._procs = self._procs, []
        stop_all(procs)
        for ns in reversed(self._created):
            remove_namespace(ns)
        self._created = []
        shutil.rmtree(self.workdir, ignore_errors=True)

    # -- running things inside ---------------------------------------------------------

    def ns_path(self, ns: str) -> str:
        """The bind mount of namespace ``ns`` (``/var/run/netns/NAME``)."""
        return f"{NETNS_DIR}/{ns}"

    def nsenter(self, ns: str) -> list[str]:
        """Argv prefix that runs a program in namespace ``ns``: only the network namespace
        changes (unlike ``ip netns exec``, /sys and the cgroup tree stay the host's)."""
        return ["nsenter", f"--net={self.ns_path(ns)}"]

    def run(
        self,
        ns: str,
        argv: list[str],
        *,
        check: bool = True,
        timeout: float = 20,
        env: Mapping[str, str] | None = None,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in ``ns`` and wait; text mode, stdout and stderr captured.

        ``env`` is added to (and overrides) the current environment. A timeout always raises
        :class:`LabError` (the program is killed); a non-zero exit raises it only with
        ``check``.
        """
        full = self.nsenter(ns) + list(argv)
        try:
            proc = subprocess.run(
                full,
                capture_output=True,
                text=True,
                timeout=timeout,
                env=merged_env(env),
                input=input,
                stdin=None if input is not None else subprocess.DEVNULL,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise LabError(f"timed out after {timeout:g}s in {ns}: {show(argv)}") from exc
        except OSError as exc:
            raise LabError(f"cannot run {show(full)}: {exc.strerror}") from exc
        if check and proc.returncode != 0:
            raise LabError(
                f"exit {proc.returncode} in {ns}: {show(argv)}: "
                f"{(proc.stderr or proc.stdout).strip()[-500:]}"
            )
        return proc

    def popen(self, ns: str, argv: list[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` in ``ns`` without waiting. ``kw`` goes to :class:`subprocess.Popen`,
        except that a mapping ``env`` is added to the current environment. The process is
        tracked and killed by :meth:`down` (``nsenter`` execs the program: same pid)."""
        if "env" in kw:
            kw["env"] = merged_env(kw["env"])
        proc = subprocess.Popen(self.nsenter(ns) + list(argv), **kw)
        with self._lock:
            self._procs.append(proc)
        return proc

    # -- independent observation ---------------------------------------------------------

    def ip_json(self, ns: str, *args: str) -> Any:
        """Run ``ip -j ARGS`` in ``ns`` and return the parsed JSON: ``[]`` for no output and
        for a routing table that does not exist; any other failure raises :class:`LabError`."""
        proc = self.run(ns, ["ip", "-j", *args], timeout=IP_TIMEOUT, check=False)
        if proc.returncode != 0:
            if "table does not exist" in proc.stderr:
                return []
            raise LabError(f"ip -j {' '.join(args)} in {ns}: {proc.stderr.strip()}")
        return parse_json(proc.stdout, default=[])

    def link_stats(self, ns: str, ifname: str) -> dict[str, int]:
        """``{"tx_packets", "tx_bytes", "rx_packets", "rx_bytes"}`` of one interface, from
        ``ip -j -s link show``: take one before and one after to see what crossed it."""
        links = self.ip_json(ns, "-s", "link", "show", "dev", ifname)
        if not links:
            raise LabError(f"no interface {ifname} in {ns}")
        stats = links[0].get("stats64") or links[0]["stats"]
        return {
            f"{direction}_{key}": int(stats[direction][key])
            for direction in ("tx", "rx")
            for key in ("packets", "bytes")
        }

    def snapshot(self, ns: str) -> dict[str, Any]:
        """Everything via-tunnel may change in ``ns``, to compare before/after:
        ``rules`` and ``routes`` (``{"4": ..., "6": ...}``, all tables), ``nft`` (parsed
        ``nft -j list ruleset``) and ``sysctl_src_valid_mark`` (of ``conf.all``)."""
        routes = {fam: self.ip_json(ns, f"-{fam}", "route", "show", "table", "all")
                  for fam in ("4", "6")}  # fmt: skip
        rules = {fam: self.ip_json(ns, f"-{fam}", "rule", "show") for fam in ("4", "6")}
        nft = self.run(ns, ["nft", "-j", "list", "ruleset"], timeout=IP_TIMEOUT).stdout
        valid = self.run(ns, ["cat", "/proc/sys/net/ipv4/conf/all/src_valid_mark"]).stdout
        return {
            "rules": rules,
            "routes": routes,
            "nft": parse_json(nft, default={}),
            "sysctl_src_valid_mark": int(valid.strip()),
        }


def netns_names() -> list[str]:
    """Names of the named network namespaces (``ip -j netns list``)."""
    out = ip(["-j", "netns", "list"], what="list namespaces")
    return [entry["name"] for entry in parse_json(out, default=[])]


def ip(args: list[str], *, what: str, input: str | None = None,
       timeout: float = IP_TIMEOUT) -> str:
    """Run ``ip ARGS`` on the host and return its output; a failure raises
    :class:`LabError` ("cannot WHAT: ...")."""
    try:
        proc = subprocess.run(["ip", *args], capture_output=True, text=True, input=input,
                              timeout=timeout, check=False)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LabError(f"cannot {what}: {exc}") from exc
    if proc.returncode != 0:
        raise LabError(f"cannot {what}: {proc.stderr.strip()}")
    return proc.stdout


def ip_batch(ns: str | None, lines: list[str]) -> None:
    """Run ``ip`` commands in one process (``ip -n NS -batch -``); stop at the first error."""
    args = (["-n", ns] if ns else []) + ["-batch", "-"]
    # (thousands of lines: the benchmarks' tunnels; ~1 ms a veth on a busy 2-core host)
    ip(args, what=f"configure {ns or 'links'}", input="\n".join(lines) + "\n",
       timeout=IP_TIMEOUT + len(lines) / 100)


def remove_namespace(ns: str) -> None:
    """Kill every process in ``ns`` (by pid) and delete it; missing is fine."""
    if not os.path.exists(f"{NETNS_DIR}/{ns}"):
        return
    with contextlib.suppress(LabError):
        pids = [int(p) for p in ip(["netns", "pids", ns], what="list pids").split()]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        wait_gone(pids, KILL_GRACE)
    with contextlib.suppress(LabError):
        ip(["netns", "del", ns], what=f"delete namespace {ns}")



def remove(prefix: str) -> list[str]:
    """Remove a lab left up (``via-tunnel demo --keep``) by another process: kill every
    process in ``PREFIX-c``, ``-g``, ``-i`` and delete them. Returns the namespaces removed."""
    spaces = Namespaces(prefix)
    existing = set(netns_names())
    spaces._created = [ns for ns in spaces.namespaces if ns in existing]
    removed = list(spaces._created)
    spaces.down()
    return removed
