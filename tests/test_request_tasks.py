"""The set of request tasks a server connection keeps: bare tasks on asyncio, a task group on trio.

What the connection relies on, the same on both: a task runs in a copy of
the context it was started from, cancel() and cancel_at() end the tasks still
running, leaving the block waits for every task, a cancelled host cancels its
tasks and still waits for them, and an exception a task lets out is not lost.
"""

from __future__ import annotations

import contextvars
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import anyio
import pytest

from fcgiproto_anyio._request_tasks import AsyncioRequestTasks, request_tasks_type

pytestmark = pytest.mark.anyio

marker: contextvars.ContextVar[str] = contextvars.ContextVar("marker", default="")


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def never_fails(exc: BaseException) -> None:
    raise AssertionError(f"no task should fail: {exc!r}")


async def test_each_task_has_its_own_copy_of_the_context() -> None:
    seen: list[str] = []

    async def run(value: str) -> None:
        await anyio.sleep(0)
        seen.append(marker.get())
        marker.set(value)  # stays in this task's copy
        await anyio.sleep(0)
        seen.append(marker.get())

    marker.set("host")
    async with request_tasks_type()(never_fails) as tasks:
        tasks.start(run, "a", name="a")
        tasks.start(run, "b", name="b")
    assert sorted(seen) == ["a", "b", "host", "host"]
    assert marker.get() == "host"


async def test_leaving_waits_for_every_task() -> None:
    ended: list[int] = []

    async def run(number: int) -> None:
        await anyio.sleep(0.01 * number)
        ended.append(number)

    async with request_tasks_type()(never_fails) as tasks:
        for number in range(3):
            tasks.start(run, number, name=str(number))
    assert sorted(ended) == [0, 1, 2]


async def test_cancel_ends_the_tasks_still_running() -> None:
    cancelled: list[str] = []

    async def run() -> None:
        try:
            await anyio.sleep(30)
        except anyio.get_cancelled_exc_class():
            cancelled.append("yes")
            raise

    with anyio.fail_after(5):
        async with request_tasks_type()(never_fails) as tasks:
            tasks.start(run, name="sleeper")
            await anyio.sleep(0.01)
            tasks.cancel()
    assert cancelled == ["yes"]


async def test_cancel_at_ends_them_at_the_deadline() -> None:
    async def run() -> None:
        await anyio.sleep(30)

    with anyio.fail_after(5):
        async with request_tasks_type()(never_fails) as tasks:
            tasks.start(run, name="sleeper")
            tasks.cancel_at(anyio.current_time() + 0.05)


async def test_a_cancelled_host_cancels_its_tasks_and_waits_for_them() -> None:
    finished: list[str] = []

    async def run() -> None:
        try:
            await anyio.sleep(30)
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.sleep(0.05)  # cleanup that takes a while: waited for
            finished.append("cleaned up")

    with anyio.fail_after(5):
        with anyio.CancelScope() as scope:
            async with request_tasks_type()(never_fails) as tasks:
                tasks.start(run, name="sleeper")
                await anyio.sleep(0.01)
                scope.cancel()
                await anyio.sleep(30)
    assert scope.cancelled_caught
    assert finished == ["cleaned up"]


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_an_exception_a_bare_task_lets_out_goes_to_on_failure() -> None:
    failures: list[BaseException] = []

    async def run() -> None:
        raise RuntimeError("a bug of the server")

    async with AsyncioRequestTasks(failures.append) as tasks:
        tasks.start(run, name="failing")
    assert [str(exc) for exc in failures] == ["a bug of the server"]


def _start_from_callback(
    tasks: AsyncioRequestTasks,
    run: Callable[[], Awaitable[None]],
    order: list[str],
    *also: Callable[[], None],
) -> None:
    """Start `run` from a callback of the loop, with `also` queued beside it."""
    import asyncio

    loop = asyncio.get_running_loop()

    def from_the_loop() -> None:
        tasks.start(run, name="request", at_once=True)
        order.append("start returned")

    loop.call_soon(from_the_loop)
    for callback in also:
        loop.call_soon(callback)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_task_started_from_a_callback_takes_its_first_step_at_once() -> None:
    import asyncio

    order: list[str] = []

    async def run() -> None:
        current = asyncio.current_task()
        order.append(f"first step in {current.get_name() if current else None}")
        marker.set("request")  # its own copy of the context, even run at once
        await anyio.sleep(0)
        order.append("second step")

    async with AsyncioRequestTasks(never_fails) as tasks:
        _start_from_callback(tasks, run, order)
        await anyio.sleep(0.01)  # a timer: nothing else is ready when the callback runs
    # The first step ran inside start(), in its own task; the rest on the loop.
    assert order == ["first step in request", "start returned", "second step"]
    assert marker.get() == ""


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_task_started_beside_other_callbacks_waits_its_turn() -> None:
    order: list[str] = []

    async def run() -> None:
        order.append("first step")

    async with AsyncioRequestTasks(never_fails) as tasks:
        # Another callback is ready in the same turn: the loop runs it first,
        # then the task (requests read together are all taken before any app runs).
        _start_from_callback(tasks, run, order, lambda: order.append("other callback"))
        await anyio.sleep(0)
        await anyio.sleep(0)
    assert order == ["start returned", "other callback", "first step"]


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_only_the_new_tasks_own_first_step_is_run_at_once() -> None:
    """A task factory that runs the first step itself (as an eager one does) and leaves
    another callback as the only one ready: start() does not run that callback, and the
    task, not done, is waited for like any other."""
    import asyncio

    loop = asyncio.get_running_loop()
    order: list[str] = []
    gate = loop.create_future()

    def stepping_factory(
        loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any], **kwargs: Any
    ) -> asyncio.Task[Any]:
        task = asyncio.Task(coro, loop=loop, **kwargs)
        loop._ready.pop()._run()  # type: ignore[attr-defined]
        return task

    async def run() -> None:
        order.append("first step")
        loop.call_soon(lambda: order.append("other callback"))
        await gate
        order.append("second step")

    loop.set_task_factory(stepping_factory)
    try:
        async with AsyncioRequestTasks(never_fails) as tasks:
            _start_from_callback(tasks, run, order)
            await anyio.sleep(0.01)
            assert order == ["first step", "start returned", "other callback"]
            gate.set_result(None)
    finally:
        loop.set_task_factory(None)
    assert order == ["first step", "start returned", "other callback", "second step"]


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_task_started_not_at_once_takes_its_first_step_on_the_loop() -> None:
    order: list[str] = []

    async def run() -> None:
        order.append("first step")

    async with AsyncioRequestTasks(never_fails) as tasks:
        tasks.start(run, name="request")
        order.append("start returned")
    assert order == ["start returned", "first step"]


@pytest.mark.parametrize("anyio_backend", [("asyncio", {"use_uvloop": True})], ids=["uvloop"])
async def test_on_a_loop_without_a_ready_queue_a_task_started_at_once_waits_its_turn() -> None:
    """uvloop keeps its callbacks to itself: the first step runs on the loop, as ever."""
    import asyncio

    import uvloop

    assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
    order: list[str] = []

    async def run() -> None:
        order.append("first step")

    async with AsyncioRequestTasks(never_fails) as tasks:
        _start_from_callback(tasks, run, order)
        await anyio.sleep(0.01)
    assert order == ["start returned", "first step"]
