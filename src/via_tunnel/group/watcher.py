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
import errno
import os
import select
import signal
import socket
import sys
import time

from via_tunnel.core.settings import Settings
from via_tunnel.group import lifecycle, state
from via_tunnel.kernel import cgroup, netcls, nlmsg


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
        state.hold_watch_lock(settings, iface, wait=True)  # held until this process ends
        # The launcher may go on: the watch lock is held. If it was killed meanwhile (EPIPE),
        # watch all the same: whatever it set up before dying is ours to remove.
        with contextlib.suppress(OSError):
            os.write(ready_fd, b"1")
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
    with contextlib.suppress(Exception):
        netcls.leave(0)  # a launcher that joined a group before it forked us: not a member
    sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115


def watch(settings: Settings, iface: str) -> None:
    """Keep the group of ``iface`` routed while it lives; tear it down once it is empty.

    One poll over ``cgroup.events`` (POLLPRI on every change) and netlink notifications of
    what the group depends on: links, addresses, routes and ip rules (rtnetlink) and
    nftables (someone ran ``nft flush ruleset``, a firewall reloaded). After any of those
    the group is repaired (:func:`lifecycle.repair`: check first, re-add what is gone).
    Emptiness is re-checked under the lock: a launcher may have joined between wake-up
    and lock.

    A cold launch starts its watcher before it sets the group up, so the first look is
    taken under the lock too: it waits for the setup, and if the setup failed there is no
    group (and nothing to watch).
    """
    events = _event_sockets()
    _preload()  # while the launcher sets the group up (we wait for its lock next)
    try:
        with state.locked(settings):
            if state.load(settings, iface) is None:
                _remove_unrecorded(settings, iface)
                return
            # What the sockets hold so far is the setup we waited for: nothing to repair
            # (a repair takes the lock for a few ms, delaying a short-lived group's exit).
            _drain(events, {sock.fileno() for sock in events})
        while True:
            rec = state.load(settings, iface)
            if rec is None:
                return
            if _wait(settings, rec, events):
                # Only what can have broken this group costs a repair (kernel/nlevents.py):
                # other groups' setups and teardowns must not wake every watcher's repair.
                if _drain(events, {sock.fileno() for sock in events}, rec):
                    try:
                        with state.locked(settings):
                            lifecycle.repair(settings, iface)
                    except Exception as exc:  # a failed repair must not end the watch
                        _log(settings, iface, exc)
                continue
            with state.locked(settings):
                if lifecycle.teardown_if_empty(settings, iface):
                    return
    finally:
        for sock in events:
            sock.close()


def _wait(settings: Settings, rec: state.GroupRecord, events: list[socket.socket]) -> bool:
    """Sleep until the group may have emptied (False) or a netlink notification came
    (True).

    While its cgroup2 group is populated, ``cgroup.events`` says when that changes. Once it
    is empty (or gone: systemd removes an emptied scope), members moved elsewhere may live
    on in its net_cls cgroup, and cgroup v1 has no events file: wait on a pidfd of each, and
    look again after any exit (their children, which inherit the classid, are in it too).
    """
    # A cgroup being removed (systemd removes an emptied scope) answers ENODEV rather
    # than ENOENT until it is gone: both mean "not there any more".
    try:
        cg_fd = os.open(os.path.join(rec.cgroup, "cgroup.events"), os.O_RDONLY)
    except OSError as exc:
        if exc.errno not in (errno.ENOENT, errno.ENODEV):
            raise
        cg_fd = -1
    pidfds: list[int] = []
    try:
        # Read before polling: kernfs reports POLLPRI at once on a file descriptor that has
        # not yet read the current state (a busy loop otherwise).
        try:
            populated = cg_fd >= 0 and cgroup.events_say_populated(os.read(cg_fd, 4096))
        except OSError as exc:
            if exc.errno != errno.ENODEV:
                raise
            populated = False
        if not populated:
            pidfds = _pidfds(netcls.tasks(settings.state_dir, rec.netcls))
            if not pidfds:
                return False
        poller = select.poll()
        if cg_fd >= 0:
            poller.register(cg_fd, select.POLLPRI | select.POLLERR)
        for fd in pidfds:
            poller.register(fd, select.POLLIN)
        socks = {sock.fileno() for sock in events}
        for fd in socks:
            poller.register(fd, select.POLLIN)
        return bool({fd for fd, _ in poller.poll()} <= socks)
    finally:
        for fd in (cg_fd, *pidfds):
            if fd >= 0:
                os.close(fd)


def _pidfds(pids: list[int]) -> list[int]:
    fds = []
    for pid in pids:
        try:
            fds.append(os.pidfd_open(pid))
        except OSError:  # exited meanwhile: the next look sees it gone
            continue
    return fds


def _preload() -> None:
    """Import the kernel adapters before they are needed: a cold launcher forks its watcher
    before it imports them, and importing them when the group exits would delay its
    teardown by ~25 ms."""
    with contextlib.suppress(Exception):
        from via_tunnel.kernel import netlink, nft

        netlink.preload()
        nft.preload()


def _remove_unrecorded(settings: Settings, iface: str) -> None:
    """No record under the lock: the launcher's setup failed or it was killed before it
    wrote one. A cold launcher makes the cgroup before the record (early_join.py), so a
    kill in between leaves an empty cgroup nobody else would remove until `cleanup`:
    remove it, and our subtree if no group is left. Caller holds the lock.

    Nobody can join such a cgroup (joins happen under the lock, into recorded groups), so a
    process still in it is the dead launcher: a dying process releases its lock before it
    leaves its cgroup. Wait for that, briefly."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(state.watcher_lock_path(settings, iface))
    state.delete(settings, iface)  # the .tmp of a launcher killed while writing the record
    with contextlib.suppress(Exception):
        path = lifecycle.group_path(settings, cgroup.cgroup2_mount(), iface)
        deadline = time.monotonic() + 2
        while cgroup.populated(path) and time.monotonic() < deadline:
            time.sleep(0.005)
        if os.path.isdir(path) and not cgroup.populated(path):
            cgroup.remove(path)
            if not state.load_all(settings):
                cgroup.remove_if_empty(os.path.dirname(path))


# rtnetlink multicast groups: links, IPv4/IPv6 addresses, routes and rules.
_RTNL_GROUPS = nlmsg.group_bits(
    nlmsg.RTNLGRP_LINK, nlmsg.RTNLGRP_IPV4_IFADDR, nlmsg.RTNLGRP_IPV4_ROUTE,
    nlmsg.RTNLGRP_IPV4_RULE, nlmsg.RTNLGRP_IPV6_IFADDR, nlmsg.RTNLGRP_IPV6_ROUTE,
    nlmsg.RTNLGRP_IPV6_RULE)


def _event_sockets() -> list[socket.socket]:
    """Netlink sockets that become readable when something the group relies on changes.

    Raw sockets: the content of a notification does not matter (repair re-checks
    everything), so nothing is parsed. Without them the group still works; it only
    cannot repair itself.
    """
    sockets = []
    for proto, groups in ((socket.NETLINK_ROUTE, _RTNL_GROUPS),
                          (nlmsg.NETLINK_NETFILTER, nlmsg.group_bits(nlmsg.NFNLGRP_NFTABLES))):
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC
                                 | socket.SOCK_NONBLOCK, proto)
            sock.bind((0, groups))
        except OSError:
            continue
        sockets.append(sock)
    return sockets


def _drain(events: list[socket.socket], ready: set[int],
           rec: state.GroupRecord | None = None) -> bool:
    """Read every pending notification; True if one may concern ``rec``'s group (any at
    all without ``rec``; lost notifications always may)."""
    from via_tunnel.kernel.nlevents import concerns

    relevant = False
    for sock in events:
        if sock.fileno() not in ready:
            continue
        while True:
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                break
            except OSError:  # ENOBUFS: notifications were lost; a repair covers them all
                relevant = True
                continue
            if not data:
                break
            relevant = relevant or rec is None or concerns(data, sock.proto, rec.iface,
                                                           rec.table)
    return relevant
