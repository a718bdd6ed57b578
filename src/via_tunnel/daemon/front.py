"""The daemon's front door: one selector loop reads every request; threads only do the work
of complete ones.

Why (issue "No escape, no cross-user influence", §4): with a thread per connection, four
users holding 32 silent connections each locked everybody out, root included. Here:

* A connection costs an fd and a buffer, no thread, and lives at most :data:`READ_TIMEOUT`
  from its accept until its request is complete (then it is answered "request timed out").
* Each user (uid, from SO_PEERCRED at accept) holds at most :data:`MAX_PER_UID`
  connections; beyond that it is told "busy" at once. When all :data:`MAX_CONNECTIONS` are
  taken, a newcomer evicts the oldest unfinished connection of the user holding the most
  (if that user holds more than the newcomer): no number of users denies one with fewer
  connections. Root is never refused nor evicted.
* Pings and malformed requests are answered from the loop (no thread). A complete request
  goes to a per-user queue; at most :data:`MAX_WORKERS` threads take requests from the
  queues in turn (root's first), and exit when there is none. A thread that cannot be
  started (the PID limit) leaves the daemon alive: the requests nobody can serve are
  answered "busy".
"""

from __future__ import annotations

import collections
import json
import os
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

from via_tunnel.daemon.log import Limiter, log

READ_TIMEOUT = 1.0  # from accept to the end of the request: a client sends it at once
WRITE_TIMEOUT = 2.0  # for the answer
MAX_REQUEST = 64 * 1024
MAX_CONNECTIONS = 512
MAX_PER_UID = 16
MAX_WORKERS = 4
ACCEPT_BURST = 64  # accepts per wake-up, so that reading is never starved
BUSY = {"ok": False, "error": "the daemon is busy; try again", "code": 125}
TIMED_OUT = {"ok": False, "error": "request timed out", "code": 125}
TOO_LARGE = {"ok": False, "error": f"request too large (more than {MAX_REQUEST} bytes)",
             "code": 125}


class Conn:
    __slots__ = ("buf", "deadline", "pid", "sock", "uid", "work")

    def __init__(self, sock: socket.socket, pid: int, uid: int, deadline: float) -> None:
        self.sock, self.pid, self.uid, self.deadline = sock, pid, uid, deadline
        self.buf = bytearray()
        self.work: object = None  # what the handler made of a complete request


# quick(raw, uid, pid): an answer to send at once (ping, malformed), or the work to queue.
Quick = Callable[[bytes, int, int], "dict[str, Any] | tuple[object]"]
# serve(sock, work): the answer to a queued request (runs in a worker thread).
Serve = Callable[[socket.socket, object], "dict[str, Any]"]


class Front:
    def __init__(self, listener: socket.socket, quick: Quick, serve: Serve, limiter: Limiter,
                 spawn: Callable[[Callable[[], None]], None], wakeup_fd: int = -1) -> None:
        self.listener, self.quick, self.serve = listener, quick, serve
        self.limiter, self.spawn = limiter, spawn
        listener.setblocking(False)
        self.sel = selectors.DefaultSelector()
        self.sel.register(listener, selectors.EVENT_READ, None)
        self._paused_until = 0.0
        if wakeup_fd >= 0:
            self.sel.register(wakeup_fd, selectors.EVENT_READ, "wakeup")
        self._reading: dict[int, Conn] = {}  # fd -> Conn, in accept order (= deadline order)
        self._lock = threading.Lock()  # counts and queues (workers release and take)
        self._per_uid: collections.Counter[int] = collections.Counter()
        self._total = 0
        self._queues: dict[int, collections.deque[Conn]] = {}
        self._workers = 0

    # -- the loop (main thread) ------------------------------------------------------

    def poll(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for events and handle them, then drop the
        connections whose time is up."""
        now = time.monotonic()
        if self._paused_until and now >= self._paused_until:
            self._paused_until = 0.0
            self.sel.register(self.listener, selectors.EVENT_READ, None)
        if self._reading:
            first = next(iter(self._reading.values()))
            timeout = max(0.0, min(timeout, first.deadline - now))
        for key, _ in self.sel.select(timeout):
            if key.data is None:
                self._accept()
            elif key.data == "wakeup":
                try:
                    while os.read(key.fd, 512):
                        pass
                except BlockingIOError:
                    pass
            else:
                self._read(key.data)
        self._expire(time.monotonic())

    def open_connections(self) -> int:
        with self._lock:
            return self._total

    def _accept(self) -> None:
        for _ in range(ACCEPT_BURST):
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE, ENFILE, ENOBUFS: pause instead of spinning
                self.limiter.log(-1, f"accept failed: {exc.strerror}; pausing 0.1 s")
                self.sel.unregister(self.listener)
                self._paused_until = time.monotonic() + 0.1
                return
            try:
                pid, uid, _gid = struct.unpack("3i", sock.getsockopt(
                    socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
            except OSError:
                sock.close()
                continue
            sock.setblocking(False)
            self._admit(Conn(sock, pid, uid, time.monotonic() + READ_TIMEOUT))

    def _admit(self, conn: Conn) -> None:
        uid = conn.uid
        victim = None
        with self._lock:
            mine = self._per_uid[uid]
            busy = uid != 0 and mine >= MAX_PER_UID
            if not busy and self._total >= MAX_CONNECTIONS and uid != 0:
                victim = self._victim(mine)
                busy = victim is None
            if not busy:
                self._total += 1
                self._per_uid[uid] += 1
        if busy:
            self.limiter.log(uid, f"busy: uid={uid} pid={conn.pid} turned away "
                                  f"({mine} connection(s) of its own open)")
            _send_now(conn.sock, BUSY)
            conn.sock.close()
            return
        if victim is not None:
            self.limiter.log(victim.uid, f"busy: uid={victim.uid} pid={victim.pid}: "
                                         f"unfinished request dropped for uid={uid}")
            self._finish(victim, BUSY)
        self._reading[conn.sock.fileno()] = conn
        self.sel.register(conn.sock, selectors.EVENT_READ, conn)

    def _victim(self, mine: int) -> Conn | None:
        """The oldest unfinished connection of the user (not root) holding the most, if
        that user holds more than ``mine``. Caller holds the lock."""
        holders = [(n, u) for u, n in self._per_uid.items() if u != 0 and n > mine + 1]
        for _n, u in sorted(holders, reverse=True):
            for conn in self._reading.values():
                if conn.uid == u:
                    return conn
        return None

    def _read(self, conn: Conn) -> None:
        try:
            chunk = conn.sock.recv(MAX_REQUEST + 1 - len(conn.buf))
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.limiter.log(conn.uid, f"uid={conn.uid} pid={conn.pid}: connection lost "
                                       f"mid-request ({exc.strerror})")
            self._finish(conn, None)
            return
        if chunk:
            conn.buf += chunk
            if len(conn.buf) > MAX_REQUEST:
                self.limiter.log(conn.uid, f"bad request from uid={conn.uid} pid={conn.pid}: "
                                           f"{TOO_LARGE['error']}")
                self._finish(conn, TOO_LARGE)
            return
        self._stop_reading(conn)
        outcome = self.quick(bytes(conn.buf), conn.uid, conn.pid)
        conn.buf = bytearray()
        if isinstance(outcome, dict):
            self._finish(conn, outcome)
            return
        conn.work = outcome[0]
        self._submit(conn)

    def _expire(self, now: float) -> None:
        while self._reading:
            conn = next(iter(self._reading.values()))
            if conn.deadline > now:
                return
            self.limiter.log(conn.uid, f"bad request from uid={conn.uid} pid={conn.pid}: "
                                       f"request timed out")
            self._finish(conn, TIMED_OUT)

    def _stop_reading(self, conn: Conn) -> None:
        if self._reading.pop(conn.sock.fileno(), None) is not None:
            self.sel.unregister(conn.sock)

    def _finish(self, conn: Conn, answer: dict[str, Any] | None) -> None:
        """Answer (if the socket takes it now), close, and free the connection's slot."""
        self._stop_reading(conn)
        if answer is not None:
            _send_now(conn.sock, answer)
        conn.sock.close()
        self._release(conn.uid)

    def _release(self, uid: int) -> None:
        with self._lock:
            self._total -= 1
            self._per_uid[uid] -= 1
            if not self._per_uid[uid]:
                del self._per_uid[uid]

    # -- the work (bounded threads) ------------------------------------------------------

    def _submit(self, conn: Conn) -> None:
        with self._lock:
            self._queues.setdefault(conn.uid, collections.deque()).append(conn)
            start = self._workers < MAX_WORKERS
            if start:
                self._workers += 1
        if not start:
            return
        try:
            self.spawn(self._worker)
        except (RuntimeError, MemoryError, OSError) as exc:  # can't start new thread
            log(f"cannot start a worker thread ({exc}): answering busy")
            with self._lock:
                self._workers -= 1
                stranded: list[Conn] = []
                if self._workers == 0:  # nobody will take the queued requests
                    for queue in self._queues.values():
                        stranded.extend(queue)
                    self._queues.clear()
            for each in stranded:
                self.limiter.log(each.uid, f"busy: uid={each.uid} pid={each.pid}: no thread "
                                           f"to serve the request")
                self._finish(each, BUSY)

    def _next_job(self) -> Conn | None:
        """Root's first, then one per user in turn. Caller holds the lock."""
        if not self._queues:
            return None
        uid = 0 if 0 in self._queues else next(iter(self._queues))
        queue = self._queues.pop(uid)
        conn = queue.popleft()
        if queue:
            self._queues[uid] = queue  # to the back of the line
        return conn

    def _worker(self) -> None:
        while True:
            with self._lock:
                conn = self._next_job()
                if conn is None:
                    self._workers -= 1
                    return
            try:
                answer = self.serve(conn.sock, conn.work)
            except Exception as exc:  # a bug must not take the daemon down
                log(f"internal error serving uid={conn.uid} pid={conn.pid}: {exc!r}")
                answer = {"ok": False, "error": f"internal error in the daemon: {exc!r}",
                          "code": 125}
            try:
                conn.sock.settimeout(WRITE_TIMEOUT)
                conn.sock.sendall(json.dumps(answer).encode())
            except OSError:
                pass
            conn.sock.close()
            self._release(conn.uid)


def _send_now(sock: socket.socket, answer: dict[str, Any]) -> None:
    """Send a short answer without waiting (a fresh socket's buffer takes it whole)."""
    try:
        sock.setblocking(False)
        sock.send(json.dumps(answer).encode())
    except OSError:
        pass
