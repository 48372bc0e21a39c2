"""The stream AnyioBackend gives on trio: AnyioStream, waiting through trio itself.

anyio on trio wraps each cancel scope and each wait_readable in a layer of its
own; a read is one of each, so going to trio directly saves a few
microseconds per request (about a seventh of a round trip's own cost). The
limit of a wait is not a cancel scope of its own but an entry that one
system task per run keeps (_Timeouts). trio registers a socket once per wait
(EPOLLONESHOT) whichever way it is called, so the waits themselves stay as
they were.
"""

from __future__ import annotations

import contextlib
import math
import socket
from collections.abc import Callable

import anyio
import outcome
import trio
import trio.lowlevel

from fcgiproto import ReadTimeout, WriteTimeout
from fcgiproto.support import Address

from ._backend import AnyioStream, _Wait

__all__ = ["TrioStream", "park", "wake_parked"]

#: What a parked task is woken with when the keeper of its limit ends.
_HANDED_BACK = object()


class _Timeouts:
    """The limits of a trio run's socket waits, kept by one system task.

    A cancel scope per wait cost about as much as the wait itself (9 against
    11 us for a socketpair round trip, loaded), and nearly every such limit,
    seconds long, guards a wait of microseconds. Here a wait is an entry in a
    dict; the keeper sleeps until the soonest limit (moved sooner only when a
    sooner one comes), and at a limit wakes the waits that are due through
    trio.lowlevel.notify_closing, which their stream reads as the timeout
    when their entry is gone. A wait woken so for the other direction's limit
    waits again. A task parked by AsyncFlag while the keeper runs has its
    limit kept here too: the keeper takes it out of its list and reschedules
    it. When the last stream closes the keeper ends, and hands the tasks
    still parked back to park(), which waits on in a cancel scope of its own.
    """

    __slots__ = ("_life", "_parked_in", "_scope", "_streams", "_waits", "_when")

    def __init__(self) -> None:
        self._waits: dict[tuple[TrioStream, bool] | trio.lowlevel.Task, float] = {}
        self._parked_in: dict[trio.lowlevel.Task, list[trio.lowlevel.Task]] = {}
        self._when = math.inf
        self._scope: trio.CancelScope | None = None
        # The keeper lives while streams are open, so that nothing is left
        # running once a client has closed its connections.
        self._streams = 0
        self._life = trio.CancelScope()

    def opened(self) -> None:
        self._streams += 1

    def closed(self) -> None:
        self._streams -= 1
        if self._streams:
            return
        self._life.cancel()
        if _TIMEOUTS.get(None) is self:
            _TIMEOUTS.set(None)  # the next stream starts a new keeper
        for task, parked in self._parked_in.items():
            if task in parked:  # not woken meanwhile
                parked.remove(task)
                trio.lowlevel.reschedule(task, outcome.Value(_HANDED_BACK))
        self._parked_in.clear()

    def park(
        self, task: trio.lowlevel.Task, parked: list[trio.lowlevel.Task], deadline: float
    ) -> None:
        self._parked_in[task] = parked
        self.add(task, deadline)

    def unpark(self, task: trio.lowlevel.Task) -> None:
        self._waits.pop(task, None)
        self._parked_in.pop(task, None)

    def add(self, key: tuple[TrioStream, bool] | trio.lowlevel.Task, deadline: float) -> None:
        self._waits[key] = deadline
        if deadline < self._when:
            self._when = deadline
            if self._scope is not None:
                self._scope.deadline = deadline

    def discard(self, key: tuple[TrioStream, bool]) -> None:
        self._waits.pop(key, None)

    def waiting(self, key: tuple[TrioStream, bool]) -> bool:
        """False once the wait's limit has passed (or it ended)."""
        return key in self._waits

    async def keep(self) -> None:
        with self._life:
            await self._keep()

    async def _keep(self) -> None:
        while True:
            with trio.CancelScope(deadline=self._when) as self._scope:
                await trio.sleep_forever()
            self._scope = None
            now = trio.current_time()
            due = [key for key, deadline in self._waits.items() if deadline <= now]
            streams = set()
            for key in due:
                del self._waits[key]
                if type(key) is tuple:
                    streams.add(key[0])
                    continue
                assert isinstance(key, trio.lowlevel.Task)
                parked = self._parked_in.pop(key, None)
                if parked is not None and key in parked:  # not woken meanwhile
                    parked.remove(key)
                    trio.lowlevel.reschedule(key)
            for stream in streams:
                if not stream._closed:
                    # A system task must not fail: that would end the whole run.
                    with contextlib.suppress(OSError, ValueError):
                        trio.lowlevel.notify_closing(stream._sock)
            self._when = min(self._waits.values(), default=math.inf)


_TIMEOUTS: trio.lowlevel.RunVar[_Timeouts | None] = trio.lowlevel.RunVar("fcgiproto_timeouts")


def _timeouts() -> _Timeouts:
    """The run's keeper of limits, started when none runs."""
    timeouts = _TIMEOUTS.get(None)
    if timeouts is None:
        timeouts = _Timeouts()
        _TIMEOUTS.set(timeouts)
        trio.lowlevel.spawn_system_task(timeouts.keep, name="fcgiproto timeouts")
    return timeouts


class TrioStream(AnyioStream):
    """One non-blocking socket, waited on with trio's own calls."""

    _checkpoint = staticmethod(trio.lowlevel.checkpoint)

    def __init__(self, sock: socket.socket, address: Address) -> None:
        super().__init__(sock, address)
        self._timeouts = _timeouts()
        self._timeouts.opened()

    async def aclose(self) -> None:
        if not self._closed:
            self._timeouts.closed()
        await super().aclose()

    async def _wait(
        self,
        wait: _Wait,
        timeout: float | None,
        error: type[ReadTimeout] | type[WriteTimeout],
    ) -> None:
        if self._closed:
            raise self._closed_error(error)
        readable = wait is anyio.wait_readable
        wait_for = trio.lowlevel.wait_readable if readable else trio.lowlevel.wait_writable
        if timeout is None:
            try:
                await wait_for(self._sock)
            except (trio.ClosedResourceError, OSError):
                raise self._closed_error(error) from None
            return
        timeouts = self._timeouts
        key = (self, readable)
        timeouts.add(key, trio.current_time() + timeout)
        try:
            while True:
                try:
                    await wait_for(self._sock)
                    return
                except (trio.ClosedResourceError, OSError):
                    if self._closed:
                        raise self._closed_error(error) from None
                    if not timeouts.waiting(key):
                        raise self._timeout(error, timeout) from None
                    # Woken for the other direction's limit: still ours to wait.
        finally:
            timeouts.discard(key)


async def park(
    parked: list[trio.lowlevel.Task], timeout: float | None, woken: Callable[[], bool]
) -> None:
    """Wait in `parked` until wake_parked() or `timeout` seconds (AsyncFlag on trio).

    `woken` tells whether the wake-up came while the task was out of the
    list: handed back by a keeper that ended, it waits on only if not.
    """
    task = trio.lowlevel.current_task()
    parked.append(task)

    def abort(_: object) -> trio.lowlevel.Abort:
        parked.remove(task)
        return trio.lowlevel.Abort.SUCCEEDED

    if timeout is None:
        await trio.lowlevel.wait_task_rescheduled(abort)
        return
    deadline = trio.current_time() + timeout
    timeouts = _TIMEOUTS.get(None)
    if timeouts is None:  # no keeper runs (no trio stream is open): a scope of its own
        with trio.CancelScope(deadline=deadline):
            await trio.lowlevel.wait_task_rescheduled(abort)
        return
    timeouts.park(task, parked, deadline)
    try:
        if await trio.lowlevel.wait_task_rescheduled(abort) is not _HANDED_BACK:
            return
    finally:
        timeouts.unpark(task)
    if woken():
        return
    parked.append(task)  # the keeper ended before the limit: wait on without it
    with trio.CancelScope(deadline=deadline):
        await trio.lowlevel.wait_task_rescheduled(abort)


def wake_parked(parked: list[trio.lowlevel.Task]) -> None:
    for task in parked:
        trio.lowlevel.reschedule(task)
    parked.clear()
