"""Thin adapter over the libnftables Python binding (Debian ``python3-nftables``).

Each public function is one atomic transaction: libnftables applies a whole command buffer
or nothing. Errors carry what was sent, so a failure can be reproduced.
"""

from __future__ import annotations

import json
from typing import Any

from via_tunnel.errors import KernelError, ViaTunnelError
from via_tunnel.plan import base_ruleset, level_ruleset
from via_tunnel.settings import NFT_FAMILY, NFT_TABLE

_ctx: Any = None


def _nft() -> Any:
    global _ctx
    if _ctx is None:
        try:
            import nftables  # type: ignore[import-not-found]
        except ImportError as exc:
            raise ViaTunnelError(
                "the libnftables Python binding is missing (Debian: apt install "
                "python3-nftables; the venv needs --system-site-packages)"
            ) from exc
        ctx = nftables.Nftables()
        ctx.set_json_output(True)
        ctx.set_handle_output(True)
        _ctx = ctx
    return _ctx


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


def list_table() -> list[dict[str, Any]] | None:
    """Our table as nft JSON objects, or None when it does not exist."""
    return list_json(f"list table {NFT_FAMILY} {NFT_TABLE}")


def table_levels(objects: list[dict[str, Any]]) -> set[int]:
    """The cgroup levels that already have a map in our table."""
    levels = set()
    for obj in objects:
        name = obj.get("map", {}).get("name", "")
        if name.startswith("groups_l") and name[8:].isdigit():
            levels.add(int(name[8:]))
    return levels


def ensure_table(level: int) -> None:
    """Create our table and the map/rule for ``level`` if missing (one transaction)."""
    objects = list_table()
    text = ""
    if objects is None:
        text = base_ruleset()
        have: set[int] = set()
    else:
        have = table_levels(objects)
    if level not in have:
        text += level_ruleset(level)
    if text:
        run_text(text)


def delete_table_command() -> dict[str, Any]:
    return {"delete": {"table": {"family": NFT_FAMILY, "name": NFT_TABLE}}}


def list_json(command: str) -> list[dict[str, Any]] | None:
    """The objects of an nft ``list`` command as JSON (metainfo dropped), or None when nft
    refuses it (e.g. a table that does not exist). ``command`` is the caller's fixed text."""
    rc, out, _err = _nft().cmd(command)
    if rc != 0:
        return None
    return [o for o in json.loads(out).get("nftables", []) if "metainfo" not in o]
