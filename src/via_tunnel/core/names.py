"""Validation of names that come from the user. Pure functions, no I/O."""

from __future__ import annotations

from via_tunnel.core.errors import UsageError

IFNAMSIZ = 16  # including the trailing NUL, as in <linux/if.h>


def validate_ifname(name: str) -> str:
    """Return ``name`` if the kernel would accept it as an interface name, else raise.

    Mirrors ``dev_valid_name()``: 1..15 bytes, not ``.`` or ``..``, no ``/``, ``:``,
    whitespace or control characters. Valid names can still contain quotes or ``;``, which
    is why no name is ever spliced into nft text: names only travel as JSON data.
    """
    if not name:
        raise UsageError("interface name is empty")
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) >= IFNAMSIZ:
        raise UsageError(f"interface name {name!r} is longer than {IFNAMSIZ - 1} bytes")
    if name in (".", ".."):
        raise UsageError(f"{name!r} is not a valid interface name")
    for ch in name:
        if ch in "/:" or ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F:
            raise UsageError(f"interface name {name!r} contains {ch!r}, which Linux forbids")
    return name
