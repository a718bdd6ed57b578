"""Subcommands (everything but the launch form), built with typer."""

from __future__ import annotations

import json
import os
import sys
from typing import Annotated

import typer

from via_tunnel import __version__
from via_tunnel.cli import status_command, trace_command
from via_tunnel.core.errors import DEBUG_HINT, EXIT_USAGE, ViaTunnelError

HELP = (
    "Run a program so that all of its traffic leaves through one interface.\n\n"
    "Launch form: via-tunnel [--gateway ADDR] [--dns ADDR]... [--ipv6 auto|tunnel|block] "
    "[--user NAME] IFACE -- CMD [ARG...]  (see man via-tunnel)"
)
app = typer.Typer(add_completion=False, no_args_is_help=True, help=HELP,
                  rich_markup_mode=None)
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


@app.command()
def status(json_out: Annotated[bool, typer.Option("--json", help="Machine-readable.")] = False
           ) -> None:
    """List the active groups: interface and its state, traffic counters, member PIDs and
    commands, since when."""
    status_command.show(json_out)


@app.command()
def doctor(
    iface: Annotated[str | None, typer.Argument(
        help="Also check this interface: up, addresses, next hop, MTU.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Machine-readable.")] = False,
) -> None:
    """Check this machine for what via-tunnel needs and what gets in its way; one line per
    check (OK/WARN/FAIL) with the fix. Exits 0 when nothing fails."""
    from via_tunnel.doctor import run as doctor_run

    raise typer.Exit(doctor_run.run(iface, json_out=json_out))


# trace [LAUNCH OPTIONS] IFACE [-- CMD]: read by the launch form's parser (see there).
app.command("trace", cls=trace_command.LaunchFormCommand, help=trace_command.HELP,
            context_settings=trace_command.CONTEXT)(trace_command.trace)


@app.command()
def cleanup() -> None:
    """Remove whatever a crashed or killed run left behind. Safe at any time: a group that
    still has processes is never touched."""
    from via_tunnel.core.settings import Settings
    from via_tunnel.group import lifecycle, state

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
    from via_tunnel.lab.demo import run_demo

    raise typer.Exit(run_demo(keep=keep))


@app.command()
def daemon(
    socket: Annotated[str | None, typer.Option(
        "--socket", help="Socket path (default $VIA_TUNNEL_SOCKET or "
                         "/run/via-tunnel/daemon.sock; ignored under socket activation).")] = None,
    config: Annotated[str | None, typer.Option(
        "--config", help="Policy file (default $VIA_TUNNEL_CONFIG or "
                         "/etc/via-tunnel/config.toml).")] = None,
) -> None:
    """Serve unprivileged launches: a root service on a Unix socket that puts a caller's own
    process into an interface's group when the policy allows its user. SIGHUP re-reads the
    policy."""
    from via_tunnel.daemon.server import run

    raise typer.Exit(run(socket, config))


desktop_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                          help="Desktop launchers (.desktop entries) that start an app via an "
                               "interface.")
app.add_typer(desktop_app, name="desktop")


@desktop_app.command("install")
def desktop_install(
    entry: Annotated[str, typer.Argument(help="APP.desktop (an installed entry) or a path.")],
    iface: Annotated[str, typer.Argument(help="The interface to launch it through.")],
) -> None:
    """Write a user copy of ENTRY whose Exec= lines run via IFACE and whose name says so."""
    from via_tunnel.cli import desktop

    print(desktop.install(entry, iface))


@desktop_app.command("remove")
def desktop_remove(
    entry: Annotated[str, typer.Argument(help="APP.desktop, as given to install.")],
) -> None:
    """Remove a copy written by `desktop install` (never any other file)."""
    from via_tunnel.cli import desktop

    print(desktop.remove(entry))


@desktop_app.command("list")
def desktop_list() -> None:
    """List the entries written by `desktop install` and their interfaces."""
    from via_tunnel.cli import desktop

    rows = desktop.list_installed()
    for path, iface in rows:
        print(f"{os.path.basename(path)}  via {iface}  ({path})")
    if not rows:
        print("no desktop entries installed by via-tunnel")


gateway_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                          help="The VPS end: masquerade a tunnel out of WAN, forward WAN ports "
                               "to addresses behind it.")
app.add_typer(gateway_app, name="gateway")


@gateway_app.command("up")
def gateway_up(
    tun: Annotated[str, typer.Argument(help="The tunnel interface (e.g. tun0).")],
    wan: Annotated[str | None, typer.Option("--wan", help="The public interface.")] = None,
    subnet: Annotated[str | None, typer.Option(
        "--subnet", help="IPv4 CIDR to masquerade (default: the subnet of the tunnel's "
                         "address; on a point-to-point tunnel, the peer's prefix).")] = None,
    forward: Annotated[list[str] | None, typer.Option(
        "--forward", help="PROTO:PORT[-PORT]:DEST[:DPORT] (repeatable).")] = None,
) -> None:
    """Set up (or update) the gateway for TUN; settings default to table gateway.TUN of
    /etc/via-tunnel/config.toml. Running it twice changes nothing."""
    from via_tunnel.core.settings import Settings
    from via_tunnel.gateway import apply as gateway_apply

    cfg = gateway_apply.resolve(tun, wan=wan, subnet=subnet, forwards=forward)
    print(gateway_apply.up(cfg, Settings.from_env()))


@gateway_app.command("down")
def gateway_down(
    tun: Annotated[str, typer.Argument(help="The tunnel interface.")],
) -> None:
    """Remove exactly what `gateway up TUN` added, and restore the forwarding sysctls."""
    from via_tunnel.core.settings import Settings
    from via_tunnel.gateway import apply as gateway_apply

    print(gateway_apply.down(tun, Settings.from_env()))


@gateway_app.command("status")
def gateway_status(
    json_out: Annotated[bool, typer.Option("--json", help="Machine-readable.")] = False,
) -> None:
    """List the gateways that are up, with packet/byte counters per forward."""
    from via_tunnel.core.settings import Settings
    from via_tunnel.gateway import apply as gateway_apply

    gws = gateway_apply.status(Settings.from_env())
    if json_out:
        json.dump({"gateways": gws}, sys.stdout, indent=2)
        print()
        return
    if not gws:
        print("no gateways up")
        return

    def fmt(c: object) -> str:
        return "missing" if not isinstance(c, dict) else f"{c['packets']} pkts {c['bytes']} bytes"

    for g in gws:
        extra = "" if g["active"] else "  (rules missing: run `gateway up` again)"
        print(f"{g['tunnel']}  wan {g['wan']}  subnet {g['subnet']}{extra}")
        print(f"  out  {fmt(g['outbound'])}   replies in  {fmt(g['inbound_replies'])}")
        for f in g["forwards"]:
            print(f"  {f['spec']:<32} {fmt(f['counter'])}")


def run_app(args: list[str]) -> int:
    """Run the typer app; turn our errors into one line and exit code 125."""
    try:
        # In non-standalone mode click returns the code of typer.Exit instead of raising.
        rc = app(args=args, prog_name="via-tunnel", standalone_mode=False)
        if isinstance(rc, int):
            return rc
    except ViaTunnelError as exc:
        from via_tunnel.core.errors import report

        return report(exc, _debug or "--debug" in args)
    except typer.Exit as exc:
        return int(exc.exit_code or 0)
    except typer.Abort:
        return 130
    except Exception as exc:
        if isinstance(exc, _click_exceptions()):
            exc.show()  # type: ignore[attr-defined]
            return EXIT_USAGE
        from via_tunnel.core.errors import report

        return report(ViaTunnelError(f"internal error: {exc!r} ({DEBUG_HINT})"),
                      _debug or "--debug" in args)
    return 0


def _click_exceptions() -> tuple[type[Exception], ...]:
    """The ClickException classes typer may raise: recent typer vendors click as
    ``typer._click``, older typer uses the ``click`` package; both may be installed."""
    classes: list[type[Exception]] = []
    try:
        from typer import _click  # type: ignore[attr-defined]

        classes.append(_click.exceptions.ClickException)
    except ImportError:
        pass
    try:
        import click

        classes.append(click.exceptions.ClickException)
    except ImportError:
        pass
    return tuple(classes)

