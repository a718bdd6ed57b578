"""Cold launch: enter the new group's cgroup while the rest of the setup runs.

Moving a process between cgroups waits for an RCU grace period in the kernel (~10 ms);
a cold launch would otherwise pay it after setup, on top of the netlink import. A thread
does the move at the start instead (it sleeps in the kernel, without the GIL), so the two
overlap. This is safe because the launcher sends no IP traffic of its own: CMD is exec'd
only once the group is complete. If setup fails, the launcher leaves the cgroup again so
that nothing it made stays behind. Used only with the global lock held and no record for
the interface (nobody else can create, join or remove this group meanwhile).

On a systemd host there is nothing to overlap: the group is a scope that PID 1 creates with
this process in it (lifecycle's ``first_pid``), so only :meth:`undo` has work to do. The
net_cls cgroup is joined by setup itself (it needs the group's slot for its classid).
"""

from __future__ import annotations

import contextlib
import os
import threading

from via_tunnel.core.settings import Settings
from via_tunnel.group import state
from via_tunnel.kernel import cgroup


class EarlyJoin:
    def __init__(self, settings: Settings, iface: str) -> None:
        from via_tunnel.group.lifecycle import group_path

        self.settings = settings
        self.iface = iface
        mount = cgroup.cgroup2_mount()
        self.home = cgroup.own_cgroup(mount)
        self.path = group_path(settings, mount, iface)
        self.subtree = os.path.dirname(self.path)
        self.made_subtree = not settings.scopes and not os.path.isdir(self.subtree)
        self.made_group = not settings.scopes and not os.path.isdir(self.path)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._join, name="early-join", daemon=True)
        if not settings.scopes:
            cgroup.make(self.path)
            self.thread.start()

    def _join(self) -> None:
        try:
            cgroup.join(self.path)
        except BaseException as exc:
            self.error = exc

    def wait(self) -> None:
        """Return once this process is in the group; raise if the move failed."""
        if self.thread.ident is not None:
            self.thread.join()
        if self.error is not None:
            raise self.error

    def undo(self) -> None:
        """Setup failed: go back where we came from and remove what setup left (its record
        is an intent log, so teardown knows what that is)."""
        from via_tunnel.group import lifecycle

        if self.thread.ident is not None:
            self.thread.join()
        with contextlib.suppress(Exception):
            cgroup.join(self.home)
        with contextlib.suppress(Exception):
            from via_tunnel.kernel import netcls

            netcls.leave(0)
        with contextlib.suppress(Exception):
            rec = state.load(self.settings, self.iface)
            if rec is not None:
                lifecycle.teardown(self.settings, rec)
            elif self.made_group:
                cgroup.remove(self.path)
        if self.made_subtree:
            cgroup.remove_if_empty(self.subtree)
