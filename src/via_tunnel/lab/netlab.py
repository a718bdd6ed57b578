"""A throwaway lab of network namespaces: a client, a gateway (the VPS) and "the internet".

Used by ``via-tunnel demo`` and by the test suite. Standard library only; every external
program (``ip``, ``nsenter``, ``openvpn``, ``curl``, ``tcpdump``) is called with an argument
list, never a shell string, and with a timeout.

Topology (``P`` is the lab's prefix; every namespace name starts with it)::

    P-c (client)                  P-i (internet)                  P-g (gateway, the VPS)
    eth0  192.0.2.2/28      ----  lan0 192.0.2.1/28
          2001:db8:1::2/64        lan0 2001:db8:1::1/64
                                  wan0 203.0.113.1/28       ----  wan0  203.0.113.2/28
                                  lo   198.51.100.10/32
                                       2001:db8:ff::10/128
    vlan3 192.0.2.34/28     ----------------------------------->  vlan3 192.0.2.33/28
    tun0  192.0.2.50 peer .49  (OpenVPN static key, UDP 192.0.2.2 <-> 203.0.113.2:1194)  tun0
    vnohop 192.0.2.82/28    ----------------------------------->  nohop0 192.0.2.81/28
    eth1dead 192.0.2.66/28 (DOWN) ----------------------------->  dead0  (down)

* The client's main table: connected routes, ``default via 192.0.2.1 dev eth0`` (v4 and v6)
  and ``198.51.100.128/25 via 192.0.2.33 dev vlan3`` (so a next hop via vlan3 can be found in
  the main table). No default via vlan3, and no route via tun0 except the kernel's own host
  route to the tunnel peer.
* ``vnohop`` is a working broadcast link to the gateway with only its connected route: no next
  hop can be found for it, so via-tunnel needs ``--gateway 192.0.2.81`` there (the internet
  routes 192.0.2.80/28 back through the gateway, so that works). ``eth1dead`` is down.
* The gateway forwards and does no NAT, so the server sees the client's tunnel addresses.
* The internet namespace routes 192.0.2.32/28 and 192.0.2.48/28 back through the gateway and
  runs the echo server: HTTP on TCP port 80 and an echo on UDP port 7, on 198.51.100.10 and
  2001:db8:ff::10, each answering with the caller's source address and a newline.
* The client's ``rp_filter`` is strict (1) by default, the hardest case for replies that come
  back through a tunnel; the gateway and the internet namespace do not filter.

This file also runs as a script (``python -I lab.py serve|ping|udp|down ...``): the echo
server, an ICMP ping and a UDP client that need no other program, and the removal of a lab
that was left up.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

LAB_FILE = os.path.abspath(__file__)
NETNS_DIR = "/var/run/netns"
OPENVPN_PORT = 1194
_IP_TIMEOUT = 10.0
_KILL_GRACE = 3.0


class LabError(RuntimeError):
    """The lab could not be built, or a command run in it failed (``check=True``)."""


def helper_argv(*args: str) -> list[str]:
    """Argv that runs this file as a script with ``args`` (``serve``, ``ping``, ``udp``).

    ``-I`` keeps the script's own directory off ``sys.path`` (so the package's modules do not
    shadow the standard library) and ignores ``PYTHON*`` variables: it works whether or not
    the package is installed.
    """
    return [sys.executable, "-I", LAB_FILE, *args]


class Lab:
    """Three network namespaces wired as in the module docstring.

    ``up()`` builds everything and returns only when the echo server accepts and (with
    ``openvpn``) a ping crosses the tunnel; on any failure it removes what it made and raises
    :class:`LabError`. ``down()`` is idempotent: it kills the processes it started and every
    other process still inside its namespaces, then deletes the namespaces it created (never
    one that existed before). Several labs can be up at once if their prefixes differ.
    """

    SERVER = "198.51.100.10"
    SERVER6 = "2001:db8:ff::10"
    CLIENT_LAN = "192.0.2.2"
    CLIENT_LAN6 = "2001:db8:1::2"
    LAN_GW = "192.0.2.1"
    LAN_GW6 = "2001:db8:1::1"
    CLIENT_VETH = "192.0.2.34"
    GW_VETH = "192.0.2.33"
    CLIENT_TUN = "192.0.2.50"
    GW_TUN = "192.0.2.49"
    GW_WAN = "203.0.113.2"
    INET_WAN = "203.0.113.1"
    VETH_ROUTE = "198.51.100.128/25"  # in the client's main table, via GW_VETH dev vlan3
    # IPv6 exists on vlan3 (not on tun0): a tunnel with v6 and one without, side by side.
    CLIENT_VETH6 = "2001:db8:3::34"
    GW_VETH6 = "2001:db8:3::33"
    GW_WAN6 = "2001:db8:2::2"
    INET_WAN6 = "2001:db8:2::1"
    VETH_ROUTE6 = "2001:db8:fe::/64"  # in the client's main table, via GW_VETH6 dev vlan3
    CLIENT_NOHOP = "192.0.2.82"  # vnohop: no route via it, the gateway is GW_NOHOP
    GW_NOHOP = "192.0.2.81"
    CLIENT_DEAD = "192.0.2.66"  # eth1dead: administratively down
    HTTP_PORT = 80
    UDP_PORT = 7

    def __init__(
        self, prefix: str | None = None, openvpn: bool = True, *, rp_filter: int = 1,
        vpn_mark: int | None = None,
    ) -> None:
        """``prefix``: 1-12 characters of ``[a-z0-9]`` (default ``"vt"`` + 4 random hex).
        ``rp_filter``: the client's ``net.ipv4.conf.{all,default}.rp_filter`` (0, 1 or 2).
        ``vpn_mark``: the client's openvpn marks its own UDP packets with it (``--mark``),
        as a system-wide VPN does so that a ``not fwmark`` rule keeps them off the tunnel."""
        prefix = prefix if prefix is not None else "vt" + secrets.token_hex(2)
        if not (1 <= len(prefix) <= 12 and prefix.isascii() and prefix.isalnum()):
            raise ValueError(f"bad lab prefix {prefix!r}: use 1-12 characters [a-z0-9]")
        if rp_filter not in (0, 1, 2):
            raise ValueError(f"rp_filter must be 0, 1 or 2, not {rp_filter!r}")
        self.prefix = prefix.lower()
        self.openvpn = openvpn
        self.rp_filter = rp_filter
        self.vpn_mark = vpn_mark
        self.client = f"{self.prefix}-c"
        self.gateway = f"{self.prefix}-g"
        self.inet = f"{self.prefix}-i"
        self.workdir = Path(tempfile.gettempdir()) / f"via-tunnel-lab-{self.prefix}"
        self.up_seconds: float | None = None  # how long the last up() took
        self._created: list[str] = []
        self._procs: list[subprocess.Popen[Any]] = []
        self._vpn_client: subprocess.Popen[Any] | None = None
        self._lock = threading.Lock()

    # -- context manager ---------------------------------------------------------------

    def __enter__(self) -> Lab:
        return self.up()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.down()

    def __repr__(self) -> str:
        return f"Lab(prefix={self.prefix!r}, openvpn={self.openvpn})"

    @property
    def namespaces(self) -> tuple[str, str, str]:
        """The lab's namespace names: client, gateway, internet."""
        return (self.client, self.gateway, self.inet)

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
                env=_merged_env(env),
                input=input,
                stdin=None if input is not None else subprocess.DEVNULL,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise LabError(f"timed out after {timeout:g}s in {ns}: {_show(argv)}") from exc
        except OSError as exc:
            raise LabError(f"cannot run {_show(full)}: {exc.strerror}") from exc
        if check and proc.returncode != 0:
            raise LabError(
                f"exit {proc.returncode} in {ns}: {_show(argv)}: "
                f"{(proc.stderr or proc.stdout).strip()[-500:]}"
            )
        return proc

    def popen(self, ns: str, argv: list[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` in ``ns`` without waiting. ``kw`` goes to :class:`subprocess.Popen`,
        except that a mapping ``env`` is added to the current environment. The process is
        tracked and killed by :meth:`down` (``nsenter`` execs the program: same pid)."""
        if "env" in kw:
            kw["env"] = _merged_env(kw["env"])
        proc = subprocess.Popen(self.nsenter(ns) + list(argv), **kw)
        with self._lock:
            self._procs.append(proc)
        return proc

    def fetch_argv(self, *, ipv6: bool = False, timeout: float = 5) -> list[str]:
        """Argv (curl) that prints the address the echo server sees for the caller and a
        newline; no proxy. Safe to join with spaces into a shell command."""
        server = self.SERVER6 if ipv6 else self.SERVER
        host = f"[{server}]" if ipv6 else server
        # No shell metacharacters: tests join this into `sh -c` strings.
        return [
            "curl", "-sS", "-g", "--noproxy", server, "--max-time", f"{timeout:g}",
            f"http://{host}:{self.HTTP_PORT}/",
        ]  # fmt: skip

    def udp_argv(self, *, ipv6: bool = False, timeout: float = 5) -> list[str]:
        """Argv that sends one datagram to the UDP echo and prints the source address the
        server saw (exit 1 on timeout). Needs only the Python running this code."""
        host = self.SERVER6 if ipv6 else self.SERVER
        return helper_argv("udp", host, str(self.UDP_PORT), "--timeout", f"{timeout:g}")

    def ping_argv(self, address: str, *, timeout: float = 5) -> list[str]:
        """Argv that pings ``address`` (ICMP echo, v4 or v6) until the first reply; exit 0 on
        a reply, 1 when ``timeout`` passes without one. The machine may have no ``ping``."""
        return helper_argv("ping", address, "--timeout", f"{timeout:g}")

    # -- independent observation ---------------------------------------------------------

    def ip_json(self, ns: str, *args: str) -> Any:
        """Run ``ip -j ARGS`` in ``ns`` and return the parsed JSON: ``[]`` for no output and
        for a routing table that does not exist; any other failure raises :class:`LabError`."""
        proc = self.run(ns, ["ip", "-j", *args], timeout=_IP_TIMEOUT, check=False)
        if proc.returncode != 0:
            if "table does not exist" in proc.stderr:
                return []
            raise LabError(f"ip -j {' '.join(args)} in {ns}: {proc.stderr.strip()}")
        return _parse_json(proc.stdout, default=[])

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
        nft = self.run(ns, ["nft", "-j", "list", "ruleset"], timeout=_IP_TIMEOUT).stdout
        valid = self.run(ns, ["cat", "/proc/sys/net/ipv4/conf/all/src_valid_mark"]).stdout
        return {
            "rules": rules,
            "routes": routes,
            "nft": _parse_json(nft, default={}),
            "sysctl_src_valid_mark": int(valid.strip()),
        }

    def capture(self, ns: str, iface: str, bpf: str = "") -> Capture:
        """A :class:`Capture` of ``iface`` in ``ns`` (use it as a context manager)."""
        return Capture(self, ns, iface, bpf)

    # -- building and removing ---------------------------------------------------------

    def up(self) -> Lab:
        """Build the lab (see the module docstring); returns ``self``.

        Raises :class:`LabError` (after removing whatever it made) when anything fails,
        including a namespace name that is already taken.
        """
        if self._created:
            raise LabError(f"{self!r} is already up")
        started = time.monotonic()
        try:
            self._build()
        except BaseException as exc:
            self.down()
            if isinstance(exc, LabError):
                raise
            if isinstance(exc, Exception):
                raise LabError(f"building the lab failed: {exc}") from exc
            raise
        self.up_seconds = time.monotonic() - started
        return self

    def down(self) -> None:
        """Remove the lab; safe to call any number of times, also after a failed ``up()``."""
        with self._lock:
            procs, self._procs = self._procs, []
        _stop_all(procs)
        for ns in reversed(self._created):
            _remove_namespace(ns)
        self._created = []
        shutil.rmtree(self.workdir, ignore_errors=True)

    def _build(self) -> None:
        for ns in self.namespaces:
            _ip(["netns", "add", ns], what=f"create namespace {ns} (is it taken?)")
            self._created.append(ns)
        # Sysctls first: interfaces created afterwards inherit conf.default.
        rp = str(self.rp_filter)
        self._sysctl(self.client, {
            "net.ipv4.conf.all.rp_filter": rp, "net.ipv4.conf.default.rp_filter": rp,
            "net.ipv6.conf.all.accept_dad": "0", "net.ipv6.conf.default.accept_dad": "0",
        })  # fmt: skip
        for ns in (self.gateway, self.inet):
            self._sysctl(ns, {
                "net.ipv4.ip_forward": "1", "net.ipv6.conf.all.forwarding": "1",
                "net.ipv4.conf.all.rp_filter": "0", "net.ipv4.conf.default.rp_filter": "0",
                "net.ipv6.conf.all.accept_dad": "0", "net.ipv6.conf.default.accept_dad": "0",
            })  # fmt: skip
        c, g, i = self.namespaces
        _ip_batch(None, [
            f"link add eth0 netns {c} type veth peer name lan0 netns {i}",
            f"link add vlan3 netns {c} type veth peer name vlan3 netns {g}",
            f"link add wan0 netns {g} type veth peer name wan0 netns {i}",
            f"link add vnohop netns {c} type veth peer name nohop0 netns {g}",
            f"link add eth1dead netns {c} type veth peer name dead0 netns {g}",
        ])  # fmt: skip
        _ip_batch(c, [
            "link set lo up", "link set eth0 up", "link set vlan3 up",
            f"addr add {self.CLIENT_LAN}/28 dev eth0",
            f"addr add {self.CLIENT_LAN6}/64 dev eth0 nodad",
            f"addr add {self.CLIENT_VETH}/28 dev vlan3",
            "link set vnohop up",
            f"addr add {self.CLIENT_NOHOP}/28 dev vnohop",
            f"addr add {self.CLIENT_DEAD}/28 dev eth1dead",
            f"route add default via {self.LAN_GW} dev eth0",
            f"route add default via {self.LAN_GW6} dev eth0",
            f"route add {self.VETH_ROUTE} via {self.GW_VETH} dev vlan3",
            f"addr add {self.CLIENT_VETH6}/64 dev vlan3 nodad",
            f"route add {self.VETH_ROUTE6} via {self.GW_VETH6} dev vlan3",
        ])  # fmt: skip
        _ip_batch(g, [
            "link set lo up", "link set vlan3 up", "link set wan0 up",
            f"addr add {self.GW_VETH}/28 dev vlan3",
            "link set nohop0 up",
            f"addr add {self.GW_NOHOP}/28 dev nohop0",
            f"addr add {self.GW_WAN}/28 dev wan0",
            f"route add default via {self.INET_WAN} dev wan0",
            f"addr add {self.GW_VETH6}/64 dev vlan3 nodad",
            f"addr add {self.GW_WAN6}/64 dev wan0 nodad",
            f"route add default via {self.INET_WAN6} dev wan0",
        ])  # fmt: skip
        _ip_batch(i, [
            "link set lo up", "link set lan0 up", "link set wan0 up",
            f"addr add {self.SERVER}/32 dev lo",
            f"addr add {self.SERVER6}/128 dev lo nodad",
            f"addr add {self.LAN_GW}/28 dev lan0",
            f"addr add {self.LAN_GW6}/64 dev lan0 nodad",
            f"addr add {self.INET_WAN}/28 dev wan0",
            f"route add 192.0.2.32/28 via {self.GW_WAN} dev wan0",
            f"route add 192.0.2.48/28 via {self.GW_WAN} dev wan0",
            f"route add 192.0.2.80/28 via {self.GW_WAN} dev wan0",
            f"addr add {self.INET_WAN6}/64 dev wan0 nodad",
            f"route add 2001:db8:3::/64 via {self.GW_WAN6} dev wan0",
        ])  # fmt: skip
        shutil.rmtree(self.workdir, ignore_errors=True)
        self.workdir.mkdir(mode=0o700)
        server = self._start_server()
        vpns = self._start_openvpn() if self.openvpn else []
        _wait_ready(server, timeout=10)
        if self.openvpn:
            self._wait_tunnel(vpns, timeout=10)

    def _sysctl(self, ns: str, values: dict[str, str]) -> None:
        self.run(ns, ["sysctl", "-q", "-w", *(f"{k}={v}" for k, v in values.items())],
                 timeout=_IP_TIMEOUT)  # fmt: skip

    def _start_server(self) -> subprocess.Popen[str]:
        return self.popen(
            self.inet,
            helper_argv("serve", self.SERVER, self.SERVER6,
                        "--http-port", str(self.HTTP_PORT), "--udp-port", str(self.UDP_PORT)),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True, start_new_session=True,
        )  # fmt: skip

    def _start_openvpn(self) -> list[subprocess.Popen[Any]]:
        key = self.workdir / "static.key"
        try:
            subprocess.run(["openvpn", "--genkey", "secret", str(key)], check=True,
                           capture_output=True, timeout=10)  # fmt: skip
        except (OSError, subprocess.SubprocessError) as exc:
            raise LabError(f"openvpn --genkey failed: {exc}") from exc
        procs = [self._openvpn_end(self.gateway), self._openvpn_end(self.client)]
        self._vpn_client = procs[1]
        return procs

    def _openvpn_end(self, ns: str) -> subprocess.Popen[Any]:
        if ns == self.gateway:
            end = ("0", self.GW_WAN, self.CLIENT_LAN, self.GW_TUN, self.CLIENT_TUN)
        else:
            end = ("1", self.CLIENT_LAN, self.GW_WAN, self.CLIENT_TUN, self.GW_TUN)
        argv = openvpn_argv(str(self.workdir / "static.key"), *end,
                            log=str(self.workdir / f"openvpn-{ns}.log"))  # fmt: skip
        if ns == self.client and self.vpn_mark is not None:
            argv += ["--mark", str(self.vpn_mark)]
        return self.popen(ns, argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip

    def start_dns(self, ns: str, *addresses: str) -> Path:
        """Run a DNS responder on ``addresses`` (port 53, UDP+TCP) in ``ns``; returns its
        query log (``PROTO SOURCE NAME`` per line). Stopped by :meth:`down`."""
        log = self.workdir / f"dns-{ns}-{len(list(self.workdir.glob('dns-*')))}.log"
        log.touch()
        proc = self.popen(ns, helper_argv("dns-serve", str(log), *addresses),
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True, start_new_session=True)
        _wait_ready(proc, timeout=10)
        return log

    def dns_argv(self, server: str, name: str = "example.test", *, tcp: bool = False,
                 timeout: float = 2) -> list[str]:
        """Argv of a DNS query (A record) to ``server``: prints the answer or ``FAIL``."""
        return helper_argv("dns", server, name, "--timeout", str(timeout),
                           *(["--tcp"] if tcp else []))

    def kill_client_vpn(self) -> None:
        """SIGKILL the client's openvpn (as a crash would): its tun0 disappears."""
        proc = self._vpn_client
        if proc is None:
            raise LabError("this lab has no OpenVPN tunnel")
        proc.kill()
        proc.wait(timeout=5)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            names = [link.get("ifname") for link in self.ip_json(self.client, "link", "show")]
            if "tun0" not in names:
                return
            time.sleep(0.01)
        raise LabError("tun0 did not go away after openvpn was killed")

    def start_client_vpn(self, timeout: float = 10) -> None:
        """Start the client's openvpn again and wait until the tunnel carries a ping."""
        self._vpn_client = self._openvpn_end(self.client)
        self._wait_tunnel([self._vpn_client], timeout)

    def _wait_tunnel(self, vpns: list[subprocess.Popen[Any]], timeout: float) -> None:
        """Ping across the tunnel until a reply; give up at once if an openvpn exits."""
        pinger = self.popen(self.client, self.ping_argv(self.GW_TUN, timeout=timeout),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
        deadline = time.monotonic() + timeout + 5
        while pinger.poll() is None and time.monotonic() < deadline:
            if any(vpn.poll() is not None for vpn in vpns):
                break
            time.sleep(0.01)
        if pinger.poll() == 0:
            return
        logs = " | ".join(
            f"{p.name}: {_tail(p)}" for p in sorted(self.workdir.glob("openvpn-*.log"))
        )
        raise LabError(f"no ping across the OpenVPN tunnel; {logs}")


def openvpn_argv(
    key: str, direction: str, local: str, remote: str, addr: str, peer: str, *, log: str
) -> list[str]:
    """One end of a static-key point-to-point OpenVPN over UDP, as OpenVPN 2.6 accepts it.

    ``--secret`` is deprecated in 2.6 (a warning only) and gone in 2.7. Its default cipher
    BF-CBC is refused by OpenSSL 3 ("Cipher BF-CBC not supported"), hence ``--cipher``.
    """
    return [
        "openvpn", "--dev", "tun0", "--dev-type", "tun", "--proto", "udp",
        "--local", local, "--remote", remote, "--port", str(OPENVPN_PORT),
        "--ifconfig", addr, peer, "--secret", key, direction, "--cipher", "AES-256-CBC",
        "--verb", "3", "--log", log,
    ]  # fmt: skip


def remove(prefix: str) -> list[str]:
    """Remove a lab left up (``via-tunnel demo --keep``) by another process: kill every
    process in ``PREFIX-c``, ``-g``, ``-i`` and delete them. Returns the namespaces removed."""
    lab = Lab(prefix)
    existing = set(netns_names())
    lab._created = [ns for ns in lab.namespaces if ns in existing]
    removed = list(lab._created)
    lab.down()
    return removed


def netns_names() -> list[str]:
    """Names of the named network namespaces (``ip -j netns list``)."""
    out = _ip(["-j", "netns", "list"], what="list namespaces")
    return [entry["name"] for entry in _parse_json(out, default=[])]


def cgroup2_mount() -> str | None:
    """The cgroup2 mount point from ``/proc/self/mountinfo`` (None without one)."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if right.split(" ", 1)[0] == "cgroup2":
                return left.split(" ")[4]
    return None


def remove_footprint(state_dir: str, cgroup_subtree: str) -> list[str]:
    """Remove a test or demo instance's state directory and its cgroup subtree (relative to
    the cgroup2 mount; only empty cgroups can go). Returns what could not be removed."""
    left: list[str] = []
    shutil.rmtree(state_dir, ignore_errors=True)
    if os.path.exists(state_dir):
        left.append(state_dir)
    mount = cgroup2_mount()
    sub = cgroup_subtree.strip("/")
    if mount and sub:
        top = os.path.join(mount, sub)
        if os.path.isdir(top):
            for dirpath, _dirs, _files in os.walk(top, topdown=False):
                try:
                    os.rmdir(dirpath)
                except OSError:
                    left.append(dirpath)
    return left


# -- packet capture --------------------------------------------------------------------


class Capture:
    """``tcpdump`` on one interface inside a namespace, as a context manager.

    ``Capture(lab, ns, iface, bpf)``: ``bpf`` is a tcpdump filter expression ("" = all).
    ``__enter__`` returns once tcpdump reports "listening on" (so it is really capturing);
    ``__exit__``/``stop()`` sends SIGINT and waits for the flush. Then ``packets()`` is one
    text line per packet (``tcpdump -n`` format) and ``dropped`` the kernel's drop count.
    To prove that nothing left an interface: ``with Capture(lab, ns, "eth0", "host X") as
    cap: ...`` then ``assert cap.packets() == []`` (and ``cap.dropped == 0``).
    """

    def __init__(self, lab: Lab, ns: str, iface: str, bpf: str = "", *, timeout: float = 5) -> None:
        self.ns_path = lab.ns_path(ns)
        self.iface = iface
        self.bpf = bpf
        self.timeout = timeout
        self.dropped: int | None = None
        self.stderr = ""
        self._packets: list[str] = []
        self._proc: subprocess.Popen[bytes] | None = None
        self._out: TextIO | None = None

    def packets(self) -> list[str]:
        """The packets seen, one ``tcpdump -n`` line each; stops the capture if running."""
        return self.stop()

    def __enter__(self) -> Capture:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> Capture:
        """Start tcpdump and wait until it captures; raises :class:`LabError` otherwise."""
        argv = ["nsenter", f"--net={self.ns_path}", "tcpdump", "-i", self.iface, "-n", "-l",
                "--immediate-mode"]  # fmt: skip
        if self.bpf:
            argv.append(self.bpf)
        self._out = tempfile.TemporaryFile("w+")  # noqa: SIM115 (closed in stop())
        try:
            self._proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=self._out, stderr=subprocess.PIPE
            )
        except OSError as exc:
            self._out.close()
            self._out = None
            raise LabError(f"cannot start tcpdump: {exc}") from exc
        assert self._proc.stderr is not None
        seen = _read_until(self._proc.stderr, b"listening on", self.timeout)
        self.stderr = seen.decode(errors="replace")
        if b"listening on" not in seen:
            self.stop()
            raise LabError(f"tcpdump did not start on {self.iface}: {self.stderr.strip()}")
        return self

    def stop(self) -> list[str]:
        """Stop (SIGINT), wait for tcpdump to flush, and return the packets. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return list(self._packets)
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            _out, err = proc.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            _out, err = proc.communicate()
        self.stderr += (err or b"").decode(errors="replace")
        for line in self.stderr.splitlines():
            if line.endswith("packets dropped by kernel"):
                self.dropped = int(line.split()[0])
        if self._out is not None:
            self._out.seek(0)
            self._packets = [line.rstrip("\n") for line in self._out if line.strip()]
            self._out.close()
            self._out = None
        return list(self._packets)


# -- internals -------------------------------------------------------------------------


def _merged_env(env: Mapping[str, str] | None) -> dict[str, str] | None:
    return None if env is None else {**os.environ, **env}


def _show(argv: list[str]) -> str:
    return " ".join(argv)


def _parse_json(text: str, *, default: Any) -> Any:
    text = text.strip()
    return json.loads(text) if text else default


def _ip(args: list[str], *, what: str, input: str | None = None) -> str:
    try:
        proc = subprocess.run(["ip", *args], capture_output=True, text=True, input=input,
                              timeout=_IP_TIMEOUT, check=False)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LabError(f"cannot {what}: {exc}") from exc
    if proc.returncode != 0:
        raise LabError(f"cannot {what}: {proc.stderr.strip()}")
    return proc.stdout


def _ip_batch(ns: str | None, lines: list[str]) -> None:
    """Run ``ip`` commands in one process (``ip -n NS -batch -``); stop at the first error."""
    args = (["-n", ns] if ns else []) + ["-batch", "-"]
    _ip(args, what=f"configure {ns or 'links'}", input="\n".join(lines) + "\n")


def _remove_namespace(ns: str) -> None:
    """Kill every process in ``ns`` (by pid) and delete it; missing is fine."""
    if not os.path.exists(f"{NETNS_DIR}/{ns}"):
        return
    with contextlib.suppress(LabError):
        pids = [int(p) for p in _ip(["netns", "pids", ns], what="list pids").split()]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _wait_gone(pids, _KILL_GRACE)
    with contextlib.suppress(LabError):
        _ip(["netns", "del", ns], what=f"delete namespace {ns}")


def _wait_gone(pids: list[int], timeout: float) -> None:
    """Wait until none of ``pids`` exists (or is only a zombie of someone else's)."""
    deadline = time.monotonic() + timeout
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                        break
            except (FileNotFoundError, ProcessLookupError, IndexError):
                break
            time.sleep(0.01)


def _stop_all(procs: list[subprocess.Popen[Any]]) -> None:
    """SIGTERM every running process, wait a little, SIGKILL the rest, reap all."""
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
    deadline = time.monotonic() + _KILL_GRACE
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=_KILL_GRACE)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def _read_until(stream: Any, marker: bytes, timeout: float) -> bytes:
    """Read ``stream`` (a binary pipe) until ``marker`` shows, EOF, or ``timeout``."""
    fd = stream.fileno()
    data = b""
    deadline = time.monotonic() + timeout
    while marker not in data:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data


def _wait_ready(proc: subprocess.Popen[str], timeout: float) -> None:
    """Wait for the echo server's "ready" line."""
    assert proc.stdout is not None
    seen = _read_until(proc.stdout, b"ready\n", timeout)
    if b"ready\n" not in seen:
        raise LabError(f"the echo server did not start (exit {proc.poll()}): {seen!r}")


def _tail(path: Path, lines: int = 3) -> str:
    try:
        return " / ".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"unreadable ({exc.strerror})"


# -- the helpers run inside namespaces (python -I lab.py ...) --------------------------


def serve(v4: str, v6: str, http_port: int, udp_port: int) -> None:
    """Echo server: HTTP GET and UDP datagrams are answered with the caller's address and a
    newline, on ``v4`` and ``v6``. Prints "ready" once every socket is bound; logs nothing."""
    import http.server
    import socketserver

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            # /bytes/N: N bytes of payload (bulk transfers); anything else: the caller.
            parts = self.path.strip("/").split("/")
            if len(parts) == 2 and parts[0] == "bytes" and parts[1].isdigit():
                size = min(int(parts[1]), 64 << 20)
                self.send_response(200)
                self.send_header("Content-Length", str(size))
                self.end_headers()
                chunk = b"x" * 65536
                while size > 0:
                    self.wfile.write(chunk[:size])
                    size -= len(chunk)
                return
            body = f"{self.client_address[0]}\n".encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    class Http4(http.server.ThreadingHTTPServer):
        address_family = socket.AF_INET
        daemon_threads = True

        def server_bind(self) -> None:  # no reverse DNS lookup (HTTPServer does getfqdn)
            socketserver.TCPServer.server_bind(self)
            self.server_name, self.server_port = "lab", self.server_address[1]

    class Http6(Http4):
        address_family = socket.AF_INET6

    class Echo(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            _data, sock = self.request
            sock.sendto(f"{self.client_address[0]}\n".encode(), self.client_address)

    class Udp4(socketserver.UDPServer):
        address_family = socket.AF_INET

    class Udp6(socketserver.UDPServer):
        address_family = socket.AF_INET6

    servers: list[socketserver.BaseServer] = [
        Http4((v4, http_port), Handler), Http6((v6, http_port), Handler),
        Udp4((v4, udp_port), Echo), Udp6((v6, udp_port), Echo),
    ]  # fmt: skip
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    print("ready", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    while True:
        signal.pause()


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return int(~total & 0xFFFF)


def ping(address: str, timeout: float, interval: float = 0.05) -> bool:
    """Send ICMP echo requests every ``interval`` until a reply from ``address`` comes back
    (True) or ``timeout`` passes (False). Needs root (a raw socket)."""
    v6 = ":" in address
    family = socket.AF_INET6 if v6 else socket.AF_INET
    proto = socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP
    request, reply = (128, 129) if v6 else (8, 0)
    ident = os.getpid() & 0xFFFF
    target = socket.getaddrinfo(address, None, family)[0][4][0]
    deadline = time.monotonic() + timeout
    with socket.socket(family, socket.SOCK_RAW, proto) as sock:
        seq = 0
        while time.monotonic() < deadline:
            seq = (seq + 1) & 0xFFFF
            header = struct.pack("!BBHHH", request, 0, 0, ident, seq)
            payload = b"via-tunnel-lab"
            if not v6:  # the kernel computes the ICMPv6 checksum
                header = struct.pack("!BBHHH", request, 0, _checksum(header + payload), ident, seq)
            with contextlib.suppress(OSError):  # unreachable for now: try again
                sock.sendto(header + payload, (address, 0))
            until = min(deadline, time.monotonic() + interval)
            while (left := until - time.monotonic()) > 0:
                if not select.select([sock], [], [], left)[0]:
                    break
                data, src = sock.recvfrom(2048)
                if not v6:
                    data = data[(data[0] & 0x0F) * 4 :]
                if len(data) >= 8 and src[0] == target:
                    kind, _code, _sum, rid, _seq = struct.unpack("!BBHHH", data[:8])
                    if kind == reply and rid == ident:
                        return True
    return False


def udp_query(host: str, port: int, timeout: float) -> str | None:
    """Send one datagram to ``host``:``port`` and return the reply text (None on timeout)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(b"via-tunnel-lab\n", (host, port))
        try:
            return sock.recv(2048).decode(errors="replace")
        except (TimeoutError, OSError):
            return None


DNS_ANSWER = "198.51.100.10"  # what the lab's resolvers answer for every A question


def _dns_reply(query: bytes, answer: str) -> tuple[bytes, str]:
    """A minimal DNS answer to ``query``: its question echoed and one A record (or none
    for other types). Returns the reply and the question's name. Enough for tests."""
    ident, _flags, qdcount = struct.unpack("!HHH", query[:6])
    pos, labels = 12, []
    while query[pos]:
        n = query[pos]
        labels.append(query[pos + 1:pos + 1 + n].decode(errors="replace"))
        pos += n + 1
    question = query[12:pos + 5]
    qtype = struct.unpack("!H", query[pos + 1:pos + 3])[0]
    records = b""
    if qtype == 1 and qdcount == 1:
        records = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + socket.inet_aton(answer)
    header = struct.pack("!HHHHHH", ident, 0x8180, 1, 1 if records else 0, 0, 0)
    return header + question + records, ".".join(labels)


def dns_serve(addresses: list[str], log: str, answer: str = DNS_ANSWER) -> None:
    """Answer DNS over UDP and TCP port 53 on ``addresses``; append one line per query
    (``PROTO SOURCE NAME``) to ``log``, so a test sees who asked and by which path."""
    import socketserver

    lock = threading.Lock()

    def record(proto: str, source: str, name: str) -> None:
        with lock, open(log, "a") as f:
            f.write(f"{proto} {source} {name}\n")

    class Udp(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            data, sock = self.request
            reply, name = _dns_reply(data, answer)
            record("udp", self.client_address[0], name)
            sock.sendto(reply, self.client_address)

    class Tcp(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            conn = self.request
            conn.settimeout(5)
            size = struct.unpack("!H", conn.recv(2))[0]
            data = b""
            while len(data) < size:
                chunk = conn.recv(size - len(data))
                if not chunk:
                    return
                data += chunk
            reply, name = _dns_reply(data, answer)
            record("tcp", self.client_address[0], name)
            conn.sendall(struct.pack("!H", len(reply)) + reply)

    servers: list[socketserver.BaseServer] = []
    for addr in addresses:
        fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
        udp_cls = type("U", (socketserver.ThreadingUDPServer,),
                       {"address_family": fam, "daemon_threads": True})
        tcp_cls = type("T", (socketserver.ThreadingTCPServer,),
                       {"address_family": fam, "daemon_threads": True,
                        "allow_reuse_address": True})
        servers += [udp_cls((addr, 53), Udp), tcp_cls((addr, 53), Tcp)]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    print("ready", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    while True:
        signal.pause()


def dns_query(server: str, name: str, *, tcp: bool, timeout: float) -> str | None:
    """Ask ``server`` for the A record of ``name``; the address, or None on no answer."""
    query = struct.pack("!HHHHHH", os.getpid() & 0xFFFF, 0x0100, 1, 0, 0, 0)
    query += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    query += struct.pack("!HH", 1, 1)
    fam = socket.AF_INET6 if ":" in server else socket.AF_INET
    try:
        with socket.socket(fam, socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM) as sock:
            sock.settimeout(timeout)
            if tcp:
                sock.connect((server, 53))
                sock.sendall(struct.pack("!H", len(query)) + query)
                size = struct.unpack("!H", sock.recv(2))[0]
                reply = sock.recv(size)
            else:
                sock.sendto(query, (server, 53))
                reply = sock.recv(4096)
    except OSError:
        return None
    if len(reply) < 16 or struct.unpack("!H", reply[6:8])[0] == 0:
        return None
    return socket.inet_ntoa(reply[-4:])


def main(argv: list[str] | None = None) -> int:
    """``serve``, ``ping``, ``udp`` (the helpers above) and ``down PREFIX``."""
    parser = argparse.ArgumentParser(prog="via_tunnel.lab.netlab")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("serve")
    p.add_argument("v4")
    p.add_argument("v6")
    p.add_argument("--http-port", type=int, default=Lab.HTTP_PORT)
    p.add_argument("--udp-port", type=int, default=Lab.UDP_PORT)
    p = sub.add_parser("ping")
    p.add_argument("address")
    p.add_argument("--timeout", type=float, default=5)
    p = sub.add_parser("udp")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--timeout", type=float, default=5)
    p = sub.add_parser("dns-serve")
    p.add_argument("log")
    p.add_argument("addresses", nargs="+")
    p = sub.add_parser("dns")
    p.add_argument("server")
    p.add_argument("name")
    p.add_argument("--tcp", action="store_true")
    p.add_argument("--timeout", type=float, default=2)
    p = sub.add_parser("up", help="build a lab, print its prefix and leave it up")
    p.add_argument("--prefix")
    p.add_argument("--no-openvpn", action="store_true")
    p = sub.add_parser("down", help="remove a lab left up")
    p.add_argument("prefix")
    args = parser.parse_args(argv)
    if args.cmd == "serve":
        serve(args.v4, args.v6, args.http_port, args.udp_port)
        return 0
    if args.cmd == "ping":
        return 0 if ping(args.address, args.timeout) else 1
    if args.cmd == "udp":
        answer = udp_query(args.host, args.port, args.timeout)
        if answer is None:
            print(f"no answer from {args.host} port {args.port}", file=sys.stderr)
            return 1
        sys.stdout.write(answer)
        return 0
    if args.cmd == "dns-serve":
        dns_serve(args.addresses, args.log)
        return 0
    if args.cmd == "dns":
        got = dns_query(args.server, args.name, tcp=args.tcp, timeout=args.timeout)
        print(got or "FAIL")
        return 0 if got else 1
    if args.cmd == "up":
        lab = Lab(args.prefix, openvpn=not args.no_openvpn).up()
        print(f"{lab.prefix} up in {lab.up_seconds:.2f}s: {' '.join(lab.namespaces)}")
        return 0
    removed = remove(args.prefix)
    print(" ".join(removed) if removed else f"no lab {args.prefix}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
