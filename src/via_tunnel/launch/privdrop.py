"""Run CMD as the user who invoked sudo/doas/pkexec (or as ``--user NAME``), not as root.

The decision (:func:`choose`) is pure; :func:`lookup` reads the user database and
:func:`drop` changes the process's identity. The launcher drops after joining the group and
right before exec: joining and creating the group need root, CMD does not.

On the launch hot path: only ``os`` and ``pwd`` (C modules) are imported.
"""

from __future__ import annotations

import os
from _collections_abc import Mapping  # already loaded by os; collections.abc is not

from via_tunnel.core.errors import ViaTunnelError


class Target:
    """The identity to switch to."""

    __slots__ = ("gid", "home", "name", "uid")

    def __init__(self, name: str, uid: int, gid: int, home: str) -> None:
        self.name = name
        self.uid = uid
        self.gid = gid
        self.home = home

    def __repr__(self) -> str:
        return f"Target({self.name!r}, uid={self.uid}, gid={self.gid})"


def choose(env: Mapping[str, str], user_opt: str | None, uid: int, euid: int
           ) -> tuple[str, str] | None:
    """Who CMD should run as, before looking anybody up: ``("name", NAME)``,
    ``("uid", UID)`` or None to keep the current identity.

    * ``--user NAME`` wins, and needs real root (uid and euid 0).
    * Otherwise, only when really root: ``SUDO_UID`` (sudo), ``DOAS_USER`` (doas),
      ``PKEXEC_UID`` (pkexec), in that order. An invoking user that is root itself
      (``sudo`` from a root shell) means no change.
    * A non-root caller never switches (the variables are then just text anyone can set).
    """
    really_root = uid == 0 and euid == 0
    if user_opt is not None:
        if not really_root:
            raise ViaTunnelError("--user needs root (it runs CMD as another user)")
        return ("name", user_opt)
    if not really_root:
        return None
    sudo_uid = env.get("SUDO_UID")
    if sudo_uid:
        return None if sudo_uid == "0" else ("uid", _digits(sudo_uid, "SUDO_UID"))
    doas_user = env.get("DOAS_USER")
    if doas_user:
        return None if doas_user == "root" else ("name", doas_user)
    pkexec_uid = env.get("PKEXEC_UID")
    if pkexec_uid:
        return None if pkexec_uid == "0" else ("uid", _digits(pkexec_uid, "PKEXEC_UID"))
    return None


def _digits(value: str, var: str) -> str:
    if not value.isdigit() or not value.isascii():
        raise ViaTunnelError(f"{var}={value[:32]!r} is not a user id")
    return value


def lookup(choice: tuple[str, str] | None, env: Mapping[str, str]) -> Target | None:
    """Resolve a :func:`choose` result in the user database. With sudo, ``SUDO_GID`` is the
    primary group sudo recorded (normally the user's own)."""
    if choice is None:
        return None
    import pwd

    kind, value = choice
    try:
        pw = pwd.getpwuid(int(value)) if kind == "uid" else pwd.getpwnam(value)
    except KeyError:
        what = f"uid {value}" if kind == "uid" else f"user {value!r}"
        raise ViaTunnelError(f"no such user: {what}") from None
    gid = pw.pw_gid
    sudo_gid = env.get("SUDO_GID")
    if kind == "uid" and env.get("SUDO_UID") == value and sudo_gid and sudo_gid.isdigit():
        gid = int(sudo_gid)
    return Target(pw.pw_name, pw.pw_uid, gid, pw.pw_dir)


def target_from_env(user_opt: str | None) -> Target | None:
    """The identity CMD should run as in this process, or None to stay as is."""
    env = os.environ
    return lookup(choose(env, user_opt, os.getuid(), os.geteuid()), env)


def drop(target: Target) -> None:
    """Become ``target`` for good: supplementary groups, gid, uid (in that order: after
    setuid nothing else may be changed), and HOME/USER/LOGNAME. The rest of the
    environment stays as the caller (sudo) passed it."""
    try:
        os.initgroups(target.name, target.gid)
        os.setgid(target.gid)
        os.setuid(target.uid)
    except OSError as exc:
        raise ViaTunnelError(f"cannot switch to user {target.name}: {exc.strerror}") from exc
    if os.getuid() != target.uid or os.geteuid() != target.uid:  # never run CMD as root
        raise ViaTunnelError(f"cannot switch to user {target.name}")
    os.environ["HOME"] = target.home
    os.environ["USER"] = target.name
    os.environ["LOGNAME"] = target.name
