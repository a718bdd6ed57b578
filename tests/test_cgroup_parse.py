"""Finding the cgroup2 mount and computing levels and nft paths (pure parts)."""

from pathlib import Path

import pytest

from via_tunnel.core.errors import ViaTunnelError
from via_tunnel.kernel import cgroup

HYBRID = [
    "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755",
    "32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu",
    "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw",
]
PURE = ["30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate"]


def test_finds_hybrid_and_pure_v2_mounts() -> None:
    assert cgroup.parse_cgroup2_mount(HYBRID) == "/sys/fs/cgroup/unified"
    assert cgroup.parse_cgroup2_mount(PURE) == "/sys/fs/cgroup"


def test_ignores_bind_mounts_of_subtrees_and_fails_without_v2() -> None:
    sub = "50 23 0:26 /user.slice /mnt/x rw - cgroup2 cgroup2 rw"
    assert cgroup.parse_cgroup2_mount([sub, *PURE]) == "/sys/fs/cgroup"
    with pytest.raises(ViaTunnelError, match="cgroup2"):
        cgroup.parse_cgroup2_mount(HYBRID[:2])


def test_level_counts_depth_inside_the_tree_not_the_path() -> None:
    assert cgroup.level_of("/sys/fs/cgroup/unified/via-tunnel/if-x", "/sys/fs/cgroup/unified") == 2
    assert cgroup.level_of("/sys/fs/cgroup/via-tunnel/if-x", "/sys/fs/cgroup") == 2
    assert cgroup.level_of("/sys/fs/cgroup", "/sys/fs/cgroup") == 0


def test_nft_path_is_relative_to_sys_fs_cgroup() -> None:
    assert cgroup.nft_path("/sys/fs/cgroup/unified/via-tunnel/if-x") == "unified/via-tunnel/if-x"
    with pytest.raises(ViaTunnelError):
        cgroup.nft_path("/mnt/cg/via-tunnel/if-x")


def test_remove_if_empty_keeps_a_directory_with_something_in_it(tmp_path: Path) -> None:
    remove_if_empty = cgroup.remove_if_empty
    subtree = tmp_path / "via-tunnel"
    (subtree / "if-tun0").mkdir(parents=True)
    assert remove_if_empty(str(subtree)) is False and subtree.is_dir()
    (subtree / "if-tun0").rmdir()
    assert remove_if_empty(str(subtree)) is True and not subtree.exists()
    assert remove_if_empty(str(subtree)) is True  # already gone


def test_a_cgroup_being_removed_counts_as_gone(monkeypatch: pytest.MonkeyPatch) -> None:
    """kernfs answers ENODEV for a cgroup systemd is removing (an emptied scope)."""
    import builtins
    import errno

    from via_tunnel.kernel import cgroup

    def dying(*_args: object, **_kw: object) -> object:
        raise OSError(errno.ENODEV, "No such device")

    monkeypatch.setattr(builtins, "open", dying)
    monkeypatch.setattr(cgroup.os, "walk", lambda path: iter([(path, [], [])]))
    assert cgroup.populated("/sys/fs/cgroup/via.slice/x.scope") is False
    assert cgroup.members("/sys/fs/cgroup/via.slice/x.scope") == []
