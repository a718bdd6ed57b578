"""Thin adapter over the cgroup2 filesystem: find it, make groups, join, watch, remove; and
the lookups of the cgroup v1 net_cls hierarchy a warm launch needs (mounting it is
kernel/netcls.py's, off the warm path)."""

from __future__ import annotations

import errno
import os

from via_tunnel.core.errors import ViaTunnelError

NFT_CGROUP_BASE = "/sys/fs/cgroup"
# A cgroup being removed (systemd removes an emptied scope) answers ENODEV until it is gone.
GONE = (errno.ENOENT, errno.ENODEV)  # nft resolves cgroup paths relative to this, always


def cgroup2_mount(mountinfo: str = "/proc/self/mountinfo") -> str:
    """The mount point of the cgroup2 hierarchy (``/sys/fs/cgroup`` or, on hybrid hosts,
    ``/sys/fs/cgroup/unified``), read from mountinfo rather than assumed."""
    try:
        with open(mountinfo) as f:
            lines = f.read().splitlines()
    except OSError as exc:
        raise ViaTunnelError(f"cannot read {mountinfo}: {exc.strerror}") from exc
    return parse_cgroup2_mount(lines)


def parse_cgroup2_mount(lines: list[str]) -> str:
    """Pick the cgroup2 mount out of mountinfo lines (pure; see proc(5) for the format)."""
    candidates = []
    for line in lines:
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        if right.split(" ", 1)[0] == "cgroup2":
            fields = left.split(" ")
            if len(fields) >= 5 and fields[3] == "/":
                candidates.append(_unescape(fields[4]))
    if not candidates:
        raise ViaTunnelError("no cgroup2 filesystem is mounted (via-tunnel needs cgroup v2)")
    # Prefer the canonical locations nft can resolve paths under.
    candidates.sort(key=lambda p: (not p.startswith(NFT_CGROUP_BASE), len(p)))
    return candidates[0]


NETCLS_SOURCE = "via-tunnel"  # the source of the mounts kernel/netcls.py makes


def netcls_mount(exact: str | None = None, mountinfo: str = "/proc/self/mountinfo", *,
                 own: str | None = None) -> str | None:
    """Where the cgroup v1 hierarchy with net_cls is mounted in this mount namespace, or
    None: the mount at ``exact`` only, when given; with ``own`` (this instance's mount
    point), see :func:`parse_netcls_mount`; else the first."""
    with open(mountinfo) as f:
        return parse_netcls_mount(f.read().splitlines(), exact, own)


def parse_netcls_mount(lines: list[str], exact: str | None = None,
                       own: str | None = None) -> str | None:
    """Pick a net_cls mount out of mountinfo lines (pure): a ``cgroup`` (v1) file system
    whose super options name net_cls (alone, or co-mounted as ``net_cls,net_prio``).

    With ``own``: a mount that belongs to no via-tunnel instance (the host's) first, else
    ``own`` if mounted; never another instance's (a test lab's, with its own state
    directory), which that instance unmounts when its last group ends."""
    mounts = []
    for line in lines:
        left, sep, right = line.partition(" - ")
        fields, sb = left.split(" "), right.split(" ")
        if not sep or len(fields) < 5 or len(sb) < 3 or sb[0] != "cgroup":
            continue
        if "net_cls" in sb[2].split(","):
            mounts.append((_unescape(fields[4]), sb[1]))
    if exact is not None:
        return exact if any(point == exact for point, _ in mounts) else None
    if own is None:
        return mounts[0][0] if mounts else None
    hosts = [point for point, source in mounts if source != NETCLS_SOURCE]
    if hosts:
        return hosts[0]
    return own if any(point == own for point, _ in mounts) else None


def join_netcls(rel: str, pid: int = 0, own: str | None = None) -> bool:
    """Move ``pid`` (0 = the caller) into the net_cls cgroup ``rel``; False when the
    hierarchy is not mounted here or the cgroup is missing (kernel/netcls.py makes them).
    ``own``: this instance's mount point (see :func:`parse_netcls_mount`)."""
    mount = netcls_mount(own=own)
    if mount is None:
        return False
    try:
        join(os.path.join(mount, rel), pid)
    except FileNotFoundError:
        return False
    return True


def _unescape(path: str) -> str:
    return path.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n") \
        .replace("\\134", "\\")


def level_of(path: str, mount: str) -> int:
    """Depth of ``path`` inside the cgroup2 tree (the root is level 0)."""
    rel = os.path.relpath(path, mount)
    if rel == ".":
        return 0
    if rel.startswith(".."):
        raise ValueError(f"{path} is not under {mount}")
    return len(rel.split("/"))


def nft_path(path: str) -> str:
    """The string nft wants for ``socket cgroupv2``: the path relative to /sys/fs/cgroup."""
    rel = os.path.relpath(path, NFT_CGROUP_BASE)
    if rel.startswith(".."):
        raise ViaTunnelError(
            f"cgroup2 is mounted at {path!r}, outside {NFT_CGROUP_BASE}; nftables cannot "
            f"match cgroups there"
        )
    return rel


def own_cgroup(mount: str, pid: int | str = "self") -> str:
    """Absolute path of the cgroup2 group of ``pid``."""
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            hid, _controllers, rel = line.rstrip("\n").split(":", 2)
            if hid == "0":
                return os.path.normpath(mount + rel)
    raise ViaTunnelError("this process is in no cgroup2 group")


def cgroup_id(path: str) -> int:
    """The group's id (its directory's inode, what sock_diag compares); 0 when gone."""
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return 0


def make(path: str) -> None:
    os.makedirs(path, exist_ok=True)


def join(path: str, pid: int = 0) -> None:
    """Move ``pid`` (0 = the caller) into the group at ``path``."""
    fd = os.open(os.path.join(path, "cgroup.procs"), os.O_WRONLY)  # FileNotFoundError
    try:
        os.write(fd, str(pid).encode())
    except OSError as exc:
        raise ViaTunnelError(f"cannot enter cgroup {path}: {exc.strerror}") from exc
    finally:
        os.close(fd)


def members(path: str) -> list[int]:
    """PIDs in the group and all its descendants; [] when it does not exist."""
    pids: list[int] = []
    for dirpath, _dirs, _files in os.walk(path):
        try:
            with open(os.path.join(dirpath, "cgroup.procs")) as f:
                pids.extend(int(x) for x in f.read().split())
        except OSError as exc:
            if exc.errno not in GONE:
                raise
    return pids


def populated(path: str) -> bool:
    """True while the group or a descendant has a live process (``cgroup.events``)."""
    try:
        with open(os.path.join(path, "cgroup.events"), "rb") as f:
            return events_say_populated(f.read())
    except OSError as exc:
        if exc.errno not in GONE:
            raise
        return False


def events_say_populated(content: bytes) -> bool:
    """Whether the text of a ``cgroup.events`` file says ``populated 1``."""
    return b"populated 1" in content.split(b"\n")


def remove_if_empty(path: str) -> bool:
    """Remove the cgroup directory ``path`` if it holds no group and no process (our
    subtree once its last group is gone); a missing one is fine. True when it is gone."""
    try:
        os.rmdir(path)
    except FileNotFoundError:
        return True
    except OSError:  # EBUSY: a group or a process is still in it
        return False
    return True


def remove(path: str) -> None:
    """Remove the group (and empty descendants, deepest first); a missing one is fine."""
    for dirpath, _dirs, _files in sorted(os.walk(path), key=lambda t: -len(t[0])):
        try:
            os.rmdir(dirpath)
        except OSError as exc:
            if exc.errno in GONE:
                continue
            if exc.errno == errno.EBUSY:
                raise ViaTunnelError(f"cgroup {dirpath} still has processes") from exc
            raise
