"""Fixtures for the kernel tests: labs of network namespaces and via-tunnel runs inside them.

Tests marked ``kernel`` need root and a few programs. Where they are missing the tests are
skipped with the reason, except in CI (``CI`` set), where they fail: a CI run that silently
skipped the kernel tests would prove nothing.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable, Iterator

import pytest
from helpers import missing_prerequisites, vt_env_for

from via_tunnel.lab.footprint import remove_footprint
from via_tunnel.lab.netlab import Lab


@functools.cache
def _missing() -> tuple[str, ...]:
    return tuple(missing_prerequisites())


def require_kernel() -> None:
    """Skip (fail under CI) when this machine cannot run the kernel tests."""
    missing = _missing()
    if not missing:
        return
    reason = "kernel tests need " + ", ".join(missing)
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set: refusing to skip)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(autouse=True)
def _kernel_prerequisites(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("kernel") is not None:
        require_kernel()


def _teardown(lab: Lab) -> None:
    lab.down()
    env = vt_env_for(lab)
    left = remove_footprint(env["VIA_TUNNEL_STATE_DIR"], env["VIA_TUNNEL_CGROUP"])
    if left:
        warnings.warn(f"left behind after lab {lab.prefix}: {left}", stacklevel=1)


def host_like(lab: Lab) -> Lab:
    """A lab's client as a host looks once a group ran or wg-quick started: with
    ``src_valid_mark=1``, which via-tunnel raises and never lowers (kernel/sysctl.py), so
    that before/after snapshots compare what a group must leave as it found. Tests of a
    client that starts at 0 set it themselves."""
    lab.run(lab.client, ["sysctl", "-qw", "net.ipv4.conf.all.src_valid_mark=1"])
    return lab


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    """A lab with OpenVPN, shared by the tests of one module and removed after them (with
    the state dir and cgroup subtree of its ``vt_env``)."""
    require_kernel()
    the_lab = host_like(Lab(openvpn=True).up())
    try:
        yield the_lab
    finally:
        _teardown(the_lab)


@pytest.fixture
def lab_factory() -> Iterator[Callable[..., Lab]]:
    """``lab_factory(**Lab kwargs)`` builds an extra lab, removed when the test ends."""
    require_kernel()
    made: list[Lab] = []

    def make(**kwargs: object) -> Lab:
        new = Lab(**kwargs)  # type: ignore[arg-type]
        made.append(new)
        return host_like(new.up())

    try:
        yield make
    finally:
        for each in made:
            _teardown(each)


@pytest.fixture
def vt_env(lab: Lab) -> dict[str, str]:
    """Environment for via-tunnel in ``lab``: VIA_TUNNEL_STATE_DIR and VIA_TUNNEL_CGROUP unique
    to the lab, and PYTHONPATH so the child runs the code under test. Use with
    ``helpers.via(lab, vt_env, IFACE, "--", *argv)``."""
    return vt_env_for(lab)
