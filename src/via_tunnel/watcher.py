"""The per-group watcher of the direct (root) launcher.

CMD is exec'd in place, so nothing of ours stays inside the group. One small process per
group, outside it, waits for ``cgroup.events`` to say "populated 0" and then tears the group
down under the global lock. It is started by double fork from the launcher: detached from
the terminal (new session, stdio on /dev/null, SIGHUP ignored) and moved to the cgroup2
root, so closing the terminal or its session scope does not take it along. It holds
``<iface>.watch`` locked for its whole life: a launcher that can take that lock knows the
watcher is gone and starts another; ``via-tunnel cleanup`` recovers if none comes.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import signal
import sys
from typing import Any

from via_tunnel import cgroup, lifecycle, state
from via_tunnel.settings import Settings


def spawn(settings: Settings, iface: str, close_fds: tuple[int, ...] = ()) -> None:
    """Start a detached watcher for ``iface`` and return once it holds its watch lock."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # first child: fork the watcher and leave at once, so CMD never sees it
        try:
            os.close(rfd)
            for fd in close_fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            os.setsid()
            if os.fork() == 0:
                _run(settings, iface, wfd)
                os._exit(0)
        finally:
            os._exit(0)
    os.close(wfd)
    os.waitpid(pid, 0)
    os.read(rfd, 1)  # b"" if the watcher died before it was ready: cleanup recovers
    os.close(rfd)


def _run(settings: Settings, iface: str, ready_fd: int) -> None:
    try:
        fd = os.open(state.watcher_lock_path(settings, iface),
                     os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())  # for `status` and for tests
        os.write(ready_fd, b"1")  # the launcher may go on: the watch lock is held
        os.close(ready_fd)
        _detach()  # after "ready": moving between cgroups costs ~10 ms (RCU grace period)
        watch(settings, iface)
    except BaseException as exc:
        _log(settings, iface, exc)
    finally:
        os._exit(0)


def _log(settings: Settings, iface: str, exc: BaseException) -> None:
    """Nobody is there to report to: leave a trace in the state dir."""
    with contextlib.suppress(Exception), open(
        os.path.join(settings.state_dir, "watcher-errors.log"), "a"
    ) as log:
        log.write(f"{iface}: {exc!r}\n")


def _detach() -> None:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    with contextlib.suppress(Exception):
        mount = cgroup.cgroup2_mount()
        cgroup.join(mount)  # out of the caller's session scope, out of every group
    sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115


def watch(settings: Settings, iface: str) -> None:
    """Keep the group of ``iface`` routed while it lives; tear it down once it is empty.

    Two event sources, one poll: ``cgroup.events`` (POLLPRI on every change) and rtnetlink
    link/address/route notifications, after which the routes are repaired (the kernel drops
    them when the interface goes down or away; fail-closed meanwhile). Emptiness is
    re-checked under the lock: a launcher may have joined between wake-up and lock.

    A cold launch starts its watcher before it sets the group up, so the first look is
    taken under the lock too: it waits for the setup, and if the setup failed there is no
    group (and nothing to watch).
    """
    events = _rtnl_events()
    try:
        with state.locked(settings):
            if state.load(settings, iface) is None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(state.watcher_lock_path(settings, iface))
                return
        while True:
            rec = state.load(settings, iface)
            if rec is None:
                return
            try:
                cg_fd = os.open(os.path.join(rec.cgroup, "cgroup.events"), os.O_RDONLY)
            except FileNotFoundError:
                cg_fd = -1
            try:
                poller = select.poll()
                if cg_fd >= 0:
                    poller.register(cg_fd, select.POLLPRI | select.POLLERR)
                if events is not None:
                    poller.register(events.fileno(), select.POLLIN)
                ready = {fd for fd, _ in poller.poll()} if cgroup.populated(rec.cgroup) \
                    else {cg_fd}
            finally:
                if cg_fd >= 0:
                    os.close(cg_fd)
            if events is not None and events.fileno() in ready:
                _drain(events)
                try:
                    with state.locked(settings):
                        lifecycle.repair(settings, iface)
                except Exception as exc:  # a failed repair must not end the watch
                    _log(settings, iface, exc)
            if cg_fd in ready or not cgroup.populated(rec.cgroup):
                with state.locked(settings):
                    if lifecycle.teardown_if_empty(settings, iface):
                        return
    finally:
        if events is not None:
            events.close()


def _rtnl_events() -> Any:
    """An rtnetlink socket subscribed to link, address and route changes (or None)."""
    try:
        from via_tunnel.pyroute2_lazy import iproute_class

        IPRoute = iproute_class()
        from pyroute2.netlink.rtnl import (
            RTMGRP_IPV4_IFADDR,
            RTMGRP_IPV4_ROUTE,
            RTMGRP_IPV6_IFADDR,
            RTMGRP_IPV6_ROUTE,
            RTMGRP_LINK,
        )

        ipr = IPRoute()
        ipr.bind(groups=RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE
                 | RTMGRP_IPV6_IFADDR | RTMGRP_IPV6_ROUTE)
        return ipr
    except Exception:  # without events the group still works; it only cannot self-repair
        return None


def _drain(events: Any) -> None:
    """Read every pending notification (their content does not matter: we re-check)."""
    poller = select.poll()
    poller.register(events.fileno(), select.POLLIN)
    while poller.poll(0):
        events.get()
