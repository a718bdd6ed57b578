"""Records of active groups and the lock that serialises every change to them.

One JSON file per group in ``<state_dir>/groups/``. A record is written *before* the kernel
is changed (an intent log), so a crash at any point leaves enough to undo it, and deleted
only after everything it names is gone.
"""

from __future__ import annotations

import fcntl
import os
import time

from via_tunnel.core import fastjson
from via_tunnel.core.errors import ViaTunnelError
from via_tunnel.core.settings import MAX_SLOT, Settings, mark_for_slot, netcls_mount_point
from via_tunnel.kernel.files import (
    FileLock,
    ensure_dir,
    read_trusted,
    remove_json,
    remove_orphan_tmp_in,
    write_json,
)


class GroupRecord:
    """What one active group consists of; enough to tear it down without other input.

    A plain class rather than a dataclass: it is read on every (warm) launch.
    """

    __slots__ = ("cgroup", "cgroup_id", "cgroup_nft_path", "classid", "created", "dns4", "dns6",
                 "dns_asked", "gateway4", "gateway_asked", "iface", "ipv6", "ipv6_asked",
                 "level", "mark", "netcls", "ready", "saved_sysctls", "slot", "table")

    def __init__(self, *, iface: str, slot: int, mark: int, table: int, level: int,
                 cgroup: str, cgroup_nft_path: str, created: float,
                 gateway4: str | None = None, ipv6: str = "block", dns4: str | None = None,
                 dns6: str | None = None, ipv6_asked: str | None = None,
                 gateway_asked: str | None = None, dns_asked: list[str] | None = None,
                 saved_sysctls: dict[str, str] | None = None, ready: bool = False,
                 netcls: str | None = None, classid: int = 0, cgroup_id: int = 0) -> None:
        self.iface = iface
        self.slot = slot
        self.mark = mark
        self.table = table
        self.level = level
        self.cgroup = cgroup  # absolute path of the group's cgroup
        self.cgroup_nft_path = cgroup_nft_path  # the same, as nft wants it
        self.created = created
        self.gateway4 = gateway4
        self.ipv6 = ipv6  # what the group does: "tunnel" or "block"
        self.ipv6_asked = ipv6_asked  # what was asked: auto, tunnel or block (None: older)
        self.dns4 = dns4
        self.dns6 = dns6
        # What its creator asked (after the config's defaults), which a non-root caller
        # must ask too to join. dns_asked is None in records of older versions, which
        # recorded neither: then gateway_asked means nothing either.
        self.gateway_asked = gateway_asked
        self.dns_asked = dns_asked
        self.saved_sysctls = saved_sysctls or {}  # per-interface sysctls to put back
        # The group's net_cls cgroup (relative to that hierarchy's mount) and its classid:
        # what keeps a member routed once it is moved elsewhere in the cgroup2 tree.
        self.netcls = netcls
        self.classid = classid
        self.cgroup_id = cgroup_id  # the cgroup2 group's id (inode), kept for when it is gone
        # Set once every part of the group is in place. A record without it is the intent
        # log of a setup that died half-way: never joined, only torn down and rebuilt.
        self.ready = ready

    def usable(self) -> bool:
        """Whether processes may join this group: its setup completed and its cgroup
        exists. Joining a half-built group could send traffic around the tunnel."""
        return self.ready and os.path.isdir(self.cgroup)

    def asked(self) -> tuple[str | None, str | None, tuple[str, ...]] | None:
        """(gateway, ipv6, dns) as its creator asked them, or None in an older record."""
        if self.dns_asked is None or self.ipv6_asked is None:
            return None
        return self.gateway_asked, self.ipv6_asked, tuple(self.dns_asked)

    def to_dict(self) -> dict[str, object]:
        return {k: getattr(self, k) for k in self.__slots__}

    @classmethod
    def from_json(cls, text: str) -> GroupRecord:
        data = fastjson.loads(text)
        if not isinstance(data, dict):
            raise ValueError("a group record is a JSON object")
        return cls(**{k: data[k] for k in cls.__slots__ if k in data})


def enter(settings: Settings, rec: GroupRecord, pid: int = 0) -> None:
    """Move ``pid`` (0 = the caller) into the group: its net_cls cgroup first (made, and
    the hierarchy mounted, if this mount namespace lacks them), then its cgroup2 group.
    Every way into a group (warm launch, early join, the daemon's move) comes here."""
    from via_tunnel.kernel import cgroup

    own = netcls_mount_point(settings.state_dir)
    if rec.netcls and not cgroup.join_netcls(rec.netcls, pid, own):
        from via_tunnel.kernel import netcls

        netcls.ensure(settings.state_dir, rec.netcls, rec.classid)
        if not cgroup.join_netcls(rec.netcls, pid, own):
            raise ViaTunnelError(f"cannot enter the net_cls cgroup {rec.netcls}")
    cgroup.join(rec.cgroup, pid)


def locked(settings: Settings) -> FileLock:
    """The global lock (``<state_dir>/lock``): every change to groups happens under it."""
    return FileLock(settings.lock_path, settings.groups_dir)


def record_path(settings: Settings, iface: str) -> str:
    return os.path.join(settings.groups_dir, f"{iface}.json")


def load(settings: Settings, iface: str) -> GroupRecord | None:
    """The record of ``iface``'s group, or None. Trusted only when it is a regular file in
    the groups directory that only root may write, and names ``iface``: else
    ViaTunnelError."""
    path = record_path(settings, iface)
    text = read_trusted(path)
    if text is None:
        return None
    try:
        rec = GroupRecord.from_json(text)
    except (ValueError, TypeError, KeyError):
        raise ViaTunnelError(f"refusing to trust {path}: not a group record") from None
    if rec.iface != iface:
        raise ViaTunnelError(f"refusing to trust {path}: it names {rec.iface!r}")
    return rec


def load_all(settings: Settings) -> list[GroupRecord]:
    out = []
    for iface in recorded(settings):
        rec = load_or_none(settings, iface)
        if rec is not None:
            out.append(rec)
    return out


def recorded(settings: Settings) -> list[str]:
    """The interfaces that have a record file (sorted), without reading one."""
    try:
        names = sorted(os.listdir(settings.groups_dir))
    except FileNotFoundError:
        return []
    return [name[:-5] for name in names if name.endswith(".json")]


def load_or_none(settings: Settings, iface: str) -> GroupRecord | None:
    """:func:`load`, with a record we do not trust read as none: not ours to act on
    (doctor and the daemon's start-up say why)."""
    try:
        return load(settings, iface)
    except ViaTunnelError:
        return None


def ensure_groups_dir(settings: Settings) -> None:
    ensure_dir(settings.groups_dir)


SLOT_PREFIX = ".slot-"  # groups_dir/.slot-N -> IFACE.json: slot N is taken


def save(settings: Settings, rec: GroupRecord) -> None:
    """Write atomically, so a reader never sees half a record; claim its slot first."""
    ensure_dir(settings.groups_dir)
    _claim_slot(settings, rec)
    write_json(record_path(settings, rec.iface), rec.to_dict())


def _claim_slot(settings: Settings, rec: GroupRecord) -> None:
    """``.slot-N`` names the record of the group in slot N, so that a new group's slot is
    found from the directory's names alone (:func:`taken_slots`): reading every record
    made each cold launch O(groups), ~55 ms at 4,095. The caller holds the lock; a link
    naming another record is a crashed group's (its record is gone) and is replaced."""
    link = os.path.join(settings.groups_dir, f"{SLOT_PREFIX}{rec.slot}")
    target = f"{rec.iface}.json"
    try:
        os.symlink(target, link)
    except FileExistsError:
        if os.readlink(link) != target:
            os.unlink(link)
            os.symlink(target, link)


def delete(settings: Settings, iface: str, slot: int | None = None) -> None:
    """Remove the record (and the claim on its ``slot``), record first."""
    remove_json(record_path(settings, iface))
    if slot is not None:
        link = os.path.join(settings.groups_dir, f"{SLOT_PREFIX}{slot}")
        try:
            if os.readlink(link) == f"{iface}.json":
                os.unlink(link)
        except (FileNotFoundError, OSError):
            pass


def taken_slots(settings: Settings) -> set[int]:
    """The slots claimed in the groups directory. As many claims as records, or the
    records are read and the claims made to match (:func:`_reclaim`: a group of a version
    before claims, still running after an upgrade; a teardown killed between its record
    and its claim). Caller holds the lock."""
    try:
        names = os.listdir(settings.groups_dir)
    except FileNotFoundError:
        return set()
    slots = {int(n[len(SLOT_PREFIX):]) for n in names
             if n.startswith(SLOT_PREFIX) and n[len(SLOT_PREFIX):].isdigit()}
    if len(slots) != sum(1 for n in names if n.endswith(".json")):
        return _reclaim(settings, slots)
    return slots


def _reclaim(settings: Settings, claimed: set[int]) -> set[int]:
    """Make the claims say what the records say (every record read, once): claim each
    record's slot, and drop a claim that names no record, or a record of another slot
    (what a teardown killed between deleting the record and its claim leaves; the next
    group on that interface would otherwise keep the stale claim alive, and leave it
    behind). A claim on a record that cannot be read stays: its group may still hold the
    slot's mark. Caller holds the lock."""
    loaded = load_all(settings)
    slots = {rec.slot for rec in loaded}
    ifaces = {rec.iface for rec in loaded}
    for rec in loaded:
        _claim_slot(settings, rec)
    for slot in claimed - slots:
        link = os.path.join(settings.groups_dir, f"{SLOT_PREFIX}{slot}")
        try:
            target = os.readlink(link)
            if target[:-len(".json")] not in ifaces and os.path.exists(
                    os.path.join(settings.groups_dir, target)):
                slots.add(slot)  # a record we cannot read: its slot stays taken
                continue
            os.unlink(link)
        except OSError:
            continue
    return slots


def remove_orphan_tmp(settings: Settings) -> list[str]:
    """Remove the ``.tmp`` files of writers killed mid-write (a launcher killed while it
    wrote its first record leaves one and nothing else), and slot claims whose record is
    gone. Call under :func:`locked`: every writer holds it, so no ``.tmp`` found then
    belongs to a live writer. Returns a line per file removed."""
    done = remove_orphan_tmp_in((settings.groups_dir, settings.state_dir))
    try:
        names = sorted(os.listdir(settings.groups_dir))
    except FileNotFoundError:
        names = []
    for name in names:
        link = os.path.join(settings.groups_dir, name)
        if name.startswith(SLOT_PREFIX) and os.path.islink(link) \
                and not os.path.exists(link):  # (dangling: no record)
            os.unlink(link)
            done.append(f"removed the claim on slot {name[len(SLOT_PREFIX):]} of a group "
                        "without record")
    return done


def _boottime() -> float:
    """Seconds on the clock the kernel's timers follow (never set, never jumps back)."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def drain_path(settings: Settings) -> str:
    return os.path.join(settings.state_dir, "draining")


def note_drain(settings: Settings, seconds: int) -> None:
    """Remember, before the drain's element is added, until when a drain may be live: the
    teardown of the last group and a new group's slot consult our table's ``draining`` map
    only before then (listing the map costs a few ms on every launch and exit)."""
    until = max(_drain_until(settings), int(_boottime()) + seconds + 2)
    ensure_dir(settings.state_dir)
    write_json(drain_path(settings), {"until": until})


def drain_may_be_live(settings: Settings) -> bool:
    """False only when no drain can be live (none noted, or all over by the clock)."""
    return _drain_until(settings) > _boottime()


def drain_noted(settings: Settings) -> bool:
    """Whether a group drained since our table was made (live or over)."""
    return os.path.exists(drain_path(settings))


def forget_drains(settings: Settings) -> None:
    """Our table is gone, and with it every drain."""
    remove_json(drain_path(settings))


def _drain_until(settings: Settings) -> float:
    try:
        raw = read_trusted(drain_path(settings))
    except (OSError, ViaTunnelError):
        return float("inf")  # unreadable: assume a drain is live (the map says for sure)
    if raw is None:
        return 0.0
    try:
        return float(fastjson.loads(raw)["until"])  # type: ignore[index]
    except (ValueError, KeyError, TypeError):
        return float("inf")


def free_slot(used: set[int], reserved: set[int] | frozenset[int] = frozenset()) -> int:
    """The lowest slot not in ``used`` (:func:`taken_slots`) and whose mark is not in
    ``reserved`` (the marks of groups still draining: their late packets must not become a
    new group's)."""
    for slot in range(1, MAX_SLOT + 1):
        if slot not in used and mark_for_slot(slot) not in reserved:
            return slot
    raise ViaTunnelError(f"too many active groups (at most {MAX_SLOT})")


WAKE_FILE = ".wake"  # in groups_dir: touched to wake the watcher (watcher.poke)


def poke(settings: Settings) -> None:
    """Wake the live watcher (watcher.py): a cold launch is about to make a group. The
    watcher looks at the records (and at group cgroups without one) as soon as it gets the
    global lock, that is once that launch is done or dead."""
    ensure_dir(settings.groups_dir)
    fd = os.open(os.path.join(settings.groups_dir, WAKE_FILE),
                 os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    os.close(fd)  # inotify: IN_CLOSE_WRITE


def forget_watcher(settings: Settings) -> None:
    """The leaving watcher removes its lock file and the wake file. Only under the global
    lock, which every reader that acts on them holds too: nobody can be between opening
    the lock file and locking it."""
    for path in (watcher_lock_path(settings), os.path.join(settings.groups_dir, WAKE_FILE)):
        try:  # noqa: SIM105 - importing contextlib (and collections) costs a warm launch ~4 ms
            os.unlink(path)
        except FileNotFoundError:
            pass


def watcher_lock_path(settings: Settings) -> str:
    """The lock the instance's one watcher holds for its whole life."""
    return os.path.join(settings.state_dir, "watch.lock")


def watcher_pid(settings: Settings) -> int | None:
    """PID of the live watcher (a process, or the daemon), or None."""
    if not watcher_alive(settings):
        return None
    try:
        with open(watcher_lock_path(settings)) as f:
            return int(f.read().strip() or 0) or None
    except (OSError, ValueError):
        return None


def hold_watch_lock(settings: Settings, *, wait: bool) -> int | None:
    """Become the instance's watcher: take the watch lock and write this process's PID
    into it (what `status` shows). Returns the lock's fd (CLOEXEC; close it to let go),
    or None when another watcher holds it and ``wait`` is false (else wait for it)."""
    ensure_dir(settings.state_dir)
    fd = os.open(watcher_lock_path(settings), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def watcher_alive(settings: Settings) -> bool:
    """True while a watcher holds the watch lock (immune to PID reuse)."""
    try:
        fd = os.open(watcher_lock_path(settings), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
