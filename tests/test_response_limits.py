"""max_response_size against the project's own servers: what a client holds of an answer.

An application that sends endless stdout or endless stderr must not take a
client's memory with it. Every test runs each client (blocking, AsyncClient
on asyncio, on trio) against both servers (fcgiproto_socket's Server and
fcgiproto_anyio's serve), and checks the typed error, the edges of the limit,
memory with tracemalloc, and that the client goes on serving afterwards.
The applications' "endless" output stops at ENOUGH, far past every limit
here, so that a client without the limit fails a test instead of hanging it.
"""

from __future__ import annotations

import contextlib
import functools
import tracemalloc
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import peers
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from helpers import serving_anyio, serving_blocking
from targets import MiB

import fcgiproto
import fcgiproto_anyio
import fcgiproto_socket
from fcgiproto import RequestError, ResponseTooLarge
from fcgiproto.support import (
    DEFAULT_MAX_RESPONSE_SIZE,
    ApplicationPeer,
    ResponseState,
    WholeAnswer,
    parse_address,
)
from fcgiproto_anyio import AsyncClient
from fcgiproto_socket import Address, Client, MemoryBackend, Response
from fcgiproto_socket._mux import Inbox

TIMEOUT = 20.0
#: Where an "endless" application gives up: far past every limit tested.
ENOUGH = 512 * MiB
CHUNK = b"x" * 65536
HEAD = b"Status: 200 OK\r\nContent-Type: text/plain\r\n\r\n"
#: What tracemalloc may see beyond the limit: a read or two of the client
#: (256 KiB each), the servers' own buffers in this process, bookkeeping.
SLACK = 2 * MiB


def params(name: str, **extra: int) -> dict[str, str]:
    return {"SCRIPT_NAME": name, **{key.upper(): str(value) for key, value in extra.items()}}


OK = params("/ok")
CONNECTION = params("/connection")


# --- the application, for each server ---


def blocking_app(request: Any) -> Any:
    name = request.params["SCRIPT_NAME"]
    if name == "/stdout":  # endless stdout

        def stdout() -> Iterator[bytes]:
            yield HEAD
            for _ in range(ENOUGH // len(CHUNK)):
                yield CHUNK

        return stdout()
    if name == "/stderr":  # a head, then endless stderr

        def stderr() -> Iterator[bytes]:
            yield HEAD + b"body"
            for _ in range(ENOUGH // len(CHUNK)):
                if request.aborted:
                    return
                request.log(CHUNK)
                yield b""

        return stderr()
    if name == "/both":  # stdout and stderr taking turns, endless

        def both() -> Iterator[bytes]:
            yield HEAD
            for _ in range(ENOUGH // len(CHUNK)):
                if request.aborted:
                    return
                request.log(CHUNK)
                yield CHUNK

        return both()
    if name == "/sized":  # exactly STDOUT bytes of stdout (the head included) and STDERR of stderr
        request.log(b"e" * int(request.params.get("STDERR", "0")))
        return sized_stdout(int(request.params.get("STDOUT", "0")))
    if name == "/connection":
        return HEAD + b"%d" % request.connection_id
    return HEAD + b"ok"


async def async_app(request: Any) -> Any:
    name = request.params["SCRIPT_NAME"]
    if name == "/stdout":

        async def stdout() -> AsyncIterator[bytes]:
            yield HEAD
            for _ in range(ENOUGH // len(CHUNK)):
                yield CHUNK

        return stdout()
    if name == "/stderr":

        async def stderr() -> AsyncIterator[bytes]:
            yield HEAD + b"body"
            for _ in range(ENOUGH // len(CHUNK)):
                await request.log(CHUNK)

        return stderr()
    if name == "/both":

        async def both() -> AsyncIterator[bytes]:
            yield HEAD
            for _ in range(ENOUGH // len(CHUNK)):
                await request.log(CHUNK)
                yield CHUNK

        return both()
    if name == "/sized":
        await request.log(b"e" * int(request.params.get("STDERR", "0")))
        return sized_stdout(int(request.params.get("STDOUT", "0")))
    if name == "/connection":
        return HEAD + b"%d" % request.connection_id
    return HEAD + b"ok"


def sized_stdout(size: int) -> bytes:
    assert size >= len(HEAD)
    return HEAD + b"o" * (size - len(HEAD))


SERVERS = {
    "blocking": functools.partial(serving_blocking, blocking_app),
    "anyio": functools.partial(serving_anyio, async_app),
}


# --- the three clients, behind one blocking face ---


class SyncFace:
    def __init__(self, client: Client) -> None:
        self.client = client

    def request(self, params: dict[str, str], **options: Any) -> Response:
        return self.client.request(params, **options)

    def read_body(
        self,
        params: dict[str, str],
        stop_at: int | None = None,
        empty_stderr: bool = False,
        **options: Any,
    ) -> tuple[int, bytes]:
        """Stream a response, reading the body only (until `stop_at` bytes, emptying
        `stderr` after each chunk if asked): how much, and the stderr held at the end."""
        size = 0
        with self.client.stream(params, **options) as r:
            for chunk in r.iter_body():
                size += len(chunk)
                if empty_stderr:
                    r.stderr.clear()
                if stop_at is not None and size >= stop_at:
                    break
            return size, bytes(r.stderr)

    def read_stderr(self, params: dict[str, str], stop_at: int, **options: Any) -> int:
        """Stream a response, reading stderr only, leaving after `stop_at` bytes."""
        seen = 0
        with self.client.stream(params, **options) as r:
            for chunk in r.iter_stderr():
                seen += len(chunk)
                assert not r.stderr  # taken as it is given
                if seen >= stop_at:
                    break
        return seen

    @property
    def multiplex(self) -> bool | None:
        return self.client.multiplex


class AsyncFace:
    def __init__(self, portal: BlockingPortal, client: AsyncClient) -> None:
        self.portal = portal
        self.client = client

    def request(self, params: dict[str, str], **options: Any) -> Response:
        return self.portal.call(functools.partial(self.client.request, params, **options))

    def read_body(
        self,
        params: dict[str, str],
        stop_at: int | None = None,
        empty_stderr: bool = False,
        **options: Any,
    ) -> tuple[int, bytes]:
        async def run() -> tuple[int, bytes]:
            size = 0
            async with self.client.stream(params, **options) as r:
                async for chunk in r.aiter_body():
                    size += len(chunk)
                    if empty_stderr:
                        r.stderr.clear()
                    if stop_at is not None and size >= stop_at:
                        break
                return size, bytes(r.stderr)

        return self.portal.call(run)

    def read_stderr(self, params: dict[str, str], stop_at: int, **options: Any) -> int:
        async def run() -> int:
            seen = 0
            async with self.client.stream(params, **options) as r:
                async for chunk in r.aiter_stderr():
                    seen += len(chunk)
                    assert not r.stderr
                    if seen >= stop_at:
                        break
            return seen

        return self.portal.call(run)

    @property
    def multiplex(self) -> bool | None:
        return self.client.multiplex


Face = SyncFace | AsyncFace


@dataclass
class World:
    server_kind: str
    client_kind: str
    socket_dir: Path
    stack: contextlib.ExitStack

    def serve(self, transport: str = "tcp", **options: Any) -> Address:
        address = "127.0.0.1:0" if transport == "tcp" else str(self.socket_dir / "app.sock")
        return self.stack.enter_context(SERVERS[self.server_kind](address, **options))

    def connect(self, address: Address, **options: Any) -> Face:
        options.setdefault("timeout", TIMEOUT)
        if self.client_kind == "blocking":
            return SyncFace(self.stack.enter_context(Client(address, **options)))
        portal = self.stack.enter_context(start_blocking_portal(self.client_kind))
        client = self.stack.enter_context(
            portal.wrap_async_context_manager(AsyncClient(address, **options))
        )
        return AsyncFace(portal, client)


@pytest.fixture(params=["blocking", "asyncio", "trio"])
def client_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=list(SERVERS))
def server_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def world(server_kind: str, client_kind: str, tmp_path: Path) -> Iterator[World]:
    with contextlib.ExitStack() as stack:
        yield World(server_kind, client_kind, peers.socket_dir(tmp_path), stack)


@contextlib.contextmanager
def traced() -> Iterator[Callable[[], int]]:
    """Trace allocations in the block; gives a function for the peak growth so far."""
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        yield lambda: tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


# --- the names ---


def test_the_error_and_the_default_are_public() -> None:
    assert issubclass(ResponseTooLarge, RequestError)
    assert fcgiproto.ResponseTooLarge is ResponseTooLarge
    assert 64 * MiB == DEFAULT_MAX_RESPONSE_SIZE
    assert fcgiproto_socket.DEFAULT_MAX_RESPONSE_SIZE == DEFAULT_MAX_RESPONSE_SIZE
    assert fcgiproto_anyio.DEFAULT_MAX_RESPONSE_SIZE == DEFAULT_MAX_RESPONSE_SIZE
    assert Client("127.0.0.1:9").max_response_size == DEFAULT_MAX_RESPONSE_SIZE
    assert AsyncClient("127.0.0.1:9").max_response_size == DEFAULT_MAX_RESPONSE_SIZE
    with pytest.raises(ValueError, match="max_response_size"):
        Client("127.0.0.1:9", max_response_size=-1)
    with pytest.raises(ValueError, match="max_response_size"):
        AsyncClient("127.0.0.1:9", max_response_size=-1)


# --- request(): whole answers ---


@pytest.mark.parametrize("transport", ["tcp", "unix"])
@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_request_stops_endless_output_at_the_limit(
    world: World, stream: str, transport: str
) -> None:
    client = world.connect(world.serve(transport), max_response_size=MiB)
    before = client.request(CONNECTION).body
    with pytest.raises(ResponseTooLarge) as caught:
        client.request(params(f"/{stream}"))
    message = str(caught.value)
    assert f"{MiB} bytes of {stream}" in message
    assert "max_response_size" in message
    # The connection that carried it is closed; the client goes on with a new one.
    after = {client.request(CONNECTION).body for _ in range(3)}
    assert len(after) == 1 and before not in after


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_request_at_the_limit_passes_and_one_byte_more_fails(world: World, stream: str) -> None:
    limit = 300_000
    client = world.connect(world.serve(), max_response_size=limit)
    at_limit = {"stdout": limit} if stream == "stdout" else {"stdout": len(HEAD), "stderr": limit}
    r = client.request(params("/sized", **at_limit))
    assert len(r.stdout if stream == "stdout" else r.stderr) == limit
    over = {**at_limit, stream: limit + 1}
    with pytest.raises(ResponseTooLarge, match=f"{limit} bytes of {stream}"):
        client.request(params("/sized", **over))
    assert client.request(OK).body == b"ok"


def test_the_limit_bounds_stdout_and_stderr_each(world: World) -> None:
    # Each stream at the limit: together twice the limit, and still within it.
    limit = 200_000
    client = world.connect(world.serve(), max_response_size=limit)
    r = client.request(params("/sized", stdout=limit, stderr=limit))
    assert (len(r.stdout), len(r.stderr)) == (limit, limit)


def test_a_call_overrides_the_client_limit(world: World) -> None:
    client = world.connect(world.serve(), max_response_size=MiB)
    big = params("/sized", stdout=3 * MiB)
    with pytest.raises(ResponseTooLarge):
        client.request(big)
    assert len(client.request(big, max_response_size=4 * MiB).stdout) == 3 * MiB
    with pytest.raises(ResponseTooLarge, match=f"{100_000} bytes of stdout"):
        client.request(params("/sized", stdout=200_000), max_response_size=100_000)
    assert client.request(OK).body == b"ok"


def test_zero_means_no_limit(world: World) -> None:
    address = world.serve()
    big = params("/sized", stdout=3 * MiB, stderr=3 * MiB)
    unlimited = world.connect(address, max_response_size=0)
    r = unlimited.request(big)
    assert (len(r.stdout), len(r.stderr)) == (3 * MiB, 3 * MiB)
    limited = world.connect(address, max_response_size=MiB)
    assert len(limited.request(big, max_response_size=0).stderr) == 3 * MiB


@pytest.mark.parametrize("server_kind", ["blocking"])
def test_the_default_limit_is_64_mib(world: World) -> None:
    client = world.connect(world.serve())
    with pytest.raises(ResponseTooLarge, match=f"{64 * MiB} bytes of stdout"):
        client.request(params("/stdout"))
    assert client.request(OK).body == b"ok"


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_request_memory_stays_near_the_limit(world: World, stream: str) -> None:
    limit = 4 * MiB
    client = world.connect(world.serve(), max_response_size=limit)
    client.request(OK)  # the connection, and the probe, before measuring
    with traced() as peak:
        with pytest.raises(ResponseTooLarge):
            client.request(params(f"/{stream}"))
        grown = peak()
    assert grown < limit + SLACK, f"peak {grown / MiB:.1f} MiB for a limit of 4 MiB"


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_a_shared_connection_aborts_the_request_and_carries_on(world: World, stream: str) -> None:
    # On a multiplexed connection the reader reads for every request: it
    # gives this one up at its limit, the request is aborted, and the
    # connection goes on carrying the others.
    client = world.connect(world.serve(multiplex=True), max_response_size=MiB)
    shared = client.request(CONNECTION).body
    assert client.multiplex is True
    with traced() as peak:
        with pytest.raises(ResponseTooLarge, match=f"{MiB} bytes of {stream}"):
            client.request(params(f"/{stream}"))
        grown = peak()
    assert grown < MiB + SLACK
    for _ in range(3):
        assert client.request(CONNECTION).body == shared


# --- stream(): what waits unread ---


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_stream_reads_endless_output_in_constant_memory(world: World, stream: str) -> None:
    # What is read as it comes never piles up: the limit is far below what is read.
    client = world.connect(world.serve(), max_response_size=MiB)
    with traced() as peak:
        if stream == "stdout":
            seen, _ = client.read_body(params("/stdout"), stop_at=16 * MiB)
        else:
            seen = client.read_stderr(params("/stderr"), stop_at=16 * MiB)
        grown = peak()
    assert seen >= 16 * MiB
    assert grown < SLACK, f"peak {grown / MiB:.1f} MiB"
    assert client.request(OK).body == b"ok"


def test_stream_raises_when_unread_stderr_passes_the_limit(world: World) -> None:
    client = world.connect(world.serve(), max_response_size=MiB)
    with traced() as peak:
        with pytest.raises(ResponseTooLarge, match=f"{MiB} bytes of stderr waiting to be read"):
            client.read_body(params("/stderr"))
        grown = peak()
    assert grown < MiB + SLACK
    assert client.request(OK).body == b"ok"


def test_stream_body_reader_may_empty_stderr_as_it_goes(world: World) -> None:
    # stdout and stderr taking turns, endless: stderr emptied between body
    # chunks never reaches the limit, and memory stays flat.
    client = world.connect(world.serve(), max_response_size=MiB)
    with traced() as peak:
        size, _ = client.read_body(params("/both"), stop_at=16 * MiB, empty_stderr=True)
        grown = peak()
    assert size >= 16 * MiB
    assert grown < SLACK, f"peak {grown / MiB:.1f} MiB"
    with pytest.raises(ResponseTooLarge, match=f"{MiB} bytes of stderr waiting to be read"):
        client.read_body(params("/both"), stop_at=16 * MiB)


def test_stream_raises_when_unread_stdout_passes_the_limit(world: World) -> None:
    # Reading stderr while the application sends stdout: stdout waits, up to the limit.
    client = world.connect(world.serve(), max_response_size=MiB)
    with pytest.raises(ResponseTooLarge, match=f"{MiB} bytes of stdout waiting to be read"):
        client.read_stderr(params("/both"), stop_at=ENOUGH)
    assert client.request(OK).body == b"ok"


def test_stream_keeps_stderr_within_the_limit_for_after_the_body(world: World) -> None:
    client = world.connect(world.serve(), max_response_size=MiB)
    size, stderr = client.read_body(params("/sized", stdout=2 * MiB, stderr=MiB))
    assert (size, stderr) == (2 * MiB - len(HEAD), b"e" * MiB)
    with pytest.raises(ResponseTooLarge):
        client.read_body(params("/sized", stdout=len(HEAD), stderr=MiB + 1))
    size, stderr = client.read_body(
        params("/sized", stdout=len(HEAD), stderr=MiB + 1), max_response_size=2 * MiB
    )
    assert len(stderr) == MiB + 1


# --- the pieces, without a socket ---


def answer_events(stdout: int, stderr: int) -> list[fcgiproto.Event]:
    return [
        fcgiproto.StdoutData(1, b"o" * stdout),
        fcgiproto.StderrData(1, b"e" * stderr),
        fcgiproto.EndRequest(1, 0, fcgiproto.ProtocolStatus.REQUEST_COMPLETE),
    ]


def test_whole_answer_takes_each_stream_up_to_the_limit() -> None:
    answer = WholeAnswer(10, parse_address("unix:/app.sock"))
    assert answer.take(answer_events(6, 10)[:-1]) is None
    assert answer.got_output
    end = answer.take([fcgiproto.StdoutData(1, b"4444"), *answer_events(0, 0)[2:]])
    assert end is not None
    r = answer.response(end)
    assert (r.stdout, r.stderr) == (b"o" * 6 + b"4444", b"e" * 10)


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_whole_answer_refuses_the_chunk_that_goes_past_and_keeps_nothing_of_it(
    stream: str,
) -> None:
    answer = WholeAnswer(10, parse_address("unix:/app.sock"))
    answer.take(answer_events(10, 0) if stream == "stdout" else answer_events(0, 10)[:-1])
    kind = fcgiproto.StdoutData if stream == "stdout" else fcgiproto.StderrData
    with pytest.raises(
        ResponseTooLarge,
        match=rf"^unix:/app\.sock: request 3 sent more than 10 bytes of {stream} "
        r"\(max_response_size\)$",
    ):
        answer.take([kind(3, b"x")], request_id=3)
    assert answer._stdout_size + answer._stderr_size == 10


def test_whole_answer_with_no_limit() -> None:
    answer = WholeAnswer(0, parse_address("unix:/app.sock"))
    end = answer.take(answer_events(5 * MiB, 5 * MiB))
    assert end is not None
    assert len(answer.response(end).stderr) == 5 * MiB


def test_the_shared_connections_reader_drops_what_goes_past_a_requests_limit() -> None:
    inbox = Inbox(parse_address("unix:/app.sock"), 7, max_size=100)
    inbox.put(fcgiproto.StdoutData(7, b"o" * 100))
    inbox.put(fcgiproto.StderrData(7, b"e" * 100))  # each stream on its own
    assert inbox.failure is None and len(inbox.events) == 2
    inbox.put(fcgiproto.StderrData(7, b"e"))
    assert isinstance(inbox.failure, ResponseTooLarge)
    assert "request 7 sent more than 100 bytes of stderr" in str(inbox.failure)
    inbox.put(fcgiproto.StdoutData(7, b"o"))
    inbox.put(fcgiproto.EndRequest(7, 0, fcgiproto.ProtocolStatus.REQUEST_COMPLETE))
    assert len(inbox.events) == 2  # nothing more is kept for it
    unlimited = Inbox()
    unlimited.put(fcgiproto.StdoutData(1, b"o" * MiB))
    assert unlimited.failure is None


def big_answer(params: dict[bytes, bytes], body: bytes) -> bytes:
    return HEAD + b"o" * int(params.get(b"SIZE", b"0"))


@pytest.mark.parametrize("multiplex", [False, True])
def test_in_memory_both_ways_of_gathering_a_whole_answer(multiplex: bool) -> None:
    peer = functools.partial(ApplicationPeer, big_answer, multiplex=multiplex, max_requests=10)
    backend = MemoryBackend(peer)
    with Client("unix:/app.sock", backend=backend, max_response_size=100_000) as client:
        assert len(client.request({"SIZE": "1000"}).body) == 1000
        with pytest.raises(ResponseTooLarge, match="100000 bytes of stdout"):
            client.request({"SIZE": "300000"})
        # A body given as an iterable takes the other way, through the stream.
        with pytest.raises(ResponseTooLarge, match="100000 bytes of stdout"):
            client.request({"SIZE": "300000"}, iter([b"body"]))
        assert len(client.request({"SIZE": "1000"}).body) == 1000
        assert client.multiplex is multiplex
    # Without multiplexing each failure closed its connection (the first
    # carried the probe and the first request); with it, after the probe,
    # one shared connection carried everything: the failures were aborts.
    assert len(backend.streams) == (3 if not multiplex else 2)


def test_a_streams_piles_count_what_waits_and_forget_what_is_read() -> None:
    state = ResponseState(parse_address("unix:/app.sock"), 10)
    state._take([fcgiproto.StdoutData(1, b"o" * 10), fcgiproto.StderrData(1, b"e" * 10)], 1)
    with pytest.raises(ResponseTooLarge, match="10 bytes of stdout waiting to be read"):
        state._take([fcgiproto.StdoutData(1, b"o")], 1)
    assert state._pop_stdout() == b"o" * 10
    state._take([fcgiproto.StdoutData(1, b"o" * 10)], 1)  # room again once read
    with pytest.raises(ResponseTooLarge, match="10 bytes of stderr waiting to be read"):
        state._take([fcgiproto.StderrData(1, b"e")], 1)
    assert state._pop_stderr() == b"e" * 10
    assert state.stderr == b""
    state._take([fcgiproto.StderrData(1, b"e" * 10)], 1)
    unlimited = ResponseState(parse_address("unix:/app.sock"), 0)
    unlimited._take([fcgiproto.StderrData(1, b"e" * MiB)], 1)
