"""No user changes another user's routing (issue "No escape, no cross-user influence", A):
a non-root caller's routing options need ``user_options``, and a non-root caller joins a
running group only when it was created with exactly the caller's (effective) options.
Without root: the policy is pure, the group's life runs on the fakes of
test_lifecycle_seam.py."""

from __future__ import annotations

import pytest
from test_lifecycle_seam import FakeKernel, fake, settings  # noqa: F401 (fixtures)

from via_tunnel.core.errors import ViaTunnelError
from via_tunnel.core.policy import InterfacePolicy, Request, RequestError, check_user_options
from via_tunnel.core.settings import Settings
from via_tunnel.group import lifecycle, state


@pytest.mark.parametrize("req", [Request("vlan3", gateway="192.0.2.1"),
                                 Request("vlan3", dns=("198.51.100.53",)),
                                 Request("vlan3", ipv6="block")])
def test_a_users_routing_options_need_user_options(req: Request) -> None:
    with pytest.raises(RequestError, match="user_options"):
        check_user_options(req, InterfacePolicy(allow_users=frozenset({"a"})), 1000)
    with pytest.raises(RequestError, match="user_options"):
        check_user_options(req, None, 1000)
    check_user_options(req, InterfacePolicy(user_options=frozenset(
        {"gateway", "dns", "ipv6"})), 1000)
    check_user_options(req, None, 0)  # root sets what it likes
    check_user_options(Request("vlan3"), None, 1000)  # asking nothing needs nothing


def test_a_plain_run_does_not_join_a_group_started_with_other_options(
        settings: Settings, fake: FakeKernel) -> None:  # noqa: F811
    rec = lifecycle.ensure_group(settings, "tun0", ipv6="block", dns=("198.51.100.53",))
    fake.populated_groups.add(rec.cgroup)  # a member runs in it
    with pytest.raises(ViaTunnelError, match=r"in use with other routing options.*ipv6, dns"):
        lifecycle.ensure_group(settings, "tun0", exact=True)
    # Root (not exact) joins it as before; so does a caller asking exactly the same.
    lifecycle.ensure_group(settings, "tun0")
    lifecycle.ensure_group(settings, "tun0", ipv6="block", dns=("198.51.100.53",),
                           exact=True)
    # Asking a subset is not the same: the group's options would be imposed on the caller.
    with pytest.raises(ViaTunnelError, match=r"\(started by root or another user; ipv6 "):
        lifecycle.ensure_group(settings, "tun0", dns=("198.51.100.53",), exact=True)


def test_a_plain_group_is_joined_by_plain_runs_only(
        settings: Settings, fake: FakeKernel) -> None:  # noqa: F811
    rec = lifecycle.ensure_group(settings, "tun0")
    fake.populated_groups.add(rec.cgroup)
    assert rec.asked() == (None, "auto", ())
    assert lifecycle.ensure_group(settings, "tun0", exact=True).slot == rec.slot
    with pytest.raises(ViaTunnelError, match="gateway differ"):
        lifecycle.ensure_group(settings, "tun0", gateway="10.8.0.1", exact=True)


def test_an_older_record_is_joined_only_with_identical_routing(
        settings: Settings, fake: FakeKernel) -> None:  # noqa: F811
    rec = lifecycle.ensure_group(settings, "tun0")
    fake.populated_groups.add(rec.cgroup)
    rec.dns_asked = rec.ipv6_asked = rec.gateway_asked = None  # as older versions wrote it
    state.save(settings, rec)
    assert state.load(settings, "tun0").asked() is None  # type: ignore[union-attr]
    lifecycle.ensure_group(settings, "tun0", exact=True)  # same routing: joined
    with pytest.raises(ViaTunnelError, match="other routing options"):
        lifecycle.ensure_group(settings, "tun0", dns=("198.51.100.53",), exact=True)


@pytest.mark.parametrize("exact", [False, True])
def test_a_group_with_other_options_but_no_member_left_is_replaced(
        settings: Settings, fake: FakeKernel, exact: bool) -> None:  # noqa: F811
    """Its last member exited and its watcher has not torn it down yet: a run with other
    options gets a new group with its own, instead of a refusal about programs that no
    longer run (`via-tunnel X -- a; via-tunnel --dns D X -- b` in a script)."""
    old = lifecycle.ensure_group(settings, "tun0")
    new = lifecycle.ensure_group(settings, "tun0", dns=("198.51.100.53",), exact=exact)
    assert new.dns4 == "198.51.100.53" and new.created >= old.created
    assert state.load(settings, "tun0").dns4 == "198.51.100.53"  # type: ignore[union-attr]
