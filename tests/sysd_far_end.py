"""The far end of the systemd container's tunnel: tells each caller the address it came from.

    python3 sysd_far_end.py ECHO_ADDR DNS_ADDR

* TCP ``ECHO_ADDR:7``: writes the caller's address and a newline, then closes.
* UDP ``DNS_ADDR:53``: answers every DNS query; an ``A`` question gets one record holding
  the querier's address (so ``getent ahostsv4 NAME`` prints where the query came from), any
  other type an empty answer.

Prints ``ready`` once both listen; runs until killed. Standard library only (run with
Debian's /usr/bin/python3 in the far end's network namespace).
"""

from __future__ import annotations

import ipaddress
import socketserver
import struct
import sys
import threading

TYPE_A = 1


class EchoPeer(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.sendall(f"{self.client_address[0]}\n".encode())


class AnswerWithPeer(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        query, sock = self.request
        reply = dns_reply(query, self.client_address[0])
        if reply is not None:
            sock.sendto(reply, self.client_address)


def dns_reply(query: bytes, peer: str) -> bytes | None:
    """The reply to ``query`` (one question) whose A record is ``peer``; None if malformed."""
    if len(query) < 12:
        return None
    end = 12
    while end < len(query) and query[end] != 0:
        end += 1 + query[end]
    end += 5  # the root label, QTYPE and QCLASS
    if end > len(query):
        return None
    (qtype,) = struct.unpack("!H", query[end - 4:end - 2])
    answers = b""
    if qtype == TYPE_A:
        rdata = ipaddress.IPv4Address(peer).packed
        answers = struct.pack("!HHHIH", 0xC00C, TYPE_A, 1, 0, len(rdata)) + rdata
    header = query[:2] + struct.pack("!HHHHH", 0x8180, 1, 1 if answers else 0, 0, 0)
    return header + query[12:end] + answers


class _TCP(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


def main(echo_addr: str, dns_addr: str) -> None:
    tcp = _TCP((echo_addr, 7), EchoPeer)
    udp = socketserver.UDPServer((dns_addr, 53), AnswerWithPeer)
    threading.Thread(target=udp.serve_forever, daemon=True).start()
    print("ready", flush=True)
    tcp.serve_forever()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
