"""A tiny TCP request/response pair for bench/scale.py: run by path, standard library only.

``tcprr.py serve HOST PORT``
    Echo server (one thread, epoll): every byte received is sent back; a connection ends
    on EOF or reset. Prints ``ready`` once it listens. Runs until killed.
``tcprr.py rr HOST PORT SECONDS``
    One connection, ``TCP_NODELAY``; send 1 byte, wait for it to come back, again, for
    SECONDS. Prints one JSON line: ``{"count", "seconds", "rate", "cgroup"}``.
``tcprr.py crr HOST PORT SECONDS``
    A new connection per transaction: connect, send 1 byte, receive it, close, for SECONDS
    (netperf's TCP_CRR). The close is abortive (``SO_LINGER`` 0: a reset, no TIME_WAIT), so
    thousands of connections a second do not run out of ports. Same JSON line.

``cgroup`` is the client's cgroup2 path (``/proc/self/cgroup``), so the caller can check
that the program it measured really ran in (or outside) the group it meant.
"""

from __future__ import annotations

import json
import selectors
import socket
import struct
import sys
import time

CHECK_EVERY = 64  # transactions between two looks at the clock


def serve(host: str, port: int) -> None:
    sel = selectors.DefaultSelector()
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind((host, port))
    lsock.listen(4096)
    lsock.setblocking(False)
    sel.register(lsock, selectors.EVENT_READ, None)
    print("ready", flush=True)
    while True:
        for key, _mask in sel.select():
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if key.data is None:  # the listening socket
                while True:
                    try:
                        conn, _addr = sock.accept()
                    except BlockingIOError:
                        break
                    conn.setblocking(False)
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    sel.register(conn, selectors.EVENT_READ, 1)
                continue
            try:
                data = sock.recv(65536)
                if data:
                    sock.sendall(data)  # 1 byte at a time: never blocks in practice
                    continue
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                pass
            sel.unregister(sock)
            sock.close()


def _cgroup() -> str:
    with open("/proc/self/cgroup") as f:
        return next((ln[3:].strip() for ln in f if ln.startswith("0::")), "")


def rr(host: str, port: int, seconds: float) -> dict[str, object]:
    sock = socket.create_connection((host, port), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    send, recv = sock.send, sock.recv
    count = 0
    start = time.perf_counter()
    deadline = start + seconds
    now = start
    while now < deadline:
        for _ in range(CHECK_EVERY):
            send(b"x")
            if not recv(1):
                raise SystemExit("the server closed the connection")
        count += CHECK_EVERY
        now = time.perf_counter()
    sock.close()
    elapsed = now - start
    return {"count": count, "seconds": elapsed, "rate": count / elapsed, "cgroup": _cgroup()}


def crr(host: str, port: int, seconds: float) -> dict[str, object]:
    linger = struct.pack("ii", 1, 0)
    count = 0
    start = time.perf_counter()
    deadline = start + seconds
    now = start
    while now < deadline:
        for _ in range(CHECK_EVERY // 8):
            sock = socket.create_connection((host, port), timeout=5)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.send(b"x")
            if not sock.recv(1):
                raise SystemExit("the server closed the connection")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            sock.close()
        count += CHECK_EVERY // 8
        now = time.perf_counter()
    elapsed = now - start
    return {"count": count, "seconds": elapsed, "rate": count / elapsed, "cgroup": _cgroup()}


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "serve":
        serve(argv[1], int(argv[2]))
        return 0
    if len(argv) == 4 and argv[0] in ("rr", "crr"):
        run = rr if argv[0] == "rr" else crr
        print(json.dumps(run(argv[1], int(argv[2]), float(argv[3]))), flush=True)
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
