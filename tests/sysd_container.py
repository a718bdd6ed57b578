"""The distribution's systemd as PID 1 in a throwaway container, on a pure cgroup v2 hierarchy.

For tests that need a real systemd host (socket activation, logind sessions, the user
manager, ``systemd-run``) on a machine whose own PID 1 is not systemd, or whose cgroups are
hybrid. ``sysd_init.sh`` (next to this file) builds the container, along the recipe of
NOTES.md: a host cgroup2 group with ``outer`` (unshare's waiting parent) and ``payload`` (the
container, whose cgroup namespace is rooted there), new pid/mount/uts/ipc/net/cgroup
namespaces, an overlay of ``/`` with a tmpfs upper layer (nothing reaches the host's disk),
read-only ``/proc/sys`` (but ``/proc/sys/net``) and sysfs, a fresh cgroup2 mount, a tmpfs
``/dev`` with ``/dev/net/tun``, a pty as ``/dev/console``, tmpfs ``/run`` and ``/tmp``, host
units that would act on the host masked, dangerous capabilities dropped. Boots in ~1 s.

How commands get in, and the identity they run with (``ContainerError`` on failure):

* :meth:`SystemdContainer.run` / :meth:`~SystemdContainer.popen`: ``nsenter -t PID -a``
  into every namespace; the process first moves itself into ``/host-exec``, a cgroup of the
  container's own tree outside any unit (a process left in the host's cgroup would be outside
  the container's cgroup namespace, where neither systemd nor via-tunnel can handle it).
  ``user=NAME`` adds ``runuser -u NAME``: that user, no PAM session, no logind session.
* ``login=True`` (with ``user``): ``su -l NAME -c CMD``. su's PAM stack includes
  ``pam_systemd``, so logind registers a session: the command runs in
  ``user.slice/user-UID.slice/session-N.scope``, with ``XDG_RUNTIME_DIR`` set, and the
  user's manager (``user@UID.service``) is started for it.
* :meth:`SystemdContainer.user_manager_argv`: ``systemd-run --user --wait --pipe`` as the
  user, after ``loginctl enable-linger``: the command is a transient service of the user's
  manager (``user@UID.service/app.slice/run-*.service``), stdio passed through.
* ``systemd-run --uid=NAME --scope CMD`` needs nothing special: run it as root.

Never used: ``machinectl``/``systemd-run -M`` (they need systemd-machined on the host).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

INIT_SCRIPT = Path(__file__).with_name("sysd_init.sh")
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CLEAN_ENV = {"PATH": PATH, "LANG": "C.UTF-8"}  # what commands entered get, nothing else
EXEC_CGROUP = "host-exec"
GROUP_PREFIX = "vt-sysd-"  # host cgroup: GROUP_PREFIX + name + "-" + the creating PID
# Join EXEC_CGROUP, then exec the command (argv after "sh").
_ENTER = f'echo $$ > /sys/fs/cgroup/{EXEC_CGROUP}/cgroup.procs && exec "$@"'


class ContainerError(Exception):
    """The container could not boot, or a command in it failed."""


def cgroup2_mount() -> str:
    """Where this host mounts the cgroup2 hierarchy (pure v2 or hybrid), from mountinfo."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[fields.index("-") + 1] == "cgroup2":
                return fields[4]
    raise ContainerError("no cgroup2 mount on this host")


class SystemdContainer:
    """One container: :meth:`boot`, use, :meth:`close` (also as a context manager).

    ``close`` powers systemd off, kills whatever remains and removes the host cgroups; the
    container's mounts live in its own mount namespace and vanish with its last process.
    """

    def __init__(self, name: str = "vtsysd") -> None:
        """``name``: hostname and ``$container`` inside; the host cgroup adds our PID."""
        self.name = name
        self.group = os.path.join(cgroup2_mount(), f"{GROUP_PREFIX}{name}-{os.getpid()}")
        self.boot_state = ""
        self.failed_units: list[str] = []
        self._pid: int | None = None
        self._outer: subprocess.Popen[bytes] | None = None
        self._console = bytearray()
        self._console_fd: int | None = None
        self._drain: threading.Thread | None = None
        self._procs: list[subprocess.Popen[Any]] = []

    def __enter__(self) -> SystemdContainer:
        return self.boot()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def pid(self) -> int:
        """systemd's PID, as the host sees it."""
        if self._pid is None:
            raise ContainerError("the container is not running")
        return self._pid

    @property
    def netns(self) -> str:
        """The container's network namespace (for ``ip link ... netns``, ``nsenter --net``)."""
        return f"/proc/{self.pid}/ns/net"

    def console(self) -> str:
        """What systemd and the init stages wrote on /dev/console so far."""
        return self._console.decode(errors="replace")

    def boot(self, timeout: float = 30) -> SystemdContainer:
        """Start the container and wait until ``systemctl is-system-running`` says running
        or degraded; ``boot_state`` and ``failed_units`` say which."""
        for sub in ("outer", "payload"):
            os.makedirs(os.path.join(self.group, sub))
        try:
            self._start()
            self._pid = self._wait_pid(timeout)
            self.boot_state = self._wait_booted(timeout)
            os.mkdir(os.path.join(self.group, "payload", EXEC_CGROUP))
            listing = self.run(["systemctl", "list-units", "--failed", "--plain",
                                "--no-legend"])
        except BaseException:
            self.close()
            raise
        self.failed_units = [line.split()[0] for line in listing.stdout.splitlines() if line]
        return self

    def _start(self) -> None:
        """The init script, its stdio on a pty whose master a thread drains (a full pty
        would block systemd's console output)."""
        master, slave = os.openpty()
        self._console_fd = master
        self._drain = threading.Thread(target=self._read_console, daemon=True)
        self._drain.start()
        try:
            self._outer = subprocess.Popen(
                [str(INIT_SCRIPT), "outer", self.group, self.name],
                stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
                env=dict(CLEAN_ENV))
        finally:
            os.close(slave)

    def _read_console(self) -> None:
        assert self._console_fd is not None
        while True:
            try:
                data = os.read(self._console_fd, 65536)
            except OSError:  # EIO: the last holder of the slave closed it
                return
            if not data:
                return
            self._console += data

    def _wait_pid(self, timeout: float) -> int:
        assert self._outer is not None
        children = f"/proc/{self._outer.pid}/task/{self._outer.pid}/children"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._outer.poll() is not None:
                raise ContainerError(f"the container did not start:\n{self.console()}")
            try:
                with open(children) as f:
                    pids = f.read().split()
            except FileNotFoundError:
                pids = []
            if pids:
                return int(pids[0])
            time.sleep(0.01)
        raise ContainerError(f"the container did not start in {timeout:g}s:\n{self.console()}")

    def _wait_booted(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            if self._outer is not None and self._outer.poll() is not None:
                break
            asked = ["nsenter", "-t", str(self.pid), "-a", "systemctl", "is-system-running"]
            state = _host_run(asked, timeout=5).stdout.strip()
            if state in ("running", "degraded"):
                return state
            time.sleep(0.03)
        raise ContainerError(f"systemd did not finish booting (state {state!r}):\n"
                             f"{self.console()}")

    def argv(self, argv: Sequence[str], *, user: str | None = None,
             login: bool = False) -> list[str]:
        """The host argv that runs ``argv`` in the container (see the module's docstring)."""
        inner = list(argv)
        if login:
            if user is None:
                raise ValueError("login=True needs a user")
            inner = ["su", "-l", user, "-c", shlex.join(inner)]
        elif user is not None:
            inner = ["runuser", "-u", user, "--", *inner]
        return ["nsenter", "-t", str(self.pid), "-a", "--", "sh", "-c", _ENTER, "sh", *inner]

    def run(self, argv: Sequence[str], *, user: str | None = None, login: bool = False,
            check: bool = True, timeout: float = 30,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in the container and wait; text, stdout and stderr captured. A
        non-zero exit raises :class:`ContainerError` unless ``check=False``."""
        result = _host_run(self.argv(argv, user=user, login=login), timeout=timeout,
                           input=input)
        if check and result.returncode != 0:
            raise ContainerError(f"{shlex.join(argv)} (user {user}) exited "
                                 f"{result.returncode}:\n{result.stdout}{result.stderr}")
        return result

    def popen(self, argv: Sequence[str], *, user: str | None = None, login: bool = False,
              **kw: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` in the container without waiting (``kw`` as for Popen; stdin is
        /dev/null unless given). Killed by :meth:`close` at the latest."""
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("env", dict(CLEAN_ENV))
        proc = subprocess.Popen(self.argv(argv, user=user, login=login), **kw)
        self._procs.append(proc)
        return proc

    def user_manager_argv(self, user: str, argv: Sequence[str]) -> list[str]:
        """Container argv (for :meth:`run` as root) that runs ``argv`` as a transient service
        of ``user``'s manager and waits for it; call :meth:`start_user_manager` first."""
        uid = self.run(["id", "-u", user]).stdout.strip()
        return ["runuser", "-u", user, "--", "env", f"XDG_RUNTIME_DIR=/run/user/{uid}",
                f"DBUS_SESSION_BUS_ADDRESS=unix:path=/run/user/{uid}/bus",
                "systemd-run", "--user", "--wait", "--pipe", "--quiet", "--collect", "--",
                *argv]

    def start_user_manager(self, user: str, timeout: float = 20) -> None:
        """``loginctl enable-linger`` and wait until ``user@UID.service`` is active."""
        uid = self.run(["id", "-u", user]).stdout.strip()
        self.run(["loginctl", "enable-linger", user])
        self.run(["systemctl", "start", f"user@{uid}.service"], timeout=timeout)

    def add_user(self, name: str) -> None:
        """A login user with a home (written to the overlay, not to the host)."""
        self.run(["useradd", "--create-home", "--shell", "/bin/sh", name])

    def write_file(self, path: str, text: str, mode: int = 0o644) -> None:
        self.run(["install", "-D", "-m", f"{mode:o}", "/dev/stdin", path], input=text)

    def copy_in(self, src: str, dest: str, *, exclude: Sequence[str] = ()) -> None:
        """Copy the host directory ``src`` to ``dest`` in the container (a tar stream: the
        container does not see host paths outside its overlay's lower layer)."""
        excludes = [f"--exclude={pattern}" for pattern in exclude]
        pack = subprocess.Popen(["tar", "-C", src, *excludes, "-cf", "-", "."],
                                stdout=subprocess.PIPE)
        try:
            unpack = subprocess.run(
                self.argv(["sh", "-c", 'mkdir -p "$1" && tar -C "$1" -xf -', "sh", dest]),
                stdin=pack.stdout, capture_output=True, text=True, timeout=60,
                env=dict(CLEAN_ENV))
        finally:
            assert pack.stdout is not None
            pack.stdout.close()
            pack.wait()
        if pack.returncode or unpack.returncode:
            raise ContainerError(f"copying {src} to {dest} failed: {unpack.stderr}")

    def journal(self, *args: str, after: str | None = None) -> str:
        """The journal of this boot (``journalctl ARGS``), after a sync; ``after`` is a
        cursor from :meth:`journal_cursor` (only what came later)."""
        self.run(["journalctl", "--sync"])
        since = [f"--after-cursor={after}"] if after else []
        return self.run(["journalctl", "-b", "--no-pager", "-o", "short-monotonic",
                         *since, *args]).stdout

    def journal_cursor(self) -> str:
        """The journal's current position, for ``journal(after=...)``."""
        self.run(["journalctl", "--sync"])
        out = self.run(["journalctl", "-n", "0", "--show-cursor", "--no-pager"]).stdout
        return out.rsplit("-- cursor: ", 1)[1].strip()

    def close(self, timeout: float = 20) -> None:
        """Power off (SIGRTMIN+4), wait, kill what remains, remove the host cgroups."""
        if self._pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._pid, signal.SIGRTMIN + 4)
        if self._outer is not None:
            try:
                self._outer.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._kill_group()
                self._outer.wait(timeout=10)
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
        if self._drain is not None:
            self._drain.join(timeout=5)
        if self._console_fd is not None:
            os.close(self._console_fd)
            self._console_fd = None
        self._kill_group()
        _remove_tree(self.group)
        remove_netcls_keeper(os.path.basename(self.group))
        self._pid = None

    def _kill_group(self) -> None:
        kill = os.path.join(self.group, "cgroup.kill")
        if os.path.exists(kill):
            with open(kill, "w") as f:
                f.write("1")


def remove_netcls_keeper(name: str) -> None:
    """Remove the net_cls cgroup ``name`` that kept that hierarchy alive for a container
    (sysd_init.sh), from a private mount namespace (no mount is left on the host)."""
    script = ('d=$(mktemp -d) && mount -t cgroup -o net_cls vtsysd "$d" 2>/dev/null && '
              '{ rmdir "$d/$1" 2>/dev/null; umount "$d"; }; rmdir "$d"')
    _host_run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
               name], timeout=10)


def remove_stale_groups() -> list[str]:
    """Remove the host cgroups of containers whose test process was killed (SIGKILL leaves
    them: the container itself dies with it). Returns what was removed."""
    top = cgroup2_mount()
    removed = []
    for entry in os.listdir(top):
        creator = entry.rsplit("-", 1)[-1]
        if entry.startswith(GROUP_PREFIX) and creator.isdigit() and not _alive(int(creator)):
            path = os.path.join(top, entry)
            with open(os.path.join(path, "cgroup.kill"), "w") as f:
                f.write("1")
            _remove_tree(path)
            remove_netcls_keeper(entry)
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _host_run(argv: Sequence[str], *, timeout: float,
              input: str | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, input=input, capture_output=True, text=True,
                              timeout=timeout, env=dict(CLEAN_ENV),
                              stdin=None if input is not None else subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise ContainerError(f"{shlex.join(argv)} timed out after {timeout:g}s") from exc


def _remove_tree(top: str, timeout: float = 10) -> None:
    """rmdir a cgroup subtree deepest first (its processes are gone or going)."""
    deadline = time.monotonic() + timeout
    for path, _dirs, _files in sorted(os.walk(top), key=lambda entry: -entry[0].count("/")):
        while True:
            try:
                os.rmdir(path)
                break
            except FileNotFoundError:
                break
            except OSError:  # EBUSY: a process is still leaving
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
