"""Entry point. The launch form is parsed by hand (it is the hot path and must not pay for
typer's import), and so are the two plain forms of ``status`` (scripts and prompts run it
often: :mod:`status_command`); every other subcommand goes through the typer app in
:mod:`commands`."""

from __future__ import annotations

import os
import sys

from via_tunnel.core.errors import DEBUG_HINT, EXIT_FAILURE, ViaTunnelError, report

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs the hot path
if TYPE_CHECKING:
    from collections.abc import Callable

SUBCOMMANDS = frozenset({"status", "cleanup", "demo", "version", "gateway", "daemon",
                         "desktop", "doctor", "trace"})


def _is_subcommand(args: list[str]) -> bool:
    """``via-tunnel status`` is the subcommand; ``via-tunnel status -- CMD`` would launch
    through an interface that happens to be called "status". A leading ``--debug`` is the
    root option of both forms (``via-tunnel --debug status``)."""
    if args[:1] == ["--debug"]:
        args = args[1:]
    if not args or args[0] not in SUBCOMMANDS:
        return not args or args[0] in ("-h", "--help", "--version")
    return not (len(args) > 1 and args[1] == "--")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if _is_subcommand(args):
        from via_tunnel.cli import status_command

        json_out = status_command.fast_form(args)
        if json_out is not None:
            return _guarded(lambda: status_command.show(json_out), "--debug" in args)
        from via_tunnel.cli.commands import run_app

        return run_app(args)
    debug = "--debug" in args[: args.index("--")] if "--" in args else "--debug" in args
    return _guarded(lambda: _launch(args), debug)


def _launch(args: list[str]) -> int:
    from via_tunnel.core.launch_form import parse
    from via_tunnel.launch import launcher

    launcher.run(parse(args))
    return EXIT_FAILURE  # not reached: launch.run execs or raises


def _guarded(action: Callable[[], int | None], debug: bool) -> int:
    """Run ``action``; our errors and bugs become one line (a traceback with --debug)."""
    try:
        return action() or 0
    except ViaTunnelError as exc:
        return report(exc, debug)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a bug: still one line unless --debug
        return report(ViaTunnelError(f"internal error: {exc!r} ({DEBUG_HINT})"), debug)


if __name__ == "__main__":
    os._exit(main())
