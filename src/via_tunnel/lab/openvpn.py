"""The lab's OpenVPN tunnel: a static-key point-to-point link from the client to the gateway.

One ``openvpn`` runs in the gateway namespace and one in the client's, over UDP between
``CLIENT_LAN`` and ``GW_WAN`` port :data:`OPENVPN_PORT`; each makes a ``tun0`` with
``CLIENT_TUN`` peer ``GW_TUN`` (and back). :class:`Tunnel` starts both ends, waits until a
ping crosses, and lets a test kill and restart the client's end as a crash would. The
processes are started with :meth:`Namespaces.popen`, so the lab's ``down()`` ends them.
"""

from __future__ import annotations

import subprocess
import time
from typing import Any

from via_tunnel.lab.namespaces import Namespaces
from via_tunnel.lab.procs import LabError, helper_argv, tail
from via_tunnel.lab.topology import Addresses

OPENVPN_PORT = 1194


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


class Tunnel:
    """Both ends of the tunnel of the lab ``spaces``; its key and logs live in the lab's
    work directory. ``mark``: the client's openvpn marks its own UDP packets with it
    (``--mark``), as a system-wide VPN does so that a ``not fwmark`` rule keeps them off
    the tunnel."""

    def __init__(self, spaces: Namespaces, mark: int | None = None) -> None:
        self.spaces = spaces
        self.mark = mark
        self._client: subprocess.Popen[Any] | None = None

    def start(self) -> list[subprocess.Popen[Any]]:
        """Make a key and start both ends (gateway, then client) without waiting."""
        key = self.spaces.workdir / "static.key"
        try:
            subprocess.run(["openvpn", "--genkey", "secret", str(key)], check=True,
                           capture_output=True, timeout=10)  # fmt: skip
        except (OSError, subprocess.SubprocessError) as exc:
            raise LabError(f"openvpn --genkey failed: {exc}") from exc
        procs = [self._end(self.spaces.gateway), self._end(self.spaces.client)]
        self._client = procs[1]
        return procs

    def _end(self, ns: str) -> subprocess.Popen[Any]:
        a, spaces = Addresses, self.spaces
        if ns == spaces.gateway:
            end = ("0", a.GW_WAN, a.CLIENT_LAN, a.GW_TUN, a.CLIENT_TUN)
        else:
            end = ("1", a.CLIENT_LAN, a.GW_WAN, a.CLIENT_TUN, a.GW_TUN)
        argv = openvpn_argv(str(spaces.workdir / "static.key"), *end,
                            log=str(spaces.workdir / f"openvpn-{ns}.log"))  # fmt: skip
        if ns == spaces.client and self.mark is not None:
            argv += ["--mark", str(self.mark)]
        return spaces.popen(ns, argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip

    def kill_client(self) -> None:
        """SIGKILL the client's openvpn (as a crash would) and wait until its tun0 is gone."""
        proc = self._client
        if proc is None:
            raise LabError("this lab has no OpenVPN tunnel")
        proc.kill()
        proc.wait(timeout=5)
        deadline = time.monotonic() + 5
        client = self.spaces.client
        while time.monotonic() < deadline:
            names = [link.get("ifname") for link in self.spaces.ip_json(client, "link", "show")]
            if "tun0" not in names:
                return
            time.sleep(0.01)
        raise LabError("tun0 did not go away after openvpn was killed")

    def start_client(self, timeout: float = 10) -> None:
        """Start the client's openvpn again and wait until the tunnel carries a ping."""
        self._client = self._end(self.spaces.client)
        self.wait([self._client], timeout)

    def wait(self, vpns: list[subprocess.Popen[Any]], timeout: float) -> None:
        """Ping across the tunnel until a reply; give up at once if an openvpn exits."""
        ping = helper_argv("ping", Addresses.GW_TUN, "--timeout", f"{timeout:g}")
        pinger = self.spaces.popen(self.spaces.client, ping, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout + 5
        while pinger.poll() is None and time.monotonic() < deadline:
            if any(vpn.poll() is not None for vpn in vpns):
                break
            time.sleep(0.01)
        if pinger.poll() == 0:
            return
        logs = " | ".join(
            f"{p.name}: {tail(p)}" for p in sorted(self.spaces.workdir.glob("openvpn-*.log"))
        )
        raise LabError(f"no ping across the OpenVPN tunnel; {logs}")
