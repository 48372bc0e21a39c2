"""Cancellation storms over one multiplexed connection, client and server both ours.

Every request's answer is unique and checked whole, so a response byte that
reached the wrong request, or a connection left in an unknown state, fails.
"""

from __future__ import annotations

import functools
import random
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from fcgiproto_anyio import AsyncClient, Request, Timeout, serve

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def expected(number: str) -> bytes:
    return f"request {number};".encode() * 40


class App:
    """Answers in several pieces with pauses, so cancellations land mid-answer."""

    def __init__(self) -> None:
        self.connections: set[int] = set()
        self.aborted = 0
        self.answering: dict[str, anyio.Event] = {}

    async def __call__(self, request: Request) -> AsyncIterator[bytes]:
        self.connections.add(request.connection_id)
        return self._answer(request)

    async def _answer(self, request: Request) -> AsyncIterator[bytes]:
        body = expected(request.params["NUMBER"])
        yield b"Content-Type: text/plain\r\n\r\n"
        try:
            if "HOLD" in request.params:  # mid-answer until the client cuts it
                yield body[:300]
                self.answering.setdefault(request.params["NUMBER"], anyio.Event()).set()
                await anyio.sleep_forever()
            for start in range(0, len(body), 300):
                await anyio.sleep(random.random() * 0.004)
                yield body[start : start + 300]
        except anyio.get_cancelled_exc_class():
            self.aborted += 1
            raise


@pytest.mark.parametrize("where", ["tcp", "unix"])
async def test_a_thousand_cancelled_requests_leave_the_shared_connection_sound(
    where: str, tmp_path: Path
) -> None:
    app = App()
    address = "127.0.0.1:0" if where == "tcp" else str(tmp_path / "app.sock")
    outcomes = {"complete": 0, "cancelled": 0}
    rng = random.Random(7)
    async with anyio.create_task_group() as server:
        bound = await server.start(functools.partial(serve, app, address, multiplex=True))
        async with AsyncClient(bound, timeout=Timeout(read=10, total=20)) as client:

            async def one(number: int, patience: float) -> None:
                with anyio.move_on_after(patience) as scope:
                    r = await client.request({"NUMBER": str(number)})
                if scope.cancelled_caught:
                    outcomes["cancelled"] += 1
                    return
                assert r.body == expected(str(number)), f"request {number} got another's bytes"
                outcomes["complete"] += 1

            async def cut_mid_answer(number: int) -> None:
                # However loaded the machine, this cut lands while the app is answering.
                answering = app.answering.setdefault(str(number), anyio.Event())
                async with anyio.create_task_group() as ask:
                    ask.start_soon(client.request, {"NUMBER": str(number), "HOLD": "1"})
                    await answering.wait()
                    ask.cancel_scope.cancel()
                outcomes["cancelled"] += 1

            with anyio.fail_after(60):
                async with anyio.create_task_group() as storm:
                    for number in range(1000):
                        # One in four is never cut, so that completions land
                        # among the cancellations however loaded the machine.
                        patience = 30.0 if number % 4 == 0 else rng.random() * 0.8
                        storm.start_soon(one, number, patience)
                        if number % 50 == 0:
                            storm.start_soon(cut_mid_answer, 2000 + number)
                # Afterwards the same connection still serves, concurrently and in turn.
                async with anyio.create_task_group() as after:
                    for number in range(1000, 1020):
                        after.start_soon(one, number, 30.0)
                assert (await client.request({"NUMBER": "last"})).body == expected("last")

            assert client.multiplex is True
        server.cancel_scope.cancel()
    assert outcomes["cancelled"] > 50 and outcomes["complete"] > 50, outcomes
    assert app.aborted > 0, "no request was aborted on the server: nothing was tested"
    # (The first connection only asked GET_VALUES; every request shared the next.)
    assert len(app.connections) == 1, "the storm cost the multiplexed connection"
