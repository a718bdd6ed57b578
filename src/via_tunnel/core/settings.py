"""Numbers and paths that define via-tunnel's footprint on a host.

Marks, routing tables and rule priorities are chosen so that they collide with none of the
neighbours seen on real hosts (NOTES.md): Tailscale (rules 5210-5270, table 52, mark bits in
0x00ff0000), wg-quick (mark and table 51820 = 0xca6c), Mullvad (mark 0x6d6f6c65, ct mark 0xf41).

* Every mark of ours has bit 31 set; none of theirs does, so ``fwmark MARK/MARK_MASK``
  can never match their packets, and theirs can never match ours.
* The group's slot (1..4095) lives in bits 24-30 (its low 7 bits: slots 1-127 have the
  marks they always had) and 8-12 (its high 5 bits), clear of Tailscale's 0x00ff0000.
* ip rules form a two-level tree so that a packet meets a bounded number of rules whatever
  the number of groups: the host's own packets 3, a group's at most 2 + 32 + 128.
"""

from __future__ import annotations

import os

MARK_FLAG = 0x8000_0000
MARK_MASK = 0xFF00_1F00  # the flag and every slot bit
SLOT_LOW_SHIFT = 24  # slot & 0x7f
SLOT_HIGH_SHIFT = 8  # slot >> 7
MAX_SLOT = 0xFFF
BUCKETS = 32  # the groups' rules are split by slot & 31 (bits 24-28 of the mark)
BUCKET_MASK = MARK_FLAG | ((BUCKETS - 1) << SLOT_LOW_SHIFT)
TABLE_BASE = 0x7674_0000  # "vt" << 16; routing table id = TABLE_BASE + slot
# ip rules: a marked packet is sent from priority 0 (right after `local`) straight to the
# groups' rules; a rule added later without a priority (wg-quick, scripts) gets priority 0 too
# and lands *after* ours (the kernel inserts it behind every rule of the same priority).
ENTRY_PRIORITY = 0  # fwmark FLAG/FLAG goto RULE_PRIORITY
SKIP_PRIORITY = 5099  # not fwmark FLAG/FLAG goto CATCH_PRIORITY: others skip the groups' rules
RULE_PRIORITY = 5100  # one per bucket: fwmark (FLAG|b<<24)/BUCKET_MASK goto bucket_priority(b)
BUCKET_BASE = 5101  # bucket b's groups: fwmark MARK/MARK_MASK lookup TABLE at 5101 + b
CATCH_PRIORITY = BUCKET_BASE + BUCKETS  # fwmark FLAG/FLAG unreachable: never routed by main
CLASSID_BASE = 0x7674_0000  # net_cls classid (major "vt", minor = slot) = TABLE_BASE + slot
UNREACHABLE_METRIC = 0xFFFF_FFFF  # kill-switch route: behind every real default
# A group that ended drains (its mark kept, its late packets dropped) for as long as its
# conntrack entries live, at most this long: conntrack's own TIME_WAIT timeout (the longest
# a closed TCP flow is kept), also the timeout of an active UDP stream.
DRAIN_MAX = 120
NFT_TABLE = "via_tunnel"
NFT_FAMILY = "inet"

ENV_STATE_DIR = "VIA_TUNNEL_STATE_DIR"
ENV_CONFIG = "VIA_TUNNEL_CONFIG"
DEFAULT_CONFIG = "/etc/via-tunnel/config.toml"
ENV_CGROUP = "VIA_TUNNEL_CGROUP"
ENV_DRAIN_MAX = "VIA_TUNNEL_DRAIN_MAX"


SCOPE_SLICE = "via-tunnel.slice"  # systemd/via-tunnel.slice
# Its cgroup: systemd reads each "-" of a slice's name as one level of nesting.
SCOPE_SLICE_PATH = "via.slice/via-tunnel.slice"


class Settings:
    """Where this instance keeps its state and its cgroups.

    ``state_dir`` holds the lock, one JSON file per active group and the saved sysctls.
    ``cgroup_subtree`` is relative to the cgroup2 mount. Both can be moved with environment
    variables so that test labs running side by side never see each other's groups.
    ``scopes``: each group is a transient systemd scope in ``via-tunnel.slice`` (systemd is
    PID 1 and ``$VIA_TUNNEL_CGROUP`` does not name a subtree), else a plain directory.
    ``drain_max``: the longest a group that ended drains (DRAIN_MAX; a test lab that compares
    the kernel's state right after a group ends sets ``$VIA_TUNNEL_DRAIN_MAX`` to 0).
    """

    # A plain class, not a dataclass: this module is on the launch hot path, and importing
    # dataclasses costs more than everything else the warm launch does.
    __slots__ = ("cgroup_subtree", "drain_max", "scopes", "state_dir")

    def __init__(self, state_dir: str = "/run/via-tunnel",
                 cgroup_subtree: str = "via-tunnel", scopes: bool = False,
                 drain_max: int = DRAIN_MAX) -> None:
        self.state_dir = state_dir
        self.cgroup_subtree = cgroup_subtree.strip("/")
        self.scopes = scopes
        self.drain_max = drain_max

    @classmethod
    def from_env(cls) -> Settings:
        subtree = os.environ.get(ENV_CGROUP)
        scopes = not subtree and os.path.isdir("/run/systemd/system")  # sd_booted(3)
        return cls(
            state_dir=os.environ.get(ENV_STATE_DIR) or "/run/via-tunnel",
            cgroup_subtree=subtree or (SCOPE_SLICE_PATH if scopes else "via-tunnel"),
            scopes=scopes,
            drain_max=_seconds(os.environ.get(ENV_DRAIN_MAX), DRAIN_MAX),
        )

    @property
    def lock_path(self) -> str:
        return os.path.join(self.state_dir, "lock")

    @property
    def groups_dir(self) -> str:
        return os.path.join(self.state_dir, "groups")

    @property
    def sysctl_path(self) -> str:
        return os.path.join(self.state_dir, "sysctl.json")


def _seconds(text: str | None, default: int) -> int:
    """A whole number of seconds, 0..default, from an environment variable; ``default`` when
    unset or not such a number (a typo never shortens the drain past the default)."""
    if text is None or not text.strip().isdigit():
        return default
    return min(int(text), default)


def netcls_mount_point(state_dir: str) -> str:
    """Where an instance mounts the net_cls hierarchy when the host has not (below its
    state directory, so that test labs side by side never share one)."""
    return os.path.join(state_dir, "net_cls")


def config_path() -> str:
    """The config file: ``$VIA_TUNNEL_CONFIG`` or /etc/via-tunnel/config.toml."""
    return os.environ.get(ENV_CONFIG) or DEFAULT_CONFIG


def mark_for_slot(slot: int) -> int:
    """The packet/ct mark of the group in ``slot`` (1..MAX_SLOT)."""
    if not 1 <= slot <= MAX_SLOT:
        raise ValueError(f"slot {slot} out of range")
    return MARK_FLAG | ((slot & 0x7F) << SLOT_LOW_SHIFT) | ((slot >> 7) << SLOT_HIGH_SHIFT)


def slot_of_mark(mark: int) -> int | None:
    """The slot whose mark is ``mark``, or None when it is not one of ours."""
    if mark & ~MARK_MASK or not mark & MARK_FLAG:
        return None
    slot = ((mark >> SLOT_LOW_SHIFT) & 0x7F) | (((mark >> SLOT_HIGH_SHIFT) & 0x1F) << 7)
    return slot or None


def bucket_priority(slot: int) -> int:
    """The priority of the ip rules of the bucket ``slot`` belongs to."""
    return BUCKET_BASE + slot % BUCKETS


def classid_for_slot(slot: int) -> int:
    """The net_cls classid of the group in ``slot`` (major 0x7674, minor = slot)."""
    if not 1 <= slot <= MAX_SLOT:
        raise ValueError(f"slot {slot} out of range")
    return CLASSID_BASE + slot


def table_for_slot(slot: int) -> int:
    """The routing table id of the group in ``slot``."""
    if not 1 <= slot <= MAX_SLOT:
        raise ValueError(f"slot {slot} out of range")
    return TABLE_BASE + slot
