"""``via-tunnel daemon``: the root service that lets ordinary users launch through a group.

Its privileged surface is one narrow entry point (oslo.privsep's rule): "move the process
that is talking to me into the group of interface X, if the policy allows its user". It
never runs a command, never takes a PID or identity from the request (the kernel says who
is calling: SO_PEERCRED, and a pidfd of the caller from SO_PEERPIDFD where the kernel offers
it), and caps each request's size and time.

Groups are created and torn down by the same code as for the root launcher
(:mod:`lifecycle` under the global lock); each group the daemon serves is watched by a thread
running :func:`watcher.watch` while it holds the group's ``.watch`` lock, exactly as the
detached watcher process of the root launcher does. A restarted daemon adopts the groups
recorded in the state dir that have no watcher, so killing it loses nothing.

Concurrency: a thread per connection, at most :data:`MAX_CONNECTIONS` at once and
:data:`MAX_PER_UID` per user (beyond that a caller is told "busy" at once). Sequential
handling would let one slow client hold everybody up for the whole request timeout; the
threads only read and parse, and everything that changes the kernel is serialised by the
global lock anyway. Signals are blocked in every thread but the main one, so SIGTERM and
SIGHUP interrupt the main thread's ``accept`` instead of landing where Python cannot act
on them.

Beside this module: the caller's identity and its move (peer.py), the listening socket
(listen.py), the log (log.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from types import FrameType

from via_tunnel import __version__
from via_tunnel.core import policy as policy_mod
from via_tunnel.core.errors import ViaTunnelError
from via_tunnel.core.policy import ConfigError, Policy, Request, RequestError
from via_tunnel.core.settings import Settings
from via_tunnel.core.settings import config_path as settings_config_path
from via_tunnel.core.wire import is_ping
from via_tunnel.core.wire import socket_path as default_socket_path
from via_tunnel.daemon.listen import own_socket, systemd_socket
from via_tunnel.daemon.log import log
from via_tunnel.daemon.peer import Peer, check, move, peer_of
from via_tunnel.group import lifecycle, state, watcher

MAX_REQUEST = 64 * 1024
REQUEST_TIMEOUT = 2.0  # for reading the whole request, and again for writing the answer
MAX_CONNECTIONS = 128
MAX_PER_UID = 32  # one user's slow clients cannot take every slot


def read_request(conn: socket.socket, limit: int = MAX_REQUEST,
                 timeout: float = REQUEST_TIMEOUT) -> bytes:
    """The request: everything until the client shuts down its side, within ``limit``
    bytes and ``timeout`` seconds in total (a slow client cannot hold a thread longer)."""
    deadline = time.monotonic() + timeout
    buf = bytearray()
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RequestError("request timed out")
        conn.settimeout(left)
        try:
            chunk = conn.recv(limit + 1 - len(buf))
        except TimeoutError:
            raise RequestError("request timed out") from None
        if not chunk:
            return bytes(buf)
        buf += chunk
        if len(buf) > limit:
            raise RequestError(f"request too large (more than {limit} bytes)")


class Daemon:
    def __init__(self, settings: Settings, config_path: str, policy: Policy) -> None:
        self.settings = settings
        self.config_path = config_path
        self.policy = policy  # replaced whole on SIGHUP; readers take one reference
        self._count_lock = threading.Lock()
        self._per_uid: dict[int, int] = {}
        self._total = 0

    # -- policy ---------------------------------------------------------------------

    def reload(self) -> None:
        """Re-read the config; on error keep the old one and say so."""
        try:
            self.policy = policy_mod.load(self.config_path)
        except ConfigError as exc:
            log(f"config not reloaded, keeping the previous one: {exc.message}")
            return
        log(f"config reloaded from {self.config_path} "
            f"({len(self.policy.interfaces)} interface(s))")

    # -- groups ---------------------------------------------------------------------

    def ensure_watcher(self, iface: str) -> None:
        """Watch ``iface``'s group from a thread unless someone (a thread of ours, a root
        launcher's watcher process) already does. Caller holds the global lock."""
        fd = state.hold_watch_lock(self.settings, iface, wait=False)
        if fd is None:
            return
        _start_thread(self._watch, (iface, fd), f"watch-{iface}")

    def _watch(self, iface: str, fd: int) -> None:
        try:
            watcher.watch(self.settings, iface)
            log(f"group {iface} is empty: removed")
        except Exception as exc:
            log(f"watching {iface} failed: {exc!r} (`via-tunnel cleanup` removes it once empty)")
        finally:
            os.close(fd)

    def adopt(self) -> None:
        """Watch every recorded group that nobody watches (after a restart or a crash),
        and remove the half-written record of a predecessor killed while writing one."""
        with state.locked(self.settings):
            for line in state.remove_orphan_tmp(self.settings):
                log(line)
            for rec in state.load_all(self.settings):
                if not state.watcher_alive(self.settings, rec.iface):
                    self.ensure_watcher(rec.iface)
                    log(f"adopted group {rec.iface}")

    def launch(self, req: Request, peer: Peer) -> dict[str, object]:
        """Decide, then put the caller into the group (created if needed)."""
        from via_tunnel.kernel.ifflags import check_link

        policy = self.policy
        decision = policy_mod.decide(policy, req.iface, peer.uid, peer.user, peer.groups)
        log(f"{'allow' if decision.allowed else 'refuse'} {peer} iface={req.iface}: "
            f"{decision.reason}")
        if not decision.allowed:
            raise ViaTunnelError(decision.reason)
        req = policy_mod.effective(req, policy.interfaces.get(req.iface))
        check_link(req.iface)
        with state.locked(self.settings):
            # Reuses a live group (refusing options that would change the routing of the
            # programs already in it), rebuilds a stale one, creates a missing one (on a
            # systemd host a scope, started with the caller in it: checked first).
            check(peer)
            rec = lifecycle.ensure_group(self.settings, req.iface, gateway=req.gateway,
                                         ipv6=req.ipv6, dns=req.dns,  # type: ignore[arg-type]
                                         first_pid=peer.pid)
            self.ensure_watcher(req.iface)
            move(peer, self.settings, rec)
        return {"ok": True, "iface": req.iface, "cgroup": rec.cgroup,
                "dns_refused": rec.dns4 is None and rec.dns6 is None}

    # -- connections ----------------------------------------------------------------

    def _admit(self, uid: int) -> bool:
        with self._count_lock:
            if self._total >= MAX_CONNECTIONS or self._per_uid.get(uid, 0) >= MAX_PER_UID:
                return False
            self._total += 1
            self._per_uid[uid] = self._per_uid.get(uid, 0) + 1
            return True

    def _release(self, uid: int) -> None:
        with self._count_lock:
            self._total -= 1
            self._per_uid[uid] -= 1
            if not self._per_uid[uid]:
                del self._per_uid[uid]

    def accept_one(self, listener: socket.socket) -> None:
        conn, _ = listener.accept()
        try:
            peer = peer_of(conn)
        except ViaTunnelError as exc:
            _answer(conn, _error(exc))
            conn.close()
            return
        except OSError as exc:
            log(f"cannot read the caller's credentials: {exc.strerror}")
            conn.close()
            return
        if not self._admit(peer.uid):
            log(f"busy: {peer} turned away")
            _answer(conn, _error(ViaTunnelError("the daemon is busy; try again")))
            conn.close()
            os.close(peer.pidfd)
            return
        _start_thread(self._serve, (conn, peer), f"serve-{peer.pid}")

    def _serve(self, conn: socket.socket, peer: Peer) -> None:
        try:
            try:
                raw = read_request(conn)
                if is_ping(raw):
                    answer = {"ok": True, "version": __version__}
                else:
                    answer = self.launch(policy_mod.parse_request(raw), peer)
            except ViaTunnelError as exc:
                if isinstance(exc, RequestError):
                    log(f"bad request from {peer}: {exc.message}")
                answer = _error(exc)
            except Exception as exc:  # a bug must not take the daemon down
                log(f"internal error serving {peer}: {exc!r}")
                answer = _error(ViaTunnelError(f"internal error in the daemon: {exc!r}"))
            _answer(conn, answer)
        finally:
            conn.close()
            os.close(peer.pidfd)
            self._release(peer.uid)


_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _start_thread(target: Callable[..., None], args: tuple[object, ...], name: str) -> None:
    """Start a daemon thread with our signals blocked (it inherits the mask)."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    try:
        threading.Thread(target=target, args=args, name=name, daemon=True).start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _error(exc: ViaTunnelError) -> dict[str, object]:
    return {"ok": False, "error": exc.message, "code": exc.exit_code}


def _answer(conn: socket.socket, answer: dict[str, object]) -> None:
    with contextlib.suppress(OSError):
        conn.settimeout(REQUEST_TIMEOUT)
        conn.sendall(json.dumps(answer).encode())


class _Stop(Exception):
    pass


def _stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop


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
    from via_tunnel.kernel import (
        netlink,
        nft,  # (preload: cold launches stay fast)
    )

    with contextlib.suppress(Exception):
        netlink.preload()
        nft.preload()

    daemon = Daemon(settings, config_path, policy)
    listener = systemd_socket()
    lock_fd = -1
    if listener is None:
        listener, lock_fd = own_socket(path, policy.socket_group)
    signal.signal(signal.SIGHUP, lambda signum, frame: daemon.reload())
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    daemon.adopt()
    log(f"listening on {path if lock_fd >= 0 else 'the socket from systemd'}, "
        f"config {config_path} ({len(policy.interfaces)} interface(s))")
    try:
        while True:
            try:
                daemon.accept_one(listener)
            except OSError as exc:  # e.g. EMFILE: back off instead of spinning
                log(f"accept failed: {exc.strerror}")
                time.sleep(0.1)
    except _Stop:
        log("stopping (groups stay; the next daemon adopts them)")
    finally:
        if lock_fd >= 0:
            with contextlib.suppress(OSError):
                os.unlink(path)
            os.close(lock_fd)
        listener.close()
    return 0

