"""Bookkeeping of a connection pool, shared by both adapters: no I/O, no clock.

The adapter owns the connections, the lock and the waiting; this decides.
Rules, which tests/test_pool.py checks with a hypothesis state machine:

- connections open (idle, in use, or being opened) never exceed max_connections;
- idle connections never exceed max_keepalive;
- a connection handed out is never idle, and is never handed back for closing
  until its user releases or discards it;
- an idle connection older than keepalive_expiry is never handed out.
"""

from __future__ import annotations

from typing import Generic, TypeVar

__all__ = ["PoolState"]

C = TypeVar("C")


class PoolState(Generic[C]):
    """Which connection to hand out, open, keep or close; the rules are at the top of the module."""

    def __init__(self, max_connections: int, max_keepalive: int, keepalive_expiry: float) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        if max_keepalive < 0:
            raise ValueError("max_keepalive cannot be negative")
        self.max_connections = max_connections
        self.max_keepalive = max_keepalive
        self.keepalive_expiry = keepalive_expiry
        self.idle: list[tuple[C, float]] = []  # (connection, idle since), newest last
        self.open = 0  # idle, in use, or being opened
        self.closed = False

    def acquire(self, now: float) -> tuple[C | None, bool, list[C]]:
        """(an idle connection to use, or None; whether a new one may be opened; to close).

        Neither a connection nor permission means: wait for a release.
        Permission counts the new connection as open already: report
        `open_failed()` if opening it fails.
        """
        if self.closed:
            raise RuntimeError("the pool is closed")
        stale = self._expired(now)
        if self.idle:
            conn, _ = self.idle.pop()  # the most recent: likeliest still alive
            return conn, False, stale
        if self.open < self.max_connections:
            self.open += 1
            return None, True, stale
        return None, False, stale

    def open_failed(self) -> None:
        """Opening the connection that acquire() permitted failed: it no longer counts."""
        self.open -= 1

    def release(self, conn: C, now: float) -> list[C]:
        """A connection in a known-clean state comes back; what to close."""
        if self.closed or len(self.idle) >= self.max_keepalive:
            self.open -= 1
            return [conn]
        self.idle.append((conn, now))
        return []

    def discard(self) -> None:
        """A connection in use was closed, or found dead, by its user."""
        self.open -= 1

    def expire(self, now: float) -> list[C]:
        """The idle connections past their expiry, taken out of the pool to be closed."""
        return self._expired(now)

    def next_expiry(self) -> float | None:
        """When the oldest idle connection expires, if any is idle."""
        if not self.idle:
            return None
        return min(since for _, since in self.idle) + self.keepalive_expiry

    def take_idle(self) -> list[C]:
        """Every idle connection, taken out of the pool to be closed."""
        idle = [conn for conn, _ in self.idle]
        self.idle.clear()
        self.open -= len(idle)
        return idle

    def close(self) -> list[C]:
        """No more connections; the idle ones to close now."""
        self.closed = True
        return self.take_idle()

    def _expired(self, now: float) -> list[C]:
        limit = now - self.keepalive_expiry
        for _, since in self.idle:
            if since <= limit:
                break
        else:
            return []  # the common case: nothing expired, nothing rebuilt
        stale = [conn for conn, since in self.idle if since <= limit]
        self.idle = [(conn, since) for conn, since in self.idle if since > limit]
        self.open -= len(stale)
        return stale
