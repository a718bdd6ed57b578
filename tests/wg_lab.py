"""Real userspace WireGuard (``wireguard-go``) between a lab's client and gateway namespaces.

A plain module for the kernel tests (``from wg_lab import WireGuard``). The kernel module
does not load in this container, so both ends run ``wireguard-go``: a tun device plus a
control socket in ``/var/run/wireguard/IFACE.sock``. That folder is shared by every network
namespace (``wg`` finds an interface by its socket, whatever the namespace), so the two ends
have different names and both names contain the lab's prefix: labs can run side by side.

Topology added to a :class:`via_tunnel.lab.Lab` (nothing of the lab is changed)::

    client  wg<prefix>   192.0.2.98/28  2001:db8:4::2/64  MTU 1420
                 | UDP from the client (random port) to 203.0.113.2:51820, by eth0 and "the
                 | internet" like any VPN's own packets
    gateway wgs<prefix>  192.0.2.97/28  2001:db8:4::1/64  MTU 1420, ListenPort 51820

* The gateway forwards between its WireGuard interface and ``wan0``. The internet namespace
  routes 192.0.2.96/28 and 2001:db8:4::/64 back through the gateway (as the lab does for its
  other tunnels), so the echo server sees the client's WireGuard address. With
  :meth:`WireGuard.masquerade` the gateway hides it behind its WAN address instead, as a
  commercial VPN does.
* Two ways to run the client end, never both at once (same keys, same addresses):
  :meth:`WireGuard.start_client` brings it up by hand (``wireguard-go -f``, ``wg setconf``,
  ``ip``: no route, no rule) and :meth:`WireGuard.quick_up` with ``wg-quick`` from a config
  file in a private temporary directory (full tunnel: ``AllowedIPs = 0.0.0.0/0, ::/0``;
  ``table="off"`` for ``Table = off``).
* Keys are made with ``wg genkey``/``wg pubkey`` and only ever written to files of that
  directory (mode 0600), never put on a command line.

:meth:`WireGuard.close` stops everything it started (also a ``wireguard-go`` that
``wg-quick`` daemonized), removes the control sockets of its two names, the return routes,
the masquerade and the temporary directory. It is idempotent; the lab is left to its owner.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Literal

from via_tunnel.lab import Lab

SOCKET_DIR = "/var/run/wireguard"
PROGRAMS = ("wireguard-go", "wg", "wg-quick")
# wireguard-go wants the first on Linux (it prefers the kernel module); wg-quick falls back to
# the second when `ip link add ... type wireguard` fails.
ENV = {
    "WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD": "1",
    "WG_QUICK_USERSPACE_IMPLEMENTATION": "wireguard-go",
}
_TIMEOUT = 10.0


def missing_programs() -> list[str]:
    """The WireGuard programs this machine lacks (``scripts/lib.sh`` installs them)."""
    return [name for name in PROGRAMS if shutil.which(name) is None]


class WireGuardError(RuntimeError):
    """A step of bringing WireGuard up or down failed."""


class WireGuard:
    """A WireGuard tunnel between ``lab.client`` and ``lab.gateway`` (module docstring)."""

    CLIENT = "192.0.2.98"
    GATEWAY = "192.0.2.97"
    NET = "192.0.2.96/28"
    CLIENT6 = "2001:db8:4::2"
    GATEWAY6 = "2001:db8:4::1"
    NET6 = "2001:db8:4::/64"
    PREFIXLEN, PREFIXLEN6 = 28, 64
    MTU = 1420
    PORT = 51820

    def __init__(self, lab: Lab, *, client_if: str | None = None,
                 gateway_if: str | None = None) -> None:
        self.lab = lab
        self.client_if = client_if or f"wg{lab.prefix}"
        self.gateway_if = gateway_if or f"wgs{lab.prefix}"
        for name in (self.client_if, self.gateway_if):
            if not 1 <= len(name) <= 15:
                raise ValueError(f"interface name {name!r}: 1-15 characters")
        self.dir: Path | None = None
        self.mode: Literal["off", "manual", "quick"] = "off"
        self.quick_table: str | None = None
        self._client: subprocess.Popen[bytes] | None = None
        self._gateway: subprocess.Popen[bytes] | None = None
        self._masquerading = False
        self.quick_runs = 0  # how many times wg-quick up ran (it leaves src_valid_mark=1)

    # -- context manager ---------------------------------------------------------------

    def __enter__(self) -> WireGuard:
        return self.up()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"WireGuard({self.client_if} <-> {self.gateway_if}, client {self.mode})"

    # -- whole tunnel ------------------------------------------------------------------

    def up(self) -> WireGuard:
        """Make the keys, bring up the gateway end and the client end (by hand), and return
        once a ping crosses the tunnel. On failure everything is removed again."""
        if self.dir is not None:
            raise WireGuardError(f"{self!r} is already up")
        try:
            self.dir = Path(tempfile.mkdtemp(prefix=f"via-tunnel-wg-{self.lab.prefix}-"))
            for end in ("client", "gateway"):
                key = self._wg(["genkey"]).strip()
                self._write(f"{end}.key", key + "\n")
                self._write(f"{end}.pub", self._wg(["pubkey"], input=key + "\n"))
            self._start_gateway()
            self.start_client()
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Stop both ends and remove everything this object added. Idempotent."""
        if self.mode == "quick":
            with contextlib.suppress(Exception):
                self.quick_down()
        for proc in (self._client, self._gateway):
            if proc is not None:
                _stop(proc)
        self._client = self._gateway = None
        for ns, name in ((self.lab.client, self.client_if), (self.lab.gateway, self.gateway_if)):
            for pid in self._pids_of(ns, name):  # wg-quick's daemon (not our child)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                _wait_gone(pid)
            with contextlib.suppress(FileNotFoundError):  # stale after a SIGKILL
                os.unlink(f"{SOCKET_DIR}/{name}.sock")
        if self.dir is not None:
            for ns in (self.lab.client, self.lab.gateway):
                self._del_link(ns, self.client_if if ns == self.lab.client else self.gateway_if)
            self._ip(self.lab.inet, ["route", "del", self.NET], check=False)
            self._ip(self.lab.inet, ["-6", "route", "del", self.NET6], check=False)
            if self._masquerading:
                self.masquerade(False)
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
        self.mode = "off"

    def masquerade(self, on: bool = True) -> None:
        """Masquerade the tunnel's traffic out of the gateway's ``wan0`` (on) or not (off):
        the echo server then sees 203.0.113.2 / 2001:db8:2::2 instead of the client's
        WireGuard address."""
        if on and not self._masquerading:
            rules = (f"table inet wglab_{self.lab.prefix} {{\n"
                     f"  chain post {{ type nat hook postrouting priority srcnat;\n"
                     f'    oifname "wan0" ip saddr {self.NET} masquerade\n'
                     f'    oifname "wan0" ip6 saddr {self.NET6} masquerade\n'
                     f"  }}\n}}\n")
            self.lab.run(self.lab.gateway, ["nft", "-f", "-"], input=rules, timeout=_TIMEOUT)
        elif not on and self._masquerading:
            self.lab.run(self.lab.gateway, ["nft", "delete", "table", "inet",
                                            f"wglab_{self.lab.prefix}"],
                         check=False, timeout=_TIMEOUT)
        self._masquerading = on

    def ping(self, *, ipv6: bool = False, timeout: float = 5) -> bool:
        """Does an ICMP echo from the client to the gateway's WireGuard address come back?
        (An ordinary process: the kernel routes it by the connected route of the client's
        WireGuard interface.)"""
        target = self.GATEWAY6 if ipv6 else self.GATEWAY
        argv = self.lab.ping_argv(target, timeout=timeout)
        return self.lab.run(self.lab.client, argv, check=False,
                            timeout=timeout + 5).returncode == 0

    def wait_ping(self, *, timeout: float = 10) -> None:
        """Wait until a ping crosses the tunnel (v4 and v6); raise otherwise."""
        for ipv6 in (False, True):
            if not self.ping(ipv6=ipv6, timeout=timeout):
                raise WireGuardError(
                    f"no {'IPv6 ' if ipv6 else ''}ping across {self.client_if} -> "
                    f"{self.gateway_if} within {timeout:g}s; {self._logs()}")

    # -- the client end by hand ----------------------------------------------------------

    def start_client(self, *, wait: bool = True) -> None:
        """(Re)create the client's interface by hand: ``wireguard-go -f``, ``wg setconf``,
        addresses, MTU 1420, up. No route and no rule: a program uses it only when something
        routes it there (via-tunnel does). ``wait``: return once a ping crosses."""
        if self.mode != "off":
            raise WireGuardError(f"the client end is already up ({self.mode})")
        ns = self.lab.client
        self._client = self._start_daemon(ns, self.client_if)
        conf = self._write("client.conf", self._client_conf(""))
        self._wg(["setconf", self.client_if, str(conf)], ns=ns)
        self._addresses(ns, self.client_if, self.CLIENT, self.CLIENT6)
        self.mode = "manual"
        if wait:
            self.wait_ping()

    def link_down(self) -> None:
        """``ip link set IFACE down`` in the client (the device and wireguard-go stay)."""
        self._ip(self.lab.client, ["link", "set", self.client_if, "down"])

    def link_up(self, *, wait: bool = True) -> None:
        """``ip link set IFACE up``, and put back the IPv6 address the kernel removed when it
        went down (``keep_addr_on_down=0``); the IPv4 address stays."""
        ns = self.lab.client
        self._ip(ns, ["link", "set", self.client_if, "up"])
        self._ip(ns, ["addr", "replace", f"{self.CLIENT6}/{self.PREFIXLEN6}",
                      "dev", self.client_if, "nodad"])
        if wait:
            self.wait_ping()

    def kill_client(self) -> None:
        """SIGKILL the client's wireguard-go (a crash): its tun device disappears; its
        control socket stays behind, stale (the next start replaces it)."""
        if self.mode != "manual" or self._client is None:
            raise WireGuardError("no client wireguard-go started by hand to kill")
        self._client.kill()
        self._client.wait(timeout=_TIMEOUT)
        self._client = None
        self.mode = "off"
        self._wait_link(self.lab.client, self.client_if, present=False)

    def delete_client_link(self) -> None:
        """``ip link del`` the client's interface: wireguard-go sees its device go and exits
        (removing its socket); wait for that."""
        if self.mode != "manual" or self._client is None:
            raise WireGuardError("no client interface made by hand to delete")
        self._ip(self.lab.client, ["link", "del", self.client_if])
        try:
            self._client.wait(timeout=_TIMEOUT)
        except subprocess.TimeoutExpired as exc:
            raise WireGuardError("wireguard-go did not exit after its link was deleted") \
                from exc
        finally:
            self.mode = "off"
        self._client = None

    def stop_client(self) -> None:
        """Take the client end down, whichever way it was brought up."""
        if self.mode == "quick":
            self.quick_down()
        elif self.mode == "manual":
            self.delete_client_link()

    # -- the client end with wg-quick ----------------------------------------------------

    def quick_up(self, *, table: str | None = None, wait: bool = True) -> None:
        """``wg-quick up DIR/IFACE.conf`` in the client namespace: full tunnel
        (``AllowedIPs = 0.0.0.0/0, ::/0``), MTU 1420; ``table`` is written as ``Table =``
        (``"off"``: no routes and no rules at all). Without it, wg-quick adds its own ip
        rules (``not fwmark 51820``, ``suppress_prefixlength 0``), table 51820, its nft table
        and sets ``src_valid_mark=1`` (which ``wg-quick down`` leaves set, as on a real host;
        :attr:`quick_runs` tells a caller that wants to put it back)."""
        if self.mode != "off":
            raise WireGuardError(f"the client end is already up ({self.mode})")
        extra = f"Address = {self.CLIENT}/{self.PREFIXLEN}, {self.CLIENT6}/{self.PREFIXLEN6}\n"
        extra += f"MTU = {self.MTU}\n"
        if table is not None:
            extra += f"Table = {table}\n"
        conf = self._write(f"{self.client_if}.conf", self._client_conf(extra))
        self.quick_runs += 1
        self.mode = "quick"  # from here on, close() runs wg-quick down
        self.quick_table = table
        self._quick("up", conf)
        if wait:
            self.wait_ping()

    def quick_down(self) -> None:
        """``wg-quick down``: it deletes the interface (wireguard-go then exits), its rules,
        table 51820 and its nft table (not ``src_valid_mark``). Returns once that
        wireguard-go has exited (it removes its socket on the way out)."""
        if self.mode != "quick":
            raise WireGuardError("wg-quick is not up")
        assert self.dir is not None
        try:
            self._quick("down", self.dir / f"{self.client_if}.conf")
        finally:
            self.mode = "off"
            self.quick_table = None
        for pid in self._pids_of(self.lab.client, self.client_if):  # before the name is reused
            _wait_gone(pid)

    # -- internals -----------------------------------------------------------------------

    def _start_gateway(self) -> None:
        ns = self.lab.gateway
        self._gateway = self._start_daemon(ns, self.gateway_if)
        client_pub = self._read("client.pub")
        conf = self._write("gateway.conf", (
            "[Interface]\n"
            f"PrivateKey = {self._read('gateway.key')}\n"
            f"ListenPort = {self.PORT}\n\n"
            "[Peer]\n"
            f"PublicKey = {client_pub}\n"
            f"AllowedIPs = {self.CLIENT}/32, {self.CLIENT6}/128\n"))
        self._wg(["setconf", self.gateway_if, str(conf)], ns=ns)
        self._addresses(ns, self.gateway_if, self.GATEWAY, self.GATEWAY6)
        self._ip(self.lab.inet, ["route", "replace", self.NET, "via", Lab.GW_WAN])
        self._ip(self.lab.inet, ["-6", "route", "replace", self.NET6, "via", Lab.GW_WAN6])

    def _client_conf(self, extra: str) -> str:
        """The client's config: full tunnel (what a VPN provider hands out)."""
        return ("[Interface]\n"
                f"PrivateKey = {self._read('client.key')}\n"
                f"{extra}\n"
                "[Peer]\n"
                f"PublicKey = {self._read('gateway.pub')}\n"
                f"Endpoint = {Lab.GW_WAN}:{self.PORT}\n"
                "AllowedIPs = 0.0.0.0/0, ::/0\n")

    def _start_daemon(self, ns: str, name: str) -> subprocess.Popen[bytes]:
        """``wireguard-go -f NAME`` in ``ns``; returns once its socket answers and its
        device exists. Tried up to three times: the socket folder is shared with every
        other user of wireguard-go on the machine, and one that removes the folder (or a
        socket it takes for stale) between wireguard-go's bind and its inotify watch makes
        it exit at once ("Failed to listen on uapi socket")."""
        for attempt in range(3):
            proc = self._spawn_daemon(ns, name)
            deadline = time.monotonic() + _TIMEOUT
            while time.monotonic() < deadline and proc.poll() is None:
                if self._link_exists(ns, name) and self._wg(["show", name], ns=ns, check=False):
                    return proc
                time.sleep(0.02)
            if proc.poll() is None:
                _stop(proc)
                raise WireGuardError(f"wireguard-go {name} did not come up; {self._logs()}")
            log = self.dir / f"wireguard-go-{name}.log" if self.dir else None
            if attempt == 2 or log is None or b"uapi" not in log.read_bytes():
                break
        raise WireGuardError(f"wireguard-go {name} exited {proc.returncode}; {self._logs()}")

    def _spawn_daemon(self, ns: str, name: str) -> subprocess.Popen[bytes]:
        assert self.dir is not None
        with open(self.dir / f"wireguard-go-{name}.log", "wb") as log:
            return subprocess.Popen(
                [*self.lab.nsenter(ns), "wireguard-go", "-f", name],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, **ENV, "LOG_LEVEL": "error"}, start_new_session=True)

    def _addresses(self, ns: str, name: str, v4: str, v6: str) -> None:
        self._ip(ns, ["addr", "add", f"{v4}/{self.PREFIXLEN}", "dev", name])
        self._ip(ns, ["addr", "add", f"{v6}/{self.PREFIXLEN6}", "dev", name, "nodad"])
        self._ip(ns, ["link", "set", name, "mtu", str(self.MTU), "up"])

    def _quick(self, action: str, conf: Path) -> None:
        proc = self.lab.run(self.lab.client, ["wg-quick", action, str(conf)], env=ENV,
                            check=False, timeout=30)
        if proc.returncode != 0:
            raise WireGuardError(f"wg-quick {action} failed (exit {proc.returncode}): "
                                 f"{proc.stderr.strip()[-800:]}")

    def _wg(self, args: list[str], *, ns: str | None = None, input: str | None = None,
            check: bool = True) -> str:
        argv = [*(self.lab.nsenter(ns) if ns else []), "wg", *args]
        try:
            proc = subprocess.run(argv, input=input, capture_output=True, text=True,
                                  timeout=_TIMEOUT, check=False,
                                  env={**os.environ, **ENV})
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise WireGuardError(f"wg {args[0]}: {exc}") from exc
        if proc.returncode != 0:
            if check:
                raise WireGuardError(f"wg {' '.join(args)}: {proc.stderr.strip()}")
            return ""
        return proc.stdout or "ok"

    def _ip(self, ns: str, args: list[str], *, check: bool = True) -> bool:
        if not os.path.exists(self.lab.ns_path(ns)):
            if check:
                raise WireGuardError(f"namespace {ns} is gone")
            return False
        return self.lab.run(ns, ["ip", *args], check=check, timeout=_TIMEOUT).returncode == 0

    def _link_exists(self, ns: str, name: str) -> bool:
        return self._ip(ns, ["link", "show", "dev", name], check=False)

    def _wait_link(self, ns: str, name: str, *, present: bool) -> None:
        deadline = time.monotonic() + _TIMEOUT
        while self._link_exists(ns, name) != present:
            if time.monotonic() > deadline:
                raise WireGuardError(f"{name} in {ns}: still {'absent' if present else 'there'}")
            time.sleep(0.02)

    def _del_link(self, ns: str, name: str) -> None:
        if self._link_exists(ns, name):
            self._ip(ns, ["link", "del", name], check=False)

    def _pids_of(self, ns: str, name: str) -> list[int]:
        """PIDs of ``wireguard-go [-f] NAME`` processes inside namespace ``ns`` of this lab
        (exact argv and network namespace: never another's process)."""
        try:
            want = os.stat(self.lab.ns_path(ns)).st_ino
        except OSError:
            return []
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")[:-1]
                if not argv or os.path.basename(argv[0]) != b"wireguard-go" \
                        or [a for a in argv[1:] if a != b"-f"] != [name.encode()]:
                    continue
                if os.stat(f"/proc/{entry}/ns/net").st_ino == want:
                    pids.append(int(entry))
            except OSError:
                continue
        return pids

    def _write(self, name: str, text: str) -> Path:
        assert self.dir is not None
        path = self.dir / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return path

    def _read(self, name: str) -> str:
        assert self.dir is not None
        return (self.dir / name).read_text().strip()

    def _logs(self) -> str:
        if self.dir is None:
            return "no logs"
        tails = []
        for path in sorted(self.dir.glob("wireguard-go-*.log")):
            lines = path.read_text(errors="replace").splitlines()
            tails.append(f"{path.name}: {' / '.join(lines[-3:]) or '(empty)'}")
        return " | ".join(tails) or "no logs"


def _wait_gone(pid: int, timeout: float = _TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return
        except (OSError, IndexError):
            return
        time.sleep(0.01)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=_TIMEOUT)
