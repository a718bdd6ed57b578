"""``via-tunnel daemon``: the root service that lets ordinary users launch through a group.

Its privileged surface is one narrow entry point (oslo.privsep's rule): "move the process
that is talking to me into the group of interface X, if the policy allows its user". It
never runs a command, never takes a PID or identity from the request (the kernel says who
is calling: SO_PEERCRED, and a pidfd of the caller from SO_PEERPIDFD where the kernel offers
it), and caps each request's size and time.

Groups are created and torn down by the same code as for the root launcher
(:mod:`lifecycle` under the global lock); one watcher serves all of them: a thread of the
daemon running :func:`watcher.watch` while it holds the instance's watch lock, exactly as
the detached watcher process of a root launcher does (whichever holds the lock watches
every group). A restarted daemon adopts the groups recorded in the state dir when no
watcher is alive, so killing it loses nothing.

Concurrency (front.py): one selector loop accepts and reads every request, with a short
deadline and a share per user; threads (a few, bounded) only do the work of complete
requests, and one thread watches every group. Signals only set flags that the loop acts
on, so a reload that fails (even with a RecursionError) keeps the old config and the daemon.

Beside this module: the connections (front.py), the caller's identity and its move
(peer.py), the listening socket (listen.py), the log (log.py).
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import threading
from collections.abc import Callable
from typing import Any

from via_tunnel import __version__
from via_tunnel.core import policy as policy_mod
from via_tunnel.core.errors import ViaTunnelError
from via_tunnel.core.policy import Policy, Request, RequestError
from via_tunnel.core.settings import Settings
from via_tunnel.core.settings import config_path as settings_config_path
from via_tunnel.core.wire import is_ping
from via_tunnel.core.wire import socket_path as default_socket_path
from via_tunnel.daemon.front import Front
from via_tunnel.daemon.listen import own_socket, systemd_socket
from via_tunnel.daemon.log import Limiter, log
from via_tunnel.daemon.peer import Peer, check, move, peer_of
from via_tunnel.group import lifecycle, state, watcher
from via_tunnel.kernel.files import check_private_dir

WANT_FILES = 4096  # RLIMIT_NOFILE we raise the soft limit to (2 fds per connection)


class Daemon:
    def __init__(self, settings: Settings, config_path: str, policy: Policy) -> None:
        self.settings = settings
        self.config_path = config_path
        self.policy = policy  # replaced whole on SIGHUP; readers take one reference
        self.limiter = Limiter()

    # -- policy ---------------------------------------------------------------------

    def reload(self) -> None:
        """Re-read the config; on error keep the old one and say so."""
        try:
            self.policy = policy_mod.load(self.config_path)
        except ViaTunnelError as exc:
            log(f"config not reloaded, keeping the previous one: {exc.message}")
            return
        except Exception as exc:  # whatever a parser does with a hostile file
            log(f"config not reloaded, keeping the previous one: {exc!r}")
            return
        log(f"config reloaded from {self.config_path} "
            f"({len(self.policy.interfaces)} interface(s))")

    # -- groups ---------------------------------------------------------------------

    def ensure_watcher(self) -> None:
        """Watch the groups from a thread unless someone (our thread, a root launcher's
        watcher process) already does; wake that one, a group may be new. Caller holds
        the global lock."""
        fd = state.hold_watch_lock(self.settings, wait=False)
        if fd is None:
            state.poke(self.settings)
            return
        try:
            _start_thread(self._watch, (fd,), "watch")
        except (RuntimeError, MemoryError, OSError) as exc:  # the PID limit
            os.close(fd)
            log(f"cannot start a thread to watch the groups: {exc}")
            raise ViaTunnelError("the daemon is busy; try again") from None

    def _watch(self, fd: int) -> None:
        released = False

        def release() -> None:
            nonlocal released
            released = True
            os.close(fd)

        try:
            watcher.watch(self.settings, release,
                          on_removed=lambda iface: log(f"group {iface} is empty: removed"))
        except Exception as exc:
            log(f"watching the groups failed: {exc!r} (`via-tunnel cleanup` removes them "
                "once empty)")
        finally:
            if not released:
                os.close(fd)

    def adopt(self) -> None:
        """Watch every recorded group that nobody watches (after a restart or a crash),
        and remove the half-written record of a predecessor killed while writing one."""
        with state.locked(self.settings):
            for line in state.remove_orphan_tmp(self.settings):
                log(line)
            records = state.load_all(self.settings)
            if records and not state.watcher_alive(self.settings):
                self.ensure_watcher()
                for rec in records:
                    log(f"adopted group {rec.iface}")

    def launch(self, req: Request, peer: Peer) -> dict[str, object]:
        """Decide, then put the caller into the group (created if needed). One log line per
        request, whatever stops it: the policy, an option, the group, the kernel."""
        try:
            answer, reason = self._launch(req, peer)
        except ViaTunnelError as exc:
            self.limiter.log(peer.uid, f"refuse {peer} iface={req.iface}: {exc.message}")
            raise
        self.limiter.log(peer.uid, f"allow {peer} iface={req.iface}: {reason}")
        return answer

    def _launch(self, req: Request, peer: Peer) -> tuple[dict[str, object], str]:
        from via_tunnel.kernel.ifflags import check_link

        policy = self.policy
        rules = policy.interfaces.get(req.iface)
        decision = policy_mod.decide(policy, req.iface, peer.uid, peer.user, peer.groups)
        if not decision.allowed:
            raise ViaTunnelError(decision.reason)
        policy_mod.check_user_options(req, rules, peer.uid)
        req = policy_mod.effective(req, rules)
        check_link(req.iface)
        with state.locked(self.settings):
            # Reuses a live group (for a non-root caller only one created with exactly its
            # options: nobody takes another user's routing), rebuilds a stale one, creates a
            # missing one (on a systemd host a scope, started with the caller in it: checked
            # first).
            check(peer)
            rec = lifecycle.ensure_group(self.settings, req.iface, gateway=req.gateway,
                                         ipv6=req.ipv6,  # type: ignore[arg-type]
                                         dns=req.dns, exact=peer.uid != 0,
                                         first_pid=peer.pid)
            try:
                self.ensure_watcher()
            except ViaTunnelError:
                lifecycle.teardown_if_empty(self.settings, req.iface)  # nobody watches it
                raise
            move(peer, self.settings, rec)
        return ({"ok": True, "iface": req.iface, "cgroup": rec.cgroup,
                 "dns_refused": rec.dns4 is None and rec.dns6 is None}, decision.reason)

    # -- requests (front.py calls these) ------------------------------------------------

    def quick(self, raw: bytes, uid: int, pid: int) -> dict[str, Any] | tuple[object]:
        """What the loop answers at once (a ping, a malformed request: no thread), or the
        parsed request to queue."""
        if is_ping(raw):
            return {"ok": True, "version": __version__}
        try:
            return (policy_mod.parse_request(raw),)
        except RequestError as exc:
            self.limiter.log(uid, f"bad request from uid={uid} pid={pid}: {exc.message}")
            return _error(exc)

    def serve(self, conn: socket.socket, work: object) -> dict[str, Any]:
        """The answer to a parsed request (in a worker thread)."""
        assert isinstance(work, Request)
        try:
            peer = peer_of(conn)
        except ViaTunnelError as exc:
            log(f"refuse iface={work.iface}: {exc.message}")
            return _error(exc)
        except OSError as exc:
            log(f"cannot read the caller's credentials: {exc.strerror}")
            return _error(ViaTunnelError("cannot identify the calling process"))
        try:
            return self.launch(work, peer)
        except ViaTunnelError as exc:
            return _error(exc)
        finally:
            os.close(peer.pidfd)


_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _start_thread(target: Callable[..., None], args: tuple[object, ...] = (),
                  name: str | None = None) -> None:
    """Start a daemon thread with our signals blocked (it inherits the mask)."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    try:
        threading.Thread(target=target, args=args, name=name, daemon=True).start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _error(exc: ViaTunnelError) -> dict[str, Any]:
    return {"ok": False, "error": exc.message, "code": exc.exit_code}


def _raise_file_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = WANT_FILES if hard == resource.RLIM_INFINITY else min(WANT_FILES, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def run(socket_path: str | None = None, config_path: str | None = None) -> int:
    """Serve until SIGTERM/SIGINT. Groups outlive the daemon (their programs keep running
    and stay routed); the next daemon adopts them."""
    if os.geteuid() != 0:
        raise ViaTunnelError("the daemon needs root")
    config_path = config_path or settings_config_path()
    path = socket_path or default_socket_path()
    policy = policy_mod.load(config_path)  # a broken config: refuse to start
    settings = Settings.from_env()
    os.umask(0o022)
    os.chdir("/")
    from via_tunnel.kernel import (  # (preload: cold launches and callers' checks stay fast)
        netlink,
        nft,
        procs,
    )

    with contextlib.suppress(Exception):
        netlink.preload()
        nft.preload()
        procs.preload()

    for directory in (settings.state_dir, settings.groups_dir):
        check_private_dir(directory)  # records are trusted only in a root-only directory
    _raise_file_limit()
    daemon = Daemon(settings, config_path, policy)
    listener = systemd_socket()
    lock_fd = -1
    if listener is None:
        listener, lock_fd = own_socket(path, policy.socket_group)
    flags: set[int] = set()
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    for sig in _SIGNALS:
        signal.signal(sig, lambda signum, frame: flags.add(signum))
    daemon.adopt()
    front = Front(listener, daemon.quick, daemon.serve, daemon.limiter,
                  lambda target: _start_thread(target, name="work"), wake_r)
    log(f"listening on {path if lock_fd >= 0 else 'the socket from systemd'}, "
        f"config {config_path} ({len(policy.interfaces)} interface(s))")
    try:
        while not flags & {signal.SIGTERM, signal.SIGINT}:
            try:
                front.poll(0.5)
            except OSError as exc:  # never seen; a daemon that stops serving is worse
                log(f"serving failed: {exc!r}")
            if signal.SIGHUP in flags:
                flags.discard(signal.SIGHUP)
                daemon.reload()
            daemon.limiter.flush()
        log("stopping (groups stay; the next daemon adopts them)")
    finally:
        if lock_fd >= 0:
            with contextlib.suppress(OSError):
                os.unlink(path)
            os.close(lock_fd)
        listener.close()
    return 0
