"""The lab of bench/scale.py and bench/parallel.py: many veth "tunnels", one far end.

On top of a :class:`via_tunnel.lab.Lab` (``openvpn=False``; its namespaces are reused, its
own links are left alone):

* tunnel ``i`` is a veth pair ``vt<i>`` (client namespace ``P-c``) -- ``vf<i>`` (far end,
  the lab's gateway namespace ``P-g``), addressed with the ``i``-th /30 of 198.18.0.0/15
  (RFC 2544's benchmarking range): the far end ``.1``, the client ``.2``, as a
  point-to-point address (``198.18.x.2 peer 198.18.x.1/30``) so that via-tunnel finds the
  next hop the way it does on a real tunnel, without ``--gateway``. The far end's connected
  routes are the routes back.
* the far end has :data:`SERVER` on its loopback and runs bench/tcprr.py's echo server on
  it; the client's main table routes :data:`SERVER` through ``vt0``, so a program in no
  group and a program in ``vt0``'s group take the same path.
* a fourth namespace ``P-b`` (baseline: no via-tunnel, no nft, the client's sysctls) with
  one veth to the far end (198.19.254.0/30) and the same route to :data:`SERVER`: the
  "N = 0" path, measured in the same run as the others, interleaved.

Nothing leaves these namespaces. :meth:`ScaleLab.down` removes all of it (processes,
namespaces, the via-tunnel instance's state dir and cgroup subtree), also after a failure.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

try:
    from via_tunnel.lab import Lab, LabError, remove_footprint
    from via_tunnel.lab.namespaces import ip, ip_batch, remove_namespace
    from via_tunnel.lab.procs import wait_ready
except ImportError:  # not installed in this interpreter: use the checkout's src/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from via_tunnel.lab import Lab, LabError, remove_footprint
    from via_tunnel.lab.namespaces import ip, ip_batch, remove_namespace
    from via_tunnel.lab.procs import wait_ready

from run import BenchError, cgroup2_mount_or_fail, pids_in_netns, run_timed

NET = ipaddress.IPv4Network("198.18.0.0/15")
SERVER = "198.19.255.1"
PORT = 5001
BASE_FAR, BASE_NEAR = "198.19.254.1", "198.19.254.2"
MAX_TUNNELS = (int(ipaddress.IPv4Address(BASE_FAR)) - int(NET.network_address)) // 4
TCPRR = str(Path(__file__).resolve().parent / "tcprr.py")
RUN_TIMEOUT = 60.0
POLL = 0.0005


def tunnel_name(i: int) -> str:
    return f"vt{i}"


def tunnel_addresses(i: int) -> tuple[str, str]:
    """(far end, client) addresses of tunnel ``i``."""
    if not 0 <= i < MAX_TUNNELS:
        raise ValueError(f"tunnel {i} out of range")
    base = int(NET.network_address) + 4 * i
    return str(ipaddress.IPv4Address(base + 1)), str(ipaddress.IPv4Address(base + 2))


def read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def wait_for(predicate: Callable[[], Any], what: str, timeout: float,
             interval: float = 0.005) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


class ScaleLab:
    """The lab, its tunnels and one via-tunnel instance (own state dir, own cgroup
    subtree, run with ``launcher``)."""

    def __init__(self, prefix: str, launcher: list[str], extra_env: Mapping[str, str]) -> None:
        self.lab = Lab(prefix, openvpn=False)
        self.prefix = prefix
        self.base_ns = f"{prefix}-b"
        self._base_created = False
        self.tunnels = 0
        self.launcher = launcher
        self.state_dir = f"/run/via-tunnel-bench-{prefix}"
        self.cgroup_subtree = f"via-tunnel-bench-{prefix}"
        # No drain: the data-path runs leave TIME_WAIT entries, and each group's mark would
        # keep our table for up to 2 minutes after its end (the leftover check compares the
        # ruleset with the one before). The drain's conntrack dump is a walk of the host's
        # conntrack hash, whatever the number of groups: bench/phases.py times it.
        self.env = {**os.environ, "VIA_TUNNEL_STATE_DIR": self.state_dir,
                    "VIA_TUNNEL_CGROUP": self.cgroup_subtree, "VIA_TUNNEL_DRAIN_MAX": "0",
                    **extra_env}
        self.subtree_path = os.path.join(cgroup2_mount_or_fail(), self.cgroup_subtree)
        self.client = self.lab.client
        self.far = self.lab.gateway
        self.nsenter = self.lab.nsenter(self.client)
        self.holders: dict[str, subprocess.Popen[bytes]] = {}
        self.logdir = Path(f"/tmp/via-tunnel-bench-{prefix}")
        self._client_ns: os.stat_result | None = None

    # -- building and removing -----------------------------------------------------------

    def up(self) -> None:
        self.lab.up()
        self._client_ns = os.stat(self.lab.ns_path(self.client))
        self.logdir.mkdir(mode=0o700, exist_ok=True)
        ip(["netns", "add", self.base_ns], what=f"create namespace {self.base_ns}")
        self._base_created = True
        self.lab.run(self.base_ns, ["sysctl", "-q", "-w", "net.ipv4.conf.all.rp_filter=1",
                                    "net.ipv4.conf.default.rp_filter=1",
                                    "net.ipv6.conf.all.accept_dad=0",
                                    "net.ipv6.conf.default.accept_dad=0"])
        ip_batch(None, [f"link add vb0 netns {self.base_ns} type veth peer name vfb "
                        f"netns {self.far}"])
        ip_batch(self.base_ns, ["link set lo up", "link set vb0 up",
                                f"addr add {BASE_NEAR} peer {BASE_FAR}/30 dev vb0",
                                f"route add {SERVER}/32 via {BASE_FAR} dev vb0"])
        ip_batch(self.far, ["link set vfb up", f"addr add {BASE_FAR} peer {BASE_NEAR}/30 "
                            f"dev vfb", f"addr add {SERVER}/32 dev lo"])
        server = self.lab.popen(self.far, [sys.executable, "-I", TCPRR, "serve", SERVER,
                                           str(PORT)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True, start_new_session=True)
        wait_ready(server, timeout=10)

    def add_tunnels(self, n: int) -> float:
        """Make tunnels up to ``n`` (those missing); returns the seconds it took."""
        if n > MAX_TUNNELS:
            raise BenchError(f"at most {MAX_TUNNELS} tunnels")
        start = time.perf_counter()
        new = range(self.tunnels, n)
        if not new:
            return 0.0
        pairs, near, far = [], [], []
        for i in new:
            far_addr, near_addr = tunnel_addresses(i)
            pairs.append(f"link add {tunnel_name(i)} netns {self.client} type veth peer "
                         f"name vf{i} netns {self.far}")
            near += [f"link set {tunnel_name(i)} up",
                     f"addr add {near_addr} peer {far_addr}/30 dev {tunnel_name(i)}"]
            far += [f"link set vf{i} up", f"addr add {far_addr} peer {near_addr}/30 dev vf{i}"]
        if self.tunnels == 0:
            far0, _ = tunnel_addresses(0)
            near.append(f"route add {SERVER}/32 via {far0} dev {tunnel_name(0)}")
        self.tunnels = n  # from here on they are in the namespaces: down() removes them
        ip_batch(None, pairs)
        ip_batch(self.client, near)
        ip_batch(self.far, far)
        return time.perf_counter() - start

    def down(self) -> list[str]:
        """Remove everything; returns what could not be removed."""
        for proc in self.holders.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
        self.lab.down()  # kills every process left in its namespaces (watchers too)
        for proc in self.holders.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        self.holders.clear()
        if self._base_created:
            remove_namespace(self.base_ns)
        left: list[str] = []
        for _ in range(50):  # a killed process leaves its cgroup a little after it is gone
            left = remove_footprint(self.state_dir, self.cgroup_subtree)
            if not left:
                break
            time.sleep(0.1)
        for name in (self.client, self.far, self.lab.inet, self.base_ns):
            if os.path.exists(f"/var/run/netns/{name}"):
                left.append(f"namespace {name}")
        with contextlib.suppress(OSError):
            for p in self.logdir.iterdir():
                p.unlink()
            self.logdir.rmdir()
        return left

    # -- running things ------------------------------------------------------------------

    def via_argv(self, iface: str, *cmd: str) -> list[str]:
        return [*self.nsenter, *self.launcher, iface, "--", *cmd]

    def timed(self, argv: list[str], env: Mapping[str, str] | None = None,
              check: bool = True) -> tuple[float, subprocess.CompletedProcess[bytes]]:
        """Run ``argv`` to its end; (wall seconds, result). Fails unless 0 with ``check``."""
        return run_timed(argv, env or self.env, check=check, timeout=RUN_TIMEOUT)

    # -- the instance's groups, observed from outside ------------------------------------

    def record_path(self, iface: str) -> str:
        return os.path.join(self.state_dir, "groups", f"{iface}.json")

    def group_path(self, iface: str) -> str:
        return os.path.join(self.subtree_path, "if-" + iface)

    def record(self, iface: str) -> dict[str, Any] | None:
        text = read(self.record_path(iface))
        try:
            return json.loads(text) if text else None
        except ValueError:
            return None

    def records(self) -> list[str]:
        """Interfaces with a group record."""
        try:
            names = os.listdir(os.path.join(self.state_dir, "groups"))
        except FileNotFoundError:
            return []
        return sorted(n[:-5] for n in names if n.endswith(".json"))

    def joined(self, iface: str, pid: int, comm: str) -> bool:
        """``pid`` runs ``comm`` (via-tunnel exec'd it) in the ready group of ``iface``."""
        if read(f"/proc/{pid}/comm").strip() != comm:
            return False
        if str(pid) not in read(os.path.join(self.group_path(iface), "cgroup.procs")).split():
            return False
        rec = self.record(iface)
        return bool(rec and rec.get("ready"))

    def group_gone(self, iface: str) -> bool:
        return not (os.path.exists(self.record_path(iface))
                    or os.path.exists(self.group_path(iface)))

    def footprint_gone(self) -> bool:
        return not self.records() and not os.path.exists(self.subtree_path)

    def client_pids(self) -> list[int]:
        """Live processes in the client namespace (launchers, members, watchers)."""
        assert self._client_ns is not None
        return pids_in_netns(self._client_ns)

    def watchers(self) -> list[int]:
        """Watcher processes: live processes in the client namespace that are neither a
        holder nor a child of ours (a watcher is detached: its parent is init)."""
        ours = {p.pid for p in self.holders.values()}
        me = os.getpid()
        out = []
        for pid in self.client_pids():
            if pid in ours:
                continue
            stat = read(f"/proc/{pid}/stat")
            if stat and int(stat.rsplit(")", 1)[1].split()[1]) != me:
                out.append(pid)
        return out

    def lock_free(self) -> bool:
        """Nobody holds the instance's global lock right now (taken and released at once)."""
        try:
            fd = os.open(os.path.join(self.state_dir, "lock"), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        finally:
            os.close(fd)
        return True

    # -- holders: one long-lived member per group -----------------------------------------

    def start_holders(self, ifaces: list[str], parallel: int, seconds: int,
                      timeout: float, log: Callable[[str], None] | None = None) -> float:
        """``via-tunnel IFACE -- sleep SECONDS`` for each of ``ifaces``, at most ``parallel``
        launches in flight; returns once each member runs in its ready group (the
        seconds it took). A launch that fails, or ``timeout``, raises."""
        start = time.perf_counter()
        deadline = start + timeout
        pending = list(ifaces)
        inflight: dict[str, subprocess.Popen[bytes]] = {}
        done = 0
        while pending or inflight:
            while pending and len(inflight) < parallel:
                iface = pending.pop(0)
                with open(self.logdir / f"holder-{iface}.err", "wb") as err:
                    proc = subprocess.Popen(self.via_argv(iface, "sleep", str(seconds)),
                                            env=self.env, stdin=subprocess.DEVNULL,
                                            stdout=subprocess.DEVNULL, stderr=err)
                self.holders[iface] = proc
                inflight[iface] = proc
            for iface, proc in list(inflight.items()):
                if proc.poll() is not None:
                    err = read(str(self.logdir / f"holder-{iface}.err")).strip()
                    raise BenchError(f"via-tunnel {iface} -- sleep exited {proc.returncode}: "
                                     f"{err[-300:]}")
                if self.joined(iface, proc.pid, "sleep"):
                    del inflight[iface]
                    done += 1
                    if log and done % 25 == 0:
                        log(f"  {done}/{len(ifaces)} groups up after "
                            f"{time.perf_counter() - start:.1f}s")
            if time.perf_counter() > deadline:
                raise BenchError(f"bring-up: {done} of {len(ifaces)} groups up after "
                                 f"{timeout:g}s")
            time.sleep(0.005)
        return time.perf_counter() - start

    def stop_holders(self, timeout: float) -> float:
        """SIGTERM every holder and wait until every group, its watcher and the subtree are
        gone; returns the seconds it took."""
        start = time.perf_counter()
        for proc in self.holders.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        for proc in self.holders.values():
            proc.wait(timeout=timeout)
        self.holders.clear()
        wait_for(lambda: self.footprint_gone() and not self.client_pids(),
                 "every group to be torn down and its watcher to exit", timeout)
        return time.perf_counter() - start

    # -- observation -----------------------------------------------------------------------

    def settle(self, timeout: float, quiet: float = 0.3) -> float:
        """Wait until the watchers stop using CPU (their utime+stime unchanged for
        ``quiet`` seconds) and the global lock is free; returns the seconds it took."""
        start = time.perf_counter()
        pids = self.watchers()  # listed again every second: a /proc scan is not free
        listed = start
        last = cpu_ticks(pids)
        since = time.perf_counter()
        while True:
            time.sleep(0.1)
            if time.perf_counter() - listed >= 1:
                pids, listed = self.watchers(), time.perf_counter()
            now = cpu_ticks(pids)
            if now != last or not self.lock_free():
                last, since = now, time.perf_counter()
            elif time.perf_counter() - since >= quiet:
                return since - start
            if time.perf_counter() - start > timeout:
                raise BenchError(f"the watchers did not settle within {timeout:g}s")

    def snapshot(self) -> dict[str, Any]:
        """The client namespace's rules, routes, nft ruleset and src_valid_mark, routes
        sorted (an interface's own routes come back in another order)."""
        snap = self.lab.snapshot(self.client)
        snap["routes"] = {fam: sorted(rs, key=lambda r: json.dumps(r, sort_keys=True))
                          for fam, rs in snap["routes"].items()}
        return snap

    def leftovers(self, before: dict[str, Any]) -> list[str]:
        problems = []
        after = self.snapshot()
        # src_valid_mark is raised by the first group and never lowered (by design, see
        # via_tunnel.kernel.sysctl): 0 -> 1 is not a leftover.
        if after["sysctl_src_valid_mark"] == 1:
            before = {**before, "sysctl_src_valid_mark": 1}
        for key in ("rules", "nft", "routes", "sysctl_src_valid_mark"):
            if after[key] != before[key]:
                problems.append(f"client namespace: {key} differ from before: "
                                f"{json.dumps(after[key])[:300]}")
        if self.client_pids():
            problems.append(f"processes left in the client namespace: {self.client_pids()}")
        if not self.footprint_gone():
            problems.append(f"records or cgroups left: {self.records()}")
        errlog = os.path.join(self.state_dir, "watcher-errors.log")
        if os.path.exists(errlog):
            problems.append(f"watcher errors: {read(errlog).strip()[-300:]}")
        return problems

    def kernel_objects(self) -> dict[str, int]:
        """Counts in the client namespace: ip rules (v4+v6), routes in via-tunnel's tables
        (v4+v6), elements in its nft sets and maps, cgroups under the instance's subtree."""
        rules = sum(len(self.lab.ip_json(self.client, f"-{f}", "rule", "show"))
                    for f in ("4", "6"))
        routes = 0
        for fam in ("4", "6"):
            for r in self.lab.ip_json(self.client, f"-{fam}", "route", "show", "table", "all"):
                table = r.get("table")
                if str(table).isdigit() and int(str(table)) >= 0x7674_0000:
                    routes += 1
        elements = 0
        for kind in ("sets", "maps"):
            out = self.lab.run(self.client, ["nft", "-t", "-j", "list", kind, "inet"],
                               check=False, timeout=600).stdout
            try:
                listing = json.loads(out) if out.strip() else {}
            except ValueError:
                continue
            for obj in listing.get("nftables", []):
                body = obj.get("set") or obj.get("map") or {}
                if body.get("table") != "via_tunnel":
                    continue
                # `list sets` omits elements: list each one, but the cgroup maps (one
                # element per group; nft prints each by walking the cgroup tree)
                name = body["name"]
                if name.startswith("groups_l"):
                    continue
                one = self.lab.run(self.client, ["nft", "-j", "list", kind[:-1], "inet",
                                                 "via_tunnel", name], check=False,
                                   timeout=600).stdout
                with contextlib.suppress(ValueError):
                    for o in json.loads(one).get("nftables", []):
                        b = o.get("set") or o.get("map") or {}
                        elements += len(b.get("elem", []))
        text = self.lab.run(self.client, ["nft", "-t", "list", "table", "inet", "via_tunnel"],
                            check=False).stdout
        cgroup_maps = sorted({w.strip("@;{") for w in text.split() if w.startswith("@groups_l")})
        cgroups = 0
        if os.path.isdir(self.subtree_path):
            cgroups = sum(1 for _d in os.walk(self.subtree_path)) - 1
        return {"ip rules": rules, "routes in our tables": routes,
                "nft elements": elements, "cgroups": cgroups, "cgroup maps": cgroup_maps}

    def nft_list_seconds(self, *what: str) -> float:
        """Wall seconds of one ``nft list WHAT`` in the client namespace (what a watcher's
        repair does, through libnftables, on every netlink event)."""
        start = time.perf_counter()
        self.lab.run(self.client, ["nft", "list", *what], timeout=900)
        return time.perf_counter() - start


def cpu_ticks(pids: list[int]) -> dict[int, int]:
    """utime+stime (clock ticks) of each live pid."""
    out = {}
    for pid in pids:
        stat = read(f"/proc/{pid}/stat")
        if stat:
            fields = stat.rsplit(")", 1)[1].split()
            out[pid] = int(fields[11]) + int(fields[12])
    return out


def memory_of(pids: list[int]) -> tuple[int, int]:
    """Sum of (Pss, Rss) in KiB of ``pids`` (smaps_rollup)."""
    pss = rss = 0
    for pid in pids:
        for line in read(f"/proc/{pid}/smaps_rollup").splitlines():
            if line.startswith("Pss:"):
                pss += int(line.split()[1])
            elif line.startswith("Rss:"):
                rss += int(line.split()[1])
    return pss, rss


MEMINFO_KEYS = ("Slab", "SUnreclaim", "KernelStack", "PageTables", "Percpu", "MemAvailable")


def meminfo() -> dict[str, int]:
    """The kernel-memory lines of /proc/meminfo, KiB (host-wide)."""
    out = {}
    for line in read("/proc/meminfo").splitlines():
        key, _, rest = line.partition(":")
        if key in MEMINFO_KEYS:
            out[key] = int(rest.split()[0])
    return out


__all__ = ["LabError"]
