"""One line of doctor's report (:class:`Check`) and the guard that turns a failing check
into one."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

from via_tunnel.core.errors import ViaTunnelError

OK = "ok"
WARN = "warn"
FAIL = "fail"
# What the report says in many places.
CLEANUP = "via-tunnel cleanup"
NEEDS_ROOT = "run doctor as root to check this"


class Check:
    """One line of the report. ``fix`` is None when there is nothing to do."""

    __slots__ = ("detail", "fix", "name", "status")

    def __init__(self, name: str, status: str, detail: str, fix: str | None = None) -> None:
        if status not in (OK, WARN, FAIL):
            raise ValueError(f"bad status {status!r}")
        self.name = name
        self.status = status
        self.detail = detail
        self.fix = fix

    def to_dict(self) -> dict[str, str | None]:
        return {"name": self.name, "status": self.status, "detail": self.detail,
                "fix": self.fix}

    def __repr__(self) -> str:
        return f"Check({self.name!r}, {self.status!r}, {self.detail!r}, {self.fix!r})"


CheckFn = Callable[[], Iterable[Check]]


def is_root() -> bool:
    return os.geteuid() == 0


def guarded(name: str, fn: CheckFn) -> list[Check]:
    """Run one check function; turn whatever it raises into a line of the report.

    A ViaTunnelError is an answer ("cannot read ..."), reported as FAIL with its message; any
    other exception is a bug in doctor, reported as FAIL too (never hidden, never a
    traceback).
    """
    try:
        return list(fn())
    except ViaTunnelError as exc:
        return [Check(name, FAIL, exc.message)]
    except Exception as exc:
        return [Check(name, FAIL, f"doctor could not check this: {exc!r}",
                      "report this as a bug in via-tunnel doctor")]
