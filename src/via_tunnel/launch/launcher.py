"""``via-tunnel [OPTIONS] IFACE [--] CMD [ARG...]``: the hot path.

Kept free of heavy imports: a warm launch (the group already exists) reads one record,
writes one PID into ``cgroup.procs`` and execs; rtnetlink and libnftables are imported only
when a group has to be created. CMD replaces this process (same PID, exit status, signals,
terminal), so no Python process stays resident per launched program.
"""

from __future__ import annotations

import os
import sys

from via_tunnel.core.errors import (
    UsageError,
    ViaTunnelError,
)
from via_tunnel.core.names import validate_ifname
from via_tunnel.core.wire import IPV6_MODES
from via_tunnel.kernel.execs import exec_in_place, resolve
from via_tunnel.kernel.ifflags import check_link

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs the hot path
if TYPE_CHECKING:
    from via_tunnel.core.settings import Settings
    from via_tunnel.group.state import GroupRecord



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


def _usage() -> str:
    parts = ["usage: via-tunnel"]
    for o in LAUNCH_OPTIONS:
        value = "" if o.metavar is None else f" {o.metavar}"
        parts.append(f"[{o.name}{value}]{'...' if o.repeatable else ''}")
    return " ".join([*parts, "IFACE -- CMD [ARG...]"])


USAGE = _usage()


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


def parse(args: list[str]) -> LaunchArgs:
    """Parse the launch form (options from :data:`LAUNCH_OPTIONS`). Options come before
    IFACE; everything after ``--`` (or after IFACE) belongs to CMD untouched."""
    values: dict[str, list[str]] = {}
    i = 0
    while i < len(args) and args[i].startswith("-") and args[i] != "--":
        name, eq, val = args[i].partition("=")
        opt = _BY_NAME.get(name)
        if opt is None or (opt.metavar is None and eq):
            raise UsageError(f"unknown option {args[i]!r}\n{USAGE}")
        if opt.metavar is None:
            val = ""
        elif not eq:
            if i + 1 >= len(args):
                raise UsageError(f"option {name} needs a value\n{USAGE}")
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
        raise UsageError(f"missing interface\n{USAGE}")
    iface = validate_ifname(args[i])
    rest = args[i + 1:]
    if rest and rest[0] == "--":
        rest = rest[1:]
    if not rest:
        raise UsageError(f"missing command to run\n{USAGE}")

    def one(name: str) -> str | None:
        return values[name][-1] if name in values else None

    return LaunchArgs(iface=iface, argv=rest, gateway=one("--gateway"),
                      ipv6=one("--ipv6") or "auto", debug="--debug" in values,
                      dns=tuple(values.get("--dns", ())), user=one("--user"))


def run(args: LaunchArgs) -> None:
    """Put this process into IFACE's group and exec CMD. Returns only by raising."""
    from via_tunnel.core.settings import Settings
    from via_tunnel.group import state
    from via_tunnel.kernel import cgroup

    path = resolve(args.argv[0])
    if os.geteuid() != 0:
        from via_tunnel.group import client

        if args.user is not None:
            raise ViaTunnelError("--user needs root (it runs CMD as another user)")
        answer = client.join(args.iface, args.gateway, args.ipv6, args.dns)
        if answer.get("dns_refused"):
            warn_if_dns_refused(args.iface)
        _warn_if_running(path, os.getuid(), args.iface)
        exec_in_place(path, args.argv)
    from via_tunnel.launch import privdrop

    target = privdrop.target_from_env(args.user)  # sudo/doas/pkexec or --user: CMD not as root
    settings = Settings.from_env()
    check_link(args.iface)
    with state.locked(settings) as lock_fd:
        rec = state.load(settings, args.iface)
        early = None
        if rec is None or not rec.usable() or args.gateway or args.dns \
                or args.ipv6 != "auto":
            if rec is None:  # cold: the watcher first (it waits for the lock), then the join
                from via_tunnel.group.early_join import EarlyJoin

                _ensure_watcher(settings, args.iface, lock_fd)
                early = EarlyJoin(settings, args.iface)
            try:
                rec = _ensure(settings, args)
                if early is not None:
                    early.wait()
            except BaseException:
                if early is not None:
                    early.undo()
                raise
        if early is None:  # (a cold launch started its watcher above)
            _ensure_watcher(settings, args.iface, lock_fd)
            cgroup.join(rec.cgroup)
        # The lock is released when lock_fd closes here (CLOEXEC would do it at exec too).
    if rec.dns4 is None and rec.dns6 is None:
        warn_if_dns_refused(args.iface)
    if target is not None:
        privdrop.drop(target)  # after joining (needs root), right before exec
    _warn_if_running(path, os.getuid(), args.iface)
    exec_in_place(path, args.argv)


def _ensure_watcher(settings: Settings, iface: str, lock_fd: int) -> None:
    """Start the group's watcher unless one is alive (it holds the group's watch lock)."""
    from via_tunnel.group import state

    if not state.watcher_alive(settings, iface):
        from via_tunnel.group import watcher

        watcher.spawn(settings, iface, close_fds=(lock_fd,))


def _ensure(settings: Settings, args: LaunchArgs) -> GroupRecord:
    """Create the group, or check that this run's options fit the existing one. The
    config's defaults for the interface (dns, ipv6, gateway) apply where the command line is
    silent, as they do for the daemon's users."""
    from via_tunnel.core.settings import config_path
    from via_tunnel.group import lifecycle

    gateway, ipv6, dns = args.gateway, args.ipv6, args.dns
    if os.path.exists(config_path()):  # (tomllib is not free: only when there is one)
        from via_tunnel.core import policy

        req = policy.effective(policy.Request(args.iface, gateway, ipv6, dns),
                               policy.load(config_path()).interfaces.get(args.iface))
        gateway, ipv6, dns = req.gateway, req.ipv6, req.dns
    return lifecycle.ensure_group(settings, args.iface, gateway=gateway,
                                  ipv6=ipv6, dns=dns)  # type: ignore[arg-type]


def _warn_if_running(path: str, uid: int, iface: str) -> None:
    from via_tunnel.kernel.instances import warn_if_running

    warn_if_running(path, uid, iface)


def warn_if_dns_refused(iface: str) -> None:
    """Say once, on stderr, that the system's local DNS stub is refused to the group."""
    from via_tunnel.kernel.resolvers import system_uses_local_stub

    if system_uses_local_stub():
        print(f"via-tunnel: no resolver known for {iface}: DNS through this host's local "
              f"resolver is refused (it would leak); pass --dns ADDR", file=sys.stderr)
