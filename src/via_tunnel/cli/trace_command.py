"""The ``trace`` subcommand: ``via-tunnel trace [LAUNCH OPTIONS] IFACE [-- CMD [ARG...]]``.

Its command line is the launch form with CMD optional, so it is read by the launch form's
own parser (:func:`launch_form.parse`): the same options, the same rules (options before
IFACE, CMD untouched) and the same usage errors (exit 2). The typer parameters declared here
are generated from :data:`launch_form.LAUNCH_OPTIONS` and only describe that command line to
``--help``, the shell completions and the man page test; typer never parses it.
"""

from __future__ import annotations

import enum
import inspect
from typing import Annotated, Any

import typer
import typer.core

from via_tunnel.core.errors import UsageError
from via_tunnel.core.launch_form import LAUNCH_OPTIONS, LaunchArgs, parse, usage

USAGE = usage("trace", require_cmd=False)
HELP = ("Show the group's new connections live (pid, command, destination, interface, "
        "source address) and the kill switch's drops, also while IFACE is down or gone, "
        "until Ctrl-C or until CMD exits. The options are the launch form's and apply to "
        "the launch of CMD.")
CONTEXT = {"ignore_unknown_options": True}
_META = "via_tunnel.launch_form"


class LaunchFormCommand(typer.core.TyperCommand):
    """A subcommand whose arguments are read by the launch form's parser; typer's own
    parser is used only to show ``--help``."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        try:
            ctx.meta[_META] = parse(args, require_cmd=False, usage_line=USAGE)
        except UsageError:
            if "--help" in (args[:args.index("--")] if "--" in args else args):
                return super().parse_args(ctx, args)  # prints the help and exits
            raise
        return []


def trace(ctx: typer.Context, **_described: object) -> None:
    from via_tunnel.trace import session

    launch: LaunchArgs = ctx.meta[_META]
    raise typer.Exit(session.run(launch))


def _described_parameters() -> list[inspect.Parameter]:
    """IFACE, CMD and the launch options as typer parameters, for the description only."""

    def param(name: str, annotation: Any, default: Any = inspect.Parameter.empty
              ) -> inspect.Parameter:
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                 annotation=annotation)

    params = [
        param("ctx", typer.Context),
        param("iface", Annotated[str, typer.Argument(
            metavar="IFACE", help="The interface whose group to watch (it may be down or gone).")]),
        param("cmd", Annotated[list[str] | None, typer.Argument(
            metavar="CMD", help="After --: a command to start in the group while tracing.")], None),
    ]
    for o in LAUNCH_OPTIONS:
        info = typer.Option(o.name, help=o.help, metavar=o.metavar)
        if o.metavar is None:
            params.append(param(o.name[2:], Annotated[bool, info], False))
        elif o.choices:
            choice = enum.Enum(o.name[2:], {c: c for c in o.choices})  # type: ignore[misc]
            params.append(param(o.name[2:], Annotated[choice | None, info], None))
        else:
            kind = list[str] if o.repeatable else str
            params.append(param(o.name[2:], Annotated[kind | None, info], None))
    return params


trace.__signature__ = inspect.Signature(_described_parameters())  # type: ignore[attr-defined]
trace.__doc__ = HELP
