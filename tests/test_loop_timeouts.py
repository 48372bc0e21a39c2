"""LoopTimeouts: the limits of many asyncio waits on one loop timer."""

from __future__ import annotations

import asyncio
import functools

from fcgiproto_anyio._primitives import AsyncFlag, LoopTimeouts, loop_timeouts


def test_each_wait_ends_at_its_own_limit_whatever_the_order_they_came_in() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        timeouts = LoopTimeouts(loop)
        start = loop.time()
        ended: dict[str, float] = {}
        limits = {"long": 0.30, "short": 0.05, "middle": 0.15, "later_shorter": 0.10}
        waiters: dict[str, asyncio.Future[object]] = {}

        def note(name: str, _: object) -> None:
            ended.setdefault(name, loop.time())

        for name, limit in limits.items():
            waiter: asyncio.Future[object] = loop.create_future()
            waiter.add_done_callback(functools.partial(note, name))
            timeouts.add(waiter, start + limit, name)
            waiters[name] = waiter
        done: asyncio.Future[object] = (
            loop.create_future()
        )  # done before its limit: never ended by the timer
        timeouts.add(done, start + 0.01, "late")
        done.set_result("first")
        gone: asyncio.Future[object] = loop.create_future()  # discarded: its limit passes unseen
        timeouts.add(gone, start + 0.02, "gone")
        timeouts.discard(gone)
        await asyncio.gather(*waiters.values())
        for name, waiter in waiters.items():
            assert waiter.result() == name
            # Never before its own limit (the loop may run a timer up to its
            # clock's resolution early), and it does end.
            assert ended[name] - start >= limits[name] - 0.005
            assert ended[name] - start < limits[name] + 5
        assert done.result() == "first"
        assert not gone.done()

    asyncio.run(main())


def test_the_running_loop_keeps_one_and_a_new_loop_gets_its_own() -> None:
    async def one() -> LoopTimeouts:
        loop = asyncio.get_running_loop()
        assert loop_timeouts(loop) is loop_timeouts(loop)
        return loop_timeouts(loop)

    assert asyncio.run(one()) is not asyncio.run(one())


def test_a_flag_wait_ends_at_its_limit_and_a_set_flag_wakes_it_before() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        flag = AsyncFlag()
        start = loop.time()
        assert not await flag.wait(0.05)
        assert loop.time() - start >= 0.045
        loop.call_later(0.01, flag.set)
        start = loop.time()
        assert await flag.wait(5)
        assert loop.time() - start < 1

    asyncio.run(main())


def test_on_trio_a_flag_wait_ends_at_its_limit_with_and_without_the_streams_keeper() -> None:
    import socket

    import anyio
    import trio

    from fcgiproto.support import parse_address
    from fcgiproto_anyio._trio_stream import TrioStream

    async def waits() -> None:
        flag = AsyncFlag()
        start = trio.current_time()
        assert not await flag.wait(0.05)
        assert trio.current_time() - start >= 0.05
        trio.lowlevel.current_trio_token().run_sync_soon(flag.set)
        assert await flag.wait(5)

    async def main() -> None:
        tasks = len(anyio.get_running_tasks())
        await waits()  # no stream open: a cancel scope of its own
        left, right = socket.socketpair()
        left.setblocking(False)
        stream = TrioStream(left, parse_address("127.0.0.1:9000"))
        try:
            await waits()  # kept by the streams' system task
        finally:
            await stream.aclose()
            right.close()
        await trio.sleep(0.01)
        assert len(anyio.get_running_tasks()) == tasks  # the keeper ended with the stream

    trio.run(main)


def test_on_trio_a_flag_wait_outlives_the_keeper_that_kept_its_limit() -> None:
    import socket

    import trio

    from fcgiproto.support import parse_address
    from fcgiproto_anyio._trio_stream import TrioStream

    async def main() -> None:
        for set_it in (True, False):
            left, right = socket.socketpair()
            left.setblocking(False)
            stream = TrioStream(left, parse_address("127.0.0.1:9000"))
            flag = AsyncFlag()
            results: list[tuple[bool, float]] = []

            async def waiter(
                flag: AsyncFlag = flag, results: list[tuple[bool, float]] = results
            ) -> None:
                start = trio.current_time()
                got = await flag.wait(0.2)
                results.append((got, trio.current_time() - start))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(waiter)
                await trio.sleep(0.01)  # parked, its limit kept by the streams' keeper
                await stream.aclose()  # the last stream: the keeper ends, hands it back
                right.close()
                await trio.sleep(0.01)
                if set_it:
                    flag.set()
            [(got, waited)] = results
            assert got is set_it
            assert waited < 0.2 if set_it else 0.2 <= waited < 5

    trio.run(main)


def test_the_server_clock_is_the_loops_own() -> None:
    """loop_clock() reads what the loop schedules by: its deadlines and ours compare."""
    import time

    import pytest

    from fcgiproto_anyio._running import loop_clock

    class SlowClockLoop(asyncio.SelectorEventLoop):
        def time(self) -> float:  # a loop with a clock of its own, as uvloop has
            return time.monotonic() + 1000.0

    async def read_clock() -> tuple[float, float]:
        clock = loop_clock()
        return clock(), asyncio.get_running_loop().time()

    ours, loops = asyncio.run(read_clock())
    assert ours == pytest.approx(loops, abs=0.05)
    loop = SlowClockLoop()
    try:
        ours, loops = loop.run_until_complete(read_clock())
    finally:
        loop.close()
    assert ours == pytest.approx(loops, abs=0.05)
