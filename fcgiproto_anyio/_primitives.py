"""What the async face of the client needs that the blocking face does differently.

The client's control flow is written once, async, in this package; the
blocking client is generated from it (scripts/generate_sync.py). Each name here has
a namesake in fcgiproto_socket/_primitives.py with the same behaviour on
threads: locks, events with a timeout, a shield against cancellation, the
clock, and the tasks a client runs in the background.
"""

from __future__ import annotations

import asyncio
import math
import threading
from asyncio import _get_running_loop
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Iterator,
)
from types import TracebackType
from typing import Any, TypeAlias

import anyio
import anyio.abc
import anyio.lowlevel

from fcgiproto import LocalProtocolError

__all__ = [
    "AsyncBackground",
    "AsyncFlag",
    "AsyncLock",
    "Body",
    "BodyPieces",
    "NextChunk",
    "Refill",
    "StateLock",
    "checkpoint",
    "current_time",
    "shield",
]


def current_time() -> float:
    """The event loop's clock (a mocked one in tests too), in seconds.

    On asyncio straight from the loop: anyio.current_time() asks sniffio
    which library runs first, several times the cost of the clock itself,
    and requests read it a few times each.
    """
    loop = _get_running_loop()
    if loop is not None:
        return loop.time()
    return anyio.current_time()


#: Asked for more of the request body to send; False when there is none.
Refill: TypeAlias = "Callable[[], Awaitable[bool]]"
#: Gives the next piece of a stream; None at its end.
NextChunk: TypeAlias = "Callable[[], Awaitable[bytes | None]]"
checkpoint = anyio.lowlevel.checkpoint


def shield() -> anyio.CancelScope:
    """A block that cancellation cannot cut short (writes, closing, bookkeeping)."""
    return anyio.CancelScope(shield=True)


#: Guards state that a reader and a sender change together. Tasks of one event
#: loop never run at once and no block under it awaits, so it is never
#: contended here; a C lock is the cheapest `with` there is (no Python frame
#: on entry or exit, where a do-nothing class costs two calls per block).
StateLock = threading.Lock


class AsyncLock:
    """A lock held across waits (connecting, writing a record)."""

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        # fast_acquire: an uncontended lock costs no trip through the event loop.
        self._lock = anyio.Lock(fast_acquire=True)

    async def __aenter__(self) -> None:
        await self._lock.acquire()

    async def __aexit__(self, *exc_info: object) -> None:
        self._lock.release()


class AsyncFlag:
    """A flag to wait for, with a limit; it can be cleared and set again.

    On asyncio a wait is a future and a LoopTimeouts entry, on trio a parked
    task in a trio cancel scope: an anyio Event waited in a move_on_after
    scope costs several times either, once per request on a multiplexed
    connection. anyio scopes cancel both like any other wait.
    """

    __slots__ = ("_is_set", "_tasks", "_waiters")

    def __init__(self) -> None:
        self._is_set = False
        self._waiters: list[asyncio.Future[None]] = []  # tasks waiting on asyncio
        self._tasks: list[Any] = []  # trio tasks parked here

    def set(self) -> None:
        if self._is_set:
            return
        self._is_set = True
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        if self._tasks:
            from ._trio_stream import wake_parked

            wake_parked(self._tasks)

    def is_set(self) -> bool:
        return self._is_set

    def clear(self) -> None:
        self._is_set = False

    async def wait(self, timeout: float | None) -> bool:
        """Whether the flag was set within `timeout` seconds (None: no limit)."""
        if self._is_set:
            return True
        loop = _get_running_loop()
        if loop is None:  # anyio runs on asyncio or trio: this is trio
            from ._trio_stream import park

            await park(self._tasks, timeout, self.is_set)
            return self._is_set
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiters.append(waiter)
        if timeout is not None:
            timeouts = loop_timeouts(loop)
            timeouts.add(waiter, loop.time() + timeout, None)
        try:
            await waiter
        finally:
            if timeout is not None:
                timeouts.discard(waiter)
            self._waiters.remove(waiter)
        return self._is_set


class LoopTimeouts:
    """The limits of many waits on an asyncio loop, kept by one loop timer.

    A timer per wait is a TimerHandle pushed on the loop's heap and a cancelled
    one popped from it later, comparisons in Python each; with a read limit
    of seconds and answers in microseconds, nearly every such timer is made
    only to be cancelled. Here a wait is an entry in a dict; the one timer is
    armed for the soonest limit when a sooner one comes, and when it fires
    it ends the waits that are due and arms itself again for the soonest of
    the others: about once per limit's length, not once per wait.
    """

    __slots__ = ("_handle", "_loop", "_waits", "_when")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._waits: dict[asyncio.Future[Any], tuple[float, object]] = {}
        self._handle: asyncio.TimerHandle | None = None
        self._when = math.inf

    def add(self, waiter: asyncio.Future[Any], deadline: float, result: object) -> None:
        """End `waiter` with `result` at `deadline` (the loop's clock) unless it is done."""
        self._waits[waiter] = (deadline, result)
        if deadline < self._when:
            if self._handle is not None:
                self._handle.cancel()
            self._handle = self._loop.call_at(deadline, self._fire)
            self._when = deadline

    def discard(self, waiter: asyncio.Future[Any]) -> None:
        self._waits.pop(waiter, None)

    def _fire(self) -> None:
        # Due: what the timer was armed for (the loop runs a timer up to its
        # clock's resolution early); the others arm it again.
        due = self._when
        self._handle, self._when = None, math.inf
        ended = [waiter for waiter, (deadline, _) in self._waits.items() if deadline <= due]
        for waiter in ended:
            _, result = self._waits.pop(waiter)
            if not waiter.done():
                waiter.set_result(result)
        if self._waits:
            soonest = min(deadline for deadline, _ in self._waits.values())
            self._handle = self._loop.call_at(soonest, self._fire)
            self._when = soonest


# The running loop's LoopTimeouts: (loop, its timeouts), read and replaced whole.
_timeouts: tuple[asyncio.AbstractEventLoop | None, LoopTimeouts | None] = (None, None)


def loop_timeouts(loop: asyncio.AbstractEventLoop) -> LoopTimeouts:
    """The LoopTimeouts of `loop`, the running one (one kept: loops rarely change)."""
    global _timeouts
    cached_loop, timeouts = _timeouts
    if cached_loop is not loop or timeouts is None:
        timeouts = LoopTimeouts(loop)
        _timeouts = (loop, timeouts)
    return timeouts


class AsyncBackground:
    """The tasks a client runs beside its callers: the reaper, connection readers.

    They run in a task group that ``async with`` the client opens, so the
    caller's block owns them and nothing outlives it.
    """

    def __init__(self) -> None:
        self._tasks: anyio.abc.TaskGroup | None = None

    def check(self) -> None:
        if self._tasks is None:
            raise LocalProtocolError("use the client as `async with AsyncClient(...) as client:`")

    def start(self, run: Callable[[], Coroutine[Any, Any, object]], name: str) -> None:
        self.check()
        assert self._tasks is not None
        self._tasks.start_soon(run, name=name)

    async def __aenter__(self) -> None:
        tasks = anyio.create_task_group()
        await tasks.__aenter__()
        self._tasks = tasks

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        tasks, self._tasks = self._tasks, None
        if tasks is not None:
            # Only the client's own tasks end here; an exception from the
            # block goes on as it was raised, not wrapped in an ExceptionGroup.
            tasks.cancel_scope.cancel()
            await tasks.__aexit__(None, None, None)

    async def join(self) -> None:
        """Wait for the tasks that are ending; on this face the task group does it."""


Body: TypeAlias = "bytes | bytearray | memoryview | Iterable[bytes] | AsyncIterable[bytes]"


class BodyPieces:
    """The pieces of a request body given as an iterable, sync or async, as bytes.

    A plain object rather than an async generator: one left unfinished (the
    application answered before reading the whole body) needs no finalizing.
    """

    __slots__ = ("_async", "_sync")

    def __init__(self, stdin: Iterable[bytes] | AsyncIterable[bytes]) -> None:
        self._async: AsyncIterator[bytes] | None = None
        self._sync: Iterator[bytes] | None = None
        if isinstance(stdin, AsyncIterable):
            self._async = stdin.__aiter__()
        else:
            self._sync = iter(stdin)

    async def next(self) -> bytes | None:
        """The next piece; None once there are no more."""
        if self._async is not None:
            try:
                return bytes(await self._async.__anext__())
            except StopAsyncIteration:
                return None
        assert self._sync is not None
        chunk = next(self._sync, None)
        return None if chunk is None else bytes(chunk)

    async def aclose(self) -> None:
        """Close a generator left unfinished, so it needs no finalizing later."""
        close = getattr(self._async, "aclose", None)
        if close is not None:
            await close()
        elif (close_sync := getattr(self._sync, "close", None)) is not None:
            close_sync()
