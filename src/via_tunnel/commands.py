"""Subcommands (everything but the launch form), built with typer."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Annotated

import typer

from via_tunnel import __version__
from via_tunnel.errors import EXIT_USAGE, ViaTunnelError

HELP = (
    "Run a program so that all of its traffic leaves through one interface.\n\n"
    "Launch form: via-tunnel [--gateway ADDR] [--ipv6 MODE] IFACE -- CMD [ARG...]"
)
app = typer.Typer(add_completion=False, no_args_is_help=True, help=HELP)
_debug = False


@app.callback(invoke_without_command=True)
def _root(
    version: Annotated[bool, typer.Option("--version", help="Print the version.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
) -> None:
    global _debug
    _debug = debug
    if version:
        print(__version__)
        raise typer.Exit(0)


@app.command()
def version() -> None:
    """Print the version."""
    print(__version__)


def _group_info() -> list[dict[str, object]]:
    from via_tunnel import cgroup, state
    from via_tunnel.settings import Settings

    settings = Settings.from_env()
    out = []
    for rec in state.load_all(settings):
        members = []
        for pid in cgroup.members(rec.cgroup):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read().rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            members.append({"pid": pid, "command": cmd})
        out.append({
            "interface": rec.iface, "since": rec.created, "mark": f"0x{rec.mark:08x}",
            "table": rec.table, "cgroup": rec.cgroup, "gateway": rec.gateway4,
            "ipv6": rec.ipv6, "watcher": state.watcher_pid(settings, rec.iface),
            "members": members,
        })
    return out


@app.command()
def status(json_out: Annotated[bool, typer.Option("--json", help="Machine-readable.")] = False
           ) -> None:
    """List the active groups: interface, member PIDs and commands, since when."""
    groups = _group_info()
    if json_out:
        json.dump({"groups": groups}, sys.stdout, indent=2)
        print()
        return
    if not groups:
        print("no active groups")
        return
    for g in groups:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(g["since"])))  # type: ignore[arg-type]
        extra = "" if g["watcher"] else "  (no watcher: `via-tunnel cleanup` after it empties)"
        print(f"{g['interface']}  since {since}  table {g['table']}  mark {g['mark']}{extra}")
        for m in g["members"]:  # type: ignore[attr-defined]
            print(f"  {m['pid']:>7}  {m['command']}")


@app.command()
def cleanup() -> None:
    """Remove whatever a crashed or killed run left behind. Safe at any time: a group that
    still has processes is never touched."""
    from via_tunnel import lifecycle, state
    from via_tunnel.settings import Settings

    if os.geteuid() != 0:
        raise ViaTunnelError("cleanup needs root")
    settings = Settings.from_env()
    with state.locked(settings):
        done = lifecycle.cleanup(settings)
    for line in done:
        print(line)
    if not done:
        print("nothing to clean up")


@app.command()
def demo(
    keep: Annotated[bool, typer.Option(help="Leave the lab's namespaces up.")] = False,
) -> None:
    """Build a throwaway lab of network namespaces and show via-tunnel at work."""
    from via_tunnel.demo import run_demo

    raise typer.Exit(run_demo(keep=keep))


def run_app(args: list[str]) -> int:
    """Run the typer app; turn our errors into one line and exit code 125."""
    try:
        # In non-standalone mode click returns the code of typer.Exit instead of raising.
        rc = app(args=args, prog_name="via-tunnel", standalone_mode=False)
        if isinstance(rc, int):
            return rc
    except ViaTunnelError as exc:
        from via_tunnel.cli import report

        return report(exc, _debug or "--debug" in args)
    except typer.Exit as exc:
        return int(exc.exit_code or 0)
    except typer.Abort:
        return 130
    except Exception as exc:
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            return EXIT_USAGE
        from via_tunnel.cli import report

        return report(ViaTunnelError(f"internal error: {exc!r} (run with --debug)"),
                      _debug or "--debug" in args)
    return 0
