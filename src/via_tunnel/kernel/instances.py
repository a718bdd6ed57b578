"""The single-instance warning: CMD would hand its work to an instance outside the group.

Browsers, Electron apps and some editors hand a new launch to the instance that already
runs and exit; that instance is outside the group, so the new window's traffic bypasses the
tunnel. We cannot prevent it, but we can say so, and only when it would happen:

* CMD is such a program: its executable's file name is in :data:`SINGLE_INSTANCE`, or in
  ``single_instance`` of the config's ``[launch]`` section (read only when the file names
  CMD at all, so other launches never parse TOML);
* an instance runs for the same user, in the same network namespace (the one that would
  receive the request: an instance elsewhere has its own sockets and its own D-Bus), and
  outside this group.

A scan of ``/proc`` (a stat per process; readlinks only for the user's own) on the launch
path, and only for those programs.
"""

from __future__ import annotations

import os
import sys

SINGLE_INSTANCE = frozenset({
    # browsers (the real executables: /usr/lib/firefox-esr/firefox-esr, /opt/google/...)
    "firefox", "firefox-esr", "firefox-bin", "librewolf", "chromium", "chromium-browser",
    "chrome", "google-chrome", "brave", "brave-browser", "msedge", "vivaldi-bin", "opera",
    "thunderbird", "thunderbird-bin",
    # Electron and other desktop apps that forward to a running instance
    "code", "code-oss", "codium", "electron", "slack", "discord", "Discord",
    "signal-desktop", "telegram-desktop", "Telegram", "spotify", "element-desktop",
    "teams-for-linux", "obsidian",
    # editors and viewers with a single-instance default
    "gedit", "gnome-text-editor", "kate", "evince", "okular", "nautilus", "dolphin",
    "soffice.bin",
})


def cgroup_of(pid: int | str, proc: str = "/proc") -> str:
    """The cgroup2 path of ``pid`` as ``/proc/PID/cgroup`` shows it (``/via-tunnel/if-x``)."""
    with open(f"{proc}/{pid}/cgroup") as f:
        return next((ln[3:].rstrip("\n") for ln in f if ln.startswith("0::")), "")


def configured(name: str, config_path: str) -> bool:
    """Whether the config's ``[launch] single_instance`` lists ``name``. The file is parsed
    only when its text contains the name (almost never), so TOML stays off the hot path."""
    try:
        with open(config_path, "rb") as f:
            raw = f.read()
    except OSError:
        return False
    if name.encode() not in raw:
        return False
    try:
        import tomllib

        from via_tunnel.core.config import launch_section

        data = tomllib.loads(raw.decode("utf-8"))
        return name in launch_section(data.get("launch", {}), config_path)
    except Exception:  # a broken config is the daemon's to report, not the launcher's
        return False


def others_running(exe: str, uid: int, cgroup_rel: str, netns: str,
                   proc: str = "/proc") -> list[int]:
    """PIDs of ``uid``'s processes whose executable is ``exe`` (a real path), in network
    namespace ``netns`` (as ``/proc/PID/ns/net`` reads) and not in cgroup ``cgroup_rel``."""
    me = os.getpid()
    found = []
    for name in os.listdir(proc):
        if not name.isdigit() or int(name) == me:
            continue
        base = f"{proc}/{name}"
        try:
            if os.stat(base).st_uid != uid or os.readlink(f"{base}/exe") != exe:
                continue
            if os.readlink(f"{base}/ns/net") != netns:
                continue
            if cgroup_of(name, proc) != cgroup_rel:
                found.append(int(name))
        except OSError:
            continue
    return found


def warn_if_running(path: str, uid: int, iface: str, config_path: str) -> None:
    """Print one warning line when CMD (``path``) is a single-instance program and an
    instance would receive this launch (see the module docstring). Never fails: advice."""
    try:
        exe = os.path.realpath(path)
        base = os.path.basename(exe)
        if base not in SINGLE_INSTANCE and os.path.basename(path) not in SINGLE_INSTANCE \
                and not configured(base, config_path):
            return
        pids = others_running(exe, uid, cgroup_of("self"), os.readlink("/proc/self/ns/net"))
    except Exception:
        return
    if pids:
        sys.stderr.write(
            f"via-tunnel: warning: {base} is already running outside {iface}'s group "
            f"(pid {pids[0]}); a single-instance app hands new windows to that process, "
            f"whose traffic bypasses {iface}: start it with a separate profile "
            f"(e.g. firefox -P NAME --no-remote, chromium --user-data-dir=DIR)\n")
        sys.stderr.flush()
