"""libnftables opens its netlink socket without close-on-exec; nft.context() fixes that
(a cold launch execs CMD from the process that used the contexts)."""

from __future__ import annotations

import os
from typing import Any

import pytest

from via_tunnel.kernel import nft


def _new_sockets(make: Any) -> tuple[Any, list[int]]:
    before = nft._open_fds()
    ctx = make()
    return ctx, [fd for fd, target in nft._open_fds().items()
                 if target.startswith("socket:") and before.get(fd) != target]


def test_every_descriptor_of_a_new_context_is_close_on_exec() -> None:
    nftables = pytest.importorskip("nftables")
    raw, raw_fds = _new_sockets(nftables.Nftables)
    assert raw_fds, "libnftables opened no socket"
    # 1.0.6: inheritable (once a libnftables makes it close-on-exec, context() may go)
    print("binding alone, inheritable:", [os.get_inheritable(fd) for fd in raw_fds])
    ctx, fds = _new_sockets(nft.context)
    assert fds and not any(os.get_inheritable(fd) for fd in fds)
    del raw, ctx
