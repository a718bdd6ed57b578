"""Running `via-tunnel daemon` in a lab for the kernel tests, with `nobody` as its user.

The unprivileged side needs to read the package, but the checkout (a CI runner's home) may
be unreadable to other users: :func:`readable_package` copies it to a world-readable
temporary directory, and the user runs it with Debian's ``/usr/bin/python3`` (the
unprivileged launcher needs only the standard library). ``nobody`` exists on every Debian
system, so no test user has to be created.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from helpers import PACKAGE_PARENT, wait_for

from via_tunnel.lab.netlab import Lab

USER = "nobody"
USER_GROUP = "nogroup"
USER_PY = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable


@contextmanager
def readable_package(*extra: str) -> Iterator[str]:
    """A world-readable copy of the package under test (and of the package directories
    ``extra``); yields its PYTHONPATH entry."""
    top = tempfile.mkdtemp(prefix="vt-pkg-")
    try:
        os.chmod(top, 0o755)
        for src in (os.path.join(PACKAGE_PARENT, "via_tunnel"), *extra):
            if os.path.isfile(src):  # a single-file module
                shutil.copy(src, top)
                continue
            shutil.copytree(src, os.path.join(top, os.path.basename(src)),
                            ignore=shutil.ignore_patterns("__pycache__"))
        for dirpath, dirs, files in os.walk(top):
            for name in dirs:
                os.chmod(os.path.join(dirpath, name), 0o755)
            for name in files:
                os.chmod(os.path.join(dirpath, name), 0o644)
        yield top
    finally:
        shutil.rmtree(top, ignore_errors=True)


def cli_dependencies() -> list[str]:
    """Where the third-party modules a subcommand imports live (typer and what it pulls in,
    pyroute2), for :func:`readable_package`: the users' interpreter is Debian's, without the
    venv. Found by running ``status`` in a fresh interpreter, not from a hand list."""
    code = ("import sys\n"
            "from via_tunnel.cli.commands import run_app\n"
            "run_app(['status', '--json'])\n"
            "from via_tunnel.kernel.netlink import link_facts\n"
            "link_facts('lo')\n"
            "for name, mod in list(sys.modules.items()):\n"
            "    if '.' in name or name in sys.stdlib_module_names or name == 'via_tunnel':\n"
            "        continue\n"
            "    path = getattr(mod, '__file__', None)\n"
            "    if path and 'site-packages' in path:\n"
            "        print(path, file=sys.stderr)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ, "VIA_TUNNEL_STATE_DIR": "/nonexistent"})
    found = []
    for path in out.stderr.split():
        found.append(os.path.dirname(path) if path.endswith("__init__.py") else path)
    return sorted(set(found))


def as_nobody(*argv: str) -> list[str]:
    """Argv that runs ``argv`` as nobody:nogroup with no supplementary groups."""
    return ["setpriv", "--reuid", USER, "--regid", USER_GROUP, "--clear-groups", "--", *argv]


def daemon_env(vt_env: dict[str, str], package: str, config: Path, iface: str) -> dict[str, str]:
    """vt_env plus a policy (written to ``config``) that lets nobody use ``iface``, the
    daemon's socket in the instance's state dir, and the readable package."""
    config.write_text(f'[interface.{iface}]\nallow_users = ["{USER}"]\n')
    config.chmod(0o644)
    return {**vt_env, "PYTHONPATH": package, "VIA_TUNNEL_CONFIG": str(config),
            "VIA_TUNNEL_SOCKET": vt_env["VIA_TUNNEL_STATE_DIR"] + "/daemon.sock"}


class Daemon:
    """`via-tunnel daemon` in the lab's client namespace, restartable, logging to a file."""

    def __init__(self, lab: Lab, env: dict[str, str], log: Path) -> None:
        self.lab, self.env, self.log_path = lab, env, log
        self.proc: subprocess.Popen[Any] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> Daemon:
        seen = self.log().count("listening on")
        with open(self.log_path, "a") as log:
            self.proc = self.lab.popen(self.lab.client,
                                       [sys.executable, "-m", "via_tunnel", "daemon"],
                                       env=self.env, stdin=subprocess.DEVNULL, stdout=log,
                                       stderr=log)
        wait_for(lambda: self.log().count("listening on") > seen or self.proc.poll() is not None,
                 timeout=10, what="the daemon to listen")
        assert self.proc.poll() is None, self.log()
        assert os.path.exists(self.env["VIA_TUNNEL_SOCKET"])
        return self

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


def require_setpriv() -> None:
    if shutil.which("setpriv") is None:
        import pytest

        pytest.fail("setpriv (util-linux) is needed")
