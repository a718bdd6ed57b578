"""The daemon's log: one line on stderr (the journal under systemd), escaped, and limited per
user so that no caller can flood it.

Escaping: whatever a caller can influence (an interface name, a user name, an error text)
reaches the line, so every character that is not printable (control characters, U+202E and
the other format characters, line separators) and the backslash are written the way
Python's ``repr`` writes them: a line cannot be forged, split or visually reordered.

Limiting: each user (uid) has a token bucket (:data:`BURST` lines, refilled at :data:`RATE`
per second); a line beyond it is counted, not written, and :meth:`Limiter.flush` writes
"N messages suppressed" for that user once the bucket has refilled. Nothing is lost
silently: every refusal is either a line or part of a count.
"""

from __future__ import annotations

import os
import threading
import time

RATE = 20.0  # lines per second and user, on average
BURST = 100  # lines a user may write at once


def escape(text: str) -> str:
    """``text`` with every non-printable character and the backslash escaped as ``repr``
    does (U+202E becomes ``\\u202e``, a newline ``\\n``)."""
    if text.isprintable() and "\\" not in text:
        return text
    out = []
    for ch in text:
        if ch == "\\":
            out.append("\\\\")
        elif ch.isprintable():
            out.append(ch)
        else:
            out.append(repr(ch)[1:-1])
    return "".join(out)


def log(line: str) -> None:
    """One line on stderr. A single write(2), so lines from threads and from signal handlers
    never interleave and no lock can deadlock."""
    os.write(2, f"via-tunnel daemon: {escape(line)}\n".encode(errors="backslashreplace"))


class Limiter:
    """Per-uid token buckets in front of :func:`log` (thread-safe)."""

    def __init__(self, rate: float = RATE, burst: int = BURST) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._lock = threading.Lock()
        self._tokens: dict[int, tuple[float, float]] = {}  # uid -> (tokens, when)
        self._suppressed: dict[int, int] = {}

    def _take(self, uid: int, now: float) -> bool:
        tokens, then = self._tokens.get(uid, (self.burst, now))
        tokens = min(self.burst, tokens + (now - then) * self.rate)
        if tokens < 1:
            self._tokens[uid] = (tokens, now)
            return False
        self._tokens[uid] = (tokens - 1, now)
        return True

    def log(self, uid: int, line: str) -> None:
        """Write ``line`` unless ``uid`` has used its share; then count it."""
        with self._lock:
            if not self._take(uid, time.monotonic()):
                self._suppressed[uid] = self._suppressed.get(uid, 0) + 1
                return
        log(line)

    def flush(self) -> None:
        """Write the count of suppressed lines of every user whose bucket has a token again,
        and forget the full buckets (their state is their initial one)."""
        now = time.monotonic()
        lines = []
        with self._lock:
            for uid, count in list(self._suppressed.items()):
                if self._take(uid, now):
                    lines.append(f"uid={uid}: {count} message(s) suppressed (rate limit)")
                    del self._suppressed[uid]
            for uid, (tokens, then) in list(self._tokens.items()):
                if uid not in self._suppressed and tokens + (now - then) * self.rate \
                        >= self.burst:
                    del self._tokens[uid]
        for line in lines:
            log(line)

    def pending(self) -> int:
        """How many lines are counted and not yet reported."""
        with self._lock:
            return sum(self._suppressed.values())
