"""The pool's bookkeeping, driven by a hypothesis state machine."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from fcgiproto.support import PoolState


class PoolMachine(RuleBasedStateMachine):
    """Users acquire, release, discard and cancel; time passes; connections die."""

    @initialize(
        max_connections=st.integers(1, 5),
        max_keepalive=st.integers(0, 5),
        expiry=st.sampled_from([0.5, 1.0, 5.0]),
    )
    def start(self, max_connections: int, max_keepalive: int, expiry: float) -> None:
        self.pool: PoolState[int] = PoolState(max_connections, max_keepalive, expiry)
        self.now = 0.0
        self.ids = itertools.count()
        self.in_use: set[int] = set()  # handed to a user
        self.opening = 0  # permission given, connection not open yet
        self.closed: set[int] = set()
        self.released_at: dict[int, float] = {}

    def _close(self, conns: list[int]) -> None:
        for conn in conns:
            assert conn not in self.in_use, "closing a connection a user holds"
            assert conn not in self.closed, "closing a connection twice"
            self.closed.add(conn)

    @rule()
    def acquire(self) -> None:
        conn, may_open, stale = self.pool.acquire(self.now)
        self._close(stale)
        if conn is not None:
            assert conn not in self.closed
            assert self.now - self.released_at[conn] < self.pool.keepalive_expiry
            self.in_use.add(conn)
        elif may_open:
            self.opening += 1
        else:
            assert self.pool.open == self.pool.max_connections  # waiting is only when full

    @precondition(lambda self: self.opening)
    @rule(succeeds=st.booleans())
    def open_finishes(self, succeeds: bool) -> None:
        self.opening -= 1
        if succeeds:
            self.in_use.add(next(self.ids))
        else:
            self.pool.open_failed()  # a refused or cancelled connect

    @precondition(lambda self: self.in_use)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        conn = data.draw(st.sampled_from(sorted(self.in_use)))
        self.in_use.discard(conn)
        self.released_at[conn] = self.now
        self._close(self.pool.release(conn, self.now))

    @precondition(lambda self: self.in_use)
    @rule(data=st.data())
    def discard(self, data: st.DataObject) -> None:
        # The request was cancelled, or its connection died under it.
        conn = data.draw(st.sampled_from(sorted(self.in_use)))
        self.in_use.discard(conn)
        self.closed.add(conn)
        self.pool.discard()

    @rule(seconds=st.sampled_from([0.1, 0.6, 2.0]))
    def time_passes(self, seconds: float) -> None:
        self.now += seconds

    @rule()
    def expire(self) -> None:
        self._close(self.pool.expire(self.now))
        due = self.pool.next_expiry()
        assert due is None or due > self.now

    @invariant()
    def counts_hold(self) -> None:
        pool = self.pool
        idle = [conn for conn, _ in pool.idle]
        assert pool.open <= pool.max_connections
        assert len(idle) <= pool.max_keepalive
        assert pool.open == len(idle) + len(self.in_use) + self.opening
        assert not set(idle) & self.in_use
        assert not set(idle) & self.closed


PoolMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=40)
test_pool_state_machine = PoolMachine.TestCase


def test_closing_hands_back_the_idle_connections_and_refuses_more() -> None:
    pool: PoolState[str] = PoolState(2, 2, 5.0)
    assert pool.acquire(0.0) == (None, True, [])
    assert pool.acquire(0.0) == (None, True, [])
    assert pool.release("a", 0.0) == []
    assert pool.close() == ["a"]
    assert pool.release("b", 1.0) == ["b"]  # a straggler is closed, not kept
    assert pool.open == 0
    with pytest.raises(RuntimeError, match="closed"):
        pool.acquire(1.0)


def test_the_most_recently_released_connection_is_reused_first() -> None:
    pool: PoolState[str] = PoolState(3, 3, 5.0)
    for _ in range(2):
        pool.acquire(0.0)
    pool.release("old", 0.0)
    pool.release("new", 1.0)
    assert pool.acquire(2.0) == ("new", False, [])


def test_expired_idle_connections_are_never_handed_out() -> None:
    pool: PoolState[str] = PoolState(1, 1, 5.0)
    pool.acquire(0.0)
    pool.release("a", 0.0)
    assert pool.next_expiry() == 5.0
    assert pool.acquire(5.0) == (None, True, ["a"])


@pytest.mark.parametrize(
    ("connections", "keepalive", "message"),
    [(0, 1, "max_connections must be at least 1"), (1, -1, "max_keepalive cannot be negative")],
)
def test_impossible_limits_are_refused(connections: int, keepalive: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PoolState(connections, keepalive, 5.0)
