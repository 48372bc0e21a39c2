"""The anyio server lets go of a connection as soon as it ends, without the gc's help."""

from __future__ import annotations

import functools
import gc
from collections.abc import Iterator

import anyio
import pytest

from fcgiproto_anyio import AsyncClient, Request
from fcgiproto_anyio._server import _Connection, serve

pytestmark = pytest.mark.anyio

HELLO = b"Content-Type: text/plain\r\n\r\nhello"


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def gc_disabled() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def connections_alive() -> int:
    return sum(1 for o in gc.get_objects() if type(o) is _Connection)


async def app(request: Request) -> bytes:
    return HELLO


async def test_connections_that_end_cleanly_are_freed_at_once(gc_disabled: None) -> None:
    # A connection's end used to cancel its writer task: the cancellation's
    # exception and traceback held the connection's frames, a cycle per
    # connection (its socket, buffers and protocol state included) that only
    # a gc collection freed.
    async with anyio.create_task_group() as tasks:
        address = await tasks.start(functools.partial(serve, app, "127.0.0.1:0"))
        async with AsyncClient(address, max_keepalive=0, multiplex=False) as client:
            for _ in range(5):
                assert (await client.request({"SCRIPT_NAME": "/"})).stdout == HELLO
        # The accept loop still names the last connection it accepted.
        with anyio.fail_after(5):
            while connections_alive() > 1:
                await anyio.sleep(0.01)
        tasks.cancel_scope.cancel()
