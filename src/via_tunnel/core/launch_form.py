"""The launch form, ``via-tunnel [OPTIONS] IFACE [--] CMD [ARG...]``: its options and its
parser (pure). The launcher, ``trace [OPTIONS] IFACE [-- CMD]`` (the same form with CMD
optional), the completions and the man page test all read :data:`LAUNCH_OPTIONS`, so the
form is described once.

Standard library only, nothing heavy: on the launch hot path.
"""

from __future__ import annotations

from via_tunnel.core.errors import UsageError
from via_tunnel.core.names import validate_ifname
from via_tunnel.core.wire import IPV6_MODES


class LaunchOption:
    """One option of the launch form. :data:`LAUNCH_OPTIONS` is the single description that
    :func:`parse`, the usage line, the shell completions (``completion_gen``) and the man
    page test read. ``metavar`` is None for a flag; ``complete`` says what a shell should
    offer for the value ("user", or "" for nothing; ``choices`` when there are any)."""

    __slots__ = ("choices", "complete", "help", "metavar", "name", "repeatable")

    def __init__(self, name: str, metavar: str | None, help: str, *,
                 repeatable: bool = False, choices: tuple[str, ...] = (),
                 complete: str = "") -> None:
        self.name = name
        self.metavar = metavar
        self.help = help
        self.repeatable = repeatable
        self.choices = choices
        self.complete = complete


LAUNCH_OPTIONS = (
    LaunchOption("--gateway", "ADDR", "Next hop on a broadcast interface (default: the next "
                 "hop of a main-table route through IFACE)."),
    LaunchOption("--dns", "ADDR", "Send every DNS query of the group to ADDR through IFACE "
                 "(IPv4 and/or IPv6).", repeatable=True),
    LaunchOption("--ipv6", "|".join(IPV6_MODES), "IPv6 of the group: through IFACE when it "
                 "has IPv6 (auto), required (tunnel) or refused (block).", choices=IPV6_MODES),
    LaunchOption("--user", "NAME", "Run CMD as this user (root only).", complete="user"),
    LaunchOption("--debug", None, "Show a traceback with errors."),
)
_BY_NAME = {o.name: o for o in LAUNCH_OPTIONS}


def usage(subcommand: str = "", *, require_cmd: bool = True) -> str:
    """The usage line of the launch form (``subcommand``: of a subcommand that takes it,
    e.g. "trace"; ``require_cmd=False``: CMD is optional there)."""
    parts = ["usage: via-tunnel", *([subcommand] if subcommand else [])]
    for o in LAUNCH_OPTIONS:
        value = "" if o.metavar is None else f" {o.metavar}"
        parts.append(f"[{o.name}{value}]{'...' if o.repeatable else ''}")
    tail = "IFACE -- CMD [ARG...]" if require_cmd else "IFACE [-- CMD [ARG...]]"
    return " ".join([*parts, tail])


USAGE = usage()


class LaunchArgs:
    """The parsed launch form."""

    __slots__ = ("argv", "debug", "dns", "gateway", "iface", "ipv6", "user")

    def __init__(self, iface: str, argv: list[str], gateway: str | None = None,
                 ipv6: str = "auto", debug: bool = False,
                 dns: tuple[str, ...] = (), user: str | None = None) -> None:
        self.iface = iface
        self.user = user  # --user: run CMD as this user (root only)
        self.dns = dns
        self.argv = argv
        self.gateway = gateway
        self.ipv6 = ipv6
        self.debug = debug


def parse(args: list[str], *, require_cmd: bool = True, usage_line: str = USAGE
          ) -> LaunchArgs:
    """Parse the launch form (options from :data:`LAUNCH_OPTIONS`). Options come before
    IFACE; everything after ``--`` (or after IFACE) belongs to CMD untouched.

    With ``require_cmd=False`` CMD may be missing (``argv`` is then empty), and a word right
    after IFACE that looks like an option is refused rather than taken for CMD: there, an
    option after IFACE is far likelier than a command whose name starts with "-".
    Usage errors end with ``usage_line``."""
    values: dict[str, list[str]] = {}
    i = 0
    while i < len(args) and args[i].startswith("-") and args[i] != "--":
        name, eq, val = args[i].partition("=")
        opt = _BY_NAME.get(name)
        if opt is None or (opt.metavar is None and eq):
            raise UsageError(f"unknown option {args[i]!r}\n{usage_line}")
        if opt.metavar is None:
            val = ""
        elif not eq:
            if i + 1 >= len(args):
                raise UsageError(f"option {name} needs a value\n{usage_line}")
            i += 1
            val = args[i]
        if opt.choices and val not in opt.choices:
            raise UsageError(f"{name} must be one of {', '.join(opt.choices)}")
        if opt.repeatable:
            values.setdefault(name, []).append(val)
        else:
            values[name] = [val]  # the last one wins
        i += 1
    if i >= len(args) or args[i] == "--":
        raise UsageError(f"missing interface\n{usage_line}")
    iface = validate_ifname(args[i])
    rest = args[i + 1:]
    if rest and rest[0] == "--":
        rest = rest[1:]
    elif rest and rest[0].startswith("-") and not require_cmd:
        name = rest[0].partition("=")[0]
        raise UsageError(f"{name} goes before IFACE\n{usage_line}" if name in _BY_NAME
                         else f"unknown option {rest[0]!r}\n{usage_line}")
    if not rest and require_cmd:
        raise UsageError(f"missing command to run\n{usage_line}")

    def one(name: str) -> str | None:
        return values[name][-1] if name in values else None

    return LaunchArgs(iface=iface, argv=rest, gateway=one("--gateway"),
                      ipv6=one("--ipv6") or "auto", debug="--debug" in values,
                      dns=tuple(values.get("--dns", ())), user=one("--user"))


def options_argv(args: LaunchArgs) -> list[str]:
    """The options of ``args`` as a command line that :func:`parse` reads back the same
    (what a front end that has the launcher start CMD, such as trace, passes on). Each
    option's value is the attribute of :class:`LaunchArgs` named after it; an option left
    at its default is not written."""
    out: list[str] = []
    default = LaunchArgs(iface="", argv=[])
    for o in LAUNCH_OPTIONS:
        value = getattr(args, o.name[2:])
        if value == getattr(default, o.name[2:]):
            continue
        if o.metavar is None:
            out.append(o.name)
        elif o.repeatable:
            out += [part for v in value for part in (o.name, v)]
        else:
            out += [o.name, value]
    return out
