"""The stream AnyioBackend gives on asyncio (AsyncioStream), against a plain socket peer.

It keeps its socket registered with the loop between reads and waits on a
future with a loop timer instead of a cancel scope, so what these tests hold
is that this changes nothing a caller can see: timeouts, cancellation by
anyio scopes (leaving no cancellation behind), close waking a waiting read,
liveness of an idle connection, and descriptors reused after close. They run
on asyncio, on uvloop, and on trio (TrioStream: AnyioStream waiting through trio itself).
"""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from fcgiproto import ReadError, ReadTimeout, WriteTimeout
from fcgiproto.support import Address
from fcgiproto_anyio import AnyioBackend
from fcgiproto_anyio._asyncio_stream import AsyncioStream
from fcgiproto_anyio._interface import AsyncNetworkStream
from fcgiproto_anyio._trio_stream import TrioStream

BACKENDS = [
    pytest.param(("asyncio", {}), id="asyncio"),
    pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
    pytest.param(("trio", {}), id="trio"),
]


@pytest.fixture(params=BACKENDS)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, object]]:
    name, options = request.param
    if options.get("use_uvloop"):
        pytest.importorskip("uvloop")
    return name, options


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, Address]]:
    path = str(tmp_path / "peer.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(8)
    with sock:
        yield sock, Address(path=path)


async def connect(
    listener: tuple[socket.socket, Address],
) -> tuple[AsyncNetworkStream, socket.socket]:
    sock, address = listener
    stream = await AnyioBackend().connect(address, 5)
    peer, _ = sock.accept()  # already queued: the connect completed
    return stream, peer


def running_asyncio() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def pending_cancellations() -> int:
    task = asyncio.current_task() if running_asyncio() else None
    if task is None or sys.version_info < (3, 11):
        return 0
    return task.cancelling()


@pytest.mark.anyio
async def test_the_stream_follows_the_running_loop(listener: tuple[socket.socket, Address]) -> None:
    stream, peer = await connect(listener)
    with peer:
        expected = AsyncioStream if running_asyncio() else TrioStream
        assert type(stream) is expected
        await stream.aclose()


@pytest.mark.anyio
async def test_reads_and_writes_over_many_requests(listener: tuple[socket.socket, Address]) -> None:
    stream, peer = await connect(listener)
    with peer:
        for n in range(50):
            request = f"request {n}".encode()
            assert await stream.write_some(memoryview(request), 5) == len(request)
            assert peer.recv(100) == request
            peer.sendall(b"answer %d" % n)
            assert await stream.read(100, 5) == b"answer %d" % n
            assert stream.looks_alive()
        await stream.aclose()


@pytest.mark.anyio
async def test_a_read_times_out_and_the_stream_still_reads(
    listener: tuple[socket.socket, Address],
) -> None:
    stream, peer = await connect(listener)
    with peer:
        with pytest.raises(ReadTimeout, match=r"did not send anything within 0\.05s"):
            await stream.read(100, 0.05)
        with pytest.raises(ReadTimeout):
            await stream.read(100, 0)
        peer.sendall(b"late")
        assert await stream.read(100, 5) == b"late"
        await stream.aclose()


@pytest.mark.anyio
async def test_a_cancel_scope_ends_a_waiting_read_and_leaves_no_cancellation(
    listener: tuple[socket.socket, Address],
) -> None:
    stream, peer = await connect(listener)
    with peer:
        pending = pending_cancellations()
        with anyio.move_on_after(0.05) as scope:
            await stream.read(100, None)
        assert scope.cancelled_caught
        assert pending_cancellations() == pending
        await anyio.sleep(0)  # a checkpoint: no stray cancellation is left for us

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(stream.read, 100, None)
            await anyio.sleep(0.02)
            tasks.cancel_scope.cancel()
        assert pending_cancellations() == pending

        # Bytes that came while nobody read are read next, nothing lost.
        peer.sendall(b"after")
        await anyio.sleep(0.02)
        assert not stream.looks_alive()
        assert await stream.read(100, 5) == b"after"
        await stream.aclose()


@pytest.mark.anyio
async def test_closing_wakes_a_waiting_read(listener: tuple[socket.socket, Address]) -> None:
    stream, peer = await connect(listener)
    with peer:
        failures: list[BaseException] = []

        async def read() -> None:
            try:
                await stream.read(100, 10)
            except ReadError as exc:
                failures.append(exc)

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(read)
                await anyio.sleep(0.02)
                await stream.aclose()
        assert len(failures) == 1
        assert "was closed" in str(failures[0])
        await stream.aclose()  # twice is fine


@pytest.mark.anyio
async def test_end_and_liveness_of_an_idle_connection(
    listener: tuple[socket.socket, Address],
) -> None:
    stream, peer = await connect(listener)
    peer.sendall(b"last answer")
    assert await stream.read(100, 5) == b"last answer"
    assert stream.looks_alive()
    peer.close()  # the application closes the kept connection (pm.max_requests)
    await anyio.sleep(0.05)  # the loop sees it, nobody waiting to read
    assert not stream.looks_alive()
    assert await stream.read(100, 5) == b""
    await stream.aclose()


@pytest.mark.anyio
async def test_reads_while_writing_when_the_peer_answers_first(
    listener: tuple[socket.socket, Address],
) -> None:
    stream, peer = await connect(listener)
    with peer:
        data = memoryview(bytes(1 << 20))
        written = 0
        while True:  # fill every buffer: the peer reads nothing
            sent, read = await stream.write_or_read(data, 100, 0.2 if written else 5)
            assert read is None
            written += sent
            if sent < len(data):
                break
        with pytest.raises(WriteTimeout, match=r"did not take more within 0\.05s"):
            await stream.write_some(data, 0.05)
        peer.sendall(b"early answer")
        assert await stream.write_or_read(data, 100, 5) == (0, b"early answer")
        await stream.aclose()


@pytest.mark.anyio
async def test_descriptors_reused_after_close_are_watched_afresh(
    listener: tuple[socket.socket, Address],
) -> None:
    # A descriptor number the loop still watched would hide the next socket
    # that gets it: every read here must see its answer.
    for n in range(20):
        stream, peer = await connect(listener)
        with peer:
            if n % 2:
                with pytest.raises(ReadTimeout):
                    await stream.read(100, 0.001)  # leaves it registered
            peer.sendall(b"%d" % n)
            with anyio.fail_after(5):
                assert await stream.read(100, 5) == b"%d" % n
            await stream.aclose()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.anyio
async def test_bytes_read_for_a_task_cancelled_before_it_resumed_are_kept(
    listener: tuple[socket.socket, Address],
) -> None:
    # asyncio's own task.cancel() can land after the loop read the bytes for a
    # waiting read and before that task resumed (an anyio scope waits for the
    # task to resume): the bytes must not be lost with the task.
    stream, peer = await connect(listener)
    assert isinstance(stream, AsyncioStream)
    with peer:
        task = asyncio.ensure_future(stream.read(100, 5))
        await asyncio.sleep(0.02)
        peer.sendall(b"kept")
        for _ in range(10_000):  # the moment the loop hands the bytes over
            waiter = stream._read_waiter
            if waiter is not None and waiter.done():
                break
            await asyncio.sleep(0)
        else:
            pytest.fail("the bytes never reached the waiting read")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not stream.looks_alive()
        assert await stream.read(100, 5) == b"kept"
        await stream.aclose()
