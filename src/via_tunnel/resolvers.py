"""Where a group's DNS queries should go when the user did not say (``--dns``).

Used only when a group is created (the cold path), never on a warm launch, except
:func:`system_uses_local_stub`, which reads one small file.
"""

from __future__ import annotations

import ipaddress
import shutil
import subprocess


def nameservers(resolv_conf: str = "/etc/resolv.conf") -> list[str]:
    """The ``nameserver`` lines of resolv.conf (empty when it cannot be read)."""
    try:
        with open(resolv_conf) as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            out.append(parts[1].split("%", 1)[0])
    return out


def system_uses_local_stub(resolv_conf: str = "/etc/resolv.conf") -> bool:
    """True when every system resolver is on this host (127.0.0.53, ::1, ...): the queries
    would be sent upstream by the stub, outside the group, so via-tunnel refuses them."""
    servers = nameservers(resolv_conf)
    if not servers:
        return True  # glibc then asks 127.0.0.1
    for text in servers:
        try:
            if not ipaddress.ip_address(text).is_loopback:
                return False
        except ValueError:
            continue
    return True


def link_resolvers(iface: str) -> tuple[str, ...]:
    """The per-link DNS servers systemd-resolved knows for ``iface`` (VPN clients set
    them), or () when resolved is not there. Parses ``resolvectl dns IFACE``."""
    if shutil.which("resolvectl") is None:
        return ()
    try:
        out = subprocess.run(["resolvectl", "dns", "--", iface], capture_output=True,
                             text=True, timeout=2, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    return parse_resolvectl_dns(out)


def parse_resolvectl_dns(text: str) -> tuple[str, ...]:
    """``Link 5 (tun0): 10.8.0.1 fd00::1`` -> ("10.8.0.1", "fd00::1") (pure)."""
    found: list[str] = []
    for line in text.splitlines():
        _, sep, rest = line.partition("):")
        if not sep:
            continue
        for word in rest.split():
            addr = word.split("#", 1)[0].split("%", 1)[0]
            try:
                found.append(str(ipaddress.ip_address(addr)))
            except ValueError:
                continue
    return tuple(found)
