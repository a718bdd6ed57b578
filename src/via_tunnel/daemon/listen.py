"""The daemon's listening socket: the one systemd passes (socket activation), or its own.
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import os
import socket
import stat

from via_tunnel.core.errors import ViaTunnelError

SD_LISTEN_FDS_START = 3


def systemd_socket() -> socket.socket | None:
    """The socket systemd passed us (socket activation), or None."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    try:
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return None
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)
    if count < 1:
        return None
    sock = socket.socket(fileno=SD_LISTEN_FDS_START)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        raise ViaTunnelError("systemd passed a socket that is not a Unix stream socket")
    os.set_inheritable(sock.fileno(), False)
    return sock


def own_socket(path: str, socket_group: str | None) -> tuple[socket.socket, int]:
    """Create the listening socket at ``path`` (mode 0666, or 0660 with ``socket_group``).

    Returns the socket and the fd of the flock that keeps a second daemon off the same
    path. The directory must be root's and writable by nobody else: whoever can write it
    could swap the socket for their own.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, mode=0o755, exist_ok=True)
    st = os.stat(directory)
    if st.st_uid != 0 or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ViaTunnelError(f"{directory} must belong to root and be writable by root only")
    gid = None
    if socket_group is not None:
        try:
            gid = grp.getgrnam(socket_group).gr_gid
        except KeyError:
            raise ViaTunnelError(f"socket_group {socket_group!r} does not exist") from None
    lock_fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock_fd)
        raise ViaTunnelError(f"another daemon is already serving {path}") from None
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # 0600 until the final mode is set: nobody connects too early
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    if gid is not None:
        os.chown(path, 0, gid)
    os.chmod(path, 0o660 if gid is not None else 0o666)
    sock.listen(128)
    return sock, lock_fd
