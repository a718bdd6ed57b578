"""Doctor: what crashed or killed runs left behind, found with the helpers ``cleanup``
itself uses (group/lifecycle.py), so the two never disagree.
"""

from __future__ import annotations

import contextlib
import os

from via_tunnel.core.settings import Settings
from via_tunnel.doctor.check import CLEANUP, OK, WARN, Check, is_root


def check_leftovers() -> list[Check]:
    """Records whose group has no process and no watcher, kernel objects in our ranges with
    no record, our nft table with no group, cgroups with no record (what ``cleanup`` sweeps,
    found with the same helpers)."""
    from via_tunnel.group import lifecycle, state
    from via_tunnel.kernel import cgroup

    settings = Settings.from_env()
    records = state.load_all(settings)
    out: list[Check] = []
    alive = state.watcher_alive(settings)
    for rec in records:
        if cgroup.populated(rec.cgroup):
            if not alive:
                out.append(Check(
                    "leftovers", WARN,
                    f"group {rec.iface} has processes but no watcher: nothing will remove "
                    f"its rules when they exit",
                    f"{CLEANUP} after they exit (or start `via-tunnel daemon`: it adopts "
                    f"groups)"))
        elif not alive:
            where = "empty" if os.path.isdir(rec.cgroup) else "gone"
            half = "" if rec.ready else ", setup never finished"
            out.append(Check(
                "leftovers", WARN,
                f"group {rec.iface}: a record in {settings.groups_dir} whose cgroup is {where} "
                f"and that no watcher serves{half} (a crashed run)", CLEANUP))
    rules, tables = lifecycle.stray_kernel_objects({r.slot for r in records})
    if rules or tables:
        what = [f"{len(rules)} ip rule(s) ({', '.join(sorted({f'0x{r.table:x}' for r in rules}))})"
                if rules else "", f"routes in table(s) {', '.join(f'0x{t:x}' for t in tables)}"
                if tables else ""]
        out.append(Check("leftovers", WARN,
                         f"{' and '.join(w for w in what if w)} in via-tunnel's range with no "
                         f"group record (a run killed before it wrote one, or after)", CLEANUP))
    nft_note = ""
    if is_root():
        from via_tunnel.kernel import nft

        if not records and nft.table_exists():
            # A group that ended keeps the table while it drains (lifecycle.teardown); after
            # the drain it stays, inert, until the next group ends or `cleanup`.
            draining = len(nft.draining())
            if draining:
                nft_note = f"; {draining} ended group(s) draining"
            else:
                out.append(Check(
                    "leftovers", WARN, "nft table inet via_tunnel exists but no group is "
                    "recorded or draining (a drain that ended leaves it until the next group "
                    "ends; it holds no group's packets)", CLEANUP))
    else:
        nft_note = "; nft table not checked (needs root)"
    known = {r.cgroup for r in records}
    with contextlib.suppress(Exception):
        for path in lifecycle.group_cgroups(settings):
            if path not in known:
                out.append(Check("leftovers", WARN, f"cgroup {path} has no group record",
                                 CLEANUP))
    if not out:
        out.append(Check("leftovers", OK, f"nothing left by crashed runs ({len(records)} "
                                          f"active group(s){nft_note})"))
    return out
