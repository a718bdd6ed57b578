"""The config file (``/etc/via-tunnel/config.toml``): read and parsed in one place.

::

    [daemon]            # who may use the daemon's socket   (read by core.policy)
    [interface.NAME]    # who may use NAME, and its defaults (read by core.policy)
    [gateway.NAME]      # `via-tunnel gateway up NAME`       (read by the gateway)
    [launch]            # single_instance = ["app", ...]     (read by :func:`launch_section`)

:func:`load` and :func:`parse` check the file as a whole, for every reader alike: UTF-8,
TOML, no section but these three, ``[daemon]`` a table, ``[interface]`` and ``[gateway]``
tables of tables named by valid interface names. They return a :class:`ConfigFile` of
those sections. What is inside a section (its keys and their values) is checked by the
section's reader, where the values are understood: :mod:`via_tunnel.core.policy` for
``[daemon]`` and every ``[interface.NAME]`` (with :func:`check_keys`), the gateway for the
``[gateway.NAME]`` it brings up (with the checks its command-line flags get). A missing file
is an empty one. Every error is a :class:`ConfigError` whose one-line message starts with
the file's path and names the place.

Pure apart from reading the file; standard library only.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from via_tunnel.core.errors import UsageError, ViaTunnelError
from via_tunnel.core.names import validate_ifname

SECTIONS = ("daemon", "interface", "gateway", "launch")
LAUNCH_KEYS = frozenset({"single_instance"})
_NAMED = ("interface", "gateway")  # tables of [SECTION.NAME] tables


class ConfigError(ViaTunnelError):
    """The config file is unreadable or wrong; the message names the file and the place."""


@dataclass(frozen=True)
class ConfigFile:
    """The sections of one config file, their layout checked (see the module docstring)."""

    path: str = "config.toml"
    daemon: Mapping[str, Any] = field(default_factory=dict)
    interfaces: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    gateways: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


def load(path: str) -> ConfigFile:
    """Read and parse the config file at ``path``; a missing file is an empty one."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return ConfigFile(path)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 ({exc.reason})") from exc
    return parse(text, path)


def parse(text: str, path: str = "config.toml") -> ConfigFile:
    """Parse config text; raise :class:`ConfigError` naming the file and the first problem."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    except RecursionError:  # tomllib recurses per nesting level: a hostile file
        raise ConfigError(f"{path}: nested too deeply") from None
    unknown = set(data) - set(SECTIONS)
    if unknown:
        raise ConfigError(f"{path}: unknown section [{sorted(unknown)[0]}]")
    daemon = data.get("daemon", {})
    if not isinstance(daemon, dict):
        raise ConfigError(f"{path}: [daemon] must be a table")
    launch_section(data.get("launch", {}), path)
    named = {section: _named_tables(data.get(section, {}), section, path)
             for section in _NAMED}
    return ConfigFile(path, daemon, named["interface"], named["gateway"])


def _named_tables(value: Any, section: str, path: str) -> dict[str, Mapping[str, Any]]:
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: [{section}] must be a table of [{section}.NAME] tables")
    for name, body in value.items():
        where = f"{path}: [{section}.{name}]"
        try:
            validate_ifname(name)
        except UsageError as exc:
            raise ConfigError(f"{where}: {exc.message}") from None
        if not isinstance(body, dict):
            raise ConfigError(f"{where} must be a table")
    return value


def check_keys(table: Mapping[str, Any], known: frozenset[str], where: str) -> None:
    """Raise :class:`ConfigError` at ``where`` for the first key of ``table`` not in
    ``known``: a typo is an error, never a setting silently ignored."""
    unknown = set(table) - known
    if unknown:
        raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r} "
                          f"(known: {', '.join(sorted(known))})")


def launch_section(launch: Any, path: str) -> frozenset[str]:
    """The ``[launch]`` section: ``single_instance``, the names of programs (their
    executable's file name) that hand a new launch to an instance already running, besides
    the built-in list (kernel/instances.py)."""
    if not isinstance(launch, dict):
        raise ConfigError(f"{path}: [launch] must be a table")
    check_keys(launch, LAUNCH_KEYS, f"{path}: [launch]")
    names = launch.get("single_instance", [])
    if not isinstance(names, list) or not all(isinstance(n, str) and n and "/" not in n
                                              for n in names):
        raise ConfigError(f"{path}: [launch] single_instance must be a list of program "
                          f"names")
    return frozenset(names)
