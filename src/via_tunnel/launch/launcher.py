"""``via-tunnel [OPTIONS] IFACE [--] CMD [ARG...]``: the hot path.

Kept free of heavy imports: a warm launch (the group already exists) reads one record,
writes one PID into ``cgroup.procs`` and execs; rtnetlink and libnftables are imported only
when a group has to be created. CMD replaces this process (same PID, exit status, signals,
terminal), so no Python process stays resident per launched program.
"""

from __future__ import annotations

import os
import sys

from via_tunnel.core.errors import ViaTunnelError
from via_tunnel.core.launch_form import LaunchArgs
from via_tunnel.kernel.execs import exec_in_place, resolve
from via_tunnel.kernel.ifflags import check_link

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs the hot path
if TYPE_CHECKING:
    from via_tunnel.core.settings import Settings
    from via_tunnel.group.state import GroupRecord



def run(args: LaunchArgs) -> None:
    """Put this process into IFACE's group and exec CMD. Returns only by raising."""
    from via_tunnel.core.settings import Settings
    from via_tunnel.group import state

    path = resolve(args.argv[0])
    if os.geteuid() != 0:
        from via_tunnel.group import client

        if args.user is not None:
            raise ViaTunnelError("--user needs root (it runs CMD as another user)")
        answer = client.join(args.iface, args.gateway, args.ipv6, args.dns)
        if answer.get("dns_refused"):
            warn_if_dns_refused(args.iface)
        _warn_if_running(path, os.getuid(), args.iface)
        _warn_if_inherited(args.iface)
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

                _ensure_watcher(settings, lock_fd, cold=True)
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
            _ensure_watcher(settings, lock_fd, cold=False)
            state.enter(settings, rec)
        # The lock is released when lock_fd closes here (CLOEXEC would do it at exec too).
    if rec.dns4 is None and rec.dns6 is None:
        warn_if_dns_refused(args.iface)
    if target is not None:
        privdrop.drop(target)  # after joining (needs root), right before exec
    _warn_if_running(path, os.getuid(), args.iface)
    _warn_if_inherited(args.iface)
    exec_in_place(path, args.argv)


def _warn_if_inherited(iface: str) -> None:
    """One line when CMD would inherit an internet socket opened outside the group."""
    from via_tunnel.kernel.inherited import warning

    line = warning(iface)
    if line is not None:
        print(line, file=sys.stderr)


def _ensure_watcher(settings: Settings, lock_fd: int, *, cold: bool) -> None:
    """Start the instance's watcher unless one is alive (it holds the watch lock); a cold
    launch wakes a live one instead, which then waits for this launch under the global
    lock and watches its group (or removes what it left, if it fails or is killed)."""
    from via_tunnel.group import state

    if not state.watcher_alive(settings):
        from via_tunnel.group import watcher

        watcher.spawn(settings, close_fds=(lock_fd,))
    elif cold:
        state.poke(settings)


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
                                  ipv6=ipv6,  # type: ignore[arg-type]
                                  dns=dns, first_pid=os.getpid())


def _warn_if_running(path: str, uid: int, iface: str) -> None:
    from via_tunnel.core.settings import config_path
    from via_tunnel.kernel.instances import warn_if_running

    warn_if_running(path, uid, iface, config_path())


def warn_if_dns_refused(iface: str) -> None:
    """Say once, on stderr, that the system's local DNS stub is refused to the group."""
    from via_tunnel.kernel.resolvers import system_uses_local_stub

    if system_uses_local_stub():
        print(f"via-tunnel: no resolver known for {iface}: DNS through this host's local "
              f"resolver is refused (it would leak); pass --dns ADDR", file=sys.stderr)
