"""Doctor: systemd-networkd, which deletes foreign ip rules and routes (ours) when it
restarts unless told not to.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable

from via_tunnel.doctor.check import OK, WARN, Check

ENV_NETWORKD_CONF_DIR = "VIA_TUNNEL_NETWORKD_CONF_DIR"
NETWORKD_KEYS = ("ManageForeignRoutingPolicyRules", "ManageForeignRoutes")
_FALSE = {"no", "false", "0", "off", "n", "f"}
_WANTS = ("multi-user.target.wants", "network-online.target.wants", "sockets.target.wants",
          "sysinit.target.wants")
_UNITS = ("systemd-networkd.service", "systemd-networkd.socket",
          "dbus-org.freedesktop.network1.service")


def networkd_dirs() -> list[str]:
    """Directories holding networkd.conf and networkd.conf.d, highest precedence first."""
    override = os.environ.get(ENV_NETWORKD_CONF_DIR)
    if override:
        return [override]
    return ["/etc/systemd", "/run/systemd", "/usr/local/lib/systemd", "/usr/lib/systemd"]


def networkd_settings(texts: Iterable[str]) -> dict[str, str]:
    """The ``[Network]`` keys that ``texts`` (main file first, then drop-ins in order) end up
    setting; a later assignment wins, as in systemd (pure)."""
    values: dict[str, str] = {}
    for text in texts:
        section = ""
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line[0] in "#;":
                continue
            if line.startswith("[") and line.endswith("]"):
                section = line[1:-1].strip()
            elif section == "Network" and "=" in line:
                key, _, value = line.partition("=")
                values[key.strip()] = value.strip()
    return values


def _networkd_texts(dirs: list[str]) -> tuple[list[str], list[str]]:
    """(texts, paths) of the main file and the drop-ins, in the order systemd applies them:
    the main file of the highest-precedence directory, then drop-ins sorted by name (a name
    in a higher-precedence directory masks the same name below)."""
    paths: list[str] = []
    for d in dirs:
        main = os.path.join(d, "networkd.conf")
        if os.path.isfile(main):
            paths.append(main)
            break
    dropins: dict[str, str] = {}
    for d in dirs:
        dd = os.path.join(d, "networkd.conf.d")
        with contextlib.suppress(OSError):
            for name in os.listdir(dd):
                if name.endswith(".conf"):
                    dropins.setdefault(name, os.path.join(dd, name))
    paths += [dropins[n] for n in sorted(dropins)]
    texts = []
    for p in paths:
        with contextlib.suppress(OSError), open(p) as f:
            texts.append(f.read())
    return texts, paths


def networkd_running() -> bool:
    """A process named systemd-networkd (its ``comm`` is cut to 15 characters)."""
    from via_tunnel.kernel import procs

    return procs.any_named("systemd-networkd", "systemd-network")


def networkd_enabled(dirs: list[str]) -> bool:
    return any(os.path.lexists(os.path.join(d, "system", wants, unit))
               for d in dirs for wants in _WANTS for unit in _UNITS)


def networkd_verdict(running: bool, enabled: bool, values: dict[str, str],
                     paths: list[str]) -> Check:
    """Judge systemd-networkd's foreign-rule settings (pure)."""
    if not (running or enabled):
        return Check("networkd", OK, "systemd-networkd is not running or enabled: nobody "
                                     "removes via-tunnel's ip rules and routes behind its back")
    state = "running" if running else "enabled"
    bad = [k for k in NETWORKD_KEYS if values.get(k, "yes").lower() not in _FALSE]
    read = ", ".join(paths) or "no networkd.conf"
    if not bad:
        return Check("networkd", OK, f"systemd-networkd is {state} and leaves foreign rules and "
                                     f"routes alone ({read})")
    found = ", ".join(f"{k}={values.get(k, 'yes (default)')}" for k in bad)
    return Check(
        "networkd", WARN,
        f"systemd-networkd is {state} with {found} ({read}): when it restarts it deletes the "
        f"ip rules and routes of via-tunnel's active groups",
        "put [Network] " + " ".join(f"{k}=no" for k in bad) +
        " in /etc/systemd/networkd.conf.d/via-tunnel.conf, then restart systemd-networkd")


def check_networkd() -> list[Check]:
    dirs = networkd_dirs()
    texts, paths = _networkd_texts(dirs)
    return [networkd_verdict(networkd_running(), networkd_enabled(dirs),
                             networkd_settings(texts), paths)]
