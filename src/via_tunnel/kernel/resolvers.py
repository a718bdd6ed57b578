"""Where a group's DNS queries should go when the user did not say (``--dns``).

Used only when a group is created (the cold path), except :func:`system_uses_local_stub`,
which every launch without a resolver calls: it reads one small file and imports nothing
heavy (ipaddress, subprocess and shutil cost a warm launch ~10 ms), so those imports are
local to the functions of the cold path.
"""

from __future__ import annotations


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
    return all(_is_loopback(text) for text in servers)


def _is_loopback(text: str) -> bool:
    """127.0.0.0/8 or ::1 in any spelling resolv.conf allows (without ipaddress)."""
    if text.startswith("127."):
        return True
    if ":" in text:
        groups = text.replace("::", ":*:").strip(":").split(":")
        digits = [g for g in groups if g != "*"]
        return bool(digits) and all(int(g or "0", 16) == 0 for g in digits[:-1]) \
            and int(digits[-1] or "0", 16) == 1 and (len(groups) == 8 or "*" in groups)
    return False


def link_resolvers(iface: str) -> tuple[str, ...]:
    """The per-link DNS servers systemd-resolved knows for ``iface`` (VPN clients set
    them), or () when resolved is not there. Parses ``resolvectl dns IFACE``."""
    import shutil
    import subprocess

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
    import ipaddress

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
