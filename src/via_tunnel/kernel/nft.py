"""Thin adapter over the libnftables Python binding (Debian ``python3-nftables``).

Each public function is one atomic transaction: libnftables applies a whole command buffer
or nothing. Errors carry what was sent, so a failure can be reproduced.

The two contexts live as long as the process and hold a netlink socket each, which
libnftables opens without close-on-exec: :func:`context` marks it so, because a cold
launch execs CMD from the process that used them (CMD gets nothing it did not have).
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

from via_tunnel.core.errors import KernelError, ViaTunnelError
from via_tunnel.core.settings import NFT_FAMILY, NFT_TABLE

_ctx: Any = None  # JSON in and out: every change, and listings of sets
_text_ctx: Any = None  # text out, terse: the whole table's structure (see table_text)


BINDING_MISSING = ("the libnftables Python binding is missing (Debian: apt install "
                   "python3-nftables; the venv needs --system-site-packages)")


def context() -> Any:
    """A new libnftables context whose file descriptors are close-on-exec.

    libnftables (1.0.6) opens its netlink socket in ``nft_ctx_new`` without
    SOCK_CLOEXEC and the binding does not expose it, so every descriptor that appears
    while the context is made gets FD_CLOEXEC (one opened meanwhile by another thread of
    ours is close-on-exec already: Python makes them so). Raises ImportError without the
    binding; whatever else the binding raises (a build of another nftables version)
    propagates."""
    import nftables  # type: ignore[import-not-found]

    before = _open_fds()
    ctx = nftables.Nftables()
    for fd, target in _open_fds().items():
        if before.get(fd) != target:  # (a number is reused: the listing's own descriptor)
            with contextlib.suppress(OSError):
                os.set_inheritable(fd, False)
    return ctx


def _open_fds() -> dict[int, str]:
    """This process's descriptors and what each one is (the listing's own is left out)."""
    out = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
    return out


def _nft() -> Any:
    global _ctx
    if _ctx is None:
        try:
            ctx = context()
        except ImportError as exc:
            raise ViaTunnelError(BINDING_MISSING) from exc
        ctx.set_json_output(True)
        ctx.set_handle_output(True)
        _ctx = ctx
    return _ctx


def preload() -> None:
    """Load the binding now (and fail now if it is missing), before it is needed."""
    _nft()


def run_text(text: str) -> None:
    """Apply nft command text as one transaction."""
    rc, _out, err = _nft().cmd(text)
    if rc != 0:
        raise KernelError(f"nftables refused a change: {err.strip()}\n--- sent:\n{text}")


def run_json(commands: list[dict[str, Any]]) -> dict[str, Any]:
    """Apply a list of nft JSON commands as one transaction and return the parsed output."""
    payload = {"nftables": commands}
    rc, out, err = _nft().json_cmd(payload)
    if rc != 0:
        raise KernelError(
            f"nftables refused a change: {str(err).strip()}\n--- sent:\n{json.dumps(payload)}"
        )
    return out if isinstance(out, dict) else {}


def _text() -> Any:
    global _text_ctx
    if _text_ctx is None:
        _nft()  # the import and its error message
        ctx = context()
        # Terse: sets and maps without their elements. Printing a cgroupsv2 element makes
        # libnftables walk /sys/fs/cgroup for its inode, once per element (NOTES.md): with
        # a thousand groups one listing took seconds, and every cold launch and teardown
        # listed the table. What the text is read for is its chains, rules and maps.
        ctx.set_terse_output(True)
        _text_ctx = ctx
    return _text_ctx


def text_cmd(text: str) -> tuple[int, str, str]:
    """libnftables' own answer (return code, output, errors) to nft command text, through
    the text context, for a caller that judges the answer itself (doctor's probes). The
    text is the caller's fixed commands, never user input."""
    rc, out, err = _text().cmd(text)
    return rc, out, err


def table_text(family: str = NFT_FAMILY, name: str = NFT_TABLE) -> str | None:
    """A table as nft prints it (text), without the elements of its sets and maps (those
    are listed as JSON: :func:`list_elements`), or None when it does not exist. ``family``
    and ``name`` are our fixed names, never user input (they are spliced into the command).

    Text, not JSON, for two bugs of libnftables 1.0.6's JSON printer: it
    cannot print the ``update @map { key : data }`` statement of our ruleset and writes a
    warning straight to our stderr (the user's terminal); and it prints the flags of a
    table with ``flags owner`` (trace's) as garbage or as nothing, which is not JSON."""
    rc, out, _err = _text().cmd(f"list table {family} {name}")
    return out if rc == 0 else None


def table_exists(family: str = NFT_FAMILY, name: str = NFT_TABLE) -> bool:
    return name in declared("chains", family)


def declared(kind: str, family: str = NFT_FAMILY) -> dict[str, list[str]]:
    """table -> names of its ``kind`` ("chains", "sets" or "maps") in ``family``, from a
    terse listing. Cheap whatever the number of elements: libnftables 1.0.6 fetches every
    element for ``list table`` and even ``list tables`` (~40 ms with 12,000 elements), not
    for ``list chains``/``list maps`` (0.1 ms). ``kind`` and ``family`` are ours."""
    rc, out, _err = _text().cmd(f"list {kind} {family}")
    found: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in out.splitlines() if rc == 0 else ():
        words = line.split()
        if len(words) >= 3 and words[0] == "table":
            current = found.setdefault(words[2], [])
        elif len(words) >= 2 and current is not None and words[0] == kind[:-1]:
            current.append(words[1])
    return found


def list_elements(sets: tuple[str, ...], maps: tuple[str, ...]) -> list[dict[str, Any]]:
    """The named sets and maps of our table as nft JSON objects, with their elements
    (those that do not exist are left out). The names are ours, never user input."""
    objects: list[dict[str, Any]] = []
    for kind, names in (("set", sets), ("map", maps)):
        for name in names:
            objects += list_json(f"list {kind} {NFT_FAMILY} {NFT_TABLE} {name}") or []
    return objects


def ensure_table(level: int) -> None:
    """Create our table and the map/rule for ``level`` if missing (one transaction). What
    exists is read from the names of our maps (:func:`declared`): a level's map and rule
    come together, and a rule someone deleted is the watcher's to put back (repair)."""
    from via_tunnel.core.nftplan import base_ruleset, level_ruleset, levels_in

    maps = declared("maps").get(NFT_TABLE)
    if maps is None:
        change = base_ruleset()
        have: set[int] = set()
    else:
        change, have = "", levels_in("".join(f"map {name}\n" for name in maps))
    if level not in have:
        change += level_ruleset(level)
    if change:
        run_text(change)


def draining() -> dict[int, tuple[str, int]]:
    """mark -> (interface, seconds left) of the groups that are draining (ruleset.nft's
    ``draining`` map); empty without our table."""
    from via_tunnel.core.nftplan import draining_in

    return draining_in(list_json(f"list map {NFT_FAMILY} {NFT_TABLE} draining") or [])


def delete_table_command() -> dict[str, Any]:
    return {"delete": {"table": {"family": NFT_FAMILY, "name": NFT_TABLE}}}


def list_json(command: str) -> list[dict[str, Any]] | None:
    """The objects of an nft ``list`` command as JSON (metainfo dropped), or None when nft
    refuses it (e.g. a table that does not exist). ``command`` is the caller's fixed text."""
    rc, out, _err = _nft().cmd(command)
    if rc != 0:
        return None
    try:
        listing = json.loads(out)
    except ValueError:  # see table_text: the JSON printer has bugs
        raise KernelError(f"libnftables printed unreadable JSON for `{command}`") from None
    return [o for o in listing.get("nftables", []) if "metainfo" not in o]


def others_ruleset() -> list[dict[str, Any]] | None:
    """Every table but ours, as ``nft -j list ruleset`` would give them (metainfo dropped).

    Ours is left out because libnftables cannot print it as JSON (see :func:`table_text`)
    and would write warnings to the user's terminal; so is a table the JSON printer
    garbles (an owned one, see there), and one deleted meanwhile. The names come from a
    text listing; each table is then listed by a JSON command, so no name read from the
    kernel is spliced into command text. None when the tables cannot be listed at all."""
    rc, out, _err = _text().cmd("list tables")
    if rc != 0:
        return None
    names = [line.split()[1:] for line in out.splitlines() if line.startswith("table ")]
    objects: list[dict[str, Any]] = []
    for family_name in names:
        if len(family_name) != 2 or tuple(family_name) == (NFT_FAMILY, NFT_TABLE):
            continue
        family, name = family_name
        try:
            rc, listing, _err = _nft().json_cmd(
                {"nftables": [{"list": {"table": {"family": family, "name": name}}}]})
        except ValueError:  # the binding's own json.loads of garbled output
            continue
        if rc == 0 and isinstance(listing, dict):
            objects += [o for o in listing.get("nftables", []) if "metainfo" not in o]
    return objects


def group_counters(set_name: str) -> dict[tuple[int, str], tuple[int, int]]:
    """(mark, interface) -> (packets, bytes) of the elements of one of our counter sets
    (``tx`` or ``rx``); empty when the table or set is missing. ``set_name`` is ours."""
    out: dict[tuple[int, str], tuple[int, int]] = {}
    for obj in list_json(f"list set {NFT_FAMILY} {NFT_TABLE} {set_name}") or []:
        for e in obj.get("set", {}).get("elem", []):
            if not (isinstance(e, dict) and "elem" in e):
                continue
            mark, iface = e["elem"]["val"]["concat"]
            counter = e["elem"].get("counter") or {}
            out[(int(mark), str(iface))] = (int(counter.get("packets", 0)),
                                            int(counter.get("bytes", 0)))
    return out
