"""The small programs the lab runs inside its namespaces, as a script.

``python -I programs.py serve|ping|udp|dns-serve|dns ...`` (:func:`via_tunnel.lab.procs.helper_argv`
builds that argv). Contract: this file imports nothing but the standard library, so it runs
by path, with ``-I``, whether or not the package is installed or readable by the user that
runs it. Each program prints what the lab's tests read and exits 0 on success:

* ``serve V4 V6``: the echo server: HTTP GET and UDP datagrams are answered with the
  caller's source address and a newline (``/bytes/N``: N bytes of payload);
* ``ping ADDRESS``: ICMP echo until the first reply (exit 1 when ``--timeout`` passes);
* ``udp HOST PORT``: one datagram to the UDP echo; prints the answer (exit 1 on none);
* ``dns-serve LOG ADDRESS...``: a DNS responder on port 53 (UDP and TCP) that answers every
  A question with :data:`DNS_ANSWER` and logs ``PROTO SOURCE NAME`` per query;
* ``dns SERVER NAME``: one A query; prints the address or ``FAIL`` (exit 1).

``serve`` and ``dns-serve`` print ``ready`` once every socket is bound and run until SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import signal
import socket
import socketserver
import struct
import sys
import threading
import time
from typing import Any, NoReturn

HTTP_PORT = 80
UDP_PORT = 7
DNS_ANSWER = "198.51.100.10"  # what the lab's resolvers answer for every A question


def serve(v4: str, v6: str, http_port: int, udp_port: int) -> None:
    """Echo server: HTTP GET and UDP datagrams are answered with the caller's address and a
    newline, on ``v4`` and ``v6``. Prints "ready" once every socket is bound; logs nothing."""
    import http.server

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            # /bytes/N: N bytes of payload (bulk transfers); anything else: the caller.
            parts = self.path.strip("/").split("/")
            if len(parts) == 2 and parts[0] == "bytes" and parts[1].isdigit():
                size = min(int(parts[1]), 64 << 20)
                self.send_response(200)
                self.send_header("Content-Length", str(size))
                self.end_headers()
                chunk = b"x" * 65536
                while size > 0:
                    self.wfile.write(chunk[:size])
                    size -= len(chunk)
                return
            body = f"{self.client_address[0]}\n".encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    class Http4(http.server.ThreadingHTTPServer):
        address_family = socket.AF_INET
        daemon_threads = True

        def server_bind(self) -> None:  # no reverse DNS lookup (HTTPServer does getfqdn)
            socketserver.TCPServer.server_bind(self)
            self.server_name, self.server_port = "lab", self.server_address[1]

    class Http6(Http4):
        address_family = socket.AF_INET6

    class Echo(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            _data, sock = self.request
            sock.sendto(f"{self.client_address[0]}\n".encode(), self.client_address)

    class Udp4(socketserver.UDPServer):
        address_family = socket.AF_INET

    class Udp6(socketserver.UDPServer):
        address_family = socket.AF_INET6

    servers: list[socketserver.BaseServer] = [
        Http4((v4, http_port), Handler), Http6((v6, http_port), Handler),
        Udp4((v4, udp_port), Echo), Udp6((v6, udp_port), Echo),
    ]  # fmt: skip
    _serve_until_sigterm(servers)


def _serve_until_sigterm(servers: list[socketserver.BaseServer]) -> NoReturn:
    """Serve each of ``servers`` in a thread, print "ready", and exit 0 on SIGTERM."""
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    print("ready", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    while True:
        signal.pause()


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return int(~total & 0xFFFF)


def ping(address: str, timeout: float, interval: float = 0.05) -> bool:
    """Send ICMP echo requests every ``interval`` until a reply from ``address`` comes back
    (True) or ``timeout`` passes (False). Needs root (a raw socket)."""
    v6 = ":" in address
    family = socket.AF_INET6 if v6 else socket.AF_INET
    proto = socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP
    request, reply = (128, 129) if v6 else (8, 0)
    ident = os.getpid() & 0xFFFF
    target = socket.getaddrinfo(address, None, family)[0][4][0]
    deadline = time.monotonic() + timeout
    with socket.socket(family, socket.SOCK_RAW, proto) as sock:
        seq = 0
        while time.monotonic() < deadline:
            seq = (seq + 1) & 0xFFFF
            header = struct.pack("!BBHHH", request, 0, 0, ident, seq)
            payload = b"via-tunnel-lab"
            if not v6:  # the kernel computes the ICMPv6 checksum
                header = struct.pack("!BBHHH", request, 0, _checksum(header + payload), ident, seq)
            with contextlib.suppress(OSError):  # unreachable for now: try again
                sock.sendto(header + payload, (address, 0))
            until = min(deadline, time.monotonic() + interval)
            while (left := until - time.monotonic()) > 0:
                if not select.select([sock], [], [], left)[0]:
                    break
                data, src = sock.recvfrom(2048)
                if not v6:
                    data = data[(data[0] & 0x0F) * 4 :]
                if len(data) >= 8 and src[0] == target:
                    kind, _code, _sum, rid, _seq = struct.unpack("!BBHHH", data[:8])
                    if kind == reply and rid == ident:
                        return True
    return False


def udp_query(host: str, port: int, timeout: float) -> str | None:
    """Send one datagram to ``host``:``port`` and return the reply text (None on timeout)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(b"via-tunnel-lab\n", (host, port))
        try:
            return sock.recv(2048).decode(errors="replace")
        except (TimeoutError, OSError):
            return None


def _dns_reply(query: bytes, answer: str) -> tuple[bytes, str]:
    """A minimal DNS answer to ``query``: its question echoed and one A record (or none
    for other types). Returns the reply and the question's name. Enough for tests."""
    ident, _flags, qdcount = struct.unpack("!HHH", query[:6])
    pos, labels = 12, []
    while query[pos]:
        n = query[pos]
        labels.append(query[pos + 1:pos + 1 + n].decode(errors="replace"))
        pos += n + 1
    question = query[12:pos + 5]
    qtype = struct.unpack("!H", query[pos + 1:pos + 3])[0]
    records = b""
    if qtype == 1 and qdcount == 1:
        records = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + socket.inet_aton(answer)
    header = struct.pack("!HHHHHH", ident, 0x8180, 1, 1 if records else 0, 0, 0)
    return header + question + records, ".".join(labels)


def dns_serve(addresses: list[str], log: str, answer: str = DNS_ANSWER) -> None:
    """Answer DNS over UDP and TCP port 53 on ``addresses``; append one line per query
    (``PROTO SOURCE NAME``) to ``log``, so a test sees who asked and by which path."""
    lock = threading.Lock()

    def record(proto: str, source: str, name: str) -> None:
        with lock, open(log, "a") as f:
            f.write(f"{proto} {source} {name}\n")

    class Udp(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            data, sock = self.request
            reply, name = _dns_reply(data, answer)
            record("udp", self.client_address[0], name)
            sock.sendto(reply, self.client_address)

    class Tcp(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            conn = self.request
            conn.settimeout(5)
            size = struct.unpack("!H", conn.recv(2))[0]
            data = b""
            while len(data) < size:
                chunk = conn.recv(size - len(data))
                if not chunk:
                    return
                data += chunk
            reply, name = _dns_reply(data, answer)
            record("tcp", self.client_address[0], name)
            conn.sendall(struct.pack("!H", len(reply)) + reply)

    servers: list[socketserver.BaseServer] = []
    for addr in addresses:
        fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
        udp_cls = type("U", (socketserver.ThreadingUDPServer,),
                       {"address_family": fam, "daemon_threads": True})
        tcp_cls = type("T", (socketserver.ThreadingTCPServer,),
                       {"address_family": fam, "daemon_threads": True,
                        "allow_reuse_address": True})
        servers += [udp_cls((addr, 53), Udp), tcp_cls((addr, 53), Tcp)]
    _serve_until_sigterm(servers)


def dns_query(server: str, name: str, *, tcp: bool, timeout: float) -> str | None:
    """Ask ``server`` for the A record of ``name``; the address, or None on no answer."""
    query = struct.pack("!HHHHHH", os.getpid() & 0xFFFF, 0x0100, 1, 0, 0, 0)
    query += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    query += struct.pack("!HH", 1, 1)
    fam = socket.AF_INET6 if ":" in server else socket.AF_INET
    try:
        with socket.socket(fam, socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM) as sock:
            sock.settimeout(timeout)
            if tcp:
                sock.connect((server, 53))
                sock.sendall(struct.pack("!H", len(query)) + query)
                size = struct.unpack("!H", sock.recv(2))[0]
                reply = sock.recv(size)
            else:
                sock.sendto(query, (server, 53))
                reply = sock.recv(4096)
    except OSError:
        return None
    if len(reply) < 16 or struct.unpack("!H", reply[6:8])[0] == 0:
        return None
    return socket.inet_ntoa(reply[-4:])


def main(argv: list[str] | None = None) -> int:
    """``serve``, ``ping``, ``udp``, ``dns-serve`` and ``dns`` (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="programs.py")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("serve")
    p.add_argument("v4")
    p.add_argument("v6")
    p.add_argument("--http-port", type=int, default=HTTP_PORT)
    p.add_argument("--udp-port", type=int, default=UDP_PORT)
    p = sub.add_parser("ping")
    p.add_argument("address")
    p.add_argument("--timeout", type=float, default=5)
    p = sub.add_parser("udp")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--timeout", type=float, default=5)
    p = sub.add_parser("dns-serve")
    p.add_argument("log")
    p.add_argument("addresses", nargs="+")
    p = sub.add_parser("dns")
    p.add_argument("server")
    p.add_argument("name")
    p.add_argument("--tcp", action="store_true")
    p.add_argument("--timeout", type=float, default=2)
    args = parser.parse_args(argv)
    if args.cmd == "serve":
        serve(args.v4, args.v6, args.http_port, args.udp_port)
        return 0
    if args.cmd == "ping":
        return 0 if ping(args.address, args.timeout) else 1
    if args.cmd == "udp":
        answer = udp_query(args.host, args.port, args.timeout)
        if answer is None:
            print(f"no answer from {args.host} port {args.port}", file=sys.stderr)
            return 1
        sys.stdout.write(answer)
        return 0
    if args.cmd == "dns-serve":
        dns_serve(args.addresses, args.log)
        return 0
    got = dns_query(args.server, args.name, tcp=args.tcp, timeout=args.timeout)  # dns
    # One write with its newline (print makes two when PYTHONUNBUFFERED is set): under
    # `via-tunnel trace`, trace's lines share this output and must not land in between.
    sys.stdout.write(f"{got or 'FAIL'}\n")
    return 0 if got else 1


if __name__ == "__main__":
    sys.exit(main())
