"""The watcher: one per instance (state directory), for all of its groups.

CMD is exec'd in place, so nothing of ours stays inside a group. One process outside every
group (or a thread of the daemon) keeps each group routed while it lives and tears it down
once it is empty, under the global lock:

* ``cgroup.events`` of every group (POLLPRI on every change) says when it may have emptied;
  once a group's cgroup2 group is empty, members moved out of it may live on in its
  net_cls cgroup (cgroup v1 has no events file): a pidfd of each says when they exit;
* rtnetlink and nftables notifications say when something a group relies on changed; only
  the groups a notification can concern are repaired (kernel/nlevents.py), the table once
  for all of them (:func:`repair.repair_many`);
* inotify on the records' directory says when a group appeared or went, and when a cold
  launcher woke it (:func:`state.poke`) before it makes anything.

It is started by double fork from a root launcher that finds none alive: detached from the
terminal (new session, stdio on /dev/null, SIGHUP ignored) and moved to the cgroup2 root,
so closing the terminal or its session scope does not take it along. It holds
``watch.lock`` for its whole life: a launcher that can take that lock knows the watcher is
gone and starts another; ``via-tunnel cleanup`` recovers if none comes. It ends when no
group is left, letting go of that lock while it still holds the global one, so that a
launcher never sees a watcher that is about to leave.
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
from collections.abc import Callable

from via_tunnel.core.settings import Settings
from via_tunnel.group import lifecycle, placement, repair, state
from via_tunnel.kernel import cgroup, netcls, nlmsg
from via_tunnel.kernel.inotify import Inotify


def spawn(settings: Settings, close_fds: tuple[int, ...] = ()) -> None:
    """Start a detached watcher and return once it holds the watch lock (or found that
    another one does)."""
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
                _run(settings, wfd)
                os._exit(0)
        finally:
            os._exit(0)
    os.close(wfd)
    os.waitpid(pid, 0)
    os.read(rfd, 1)  # b"" if the watcher died before it was ready: cleanup recovers
    os.close(rfd)


def _run(settings: Settings, ready_fd: int) -> None:
    try:
        lock = state.hold_watch_lock(settings, wait=False)
        # The launcher may go on: a watcher holds the lock (this one, or another that a
        # launch meanwhile started). If the launcher was killed meanwhile (EPIPE), watch
        # all the same: whatever it set up before dying is ours to remove.
        with contextlib.suppress(OSError):
            os.write(ready_fd, b"1")
        os.close(ready_fd)
        if lock is None:
            return
        _detach()  # after "ready": moving between cgroups costs ~10 ms (RCU grace period)
        watch(settings, lambda: os.close(lock))
    except BaseException as exc:
        _log(settings, "watcher", exc)
    finally:
        os._exit(0)


def _log(settings: Settings, what: str, exc: BaseException) -> None:
    """Nobody is there to report to: leave a trace in the state dir."""
    with contextlib.suppress(Exception), open(
        os.path.join(settings.state_dir, "watcher-errors.log"), "a"
    ) as log:
        log.write(f"{what}: {exc!r}\n")


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


def watch(settings: Settings, release: Callable[[], None],
          on_removed: Callable[[str], None] | None = None) -> None:
    """Watch every group of ``settings`` until none is left. The caller holds the watch
    lock; ``release`` lets go of it, and is called under the global lock right before this
    returns. ``on_removed(iface)`` after each teardown (the daemon logs it).

    Every look at the groups is taken under the global lock, so a launch in progress is
    waited for: its group is watched once it is set up, and what a launch that failed or
    was killed left is removed (its record, or a cgroup it made before writing one).
    """
    events = _event_sockets()
    state.ensure_groups_dir(settings)
    wake = Inotify(settings.groups_dir)
    _preload()
    watched: dict[str, _Group] = {}
    check: set[str] | None = None  # the groups to look at; None: every recorded one
    sweep = first = True
    try:
        while True:
            if check is None or check or sweep:
                with state.locked(settings):
                    if not _look(settings, watched, check, sweep, on_removed):
                        state.forget_watcher(settings)
                        release()
                        return
                    if first:  # what the sockets hold so far is the setup we waited for:
                        _drain(events, {s.fileno() for s in events}, {})  # nothing to repair
                check, sweep, first = set(), False, False
            fired = _wait(watched, events, wake)
            if wake.fileno() in fired:
                names = wake.read()
                if names is None:  # the kernel's queue overflowed: look at everything
                    check = None
                else:
                    sweep = sweep or state.WAKE_FILE in names
                    if check is not None:
                        check |= {n[:-5] for n in names if n.endswith(".json")}
            if check is not None:
                check |= {g.iface for g in watched.values() if g.fds & fired}
            ready = {s.fileno() for s in events} & fired
            if ready:
                routing, tables = _drain(events, ready,
                                         {g.iface: g.table for g in watched.values()})
                if routing or tables:
                    try:
                        with state.locked(settings):
                            repair.repair_many(settings, sorted(routing | tables),
                                               nft=bool(tables))
                    except Exception as exc:  # a failed repair must not end the watch
                        _log(settings, "repair", exc)
    finally:
        for sock in events:
            sock.close()
        wake.close()
        for group in watched.values():
            group.close()


class _Group:
    """A watched group: its record's facts, and the file descriptors that say it may have
    emptied (its ``cgroup.events``, read to re-arm; pidfds of members moved out)."""

    __slots__ = ("cgroup_fd", "fds", "iface", "pidfds", "table")

    def __init__(self, rec: state.GroupRecord) -> None:
        self.iface = rec.iface
        self.table = rec.table
        self.cgroup_fd = -1
        self.pidfds: list[int] = []
        self.fds: set[int] = set()

    def arm(self, settings: Settings, rec: state.GroupRecord) -> bool:
        """Open and read what says the group may have emptied; False when it is empty now
        (nothing to wait for). Reading ``cgroup.events`` first matters: kernfs reports
        POLLPRI at once on a descriptor that has not read the current state."""
        self.close()
        # A cgroup being removed (systemd removes an emptied scope) answers ENODEV rather
        # than ENOENT until it is gone: both mean "not there any more".
        try:
            self.cgroup_fd = os.open(os.path.join(rec.cgroup, "cgroup.events"), os.O_RDONLY)
            populated = cgroup.events_say_populated(os.read(self.cgroup_fd, 4096))
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENODEV):
                raise
            populated = False
        if not populated:
            self.pidfds = _pidfds(netcls.tasks(settings.state_dir, rec.netcls))
            if not self.pidfds:
                return False
        self.fds = {fd for fd in (self.cgroup_fd, *self.pidfds) if fd >= 0}
        return True

    def close(self) -> None:
        for fd in (self.cgroup_fd, *self.pidfds):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.cgroup_fd, self.pidfds, self.fds = -1, [], set()


def _look(settings: Settings, watched: dict[str, _Group], check: set[str] | None,
          sweep: bool, on_removed: Callable[[str], None] | None) -> bool:
    """Under the global lock: bring ``watched`` in line with the records of ``check`` (all
    of them for None), tearing down those that are empty, and with ``sweep`` remove what
    dead launches left. False when no group is left.

    Only the groups named are read: a new group's record costs one read, not one per
    group (records are written a few times per launch)."""
    if check is None:
        records = {rec.iface: rec for rec in state.load_all(settings)}
        for iface in set(watched) - set(records):
            watched.pop(iface).close()
    else:
        records = {}
        for iface in check:
            rec = state.load_or_none(settings, iface)
            if rec is not None:
                records[iface] = rec
            elif iface in watched:
                watched.pop(iface).close()
    for iface, rec in records.items():
        group = watched.setdefault(iface, _Group(rec))
        try:
            # Empty now: tear it down. (Not empty after all: a member appeared or moved
            # between the two looks; look again.)
            while not group.arm(settings, rec):
                if lifecycle.teardown_if_empty(settings, iface):
                    watched.pop(iface).close()
                    if on_removed is not None:
                        on_removed(iface)
                    break
        except Exception as exc:  # one group's failure must not end the watch of all
            _log(settings, iface, exc)
            watched.pop(iface).close()  # its record stays, not ready: `cleanup` finishes
    if sweep:  # (by the records on disk: a group set up since the last look is not
        # watched yet, and its cgroup is not a dead launcher's)
        _sweep_unrecorded(settings, set(state.recorded(settings)))
    if not watched and check is not None and state.load_all(settings):
        return _look(settings, watched, None, sweep, on_removed)  # (never missed one)
    return bool(watched)


def _sweep_unrecorded(settings: Settings, recorded: set[str]) -> None:
    """Remove the group cgroups no record explains, with the ``.tmp`` of a record being
    written: a cold launcher makes its cgroup before the record (early_join.py), and one
    killed in between leaves them. Caller holds the global lock, so no launch is in
    progress: a process still in such a cgroup is the dead launcher (a dying process
    releases its locks before it leaves its cgroup). Wait for that, briefly."""
    state.remove_orphan_tmp(settings)
    with contextlib.suppress(Exception):
        mount = cgroup.cgroup2_mount()
        known = {placement.group_path(settings, mount, iface) for iface in recorded}
        for path in lifecycle.group_cgroups(settings):
            if path in known:
                continue
            deadline = time.monotonic() + 2
            while cgroup.populated(path) and time.monotonic() < deadline:
                time.sleep(0.005)
            if not cgroup.populated(path):
                cgroup.remove(path)
        if not recorded:
            cgroup.remove_if_empty(lifecycle.subtree_path(settings))


def _wait(watched: dict[str, _Group], events: list[socket.socket],
          wake: Inotify) -> set[int]:
    """Sleep until something happens; the file descriptors that fired."""
    poller = select.poll()
    for group in watched.values():
        if group.cgroup_fd >= 0:
            poller.register(group.cgroup_fd, select.POLLPRI | select.POLLERR)
        for fd in group.pidfds:
            poller.register(fd, select.POLLIN)
    for sock in events:
        poller.register(sock.fileno(), select.POLLIN)
    poller.register(wake.fileno(), select.POLLIN)
    return {fd for fd, _ in poller.poll()}


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


# rtnetlink multicast groups: links, IPv4/IPv6 addresses, routes and rules.
_RTNL_GROUPS = nlmsg.group_bits(
    nlmsg.RTNLGRP_LINK, nlmsg.RTNLGRP_IPV4_IFADDR, nlmsg.RTNLGRP_IPV4_ROUTE,
    nlmsg.RTNLGRP_IPV4_RULE, nlmsg.RTNLGRP_IPV6_IFADDR, nlmsg.RTNLGRP_IPV6_ROUTE,
    nlmsg.RTNLGRP_IPV6_RULE)


def _event_sockets() -> list[socket.socket]:
    """Netlink sockets that become readable when something the groups rely on changes
    (:func:`_drain` reads which groups a notification concerns). Without them the groups
    still work; they only cannot repair themselves.

    Their receive buffers are large: a notification lost to a full buffer (ENOBUFS)
    makes the watcher check every group, which at thousands of groups costs seconds (the
    cgroup maps' listing), while a thousand teardowns at once send tens of thousands of
    notifications (8 MiB holds ~40,000; the kernel charges only what is queued).
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
        for option in (_SO_RCVBUFFORCE, socket.SO_RCVBUF):  # (FORCE: above rmem_max, root)
            try:
                sock.setsockopt(socket.SOL_SOCKET, option, EVENT_BUFFER)
                break
            except OSError:
                continue
        sockets.append(sock)
    return sockets


EVENT_BUFFER = 8 << 20
_SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)


def _drain(events: list[socket.socket], ready: set[int],
           groups: dict[str, int]) -> tuple[set[str], set[str]]:
    """Read every pending notification; the groups (interface -> table) an rtnetlink one
    may concern, and those an nftables one may concern (each: all of them when its
    notifications were lost)."""
    from via_tunnel.kernel.nlevents import affected

    concerned: dict[int, set[str]] = {socket.NETLINK_ROUTE: set(),
                                      nlmsg.NETLINK_NETFILTER: set()}
    for sock in events:
        if sock.fileno() not in ready:
            continue
        found = concerned[sock.proto]
        while True:
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                break
            except OSError:  # ENOBUFS: notifications were lost; a repair covers them all
                found |= set(groups)
                continue
            if not data:
                break
            if len(found) < len(groups):
                found |= affected(data, sock.proto, groups)
    return concerned[socket.NETLINK_ROUTE], concerned[nlmsg.NETLINK_NETFILTER]
