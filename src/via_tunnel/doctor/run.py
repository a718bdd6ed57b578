"""``via-tunnel doctor [IFACE] [--json]``: what via-tunnel needs and what gets in its way.

Each check gives one line: a status (OK, WARN, FAIL), what it found, and when something is
wrong, the fix. The checks themselves live in :mod:`via_tunnel.doctor.checks` (the machine),
:mod:`via_tunnel.doctor.rules` (ip rules against our footprint, pure) and
:mod:`via_tunnel.doctor.iface` (one interface); this module runs them and reports.

Contract:
* Read-only. Doctor changes nothing: it reads files, sysctls and netlink dumps. The kernel
  feature probe sends nft a transaction that ends with a command that must fail, so the kernel
  checks every part of it and then commits none of it (no table, no event).
* Never a traceback: a check that cannot run says why, as WARN when it needs root (non-root
  users get what can be checked without it), as FAIL when doctor itself broke.
* Exit status: 0 when no check FAILs, 1 otherwise.
* ``--json`` prints one object, stable (new checks may appear; fields never change meaning)::

    {"version": 1, "ok": true,
     "checks": [{"name": "cgroup2", "status": "ok", "detail": "...", "fix": null}, ...]}

  ``status`` is ``"ok"``, ``"warn"`` or ``"fail"``; ``fix`` is a string or null; ``ok`` is
  false exactly when some status is ``"fail"``. Names are stable identifiers such as
  ``cgroup2``, ``nft-binding``, ``kernel:socket-cgroupv2``, ``rp_filter``, ``ip-rules``,
  ``networkd``, ``leftovers``, ``daemon``, ``iface:up``.

Environment: besides via-tunnel's own (VIA_TUNNEL_STATE_DIR, VIA_TUNNEL_CGROUP,
VIA_TUNNEL_SOCKET), ``VIA_TUNNEL_NETWORKD_CONF_DIR`` replaces /etc/systemd as the place where
systemd-networkd's configuration and unit enablement are looked for (tests use it).

Typer is never imported here: commands.py calls :func:`run`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from typing import TextIO

from via_tunnel.doctor.check import FAIL, Check, guarded

JSON_VERSION = 1


def collect(iface: str | None) -> list[Check]:
    """Every check, in report order: the machine first, then ``iface`` if given."""
    from via_tunnel.doctor import checks as doctor_checks
    from via_tunnel.doctor import iface as doctor_iface

    checks: list[Check] = []
    for name, fn in doctor_checks.machine_checks():
        checks.extend(guarded(name, fn))
    if iface is not None:
        checks.extend(guarded("iface", lambda: doctor_iface.checks(iface)))
    return checks


def exit_code(checks: Iterable[Check]) -> int:
    return 1 if any(c.status == FAIL for c in checks) else 0


def render_text(checks: Iterable[Check], out: TextIO) -> None:
    """One line per check: ``STATUS  name: detail`` and, when there is one, ``-- fix: ...``."""
    for c in checks:
        line = f"{c.status.upper():<4}  {c.name}: {c.detail}"
        if c.fix:
            line += f"  -- fix: {c.fix}"
        print(line, file=out)


def render_json(checks: list[Check], out: TextIO) -> None:
    json.dump({"version": JSON_VERSION, "ok": exit_code(checks) == 0,
               "checks": [c.to_dict() for c in checks]}, out, indent=2)
    print(file=out)


def run(iface: str | None, *, json_out: bool) -> int:
    """Run every check, print the report (text or JSON) and return the exit status."""
    checks = collect(iface)
    if json_out:
        render_json(checks, sys.stdout)
    else:
        render_text(checks, sys.stdout)
    return exit_code(checks)
