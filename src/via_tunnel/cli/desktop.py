"""``via-tunnel desktop install|remove|list``: launchers that start an app via an interface.

``install APP.desktop IFACE`` writes a user copy of the entry (same desktop file ID, so it
takes the original's place in menus) to ``$XDG_DATA_HOME/applications`` with, following the
Desktop Entry Specification:

* every ``Exec=`` (main group and ``[Desktop Action *]`` groups) prefixed with
  ``via-tunnel IFACE --``; the app's own arguments and field codes (``%u``, ``%F``...) stay;
* ``Name`` and every localized ``Name[xx]`` suffixed with `` (via IFACE)``;
* ``DBusActivatable`` removed: a launcher that can activate the app over D-Bus ignores
  ``Exec=``, which would bypass the tunnel;
* ``TryExec`` kept (the entry still disappears when the app is uninstalled);
* a marker key ``X-Via-Tunnel-Interface=IFACE``, so ``remove`` and ``list`` only ever touch
  files written here.

The text transformation (:func:`transform`) is pure; the rest finds and writes files.
"""

from __future__ import annotations

import os
import shutil

from via_tunnel.core.errors import UsageError, ViaTunnelError
from via_tunnel.core.names import validate_ifname

MARKER = "X-Via-Tunnel-Interface"
MAIN = "Desktop Entry"
# Characters that force quoting of an Exec argument (Desktop Entry Specification, "The Exec
# key"); inside double quotes, these four must be escaped with a backslash.
_RESERVED = set(" \t\n\"'\\><~|&;$*?#()`")
_ESCAPE_IN_QUOTES = set('"`$\\')


def data_home() -> str:
    return os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"),
                                                           ".local", "share")


def data_dirs() -> list[str]:
    raw = os.environ.get("XDG_DATA_DIRS") or "/usr/local/share:/usr/share"
    return [d for d in raw.split(":") if d]


def user_dir() -> str:
    return os.path.join(data_home(), "applications")


def exec_arg(arg: str) -> str:
    """One argument as the Exec key wants it (before the file's own string escaping)."""
    arg = arg.replace("%", "%%")
    if not any(c in _RESERVED for c in arg):
        return arg
    return '"' + "".join("\\" + c if c in _ESCAPE_IN_QUOTES else c for c in arg) + '"'


def escape_value(text: str) -> str:
    """A string as a desktop file value: backslashes doubled (the spec's string escapes)."""
    return text.replace("\\", "\\\\")


def _key_of(line: str) -> tuple[str, str] | None:
    """``(key, value)`` of a ``Key[locale] = value`` line, or None for other lines."""
    if not line or line.startswith("#") or line.startswith("[") or "=" not in line:
        return None
    key, _, value = line.partition("=")
    return key.strip(), value.lstrip(" ")


def transform(text: str, iface: str, via_tunnel: str = "via-tunnel") -> str:
    """The user copy of a desktop entry launched through ``iface`` (pure)."""
    prefix = " ".join(escape_value(exec_arg(a)) for a in (via_tunnel, iface, "--"))
    label = escape_value(iface)
    group = None
    seen_main = False
    has_exec = False
    out = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("[") and stripped.endswith("]"):
            if group == MAIN:
                out.append(f"{MARKER}={label}")
            group = stripped[1:-1]
            seen_main = seen_main or group == MAIN
            out.append(line)
            continue
        kv = _key_of(stripped)
        if kv is None or group is None:
            out.append(line)
            continue
        key, value = kv
        base = key.split("[", 1)[0]
        is_action = group.startswith("Desktop Action ")
        if group == MAIN and base == MARKER:
            raise ViaTunnelError("this entry was written by via-tunnel already")
        if group == MAIN and base == "Type" and value.strip() != "Application":
            raise ViaTunnelError(f"only Type=Application entries can be launched (this is "
                                 f"Type={value.strip()})")
        if group == MAIN and base == "DBusActivatable":
            continue  # would let the launcher bypass Exec=
        if (group == MAIN or is_action) and key == "Exec":
            out.append(f"Exec={prefix} {value}")
            has_exec = has_exec or group == MAIN
            continue
        if group == MAIN and base == "Name":
            out.append(f"{key}={value} (via {label})")
            continue
        out.append(line)
    if group == MAIN:
        out.append(f"{MARKER}={label}")
    if not seen_main:
        raise ViaTunnelError("not a desktop entry (no [Desktop Entry] group)")
    if not has_exec:
        raise ViaTunnelError("the entry has no Exec= line to prefix (D-Bus activation only?)")
    return "\n".join(out) + "\n"


def _marker(path: str) -> str | None:
    """The interface recorded in a file we wrote, or None for any other file."""
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                kv = _key_of(line.strip())
                if kv and kv[0] == MARKER:
                    return kv[1].strip().replace("\\\\", "\\")
    except (OSError, UnicodeDecodeError):
        return None
    return None


def find(entry: str) -> str:
    """The file of ``entry``: a path, or a desktop file name looked up in the XDG
    applications directories (the user's own copies written by us do not count)."""
    if "/" in entry:
        if not os.path.isfile(entry):
            raise ViaTunnelError(f"{entry}: no such file")
        return entry
    for base in [data_home(), *data_dirs()]:
        path = os.path.join(base, "applications", entry)
        if os.path.isfile(path) and _marker(path) is None:
            return path
    raise ViaTunnelError(f"{entry}: not found in any applications directory "
                         f"($XDG_DATA_HOME, $XDG_DATA_DIRS); give a path")


def _name(entry: str) -> str:
    name = os.path.basename(entry)
    if not name.endswith(".desktop"):
        raise UsageError(f"{entry}: a desktop entry's name ends in .desktop")
    return name


def install(entry: str, iface: str) -> str:
    """Write the user copy of ``entry`` launched via ``iface``; returns a line for the user."""
    validate_ifname(iface)
    name = _name(entry)
    source = find(entry)
    try:
        with open(source, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ViaTunnelError(f"cannot read {source}: {exc}") from exc
    via = shutil.which("via-tunnel") or "via-tunnel"
    new = transform(text, iface, via)
    target_dir = user_dir()
    target = os.path.join(target_dir, name)
    if os.path.exists(target) and _marker(target) is None:
        raise ViaTunnelError(f"{target} exists and was not written by via-tunnel; "
                             f"not overwriting it")
    os.makedirs(target_dir, exist_ok=True)
    tmp = target + ".via-tunnel.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(new)
    os.replace(tmp, target)
    return f"installed {target} (launches via {iface})"


def remove(entry: str) -> str:
    """Remove a user copy written by :func:`install`; any other file is left alone."""
    target = os.path.join(user_dir(), _name(entry))
    if not os.path.exists(target):
        raise ViaTunnelError(f"{target}: not installed")
    if _marker(target) is None:
        raise ViaTunnelError(f"{target} was not written by via-tunnel; not removing it")
    os.unlink(target)
    return f"removed {target}"


def list_installed() -> list[tuple[str, str]]:
    """``(path, interface)`` of every entry written by :func:`install`."""
    directory = user_dir()
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    rows = []
    for name in names:
        path = os.path.join(directory, name)
        if name.endswith(".desktop"):
            iface = _marker(path)
            if iface is not None:
                rows.append((path, iface))
    return rows
