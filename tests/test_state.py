"""The group records' file handling: what a writer killed mid-write leaves is removed."""

from __future__ import annotations

from pathlib import Path

from via_tunnel.core.settings import Settings
from via_tunnel.group import state
from via_tunnel.kernel import sysctl


def _record(iface: str) -> state.GroupRecord:
    return state.GroupRecord(iface=iface, slot=1, mark=0x1, table=1, level=1,
                             cgroup="/nonexistent", cgroup_nft_path="x", created=0.0)


def test_delete_also_removes_a_half_written_record(tmp_path: Path) -> None:
    settings = Settings(state_dir=str(tmp_path))
    state.save(settings, _record("vlan3"))
    # A launcher killed between the write and the rename of the next save leaves this:
    Path(state.record_path(settings, "vlan3") + ".tmp").write_text('{"iface": "vl')
    state.delete(settings, "vlan3", 1)
    assert sorted(p.name for p in Path(settings.groups_dir).iterdir()) == []


def test_orphan_tmp_files_are_swept_and_nothing_else(tmp_path: Path) -> None:
    settings = Settings(state_dir=str(tmp_path))
    state.save(settings, _record("eth0"))
    groups = Path(settings.groups_dir)
    (groups / "vlan3.json.tmp").write_text("{")  # killed during its very first save
    (tmp_path / "sysctl.json.tmp").write_text("{")
    (groups / state.WAKE_FILE).write_text("")
    done = state.remove_orphan_tmp(settings)
    assert len(done) == 2 and all("half-written" in line for line in done)
    assert sorted(p.name for p in groups.iterdir()) == [".slot-1", ".wake", "eth0.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["groups"]
    assert [r.iface for r in state.load_all(settings)] == ["eth0"]
    assert state.remove_orphan_tmp(settings) == []


def test_a_missing_state_dir_is_not_an_error(tmp_path: Path) -> None:
    settings = Settings(state_dir=str(tmp_path / "absent"))
    assert state.remove_orphan_tmp(settings) == []
    state.delete(settings, "vlan3")


def test_the_sysctls_saved_by_earlier_versions_are_forgotten_with_their_half_written_file(
        tmp_path: Path) -> None:
    settings = Settings(state_dir=str(tmp_path))
    Path(settings.sysctl_path).write_text('{"/proc/sys/net/ipv4/conf/all/src_valid_mark": "0"}')
    Path(settings.sysctl_path + ".tmp").write_text('{"/proc/sys/net/ipv4/conf/all/src_v')
    sysctl.forget_saved(settings)
    assert list(tmp_path.iterdir()) == []


def test_slots_are_claimed_by_name_and_a_crashed_groups_claim_is_swept(tmp_path: Path
                                                                        ) -> None:
    """A new group's slot is found from the directory's names (no record is read)."""
    settings = Settings(state_dir=str(tmp_path))
    for iface, slot in (("eth0", 1), ("vlan3", 2), ("tun0", 4)):
        rec = _record(iface)
        rec.slot = slot
        state.save(settings, rec)
    assert state.taken_slots(settings) == {1, 2, 4}
    assert state.free_slot(state.taken_slots(settings)) == 3
    assert state.free_slot({1, 2, 3, 4}, {state.mark_for_slot(5)}) == 6  # 5 drains
    state.delete(settings, "vlan3", 2)
    assert state.taken_slots(settings) == {1, 4}
    # A group whose record someone removed: its claim dangles, and more claims than
    # records make the next look read the records and drop it...
    Path(state.record_path(settings, "tun0")).unlink()
    assert state.taken_slots(settings) == {1}
    assert not (Path(settings.groups_dir) / ".slot-4").is_symlink()
    # (as the sweep under the lock does, when no slot was sought meanwhile)
    (Path(settings.groups_dir) / ".slot-4").symlink_to("tun0.json")
    assert state.remove_orphan_tmp(settings) == [
        "removed the claim on slot 4 of a group without record"]
    assert state.taken_slots(settings) == {1}
    # ...and a claim naming another record is replaced by the next group in that slot.
    (Path(settings.groups_dir) / ".slot-2").symlink_to("gone.json")
    rec = _record("wg0")
    rec.slot = 2
    state.save(settings, rec)
    assert (Path(settings.groups_dir) / ".slot-2").readlink() == Path("wg0.json")
    state.delete(settings, "eth0", 2)  # (a wrong slot: wg0's claim is left alone)
    assert (Path(settings.groups_dir) / ".slot-2").readlink() == Path("wg0.json")
    assert state.taken_slots(settings) == {2}  # (eth0's claim dangled: dropped)


def test_records_of_an_earlier_version_without_claims_are_claimed_when_a_slot_is_sought(
        tmp_path: Path) -> None:
    """After an upgrade, groups made before slots were claimed still run: their slots
    must not be handed out again."""
    settings = Settings(state_dir=str(tmp_path))
    rec = _record("eth0")
    rec.slot = 3
    state.save(settings, rec)
    (Path(settings.groups_dir) / ".slot-3").unlink()  # as the earlier version left it
    assert state.taken_slots(settings) == {3}
    assert (Path(settings.groups_dir) / ".slot-3").readlink() == Path("eth0.json")


def test_a_teardown_killed_between_record_and_claim_leaves_nothing_after_the_next_group(
        tmp_path: Path) -> None:
    """The crash test's case: the watcher died after deleting vlan3's record, before its
    claim. The next group on vlan3 must neither keep that claim alive (its target exists
    again) nor leave it behind when it ends."""
    settings = Settings(state_dir=str(tmp_path))
    rec = _record("vlan3")
    rec.slot = 1
    state.save(settings, rec)
    Path(state.record_path(settings, "vlan3")).unlink()  # killed here
    rec = _record("vlan3")
    rec.slot = state.free_slot(state.taken_slots(settings))
    state.save(settings, rec)
    state.delete(settings, "vlan3", rec.slot)
    assert sorted(p.name for p in Path(settings.groups_dir).iterdir()
                  if p.name != ".wake") == []


def test_a_claim_on_a_record_we_cannot_read_keeps_its_slot(tmp_path: Path) -> None:
    settings = Settings(state_dir=str(tmp_path))
    for iface, slot in (("eth0", 1), ("vlan3", 2)):
        rec = _record(iface)
        rec.slot = slot
        state.save(settings, rec)
    Path(state.record_path(settings, "vlan3")).write_text("{not json")
    (Path(settings.groups_dir) / ".slot-3").symlink_to("gone.json")  # counts differ
    assert state.taken_slots(settings) == {1, 2}
    assert sorted(p.name for p in Path(settings.groups_dir).iterdir()
                  if p.name.startswith(".slot-")) == [".slot-1", ".slot-2"]
