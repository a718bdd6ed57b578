"""The ``status`` subcommand: ``via-tunnel status [--json]``.

Kept free of typer: ``status`` is run by scripts and prompts, often, and typer's import
(with pydantic) costs more than everything ``status`` does with a thousand groups. The
entry point (:mod:`main`) runs :func:`show` directly for exactly ``status`` and
``status --json``; any other form (``--help``, a typo) goes through the typer app, whose
``status`` command calls :func:`show` too, so both forms print the same.
"""

from __future__ import annotations

import json
import os
import sys
import time

from via_tunnel.core.errors import ViaTunnelError

STATUS_FORMAT = 2  # bumped only when a key of `status --json` changes meaning or goes away
FAST_FORMS = (["status"], ["status", "--json"])


def fast_form(args: list[str]) -> bool | None:
    """``--json`` or not, when ``args`` (after an optional leading ``--debug``) are one of
    :data:`FAST_FORMS`; None for anything else (the typer app parses it)."""
    if args[:1] == ["--debug"]:
        args = args[1:]
    return None if args not in FAST_FORMS else args == ["status", "--json"]


def show(json_out: bool) -> None:
    """Print the active groups (and those that drain) as text or as JSON."""
    groups = group_info()
    draining = draining_info()
    if json_out:
        json.dump({"format": STATUS_FORMAT, "groups": groups, "draining": draining},
                  sys.stdout, indent=2)
        print()
        return
    for d in draining or []:
        print(f"{d['interface']}  ended, draining {d['seconds_left']} s more  mark {d['mark']}"
              "  (late packets of its closed flows are dropped)")
    if not groups:
        if not draining:
            print("no active groups")
        return
    if os.geteuid() != 0:
        print("(counters and watchers are shown to root only)")
    for g in groups:
        _print_group(g)


def _print_group(g: dict[str, object]) -> None:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(g["since"])))  # type: ignore[arg-type]
    extra = "" if g["watcher"] or os.geteuid() != 0 else \
        "  (no watcher: `via-tunnel cleanup` after it empties)"
    print(f"{g['interface']}  since {since}  table {g['table']}  mark {g['mark']}{extra}")
    link = g["link"]
    assert isinstance(link, dict)
    addrs = ", ".join(link["addresses"]) or "no address"
    print(f"  link {link['state']}  mtu {link['mtu']}  {addrs}")
    counters = g["counters"]
    if isinstance(counters, dict):
        print("  " + "   ".join(
            f"{label} {c['packets']} pkts {human_bytes(c['bytes'])}"
            for label, c in (("sent", counters["sent"]), ("received", counters["received"]))
            if c is not None))
    elif os.geteuid() == 0:
        print("  counters missing (the nft table is being repaired or was removed)")
    for m in g["members"]:  # type: ignore[attr-defined]
        moved = f"  (moved to {m['moved_to']}; still in the group)" if "moved_to" in m else ""
        print(f"  {m['pid']:>7}  {m['command']}{moved}")


def group_info() -> list[dict[str, object]]:
    """The active groups as `status --json` prints them (the shape is documented in the
    README and the man page: keys are only ever added)."""
    from via_tunnel.core.settings import Settings
    from via_tunnel.group import state

    settings = Settings.from_env()
    records = state.load_all(settings)
    if not records:  # (nothing else to import: the usual answer, kept quick)
        return []
    from via_tunnel.group import placement
    from via_tunnel.kernel import cgroup, netlink, nft, procs

    links = netlink.link_states(rec.iface for rec in records)
    # Counters and watcher locks are root's (reading nft needs CAP_NET_ADMIN; a lock anyone
    # could open could be held by anyone): an allowed user sees the rest, they show null.
    root = os.geteuid() == 0
    sent = nft.group_counters("tx") if root else {}
    received = nft.group_counters("rx") if root else {}
    out = []
    mount = cgroup.cgroup2_mount()
    watcher = state.watcher_pid(settings) if root else None
    netcls_root = placement.netcls_root_of(settings)
    for rec in records:
        members: list[dict[str, object]] = []
        inside = cgroup.members(rec.cgroup)
        for pid in inside + placement.moved_out(rec, inside, netcls_root):
            cmd = procs.command_line(pid)
            if cmd is None:
                continue  # (gone meanwhile)
            member: dict[str, object] = {"pid": pid, "command": cmd}
            if pid not in inside:  # moved out of the group's cgroup2 group (systemd-run
                try:                # --scope, flatpak): still in the group by its classid
                    member["moved_to"] = cgroup.own_cgroup(mount, pid)
                except (OSError, ViaTunnelError):
                    continue
            members.append(member)
        key = (rec.mark, rec.iface)
        out.append({
            "interface": rec.iface, "since": rec.created, "mark": f"0x{rec.mark:08x}",
            "table": rec.table, "cgroup": rec.cgroup, "gateway": rec.gateway4,
            "ipv6": rec.ipv6_asked or rec.ipv6, "ipv6_routed": rec.ipv6 == "tunnel",
            "dns": [a for a in (rec.dns4, rec.dns6) if a],
            "watcher": watcher if root else None,
            "ready": rec.ready,
            "link": links[rec.iface],
            "counters": {
                "sent": _counter(sent.get(key)), "received": _counter(received.get(key)),
            } if key in sent or key in received else None,
            "members": members,
        })
    return out


def draining_info() -> list[dict[str, object]] | None:
    """The groups that ended but still drain (lifecycle.teardown), soonest done first;
    None for a caller who may not read our table (not root). The map is listed only when
    the state dir says a drain may be live (listing it means loading libnftables)."""
    from via_tunnel.core.settings import Settings
    from via_tunnel.group import state
    from via_tunnel.kernel import nft

    if os.geteuid() != 0:
        return None
    if not state.drain_may_be_live(Settings.from_env()):
        return []
    try:
        draining = nft.draining()
    except ViaTunnelError:  # no binding: no table of ours could have been made
        return []
    return [{"interface": iface, "mark": f"0x{mark:08x}", "seconds_left": left}
            for mark, (iface, left) in sorted(draining.items(), key=lambda i: i[1][1])]


def _counter(value: tuple[int, int] | None) -> dict[str, int] | None:
    return None if value is None else {"packets": value[0], "bytes": value[1]}


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # not reached
