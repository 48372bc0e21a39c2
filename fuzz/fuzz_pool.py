#!/usr/bin/env python3
"""Fuzz PoolState, the pool bookkeeping both clients share, against a model of its rules.

    uv run --group fuzz python fuzz/fuzz_pool.py fuzz/corpus/pool -max_total_time=600

Input: 4 setup bytes, then 2-byte operations ``op arg``.

- byte 0: max_connections, ``b & 15`` (0 is refused with ValueError; the run
  then stops); byte 1: max_keepalive, ``(b & 15) - 1`` (-1 is refused);
  byte 2: keepalive_expiry in quarter seconds, ``(b & 63) / 4`` (0 included);
  byte 3: ``0x01`` the clock may stand still between operations (ties at the
  expiry instant), otherwise every operation costs a quarter second.
- operations, ``op % 10``: acquire; the connection being opened opens (its
  user holds it) or fails to open (``open_failed``), ``arg`` picks which;
  release or discard the ``arg``-th connection in use; the clock moves on by
  ``arg`` quarter seconds; ``expire``; ``take_idle``; ``close``; a pool
  contention burst of ``arg & 7`` acquires. ``next_expiry`` is checked after
  every operation.

Checks, after every operation, against a model that knows the rules and
nothing of the implementation: connections open (idle, in use, being opened)
never exceed max_connections and equal the pool's count; idle connections
never exceed max_keepalive and are exactly the model's, newest last; a
connection handed out is the newest idle one, never expired, never in use,
never closed; only idle, released, or stale connections come back to be
closed, each once; a full pool gives neither a connection nor permission;
after close() acquire raises RuntimeError and every release closes;
next_expiry is the oldest idle connection's expiry.
"""

from __future__ import annotations

import itertools
import sys
from contextlib import nullcontext
from dataclasses import dataclass, field

try:
    import atheris
except ImportError:  # replaying inputs (tests/test_fuzz_corpus.py) needs no atheris
    atheris = None

with (
    atheris.instrument_imports(include=["fcgiproto"])
    if atheris is not None and __name__ == "__main__"
    else nullcontext()
):
    from fcgiproto.support import PoolState

if __package__:
    from . import _harness as h
else:  # run as a script: fuzz/ is sys.path[0]
    import _harness as h

#: At most this many operations per input: the state is small, runs stay fast.
MAX_OPS = 512
QUARTER = 0.25

(
    ACQUIRE,
    OPEN_DONE,
    OPEN_FAILED,
    RELEASE,
    DISCARD,
    ADVANCE,
    EXPIRE,
    TAKE_IDLE,
    CLOSE,
    BURST,
) = range(10)


@dataclass
class Model:
    max_connections: int
    max_keepalive: int
    expiry: float
    now: float = 0.0
    idle: list[tuple[int, float]] = field(default_factory=list)  # newest last
    in_use: set[int] = field(default_factory=set)
    opening: int = 0
    closed_ids: set[int] = field(default_factory=set)
    closed: bool = False
    ids: itertools.count = field(default_factory=itertools.count)

    @property
    def open(self) -> int:
        return len(self.idle) + len(self.in_use) + self.opening

    def stale(self) -> list[int]:
        """The idle connections the clock says are past their expiry, taken out."""
        limit = self.now - self.expiry
        stale = [conn for conn, since in self.idle if since <= limit]
        self.idle = [(conn, since) for conn, since in self.idle if since > limit]
        return stale


def to_close(model: Model, conns: list[int], allowed: set[int]) -> None:
    """Connections the pool handed back for closing: each once, none a user holds."""
    assert len(set(conns)) == len(conns), f"closing {conns} twice"
    for conn in conns:
        assert conn in allowed, f"closing {conn}, which is not among {sorted(allowed)}"
        assert conn not in model.in_use, f"closing {conn}, which a user holds"
        assert conn not in model.closed_ids, f"closing {conn} a second time"
        model.closed_ids.add(conn)


def acquire(pool: PoolState[int], model: Model) -> None:
    if model.closed:
        try:
            pool.acquire(model.now)
        except RuntimeError:
            return
        raise AssertionError("a closed pool handed out a connection or permission")
    idle_before = {conn for conn, _ in model.idle}
    expected_stale = model.stale()
    conn, may_open, stale = pool.acquire(model.now)
    assert sorted(stale) == sorted(expected_stale), f"stale {stale}, expected {expected_stale}"
    to_close(model, stale, idle_before)
    if model.idle:
        newest, since = model.idle.pop()
        assert conn == newest, f"handed out {conn}, not the newest idle {newest}"
        assert since > model.now - model.expiry, f"handed out {conn}, expired"
        assert not may_open, "permission to open beside an idle connection"
        model.in_use.add(newest)
    elif model.open < model.max_connections:
        assert conn is None and may_open, "no permission below max_connections"
        model.opening += 1
    else:
        assert conn is None and not may_open, "a full pool gave a connection or permission"


def release(pool: PoolState[int], model: Model, arg: int) -> None:
    if not model.in_use:
        return
    conn = sorted(model.in_use)[arg % len(model.in_use)]
    model.in_use.discard(conn)
    closing = pool.release(conn, model.now)
    if model.closed or len(model.idle) >= model.max_keepalive:
        assert closing == [conn], f"release gave {closing} to close, not [{conn}]"
        to_close(model, closing, {conn})
    else:
        assert closing == [], f"release gave {closing} to close with room for an idle one"
        model.idle.append((conn, model.now))


def step(pool: PoolState[int], model: Model, op: int, arg: int) -> None:
    op %= 10
    if op == ACQUIRE:
        acquire(pool, model)
    elif op in (OPEN_DONE, OPEN_FAILED):
        if not model.opening:
            return
        model.opening -= 1
        if op == OPEN_DONE:
            model.in_use.add(next(model.ids))
        else:
            pool.open_failed()
    elif op == RELEASE:
        release(pool, model, arg)
    elif op == DISCARD:
        if model.in_use:
            conn = sorted(model.in_use)[arg % len(model.in_use)]
            model.in_use.discard(conn)
            model.closed_ids.add(conn)
            pool.discard()
    elif op == ADVANCE:
        model.now += arg * QUARTER
    elif op == EXPIRE:
        idle_before = {conn for conn, _ in model.idle}
        expected = model.stale()
        expired = pool.expire(model.now)
        assert sorted(expired) == sorted(expected), f"expired {expired}, expected {expected}"
        to_close(model, expired, idle_before)
    elif op == TAKE_IDLE:
        idle = [conn for conn, _ in model.idle]
        model.idle.clear()
        taken = pool.take_idle()
        assert sorted(taken) == sorted(idle), f"took {taken}, idle were {idle}"
        to_close(model, taken, set(idle))
    elif op == CLOSE:
        idle = [conn for conn, _ in model.idle]
        model.idle.clear()
        model.closed = True
        taken = pool.close()
        assert sorted(taken) == sorted(idle), f"close gave {taken}, idle were {idle}"
        to_close(model, taken, set(idle))
    else:  # BURST: several callers at once, as when a pool is contended
        for _ in range(arg & 7):
            acquire(pool, model)


def check(pool: PoolState[int], model: Model) -> None:
    assert pool.open == model.open, f"pool counts {pool.open} open, the model {model.open}"
    assert pool.open <= model.max_connections, f"{pool.open} open > {model.max_connections}"
    assert len(pool.idle) <= model.max_keepalive, f"{len(pool.idle)} idle > keepalive cap"
    assert pool.idle == model.idle, f"idle {pool.idle}, expected {model.idle}"
    assert pool.closed == model.closed
    idle_ids = {conn for conn, _ in pool.idle}
    assert not idle_ids & model.in_use, "a connection both idle and in use"
    assert not idle_ids & model.closed_ids, "a closed connection is idle"
    expected = min((s for _, s in model.idle), default=None)
    due = pool.next_expiry()
    if expected is None:
        assert due is None, f"next_expiry {due} with nothing idle"
    else:
        assert due == expected + model.expiry, f"next_expiry {due}, not {expected + model.expiry}"


def one_input(data: bytes) -> None:
    setup, ops = data[:4].ljust(4, b"\0"), data[4 : 4 + 2 * MAX_OPS]
    max_connections = setup[0] & 15
    max_keepalive = (setup[1] & 15) - 1
    expiry = (setup[2] & 63) * QUARTER
    ties = bool(setup[3] & 1)
    try:
        pool: PoolState[int] = PoolState(max_connections, max_keepalive, expiry)
    except ValueError:
        assert max_connections < 1 or max_keepalive < 0, "refused valid limits"
        return
    assert max_connections >= 1 and max_keepalive >= 0, "took invalid limits"
    model = Model(max_connections, max_keepalive, expiry)
    for i in range(0, len(ops) - 1, 2):
        step(pool, model, ops[i], ops[i + 1])
        check(pool, model)
        if not ties:
            model.now += QUARTER
    # Every connection still held or idle can end: then nothing is open.
    for conn in sorted(model.in_use):
        model.in_use.discard(conn)
        pool.discard()
    for _ in range(model.opening):
        pool.open_failed()
    model.opening = 0
    pool.close()
    assert pool.open == 0, f"{pool.open} connections counted open after everything ended"


# --- seeds ---


def encode(
    max_connections: int, max_keepalive: int, expiry: float, ops: list[tuple[int, int]], ties=False
) -> bytes:
    setup = bytes((max_connections, max_keepalive + 1, int(expiry / QUARTER), int(ties)))
    return setup + b"".join(bytes(o) for o in ops)


def seeds() -> dict[str, bytes]:
    """The seed corpus: each a pool doing one thing of note."""
    a, done, fail, rel, disc = (ACQUIRE, 0), (OPEN_DONE, 0), (OPEN_FAILED, 0), RELEASE, DISCARD
    return {
        "acquire-open-release-reuse": encode(2, 2, 5.0, [a, done, (rel, 0), a, (rel, 0)]),
        "full-pool-gives-nothing": encode(1, 1, 5.0, [a, done, a, a, (rel, 0), a]),
        "open-failed-frees-the-slot": encode(1, 1, 5.0, [a, fail, a, done, (disc, 0), a]),
        "keepalive-cap-closes-on-release": encode(
            3, 1, 5.0, [a, done, a, done, a, done, (rel, 0), (rel, 0), (rel, 0)]
        ),
        "no-keepalive-at-all": encode(2, 0, 5.0, [a, done, (rel, 0), a]),
        "idle-expires-on-acquire": encode(2, 2, 1.0, [a, done, (rel, 0), (ADVANCE, 4), a]),
        "idle-expires-by-reaper": encode(
            2,
            2,
            1.0,
            [a, done, a, done, (rel, 0), (ADVANCE, 2), (rel, 0), (ADVANCE, 2), (EXPIRE, 0)],
        ),
        "expiry-instant-tie": encode(1, 1, 1.0, [a, done, (rel, 0), (ADVANCE, 4), a], ties=True),
        "zero-expiry": encode(2, 2, 0.0, [a, done, (rel, 0), a], ties=True),
        "newest-idle-first": encode(
            3, 3, 60.0, [a, done, a, done, a, done, (rel, 2), (rel, 0), (rel, 0), a, a]
        ),
        "take-idle-for-multiplexing": encode(
            3, 3, 5.0, [a, done, a, done, (rel, 0), (TAKE_IDLE, 0), a]
        ),
        "close-with-connections-in-use": encode(
            2, 2, 5.0, [a, done, a, done, (rel, 0), (CLOSE, 0), (rel, 0), a, (disc, 0)]
        ),
        "contention-burst": encode(4, 2, 2.0, [(BURST, 7), done, done, fail, (BURST, 3), (rel, 0)]),
        "invalid-limits": encode(0, -1, 5.0, [a]),
    }


def write_seeds(directory: str) -> None:
    import pathlib

    path = pathlib.Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    for name, data in seeds().items():
        (path / name).write_bytes(data)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--write-seeds"]:
        write_seeds(sys.argv[2])
    else:
        h.fuzz(one_input)
