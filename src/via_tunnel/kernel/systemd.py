"""systemd as the owner of the cgroup tree: is it PID 1, unit-name escaping, and a group as
a transient scope unit (``StartTransientUnit`` over D-Bus).

On a systemd host every cgroup belongs to a unit. A group made as a bare directory is one
systemd does not know (no ``systemctl status``, no resource control, and a service that
holds it in its own cgroup gets "left-over process" warnings on restart). A transient scope
``via-tunnel-IFACE.scope`` in ``via-tunnel.slice``, created with its first member
(``PIDs=``) and ``Delegate=yes`` (later members are written into its cgroup directly), is
systemd's own way to adopt processes it did not start. systemd removes the scope's cgroup
once it is empty; teardown tolerates that (lifecycle.py).

D-Bus (python3-dbus) is imported only here, only when a scope is made: never on the warm
launch path.
"""

from __future__ import annotations

import os
import time

from via_tunnel.core.errors import ViaTunnelError

SLICE = "via-tunnel.slice"
SCOPE_PREFIX = "via-tunnel-"
_SYSTEMD = "org.freedesktop.systemd1"
_PATH = "/org/freedesktop/systemd1"


def booted(run_dir: str = "/run/systemd/system") -> bool:
    """sd_booted(3): whether systemd is PID 1 of this system."""
    return os.path.isdir(run_dir)


def escape(name: str) -> str:
    """``systemd-escape NAME`` (unit_name_escape): what a unit name may carry verbatim
    stays, ``/`` becomes ``-``, anything else (``-`` too, and a leading ``.``) ``\\xNN``."""
    out = []
    for i, ch in enumerate(name):
        if ch == "/":
            out.append("-")
        elif (ch.isascii() and ch.isalnum()) or ch in ":_" or (ch == "." and i > 0):
            out.append(ch)
        else:
            out.extend(f"\\x{b:02x}" for b in ch.encode())
    return "".join(out)


def scope_name(iface: str) -> str:
    """The scope unit of ``iface``'s group."""
    return f"{SCOPE_PREFIX}{escape(iface)}.scope"


def start_scope(unit: str, slice_name: str, pid: int, path: str, mount: str,
                timeout: float = 10.0) -> None:
    """Start the transient scope ``unit`` in ``slice_name`` with ``pid`` as its first
    member, and return once the kernel says ``pid`` is in its cgroup (``path``)."""
    from via_tunnel.kernel.cgroup import own_cgroup

    try:
        import dbus  # type: ignore[import-untyped]
    except ImportError as exc:
        raise ViaTunnelError("systemd is PID 1 but python3-dbus is missing (groups are "
                             "made as systemd scopes over D-Bus)") from exc
    props = dbus.Array([
        ("Description", dbus.String(f"via-tunnel group of {unit}")),
        ("Slice", dbus.String(slice_name)),
        ("Delegate", dbus.Boolean(True)),
        ("CollectMode", dbus.String("inactive-or-failed")),
        ("PIDs", dbus.Array([dbus.UInt32(pid)], signature="u")),
    ], signature="(sv)")
    try:
        bus = dbus.SystemBus(private=True)  # our own connection: callers run in threads
        try:
            manager = dbus.Interface(bus.get_object(_SYSTEMD, _PATH),
                                     "org.freedesktop.systemd1.Manager")
            manager.StartTransientUnit(unit, "fail", props,
                                       dbus.Array([], signature="(sa(sv))"))
        finally:
            bus.close()
    except dbus.DBusException as exc:
        raise ViaTunnelError(f"systemd refused the scope {unit}: "
                             f"{exc.get_dbus_message()}") from None
    # PID 1 moves the process when it runs the start job: wait for that, by the state.
    deadline = time.monotonic() + timeout
    while True:
        try:
            if own_cgroup(mount, pid) == os.path.normpath(path):
                return
        except FileNotFoundError:
            raise ViaTunnelError(f"process {pid} exited before joining {unit}") from None
        if time.monotonic() > deadline:
            raise ViaTunnelError(f"systemd did not move process {pid} into {unit} "
                                 f"within {timeout:g}s")
        time.sleep(0.001)
