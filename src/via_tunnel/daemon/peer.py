"""Who is calling the daemon, as the kernel says (never the request), and moving exactly
that process into a group.

SO_PEERCRED gives the caller's pid, uid and gid; SO_PEERGROUPS its groups; SO_PEERPIDFD (or,
on older kernels, a pidfd opened at once from the pid) pins the process, so that the PID
written into ``cgroup.procs`` still names the caller when it is written.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import select
import socket
import struct

from via_tunnel.core.errors import ViaTunnelError
from via_tunnel.core.settings import Settings
from via_tunnel.daemon.log import log
from via_tunnel.group import state
from via_tunnel.group.state import GroupRecord
from via_tunnel.kernel import cgroup, procs

SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux 4.13; not in Python 3.11
SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)  # Linux 6.5


class Peer:
    """The caller, as the kernel describes it."""

    __slots__ = ("gid", "groups", "pid", "pidfd", "uid", "user")

    def __init__(self, pid: int, uid: int, gid: int, pidfd: int, user: str | None,
                 groups: frozenset[str]) -> None:
        self.pid = pid
        self.uid = uid
        self.gid = gid
        self.pidfd = pidfd
        self.user = user
        self.groups = groups

    def __str__(self) -> str:
        return f"uid={self.uid}({self.user or '?'}) pid={self.pid}"


def peer_of(conn: socket.socket) -> Peer:
    """Read the caller's pid/uid/gid and groups from the kernel and pin its process with a
    pidfd. SO_PEERPIDFD names the process that connected, immune to PID reuse; on older
    kernels we open one from the PID right away and check the uid again before the move."""
    pid, uid, gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                        struct.calcsize("3i")))
    if pid <= 0:
        raise ViaTunnelError("cannot identify the calling process (another PID namespace?)")
    try:
        user: str | None = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = None
    groups = _group_names(conn, user, gid)
    try:
        pidfd = conn.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
    except OSError:
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            raise ViaTunnelError("the calling process is gone") from None
    return Peer(pid, uid, gid, pidfd, user, groups)


def _group_names(conn: socket.socket, user: str | None, gid: int) -> frozenset[str]:
    """Names of the caller's groups: those its process holds (SO_PEERGROUPS), else those the
    group database gives the user."""
    try:
        raw = conn.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 1024)
        gids = set(struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4]))
    except OSError:  # ERANGE beyond 256 groups, or an old kernel
        gids = set(os.getgrouplist(user, gid)) if user else set()
    gids.add(gid)
    names = set()
    for g in gids:
        with contextlib.suppress(KeyError):
            names.add(grp.getgrgid(g).gr_name)
    return frozenset(names)


def _exited(pidfd: int) -> bool:
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))


def check(peer: Peer) -> None:
    """Raise unless the caller is alive and still the user it connected as. The PID may be
    handed on (to systemd, as a new scope's first member) only between this check and the
    one :func:`move` makes after the move."""
    if _exited(peer.pidfd):
        raise ViaTunnelError("the calling process exited")
    if procs.uids(peer.pid) != (peer.uid,) * 3:  # also an exec of a setuid program
        raise ViaTunnelError("the calling process changed its identity")


def move(peer: Peer, settings: Settings, rec: GroupRecord) -> None:
    """Move exactly the calling process into the group of ``rec`` (its cgroup2 group and
    its net_cls cgroup: state.enter).

    cgroup.procs takes a PID number, so the number must still name the caller when it is
    written: the pidfd proves the caller was alive before the uid check and after the
    write, and a live process's PID cannot be reused in between. If the pidfd says the
    caller died meanwhile, the PID may name a new process (PID reuse): whatever process it
    names is moved back to where the caller was, never left in the group.
    """
    check(peer)
    mount = cgroup.cgroup2_mount()
    try:
        before = cgroup.own_cgroup(mount, peer.pid)
    except OSError:
        raise ViaTunnelError("the calling process exited") from None
    state.enter(settings, rec, peer.pid)
    if _exited(peer.pidfd):
        log(f"{peer}: exited while it was being moved into {rec.cgroup}")
        if peer.pid in cgroup.members(rec.cgroup):  # another process now has its PID
            with contextlib.suppress(ViaTunnelError, OSError):
                cgroup.join(before, peer.pid)
            with contextlib.suppress(ViaTunnelError, OSError):
                cgroup.join_netcls("", peer.pid)  # the hierarchy's root: no classid
            log(f"{peer}: moved PID {peer.pid} back to {before} (PID reused)")
        raise ViaTunnelError("the calling process exited")
