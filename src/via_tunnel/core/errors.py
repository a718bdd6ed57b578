"""One exception family for everything via-tunnel reports to a user.

The CLI edge turns a :class:`ViaTunnelError` into one line on stderr and its exit code; only
``--debug`` shows a traceback. Exit codes follow ``env``/``nice``/``timeout``.
"""

from __future__ import annotations

import sys

EXIT_FAILURE = 125  # via-tunnel itself failed
EXIT_CANNOT_EXEC = 126  # CMD found but not executable
EXIT_NOT_FOUND = 127  # CMD not found
EXIT_USAGE = 2  # bad command line


DEBUG_HINT = "run again as `via-tunnel --debug ...` for the traceback"


class ViaTunnelError(Exception):
    """A failure with a message meant for the user and the exit code to leave with."""

    exit_code = EXIT_FAILURE

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code

    @property
    def message(self) -> str:
        return str(self.args[0])


class UsageError(ViaTunnelError):
    """The command line itself is wrong (exit 2)."""

    exit_code = EXIT_USAGE


class KernelError(ViaTunnelError):
    """The kernel (netlink, nftables, cgroupfs) refused a change; nothing half-applied remains."""


def report(exc: ViaTunnelError, debug: bool) -> int:
    """Print ``exc`` as one line on stderr (with the traceback under ``--debug``) and
    return its exit code."""
    if debug:
        import traceback

        traceback.print_exc()
    print(f"via-tunnel: {exc.message}", file=sys.stderr)
    return exc.exit_code
