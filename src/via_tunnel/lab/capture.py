"""Packet capture: ``tcpdump`` on one interface inside one of the lab's namespaces.

The independent witness of what crossed an interface (or, as important, that nothing did).
Needs ``tcpdump`` and ``nsenter``; failures are :class:`~via_tunnel.lab.procs.LabError`.
"""

from __future__ import annotations

import signal
import subprocess
import tempfile
from types import TracebackType
from typing import TextIO

from via_tunnel.lab.namespaces import Namespaces
from via_tunnel.lab.procs import LabError, read_until


class Capture:
    """``tcpdump`` on one interface inside a namespace, as a context manager.

    ``Capture(lab, ns, iface, bpf)``: ``bpf`` is a tcpdump filter expression ("" = all).
    ``__enter__`` returns once tcpdump reports "listening on" (so it is really capturing);
    ``__exit__``/``stop()`` sends SIGINT and waits for the flush. Then ``packets()`` is one
    text line per packet (``tcpdump -n`` format) and ``dropped`` the kernel's drop count.
    To prove that nothing left an interface: ``with Capture(lab, ns, "eth0", "host X") as
    cap: ...`` then ``assert cap.packets() == []`` (and ``cap.dropped == 0``).
    """

    def __init__(self, lab: Namespaces, ns: str, iface: str, bpf: str = "", *,
                 timeout: float = 5) -> None:
        self.ns_path = lab.ns_path(ns)
        self.iface = iface
        self.bpf = bpf
        self.timeout = timeout
        self.dropped: int | None = None
        self.stderr = ""
        self._packets: list[str] = []
        self._proc: subprocess.Popen[bytes] | None = None
        self._out: TextIO | None = None

    def packets(self) -> list[str]:
        """The packets seen, one ``tcpdump -n`` line each; stops the capture if running."""
        return self.stop()

    def __enter__(self) -> Capture:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> Capture:
        """Start tcpdump and wait until it captures; raises :class:`LabError` otherwise."""
        argv = ["nsenter", f"--net={self.ns_path}", "tcpdump", "-i", self.iface, "-n", "-l",
                "--immediate-mode"]  # fmt: skip
        if self.bpf:
            argv.append(self.bpf)
        self._out = tempfile.TemporaryFile("w+")  # noqa: SIM115 (closed in stop())
        try:
            self._proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=self._out, stderr=subprocess.PIPE
            )
        except OSError as exc:
            self._out.close()
            self._out = None
            raise LabError(f"cannot start tcpdump: {exc}") from exc
        assert self._proc.stderr is not None
        seen = read_until(self._proc.stderr, b"listening on", self.timeout)
        self.stderr = seen.decode(errors="replace")
        if b"listening on" not in seen:
            self.stop()
            raise LabError(f"tcpdump did not start on {self.iface}: {self.stderr.strip()}")
        return self

    def stop(self) -> list[str]:
        """Stop (SIGINT), wait for tcpdump to flush, and return the packets. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return list(self._packets)
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            _out, err = proc.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            _out, err = proc.communicate()
        self.stderr += (err or b"").decode(errors="replace")
        for line in self.stderr.splitlines():
            if line.endswith("packets dropped by kernel"):
                self.dropped = int(line.split()[0])
        if self._out is not None:
            self._out.seek(0)
            self._packets = [line.rstrip("\n") for line in self._out if line.strip()]
            self._out.close()
            self._out = None
        return list(self._packets)
