"""A throwaway lab of network namespaces: a client, a gateway (the VPS) and "the internet".

Used by ``via-tunnel demo``, the test suite and the benchmarks. Standard library only; every
external program (``ip``, ``nsenter``, ``openvpn``, ``curl``, ``tcpdump``) is called with an
argument list, never a shell string, and with a timeout.

:class:`Lab` puts the parts together: the namespaces and how to run and observe things in
them (:mod:`~via_tunnel.lab.namespaces`), the addresses and wiring
(:mod:`~via_tunnel.lab.topology`, which also draws the topology), the echo and DNS servers
(:mod:`~via_tunnel.lab.programs`, run by path inside the namespaces), the OpenVPN tunnel
(:mod:`~via_tunnel.lab.openvpn`) and packet captures (:mod:`~via_tunnel.lab.capture`).
``python -m via_tunnel.lab up|down`` builds a lab and leaves it up, or removes one.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from types import TracebackType

from via_tunnel.lab.capture import Capture
from via_tunnel.lab.namespaces import IP_TIMEOUT, Namespaces, ip_batch
from via_tunnel.lab.openvpn import Tunnel
from via_tunnel.lab.procs import LabError, helper_argv, wait_ready
from via_tunnel.lab.topology import Addresses, ip_batches, sysctls


class Lab(Namespaces, Addresses):
    """Three network namespaces wired as :mod:`~via_tunnel.lab.topology` draws them.

    ``up()`` builds everything and returns only when the echo server accepts and (with
    ``openvpn``) a ping crosses the tunnel; on any failure it removes what it made and raises
    :class:`LabError`. ``down()`` is idempotent: it kills the processes it started and every
    other process still inside its namespaces, then deletes the namespaces it created (never
    one that existed before). Several labs can be up at once if their prefixes differ.
    """

    def __init__(
        self, prefix: str | None = None, openvpn: bool = True, *, rp_filter: int = 1,
        vpn_mark: int | None = None,
    ) -> None:
        """``prefix``: 1-12 characters of ``[a-z0-9]`` (default ``"vt"`` + 4 random hex).
        ``rp_filter``: the client's ``net.ipv4.conf.{all,default}.rp_filter`` (0, 1 or 2).
        ``vpn_mark``: the client's openvpn marks its own UDP packets with it (``--mark``),
        as a system-wide VPN does so that a ``not fwmark`` rule keeps them off the tunnel."""
        super().__init__(prefix)
        if rp_filter not in (0, 1, 2):
            raise ValueError(f"rp_filter must be 0, 1 or 2, not {rp_filter!r}")
        self.openvpn = openvpn
        self.rp_filter = rp_filter
        self.vpn_mark = vpn_mark
        self.up_seconds: float | None = None  # how long the last up() took
        self._tunnel = Tunnel(self, vpn_mark) if openvpn else None

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

    # -- what to run inside ------------------------------------------------------------

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

    def dns_argv(self, server: str, name: str = "example.test", *, tcp: bool = False,
                 timeout: float = 2) -> list[str]:
        """Argv of a DNS query (A record) to ``server``: prints the answer or ``FAIL``."""
        return helper_argv("dns", server, name, "--timeout", str(timeout),
                           *(["--tcp"] if tcp else []))

    def capture(self, ns: str, iface: str, bpf: str = "") -> Capture:
        """A :class:`Capture` of ``iface`` in ``ns`` (use it as a context manager)."""
        return Capture(self, ns, iface, bpf)

    # -- building ----------------------------------------------------------------------

    def up(self) -> Lab:
        """Build the lab (see :mod:`~via_tunnel.lab.topology`); returns ``self``.

        Raises :class:`LabError` (after removing whatever it made) when anything fails,
        including a namespace name that is already taken.
        """
        if self.created:
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

    def _build(self) -> None:
        self.create()
        # Sysctls first: interfaces created afterwards inherit conf.default.
        for ns, values in sysctls(*self.namespaces, self.rp_filter).items():
            self.run(ns, ["sysctl", "-q", "-w", *(f"{k}={v}" for k, v in values.items())],
                     timeout=IP_TIMEOUT)  # fmt: skip
        for where, lines in ip_batches(*self.namespaces):
            ip_batch(where, lines)
        shutil.rmtree(self.workdir, ignore_errors=True)
        self.workdir.mkdir(mode=0o700)
        server = self.popen(
            self.inet,
            helper_argv("serve", self.SERVER, self.SERVER6,
                        "--http-port", str(self.HTTP_PORT), "--udp-port", str(self.UDP_PORT)),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True, start_new_session=True,
        )  # fmt: skip
        vpns = self._tunnel.start() if self._tunnel else []
        wait_ready(server, timeout=10)
        if self._tunnel:
            self._tunnel.wait(vpns, timeout=10)

    # -- extras a test starts ------------------------------------------------------------

    def start_dns(self, ns: str, *addresses: str) -> Path:
        """Run a DNS responder on ``addresses`` (port 53, UDP+TCP) in ``ns``; returns its
        query log (``PROTO SOURCE NAME`` per line). Stopped by :meth:`down`."""
        log = self.workdir / f"dns-{ns}-{len(list(self.workdir.glob('dns-*')))}.log"
        log.touch()
        proc = self.popen(ns, helper_argv("dns-serve", str(log), *addresses),
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True, start_new_session=True)
        wait_ready(proc, timeout=10)
        return log

    def kill_client_vpn(self) -> None:
        """SIGKILL the client's openvpn (as a crash would): its tun0 disappears."""
        self._vpn().kill_client()

    def start_client_vpn(self, timeout: float = 10) -> None:
        """Start the client's openvpn again and wait until the tunnel carries a ping."""
        self._vpn().start_client(timeout)

    def _vpn(self) -> Tunnel:
        if self._tunnel is None:
            raise LabError("this lab has no OpenVPN tunnel")
        return self._tunnel
