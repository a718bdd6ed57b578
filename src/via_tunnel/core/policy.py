"""Who may use which interface through the daemon: its part of the config file, the
decisions, and the validation of requests.

Pure: parsing and decisions take text and plain values and return values; the daemon does
the I/O (the peer's credentials, the user database). The file is read and its layout
checked by :mod:`via_tunnel.core.config`; this module reads ``[daemon]`` and every
``[interface.NAME]``, the sections that are its own::

    [daemon]                      # optional
    socket_group = "via-tunnel"   # socket mode 0660 and this group (default: mode 0666)

    [interface.vlan3]
    allow_users  = ["user1"]
    allow_groups = ["vpn"]
    dns  = ["198.51.100.53"]      # default --dns for this interface
    ipv6 = "auto"                 # default --ipv6
    gateway = "192.0.2.33"        # default --gateway
    user_options = ["dns"]        # options a non-root caller may set itself (default: none)

Nothing is allowed unless listed; root is always allowed.

No user can change another user's routing: a non-root caller's ``--gateway``, ``--dns``
and ``--ipv6`` are refused unless the interface lists them in ``user_options`` (its routing
comes from the config, the same for every allowed user), and a caller joins a running group
only when the group's options are exactly the ones the caller would have created it with
(a group started by root or by a user with other options is refused, never joined).

Unknown keys are errors, so a typo (``allow_user``) cannot silently lock everybody out or,
worse, be read as something else.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from via_tunnel.core import config
from via_tunnel.core.config import ConfigError, check_keys
from via_tunnel.core.errors import UsageError, ViaTunnelError
from via_tunnel.core.names import validate_ifname
from via_tunnel.core.wire import IPV6_MODES

MAX_DNS = 8
_IFACE_KEYS = frozenset({"allow_users", "allow_groups", "dns", "ipv6", "gateway",
                         "user_options"})
USER_OPTIONS = ("gateway", "dns", "ipv6")
_DAEMON_KEYS = frozenset({"socket_group"})


class RequestError(ViaTunnelError):
    """A request the daemon cannot take (malformed, too large, bad values)."""


@dataclass(frozen=True)
class InterfacePolicy:
    """What the config says about one interface."""

    allow_users: frozenset[str] = frozenset()
    allow_groups: frozenset[str] = frozenset()
    dns: tuple[str, ...] = ()
    ipv6: str | None = None
    gateway: str | None = None
    user_options: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Policy:
    """The whole config. An empty policy allows root only."""

    interfaces: Mapping[str, InterfacePolicy] = field(default_factory=dict)
    socket_group: str | None = None


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str


@dataclass(frozen=True)
class Request:
    """A launch request as the daemon accepts it. Identity is never part of it: who is
    asking comes from the kernel (SO_PEERCRED), not from the request."""

    iface: str
    gateway: str | None = None
    ipv6: str = "auto"
    dns: tuple[str, ...] = ()


def load(path: str) -> Policy:
    """Read and parse the config file. A missing file is an empty policy (root only)."""
    return from_file(config.load(path))


def parse(text: str, path: str = "config.toml") -> Policy:
    """Parse config text; raise :class:`ConfigError` naming the file and the first problem."""
    return from_file(config.parse(text, path))


def from_file(conf: config.ConfigFile) -> Policy:
    """The policy of a parsed config file: its ``[daemon]`` and ``[interface.NAME]``
    sections, every key and value checked (:class:`ConfigError` on the first problem)."""
    check_keys(conf.daemon, _DAEMON_KEYS, f"{conf.path}: [daemon]")
    socket_group = conf.daemon.get("socket_group")
    if socket_group is not None and (not isinstance(socket_group, str) or not socket_group):
        raise ConfigError(f"{conf.path}: [daemon] socket_group must be a group name")
    interfaces = {name: _interface(body, f"{conf.path}: [interface.{name}]")
                  for name, body in conf.interfaces.items()}
    return Policy(interfaces=interfaces, socket_group=socket_group)


def _interface(body: Mapping[str, Any], where: str) -> InterfacePolicy:
    check_keys(body, _IFACE_KEYS, where)
    users = _names(body.get("allow_users", []), f"{where} allow_users")
    groups = _names(body.get("allow_groups", []), f"{where} allow_groups")
    try:
        dns = check_dns(body.get("dns", []))
        ipv6 = body.get("ipv6")
        if ipv6 is not None:
            check_ipv6(ipv6)
        gateway = body.get("gateway")
        if gateway is not None:
            check_gateway(gateway)
    except RequestError as exc:
        raise ConfigError(f"{where}: {exc.message}") from None
    options = _names(body.get("user_options", []), f"{where} user_options")
    unknown = sorted(options - set(USER_OPTIONS))
    if unknown:
        raise ConfigError(f"{where} user_options: unknown option {unknown[0]!r} (known: "
                          f"{', '.join(USER_OPTIONS)})")
    return InterfacePolicy(allow_users=users, allow_groups=groups, dns=dns, ipv6=ipv6,
                           gateway=gateway, user_options=options)


def _names(value: Any, where: str) -> frozenset[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{where} must be a list of names")
    return frozenset(value)


def check_dns(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or len(value) > MAX_DNS:
        raise RequestError(f"dns must be a list of at most {MAX_DNS} addresses")
    out = []
    for item in value:
        if not isinstance(item, str):
            raise RequestError("dns must be a list of IP addresses")
        try:
            out.append(str(ipaddress.ip_address(item)))
        except ValueError:
            raise RequestError(f"dns: {item[:64]!r} is not an IP address") from None
    return tuple(out)


def check_ipv6(value: Any) -> str:
    if value not in IPV6_MODES:
        raise RequestError(f"ipv6 must be one of {', '.join(IPV6_MODES)}")
    return str(value)


def check_gateway(value: Any) -> str:
    if not isinstance(value, str):
        raise RequestError("gateway must be an IPv4 address")
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        raise RequestError(f"gateway {value[:64]!r} is not an IPv4 address") from None


def decide(policy: Policy, iface: str, uid: int, user: str | None,
           groups: Iterable[str]) -> Decision:
    """May the user (``uid``, its name, the names of all its groups) use ``iface``?"""
    if uid == 0:
        return Decision(True, "root")
    who = user if user is not None else f"uid {uid}"
    rules = policy.interfaces.get(iface)
    if rules is None:
        return Decision(False, f"{iface} is not configured for the daemon "
                               f"(no [interface.{iface}] in the config)")
    if user is not None and user in rules.allow_users:
        return Decision(True, f"user {user} is in allow_users")
    matched = sorted(rules.allow_groups.intersection(groups))
    if matched:
        return Decision(True, f"{who} is in group {matched[0]}")
    return Decision(False, f"{who} is not allowed to use {iface} "
                           f"(not in its allow_users or allow_groups)")


def parse_request(raw: bytes) -> Request:
    """Validate one request (JSON object). Unknown fields are ignored, in particular any
    claim of identity ("pid", "uid"): the daemon takes those from the kernel only."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise RequestError("malformed request (not JSON)") from None
    if not isinstance(data, dict):
        raise RequestError("malformed request (not a JSON object)")
    iface = data.get("iface")
    if not isinstance(iface, str):
        raise RequestError("malformed request (no interface)")
    try:
        iface = validate_ifname(iface)
    except UsageError as exc:
        raise RequestError(exc.message, exc.exit_code) from None
    except UnicodeEncodeError:  # JSON can carry lone surrogates
        raise RequestError("malformed request (interface name is not text)") from None
    gateway = data.get("gateway")
    return Request(
        iface=iface,
        gateway=None if gateway is None else check_gateway(gateway),
        ipv6=check_ipv6(data.get("ipv6", "auto")),
        dns=check_dns(data.get("dns", [])),
    )


def check_user_options(request: Request, rules: InterfacePolicy | None, uid: int) -> None:
    """Refuse the options a non-root caller set but the interface does not grant it
    (``user_options``): routing options come from the config, the same for every user."""
    if uid == 0:
        return
    granted = rules.user_options if rules is not None else frozenset()
    asked = {"gateway": request.gateway is not None, "dns": bool(request.dns),
             "ipv6": request.ipv6 != "auto"}
    for name in USER_OPTIONS:
        if asked[name] and name not in granted:
            raise RequestError(
                f"--{name} of {request.iface} is set by root in the config for every user "
                f"(user_options of [interface.{request.iface}] does not list {name!r})")


def effective(request: Request, rules: InterfacePolicy | None) -> Request:
    """The request with the interface's configured defaults filled in where the caller left
    an option at its default (``--ipv6 auto``, no ``--gateway``, no ``--dns``)."""
    if rules is None:
        return request
    return Request(
        iface=request.iface,
        gateway=request.gateway if request.gateway is not None else rules.gateway,
        ipv6=request.ipv6 if request.ipv6 != "auto" or rules.ipv6 is None else rules.ipv6,
        dns=request.dns or rules.dns,
    )
