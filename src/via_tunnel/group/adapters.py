"""The kernel interfaces that :mod:`via_tunnel.group.lifecycle` sequences, as Protocols: one
per interface, each docstring its contract.

The real implementations are the kernel modules themselves (kernel/nft.py, netlink.py,
cgroup.py, netcls.py, systemd.py, sysctl.py, flows.py, resolvers.py), which satisfy these
Protocols as they are;
:func:`current` gives them unless a test has put fakes in their place with
:func:`replaced` (tests/test_lifecycle_seam.py checks lifecycle's ordering and rollback
that way, without root, besides the kernel tests). Nothing here changes what lifecycle does.

Common to all: a call either does all it says or raises (KernelError / ViaTunnelError for
the kernel's refusals, OSError for the file system's), and removals are idempotent.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from via_tunnel.core.plan import LinkFacts, RouteSpec, RuleSpec
    from via_tunnel.core.settings import Settings


class Nft(Protocol):
    """Our nftables table (kernel/nft.py). Each change is one transaction: applied whole
    or not at all (KernelError, carrying what was sent)."""

    def preload(self) -> None:
        """Load the binding now; ViaTunnelError when it is missing (before any change)."""

    def ensure_table(self, level: int) -> None:
        """Create our table, and the rule for cgroup level ``level``, where missing."""

    def run_json(self, commands: list[dict[str, Any]]) -> dict[str, Any]:
        """Apply nft JSON ``commands`` as one transaction."""

    def run_text(self, text: str) -> None:
        """Apply nft command text (our fixed ruleset only) as one transaction."""

    def table_exists(self) -> bool:
        """Whether our table exists."""

    def table_text(self) -> str | None:
        """Our table as nft prints it, or None when it does not exist."""

    def list_elements(self, sets: tuple[str, ...],
                      maps: tuple[str, ...]) -> list[dict[str, Any]]:
        """The named sets and maps of our table with their elements (missing ones left
        out)."""

    def delete_table_command(self) -> dict[str, Any]:
        """The JSON command that deletes our table."""

    def draining(self) -> dict[int, tuple[str, int]]:
        """mark -> (interface, seconds left) of the groups draining; empty without table."""


class Netlink(Protocol):
    """rtnetlink (kernel/netlink.py): interface facts, ip rules and routes. Adds tolerate
    "already there", removals "not there"; a family the kernel lacks is left out."""

    def link_facts(self, name: str) -> LinkFacts:
        """What planning needs about interface ``name``; ViaTunnelError if it is absent."""

    def apply(self, rules: Iterable[RuleSpec], routes: Iterable[RouteSpec]) -> None:
        """Add ``routes``, then ``rules`` (a rule never points at an unfilled table)."""

    def remove(self, rules: Iterable[RuleSpec], tables: Iterable[int]) -> None:
        """Remove ``rules`` and every route of ``tables``."""

    def our_rules_and_tables(self, rules: Iterable[RuleSpec], tables: Iterable[int]
                             ) -> tuple[list[RuleSpec], list[int]]:
        """Which of ``rules`` exist, and which of ``tables`` hold routes."""


class Cgroups(Protocol):
    """The cgroup2 file system (kernel/cgroup.py)."""

    def cgroup2_mount(self) -> str:
        """Where cgroup2 is mounted (read from mountinfo, never assumed)."""

    def level_of(self, path: str, mount: str) -> int:
        """The depth of ``path`` in the tree (the root is 0)."""

    def nft_path(self, path: str) -> str:
        """``path`` as nft's ``socket cgroupv2`` wants it."""

    def make(self, path: str) -> None:
        """Create the group (an existing one is fine)."""

    def cgroup_id(self, path: str) -> int:
        """The group's id (what sock_diag filters on); 0 when it does not exist."""

    def own_cgroup(self, mount: str, pid: int | str = "self") -> str:
        """The group ``pid`` is in."""

    def join(self, path: str, pid: int = 0) -> None:
        """Move ``pid`` (0: the caller) into the group."""

    def remove(self, path: str) -> None:
        """Remove the group and its empty descendants (a missing one is fine);
        ViaTunnelError while a process is in it."""

    def remove_if_empty(self, path: str) -> bool:
        """Remove ``path`` if nothing is in it; True when it is gone."""

    def populated(self, path: str) -> bool:
        """Whether a live process is in the group or below it."""


class NetCls(Protocol):
    """The cgroup v1 net_cls hierarchy (kernel/netcls.py); ``rel`` names a cgroup relative
    to its mount. ViaTunnelError where the kernel has no net_cls (fail closed)."""

    def require(self) -> None:
        """ViaTunnelError unless the kernel has net_cls (before any change)."""

    def ensure(self, state_dir: str, rel: str, classid: int) -> str:
        """Make the cgroup with ``classid`` (mounting the hierarchy if needed)."""

    def join(self, state_dir: str, rel: str, pid: int) -> None:
        """Move ``pid`` into it."""

    def leave(self, pid: int) -> None:
        """Move ``pid`` back to the hierarchy's root."""

    def tasks(self, state_dir: str, rel: str | None) -> list[int]:
        """The processes in it ([] when it is absent)."""

    def remove(self, state_dir: str, rel: str | None) -> None:
        """Remove it (missing is fine); ViaTunnelError while a process is in it."""

    def release(self, state_dir: str, subtree: str) -> None:
        """No group left: remove our subtree, unmount the hierarchy if we mounted it."""


class Scopes(Protocol):
    """systemd's transient scope units (kernel/systemd.py)."""

    def start_scope(self, unit: str, slice_name: str, pid: int, path: str,
                    mount: str) -> None:
        """Start scope ``unit`` with ``pid`` in it; return once pid is in ``path``."""


class Sysctl(Protocol):
    """Sysctls (kernel/sysctl.py): set what a group needs, put back what was there."""

    def ensure(self) -> None:
        """Set the host-wide sysctl every group needs (never lowered afterwards)."""

    def apply_saving(self, values: tuple[tuple[str, str], ...]) -> dict[str, str]:
        """Set each (path, value); return the previous values of those that changed."""

    def put_back(self, saved: dict[str, str]) -> None:
        """Restore what :meth:`apply_saving` returned (an interface gone is fine)."""

    def forget_saved(self, settings: Settings) -> None:
        """Drop what earlier versions saved to restore (when the last group is gone)."""


class Flows(Protocol):
    """A group's sockets and conntrack entries (kernel/flows.py). Best effort: a kernel
    that refuses leaves them, never raises."""

    def kill_sockets(self, cgroup_path: str, cgroup_id: int = 0) -> None:
        """Destroy every socket of the group's processes (orphans included); by
        ``cgroup_id`` too when the group's directory is gone already."""

    def reset_unmasqueraded(self, cgroup_path: str, mark: int, mark_mask: int,
                            own_addresses: tuple[str, ...]) -> object:
        """Delete the conntrack entries of the group's flows that escaped masquerade."""

    def lingering(self, mark: int, mark_mask: int) -> int | None:
        """Seconds the longest-lived conntrack entry with the group's mark has left (0:
        none); None when conntrack cannot be read."""

    def forget(self, mark: int, mark_mask: int) -> None:
        """Delete the conntrack entries with the group's mark."""


class Resolvers(Protocol):
    """The system's resolver configuration (kernel/resolvers.py)."""

    def link_resolvers(self, iface: str) -> tuple[str, ...]:
        """The per-link DNS servers known for ``iface``, or ()."""


class Kernel:
    """The adapters lifecycle uses, one per kernel interface."""

    __slots__ = ("cgroup", "flows", "netcls", "netlink", "nft", "resolvers", "scopes", "sysctl")

    def __init__(self, *, nft: Nft, netlink: Netlink, cgroup: Cgroups, sysctl: Sysctl,
                 flows: Flows, resolvers: Resolvers, netcls: NetCls, scopes: Scopes) -> None:
        self.netcls = netcls
        self.scopes = scopes
        self.nft = nft
        self.netlink = netlink
        self.cgroup = cgroup
        self.sysctl = sysctl
        self.flows = flows
        self.resolvers = resolvers


_real: Kernel | None = None
_replacement: Kernel | None = None


def current() -> Kernel:
    """The adapters in use: the kernel modules (imported on first use: a cold launch only
    pays for them when it creates a group), unless :func:`replaced`."""
    global _real
    if _replacement is not None:
        return _replacement
    if _real is None:
        from via_tunnel.kernel import (
            cgroup,
            flows,
            netcls,
            netlink,
            nft,
            resolvers,
            sysctl,
            systemd,
        )

        _real = Kernel(nft=nft, netlink=netlink, cgroup=cgroup, sysctl=sysctl, flows=flows,
                       resolvers=resolvers, netcls=netcls, scopes=systemd)
    return _real


@contextlib.contextmanager
def replaced(kernel: Kernel) -> Iterator[Kernel]:
    """Use ``kernel`` instead of the real adapters for the duration (tests)."""
    global _replacement
    before, _replacement = _replacement, kernel
    try:
        yield kernel
    finally:
        _replacement = before
