"""``via-tunnel trace [LAUNCH OPTIONS] IFACE [-- CMD...]``: watch a group's traffic live.

One line per new connection of the group (who, where to, which interface it left by, the
source address the far end sees) and per packet the kill switch drops, also while the
interface is down or gone (then the group's table routes nothing), until Ctrl-C, or, with
CMD, until CMD exits (then with CMD's exit status).

How: a temporary table of our own (rules.py) logs those packets to an NFLOG group that
this process reads (kernel/nflog.py); the sender is looked up in /proc (who.py); the drops
of a group whose table has no route are logged only while that lasts (unrouted.py). The
table is created with ``flags owner``, so the kernel removes it when this process dies,
even by SIGKILL; on every other exit we delete it ourselves, and a leftover one is swept
at the next start. Only one trace runs per network namespace: the table of a live trace
belongs to it, and nobody else can change it.

With CMD, the normal launcher starts it as our child, with our environment and the launch
options given to trace. It does not exec CMD directly but a gate that waits until we trace
the group (whose mark is known only once the launcher has created or joined it): CMD's
first packet is already seen.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import time
from types import FrameType
from typing import TextIO

from via_tunnel.core.errors import KernelError, UsageError, ViaTunnelError
from via_tunnel.core.launch_form import LAUNCH_OPTIONS, LaunchArgs, options_argv, usage
from via_tunnel.core.settings import NFT_FAMILY, Settings
from via_tunnel.group import placement, state
from via_tunnel.group.state import GroupRecord
from via_tunnel.kernel import cgroup
from via_tunnel.kernel.nflog import Flow, Logged, NflogSocket, flow_of
from via_tunnel.trace.rules import (
    PREFIX_DROP,
    PREFIX_NEW,
    PREFIX_UNROUTED,
    PREFIX_UNROUTED_DNS,
    TABLE,
    delete_table_command,
    group_elements,
    table_commands,
)
from via_tunnel.trace.unrouted import Unrouted
from via_tunnel.trace.who import Who, who_sent

POLL_SECONDS = 0.1  # how often the group's record is re-read (a group can end and restart)

# Runs as CMD's process after the launcher put it in the group: says "in", waits for "go"
# (EOF if trace died: then CMD never runs), restores the signals Python ignores (an ignored
# signal stays ignored across exec) and execs CMD.
_GATE = """\
import os, signal, sys
fd = int(sys.argv[1])
os.write(fd, b"in")
if os.read(fd, 2) != b"go":
    sys.exit(125)
os.close(fd)
for sig in (signal.SIGPIPE, signal.SIGXFSZ):
    signal.signal(sig, signal.SIG_DFL)
try:
    os.execv(sys.argv[2], sys.argv[3:])
except OSError as exc:
    sys.stderr.write(f"via-tunnel: {sys.argv[3]}: {exc.strerror}\\n")
    sys.exit(126)
"""


def run(args: LaunchArgs) -> int:
    """Trace the group of ``args.iface`` until stopped (exit 0) or, with a command
    (``args.argv``), until it exits (its status; 128+N when a signal N ended it). The launch
    options of ``args`` apply to the launch of that command."""
    iface, cmd = args.iface, args.argv
    options = options_argv(args)
    given = [o.name for o in LAUNCH_OPTIONS if o.name in options and o.metavar is not None]
    if given and not cmd:
        raise UsageError(f"{given[0]} applies to the launch of CMD: give -- CMD\n"
                         f"{usage('trace', require_cmd=False)}")
    if os.geteuid() != 0:
        raise ViaTunnelError("trace needs root (it adds an nft table and reads NFLOG)")
    settings = Settings.from_env()
    active = _active(state.load(settings, iface))
    if active is None and not _exists(iface):
        raise ViaTunnelError(f"no such interface {iface}")
    if not cmd and active is None:
        raise ViaTunnelError(f"no active group for {iface}; start one with "
                             f"`via-tunnel {iface} -- CMD` or give -- CMD")
    path = None
    if cmd:
        from via_tunnel.kernel.execs import resolve

        path = resolve(cmd[0])  # 127/126 now, before anything is changed
    tracer = Tracer(settings, iface)
    try:
        tracer.start()
        if path is None:
            return tracer.follow(None)
        return tracer.follow(tracer.launch(path, cmd, options))
    finally:
        tracer.stop()


def _exists(iface: str) -> bool:
    try:
        socket.if_nametoindex(iface)
    except OSError:
        return False
    return True


def _active(rec: GroupRecord | None) -> GroupRecord | None:
    return rec if rec is not None and rec.usable() else None


class Tracer:
    """The trace of one interface's group: table, NFLOG socket, signals, output."""

    def __init__(self, settings: Settings, iface: str) -> None:
        self.settings = settings
        self.iface = iface
        self.nflog: NflogSocket | None = None
        self.unrouted: Unrouted | None = None
        self.table = False
        self.traced: GroupRecord | None = None  # the group whose mark is in our sets
        self.stopping = False
        self.child: subprocess.Popen[bytes] | None = None
        self._old_handlers: dict[int, object] = {}

    # -- setup and teardown ------------------------------------------------------------

    def start(self) -> None:
        from via_tunnel.kernel import nft

        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            self._old_handlers[sig] = signal.signal(sig, self._on_signal)
        self.nflog = NflogSocket()
        if nft.table_exists(NFT_FAMILY, TABLE):
            try:  # left by a trace that could not clean up (its owner flag died with it)
                nft.run_json([delete_table_command()])
            except KernelError:
                raise ViaTunnelError("another via-tunnel trace is running in this network "
                                     "namespace (one at a time)") from None
        self.table = True  # from here on, stop() deletes it (a failed add is a no-op)
        # Text for the table only: `flags owner` through JSON is ignored by nft 1.0.6
        # (NOTES.md). Owned by this process's netlink socket, it dies with us.
        nft.run_text(f"add table {NFT_FAMILY} {TABLE} {{ flags owner; }}")
        nft.run_json(table_commands(self.nflog.group))
        self.unrouted = Unrouted(self.iface)
        self._sync()
        say(f"via-tunnel: tracing {self.iface} (Ctrl-C to stop)", sys.stderr)

    def stop(self) -> None:
        """Remove everything start() added; safe to call at any point, and twice."""
        from via_tunnel.kernel import nft

        if self.table:
            with contextlib.suppress(ViaTunnelError):
                nft.run_json([delete_table_command()])
            self.table = False
        if self.nflog is not None:
            self.nflog.close()
            self.nflog = None
        if self.unrouted is not None:
            self.unrouted.close()
            self.unrouted = None
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._old_handlers.clear()

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if self.child is None:
            self.stopping = True
        elif signum != signal.SIGINT:  # Ctrl-C reaches CMD from the terminal by itself
            with contextlib.suppress(OSError):
                self.child.send_signal(signum)

    def _sync(self) -> None:
        """Put the group's current mark in our sets (it changes when the group ends and a
        new one starts); an ended group's mark is removed at once, as another group may
        get it next. The same for its cgroup, watched while its table has no route."""
        from via_tunnel.kernel import nft

        rec = state.load(self.settings, self.iface)
        old = self.traced
        assert self.unrouted is not None
        if rec is not None and old is not None and (rec.mark, rec.created) == (
                old.mark, old.created):
            if self.unrouted.rec is None and rec.usable():  # it became ready meanwhile
                self.unrouted.follow(rec)
            return
        if old is not None:
            with contextlib.suppress(KernelError):
                nft.run_json(group_elements(old.mark, old.iface, "delete"))
            self.traced = None
            say(f"via-tunnel: the group of {self.iface} ended", sys.stderr)
        self.unrouted.follow(rec)
        if rec is not None:
            nft.run_json(group_elements(rec.mark, rec.iface, "add"))
            self.traced = rec
            if old is not None:
                say(f"via-tunnel: a new group of {self.iface} started", sys.stderr)

    # -- CMD -----------------------------------------------------------------------------

    def launch(self, path: str, cmd: list[str], options: list[str]
               ) -> subprocess.Popen[bytes] | int:
        """Start CMD in the group through the launcher, with the launch ``options``; the
        Popen once CMD is about to run, or the launcher's exit status when it failed (it
        has said why on stderr)."""
        if self.stopping:  # Ctrl-C before CMD started: do not start it
            return 130
        ours, theirs = socket.socketpair()
        argv = [sys.executable, "-m", "via_tunnel", *options, self.iface, "--",
                sys.executable, "-I", "-c", _GATE, str(theirs.fileno()), path, *cmd]
        try:
            self.child = subprocess.Popen(argv, pass_fds=(theirs.fileno(),))
            theirs.close()
            while not self.child_exited():
                ready, _, _ = select.select([ours], [], [], POLL_SECONDS)
                if not ready:
                    continue
                if ours.recv(2) != b"in":  # the launcher failed before CMD's turn
                    break
                self._sync()  # CMD is in the group: trace the group, then let CMD go
                ours.send(b"go")
                return self.child
            return _status(self.child)
        finally:
            theirs.close()
            ours.close()

    def child_exited(self) -> bool:
        return self.child is not None and self.child.poll() is not None

    # -- the loop ------------------------------------------------------------------------

    def follow(self, child: subprocess.Popen[bytes] | int | None) -> int:
        """Print events until stopped or until ``child`` exits; the exit status."""
        if isinstance(child, int):
            return child
        assert self.nflog is not None and self.unrouted is not None
        watch = [self.nflog] + ([self.unrouted] if self.unrouted.fileno() >= 0 else [])
        while not self.stopping:
            if child is not None and child.poll() is not None:
                self._drain()
                return _status(child)
            ready, _, _ = select.select(watch, [], [], POLL_SECONDS)
            if self.nflog in ready:
                self._read()
            if self.unrouted in ready:
                self.unrouted.drain()
            elif len(watch) == 1:  # no link and route notifications: look every time
                self.unrouted.update()
            self._sync()
        return 0

    def _drain(self) -> None:
        """Print what was logged before CMD exited and is still queued."""
        assert self.nflog is not None
        while select.select([self.nflog], [], [], 0)[0]:
            self._read()

    def _read(self) -> None:
        assert self.nflog is not None
        packets, lost = self.nflog.read()
        if lost:
            say("via-tunnel: some events were lost (too many at once)", sys.stderr)
        for logged in packets:
            line = self._describe(logged)
            if line is not None:
                try:
                    say(line, sys.stdout)
                except BrokenPipeError:  # `trace ... | head`: the reader is done
                    self.stopping = True
                    return

    def _describe(self, logged: Logged) -> str | None:
        flow = flow_of(logged.payload)
        rec = self.traced
        if flow is None:
            return None
        if logged.prefix == PREFIX_NEW:
            note = {"via": _ifname(logged.outdev)}
        elif logged.prefix == PREFIX_DROP:
            note = {"dropped": f"would leave by {_ifname(logged.outdev)}"}
        elif logged.prefix in (PREFIX_UNROUTED, PREFIX_UNROUTED_DNS):
            # DNS to this host is dropped only when --dns sends it to the group's resolver
            # of that family (else it is refused, not shown: rules.py).
            if logged.prefix == PREFIX_UNROUTED_DNS and (rec is None or (
                    rec.dns6 if ":" in flow.dst else rec.dns4) is None):
                return None
            assert self.unrouted is not None
            note = {"dropped": self.unrouted.reason or "no route"}
        else:
            return None
        who = who_sent(flow, _members(self.settings, rec)) if rec is not None else None
        return format_line(time.time(), flow, who, **note)


def _members(settings: Settings, rec: GroupRecord) -> list[int]:
    """The group's processes: those in its cgroup2 group and those moved out of it."""
    return cgroup.members(rec.cgroup) + placement.moved_members(settings, rec)


def say(line: str, stream: TextIO) -> None:
    """One line on ``stream`` in one write: CMD writes to the same terminal or pipe, and
    ``print`` writes the text and its newline separately when Python's output is
    unbuffered (PYTHONUNBUFFERED), so CMD's output could land in between."""
    stream.write(line + "\n")
    stream.flush()


def format_line(when: float, flow: Flow, who: Who | None, *, via: str = "",
                dropped: str = "") -> str:
    """One line of output: a new connection that left ``via`` an interface, or a packet
    ``dropped`` (the reason). For a new connection ``flow`` is the packet after
    masquerade: its source is what the far end sees; the program's own address is the
    socket's."""
    stamp = time.strftime("%H:%M:%S", time.localtime(when)) + f".{int(when * 1000) % 1000:03d}"
    pid = f"pid {who.pid} {who.comm}" if who is not None else "pid ?"
    if who is not None and who.local not in ("0.0.0.0", "::"):
        src = _endpoint(who.local, who.lport)
    else:
        src = _endpoint(flow.src, flow.sport)
    where = f"{flow.proto} {src} -> {_endpoint(flow.dst, flow.dport)}"
    if dropped:
        return f"{stamp}  DROPPED by kill switch  {pid}  {where}  ({dropped})"
    return f"{stamp}  {pid}  {where}  via {via} from {flow.src}"


def _endpoint(addr: str, port: int | None) -> str:
    if port is None:
        return addr
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def _ifname(index: int) -> str:
    try:
        return socket.if_indextoname(index)
    except OSError:
        return f"ifindex {index}"  # already gone


def _status(child: subprocess.Popen[bytes]) -> int:
    code = child.wait()
    return 128 - code if code < 0 else code
