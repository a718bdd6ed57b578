"""Who CMD runs as under sudo/doas/pkexec or --user (the pure decision; no root needed)."""

from __future__ import annotations

import os
import pwd

import pytest

from via_tunnel.core.errors import ViaTunnelError
from via_tunnel.launch.privdrop import choose, lookup


@pytest.mark.parametrize(("env", "user", "expected"), [
    ({}, None, None),
    ({"SUDO_UID": "1000", "SUDO_GID": "1000", "SUDO_USER": "alice"}, None, ("uid", "1000")),
    ({"SUDO_UID": "0"}, None, None),  # sudo from a root shell
    ({"DOAS_USER": "alice"}, None, ("name", "alice")),
    ({"DOAS_USER": "root"}, None, None),
    ({"PKEXEC_UID": "1001"}, None, ("uid", "1001")),
    ({"SUDO_UID": "1000", "DOAS_USER": "bob"}, None, ("uid", "1000")),  # sudo first
    ({"SUDO_UID": "1000"}, "bob", ("name", "bob")),  # --user wins
    ({}, "bob", ("name", "bob")),
])
def test_choice_when_really_root(env: dict[str, str], user: str | None,
                                 expected: tuple[str, str] | None) -> None:
    assert choose(env, user, 0, 0) == expected


@pytest.mark.parametrize(("uid", "euid"), [(1000, 1000), (1000, 0), (0, 1000)])
def test_non_root_never_switches_and_cannot_use_user_option(uid: int, euid: int) -> None:
    assert choose({"SUDO_UID": "1001", "DOAS_USER": "x", "PKEXEC_UID": "7"}, None,
                  uid, euid) is None
    with pytest.raises(ViaTunnelError, match="--user needs root"):
        choose({}, "bob", uid, euid)


def test_garbage_sudo_uid_is_an_error() -> None:
    with pytest.raises(ViaTunnelError, match="SUDO_UID"):
        choose({"SUDO_UID": "12abc"}, None, 0, 0)


def test_lookup_uses_the_user_database_and_sudo_gid() -> None:
    me = pwd.getpwuid(os.getuid())
    t = lookup(("uid", str(me.pw_uid)), {"SUDO_UID": str(me.pw_uid), "SUDO_GID": "4242"})
    assert t is not None
    assert (t.name, t.uid, t.gid, t.home) == (me.pw_name, me.pw_uid, 4242, me.pw_dir)
    t = lookup(("name", me.pw_name), {})
    assert t is not None and t.gid == me.pw_gid
    assert lookup(None, {}) is None
    with pytest.raises(ViaTunnelError, match="no such user"):
        lookup(("name", "no-such-user-vt"), {})


def test_launch_form_takes_user_option() -> None:
    from via_tunnel.core.launch_form import parse

    assert parse(["--user", "bob", "vlan3", "--", "id"]).user == "bob"
    assert parse(["--user=bob", "vlan3", "--", "id"]).user == "bob"
    assert parse(["vlan3", "--", "id", "--user", "x"]).user is None  # CMD's own option
