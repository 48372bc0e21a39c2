"""The tasks a server connection runs its requests in: a plain asyncio task each on asyncio.

anyio's task group spawns a task with a cancel scope, an event and a
wrapping coroutine of its own, and tracks it in a weak mapping: on asyncio
that costs several times the task itself, once per request. On asyncio a
request's task is a bare task of the loop (as uvicorn's are), kept in a set
so that the connection can cancel the ones still running and wait for them
to end; each still gets its own copy of the context. Elsewhere (trio) it is
an anyio task group. Either way the set is entered with ``async with``,
which returns once every task started in it has ended.

On asyncio a task started from the loop's read callback (`at_once`), when
the loop has nothing else ready to run, takes its first step there and
then, as Python 3.12's eager tasks do: a request whose app never has to
wait is answered in the callback its bytes came in, without a second turn
of the loop. The task is made as any other, then its first step, which the
loop would run next, is run now.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any

import anyio
import anyio.abc

from ._running import running_asyncio

__all__ = ["AnyioRequestTasks", "AsyncioRequestTasks", "RequestTasks", "request_tasks_type"]

Run = Callable[..., Coroutine[Any, Any, object]]
#: Told of an exception a task let out (the task group would have raised it).
OnFailure = Callable[[BaseException], None]


class AsyncioRequestTasks:
    """Bare asyncio tasks, cancelled natively, waited for on the way out."""

    def __init__(self, on_failure: OnFailure) -> None:
        self._loop = asyncio.get_running_loop()
        # Where the loop keeps the callbacks it runs next (asyncio's own loops;
        # not uvloop's): a new task's first step is the last of them.
        self._ready: deque[asyncio.Handle] | None = getattr(self._loop, "_ready", None)
        if not isinstance(self._ready, deque):
            self._ready = None
        self._on_failure = on_failure
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._keys = itertools.count()
        self._all_ended: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._cancelled = False

    def start(self, run: Run, *args: object, name: str, at_once: bool = False) -> None:
        """Run ``run(*args)`` in a task of its own, from the next turn of the loop.

        With `at_once`, from a callback of the loop (never from a task), its
        first step runs now if the loop has nothing else to run first.
        """
        key = next(self._keys)
        task = self._loop.create_task(self._guard(key, run, args), name=name)
        ready = self._ready
        if at_once and ready is not None and len(ready) == 1:
            # The loop has nothing else to run before this task's first step
            # (with more, each runs in its turn: requests that came together
            # are taken together, then their apps run, which is cheaper).
            step = ready[0]
            if getattr(getattr(step, "_callback", None), "__self__", None) is task:
                # Its first step, run here instead of on the loop's next turn:
                # the task is the current one while it runs, as on the loop.
                ready.pop()
                step._run()
        if task.done():  # ran to its end at once (here, or by an eager task factory)
            return
        self._tasks[key] = task
        if self._cancelled:  # as in a cancelled task group: it ends at its first await
            task.cancel()

    async def _guard(self, key: int, run: Run, args: tuple[object, ...]) -> None:
        try:
            await run(*args)
        except asyncio.CancelledError:
            pass  # only the set cancels its tasks, and it does not ask why
        except Exception as exc:
            self._on_failure(exc)
        finally:
            self._tasks.pop(key, None)  # not there yet if it ran eagerly
            if not self._tasks and self._all_ended is not None and not self._all_ended.done():
                self._all_ended.set_result(None)

    def cancel(self) -> None:
        """Cancel the tasks, once: a second cancellation would cut short their cleanup."""
        if self._cancelled:
            return
        self._cancelled = True
        for task in self._tasks.values():
            task.cancel()

    def cancel_at(self, deadline: float) -> None:
        """Cancel the tasks still running at `deadline` (the loop's clock)."""
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_at(deadline, self.cancel)

    async def __aenter__(self) -> AsyncioRequestTasks:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if exc_type is not None:  # the host failed or was cancelled: its tasks go too
            self.cancel()
        cancelled: BaseException | None = None
        try:
            while self._tasks:
                self._all_ended = self._loop.create_future()
                try:
                    if exc_type is None and cancelled is None:
                        await self._all_ended
                    else:
                        # Cancelled once is enough: the tasks are, and they are
                        # waited for without anyio cancelling this wait again
                        # on every turn of the loop.
                        with anyio.CancelScope(shield=True):
                            await self._all_ended
                except asyncio.CancelledError as error:
                    cancelled = error
                    self.cancel()
        finally:
            self._all_ended = None
            if self._timer is not None:
                self._timer.cancel()
        if cancelled is not None and exc_type is None:
            raise cancelled
        return False


class AnyioRequestTasks:
    """An anyio task group: an exception a task lets out leaves the group, as anyio has it."""

    def __init__(self, on_failure: OnFailure) -> None:
        self._group = anyio.create_task_group()

    def start(self, run: Run, *args: object, name: str, at_once: bool = False) -> None:
        self._group.start_soon(run, *args, name=name)

    def cancel(self) -> None:
        self._group.cancel_scope.cancel()

    def cancel_at(self, deadline: float) -> None:
        self._group.cancel_scope.deadline = deadline

    async def __aenter__(self) -> AnyioRequestTasks:
        await self._group.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        return bool(await self._group.__aexit__(exc_type, exc, tb))


RequestTasks = AsyncioRequestTasks | AnyioRequestTasks


def request_tasks_type() -> type[AsyncioRequestTasks] | type[AnyioRequestTasks]:
    """The kind for the running loop, looked up once per server."""
    return AsyncioRequestTasks if running_asyncio() else AnyioRequestTasks
