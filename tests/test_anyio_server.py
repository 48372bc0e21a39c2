"""fcgiproto_anyio's serve() on asyncio and trio, talked to by a raw ClientConnection."""

from __future__ import annotations

import functools
import os
import random
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest

from fcgiproto import (
    ClientConnection,
    EndRequest,
    Event,
    GetValuesResult,
    ProtocolStatus,
    Role,
    StderrData,
    StdoutData,
)
from fcgiproto.support import Address
from fcgiproto_anyio._server import App, Request, serve

pytestmark = pytest.mark.anyio

HEAD = b"Content-Type: text/plain\r\n\r\n"
WAIT = 10.0  # generous: every wait in these tests ends long before, unless something hangs


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=["unix", "tcp"])
def address(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where to listen: a short Unix socket path, or a free loopback TCP port."""
    if request.param == "tcp":
        return "127.0.0.1:0"
    path = str(tmp_path / "app.sock")
    assert len(path) < 100, path
    return path


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def get(path: str = "/", **extra: str) -> dict[str, str]:
    return {"REQUEST_METHOD": "GET", "SCRIPT_NAME": path, "SCRIPT_FILENAME": path, **extra}


@asynccontextmanager
async def running(
    app: App,
    address: str | tuple[str, int] = "127.0.0.1:0",
    within: float = WAIT,
    **options: Any,
) -> AsyncIterator[Address]:
    """serve() in a task group for the block, which must end `within`; cancelled after it."""
    async with anyio.create_task_group() as tasks:
        bound: Address = await tasks.start(functools.partial(serve, app, address, **options))
        try:
            with anyio.fail_after(within):
                yield bound
        finally:
            tasks.cancel_scope.cancel()


@dataclass
class Reply:
    request_id: int
    stdout: bytes
    stderr: bytes
    end: EndRequest


class Raw:
    """A ClientConnection on an anyio stream, gathering what each request receives."""

    def __init__(self, stream: anyio.abc.ByteStream, multiplex: bool) -> None:
        self.stream = stream
        self.conn = ClientConnection(multiplex=multiplex)
        self.stdout: dict[int, bytes] = {}
        self.stderr: dict[int, bytes] = {}
        self.ends: dict[int, EndRequest] = {}
        self.values: dict[str, str] | None = None

    @classmethod
    async def open(cls, address: Address, multiplex: bool = False) -> Raw:
        stream: anyio.abc.ByteStream
        if address.path is not None:
            stream = await anyio.connect_unix(address.path)
        else:
            stream = await anyio.connect_tcp(address.host, address.port)
        return cls(stream, multiplex)

    @classmethod
    @asynccontextmanager
    async def connect(cls, address: Address, multiplex: bool = False) -> AsyncIterator[Raw]:
        raw = await cls.open(address, multiplex)
        async with raw.stream:
            yield raw

    async def send(self) -> None:
        await self.stream.send(self.conn.data_to_send())

    async def receive(self) -> bytes:
        try:
            return await self.stream.receive(65536)
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            return b""

    async def read(self) -> list[Event]:
        events = self.conn.receive_data(await self.receive())
        for event in events:
            if isinstance(event, StdoutData):
                self.stdout[event.request_id] = self.stdout.get(event.request_id, b"") + event.data
            elif isinstance(event, StderrData):
                self.stderr[event.request_id] = self.stderr.get(event.request_id, b"") + event.data
            elif isinstance(event, EndRequest):
                self.ends[event.request_id] = event
            elif isinstance(event, GetValuesResult):
                self.values = dict(event.values)
        return events

    async def until_ended(self, *rids: int) -> None:
        while not all(rid in self.ends for rid in rids):
            await self.read()

    async def request(self, params: dict[str, str], stdin: bytes = b"", **options: Any) -> Reply:
        """Send a whole request and wait for its end; what it received, taken out of the dicts."""
        rid = self.conn.send_request(params, stdin, **options)
        for received in (self.stdout, self.stderr, self.ends):  # of an earlier request
            received.pop(rid, None)
        await self.send()
        await self.until_ended(rid)
        return Reply(rid, self.stdout.pop(rid, b""), self.stderr.pop(rid, b""), self.ends.pop(rid))

    async def closed_by_peer(self) -> bool:
        """True when the server closes the connection (the test's deadline bounds the wait)."""
        return await self.receive() == b""


# --- requests and responses ---


async def test_get(address: str) -> None:
    seen: list[Request] = []

    async def app(request: Request) -> bytes:
        seen.append(request)
        return b"Status: 201 Created\r\nX-Role: " + request.role.name.encode() + b"\r\n\r\nhi"

    async with running(app, address) as bound, Raw.connect(bound) as raw:
        reply = await raw.request(get("/index.php", QUERY_STRING="a=1"))
    assert reply.stdout == b"Status: 201 Created\r\nX-Role: RESPONDER\r\n\r\nhi"
    assert reply.stderr == b""
    assert reply.end == EndRequest(1, 0, ProtocolStatus.REQUEST_COMPLETE)
    (request,) = seen
    assert (request.request_id, request.role, request.keep_conn) == (1, Role.RESPONDER, True)
    assert request.params["SCRIPT_FILENAME"] == "/index.php"
    assert request.params["QUERY_STRING"] == "a=1"
    assert (request.stdin, request.data, request.aborted) == (b"", b"", False)
    assert request.connection_id == 1


@pytest.mark.parametrize("size", [0, 64 * 1024, 8 * 1024 * 1024], ids=["0B", "64KiB", "8MiB"])
async def test_post_bodies_arrive_byte_exact(address: str, size: int) -> None:
    body = random.Random(size).randbytes(size)
    lengths: list[int] = []

    async def echo(request: Request) -> bytes:
        lengths.append(len(request.stdin))
        return HEAD + request.stdin

    async with running(echo, address) as bound, Raw.connect(bound) as raw:
        reply = await raw.request(get(REQUEST_METHOD="POST"), body)
    assert lengths == [size]
    assert reply.stdout == HEAD + body


async def test_params_keep_any_bytes() -> None:
    raw_value = b"\xff\xfe caf\xc3\xa9 \x80"
    got: dict[str, str] = {}

    async def app(request: Request) -> bytes:
        got.update(request.params)
        return HEAD + request.params["X_RAW"].encode("utf-8", "surrogateescape")

    async with running(app) as bound, Raw.connect(bound) as raw:
        params: dict[str | bytes, str | bytes] = {b"X_RAW": raw_value, "NAME": "café"}
        rid = raw.conn.send_request(params)
        await raw.send()
        await raw.until_ended(rid)
    assert raw.stdout[rid] == HEAD + raw_value
    assert got["NAME"] == "café"


async def test_streamed_output_is_sent_as_it_is_produced(address: str) -> None:
    gate = anyio.Event()

    async def app(request: Request) -> AsyncIterator[bytes]:
        yield HEAD + b"first"
        await gate.wait()  # set only once the client has read "first"
        yield b"second"

    async with running(app, address) as bound, Raw.connect(bound) as raw:
        rid = raw.conn.send_request(get())
        await raw.send()
        while raw.stdout.get(rid) != HEAD + b"first":
            await raw.read()
        gate.set()
        await raw.until_ended(rid)
    assert raw.stdout[rid] == HEAD + b"firstsecond"


@pytest.mark.parametrize("kind", ["async generator function", "async iterable", "iterable"])
async def test_every_kind_of_output(kind: str) -> None:
    parts: list[bytes | bytearray | memoryview] = [
        HEAD,
        b"one ",
        b"",
        bytearray(b"two "),
        memoryview(b"three"),
    ]

    async def generator(request: Request) -> AsyncIterator[bytes | bytearray | memoryview]:
        for part in parts:
            yield part

    async def returns_async(request: Request) -> AsyncIterator[bytes | bytearray | memoryview]:
        return generator(request)

    async def returns_list(request: Request) -> list[bytes | bytearray | memoryview]:
        return parts

    apps: dict[str, Any] = {
        "async generator function": generator,
        "async iterable": returns_async,
        "iterable": returns_list,
    }
    async with running(apps[kind]) as bound, Raw.connect(bound) as raw:
        reply = await raw.request(get())
    assert reply.stdout == HEAD + b"one two three"
    assert reply.end.app_status == 0


async def test_stderr_is_kept_apart_from_stdout(address: str) -> None:
    async def app(request: Request) -> bytes:
        await request.log("warning: café\n")
        await request.log(b"\xff raw bytes\n")
        return HEAD + b"body"

    async with running(app, address) as bound, Raw.connect(bound) as raw:
        reply = await raw.request(get())
    assert reply.stderr == "warning: café\n".encode() + b"\xff raw bytes\n"
    assert reply.stdout == HEAD + b"body"


async def test_app_status_is_sent() -> None:
    async def app(request: Request) -> bytes:
        request.app_status = 3
        return HEAD

    async with running(app) as bound, Raw.connect(bound) as raw:
        reply = await raw.request(get())
    assert reply.end == EndRequest(1, 3, ProtocolStatus.REQUEST_COMPLETE)


async def test_filter_role_gets_stdin_and_data() -> None:
    seen: list[Request] = []

    async def app(request: Request) -> bytes:
        seen.append(request)
        return HEAD + request.data.upper()

    async with running(app) as bound, Raw.connect(bound) as raw:
        rid = raw.conn.begin_request(Role.FILTER)
        raw.conn.send_params(rid, get(FCGI_DATA_LENGTH="9"))
        raw.conn.end_params(rid)
        raw.conn.send_stdin(rid, b"in")
        raw.conn.end_stdin(rid)
        raw.conn.send_data(rid, b"file ")
        raw.conn.send_data(rid, b"body")
        raw.conn.end_data(rid)
        await raw.send()
        await raw.until_ended(rid)
    assert raw.stdout[rid] == HEAD + b"FILE BODY"
    (request,) = seen
    assert (request.role, request.stdin, request.data) == (Role.FILTER, b"in", b"file body")


async def test_roles_not_served_are_refused() -> None:
    async def app(request: Request) -> bytes:
        return HEAD + b"ok"

    async with running(app, roles=[Role.RESPONDER]) as bound, Raw.connect(bound) as raw:
        refused = await raw.request(get(), role=Role.AUTHORIZER)
        served = await raw.request(get())
    assert refused.end.protocol_status is ProtocolStatus.UNKNOWN_ROLE
    assert served.stdout == HEAD + b"ok"


# --- failures in the app ---


async def test_app_exception_is_a_500_and_the_connection_keeps_working(address: str) -> None:
    async def app(request: Request) -> bytes:
        if request.params["SCRIPT_NAME"] == "/boom":
            raise ZeroDivisionError("boom")
        return HEAD + str(request.connection_id).encode()

    async with running(app, address) as bound, Raw.connect(bound) as raw:
        before = await raw.request(get("/ok"))
        failed = await raw.request(get("/boom"))
        after = await raw.request(get("/ok"))
    assert failed.stdout.startswith(b"Status: 500 Internal Server Error\r\n")
    assert failed.stdout.endswith(b"\r\n\r\nInternal Server Error\n")
    assert b"Traceback" in failed.stderr
    assert b"ZeroDivisionError: boom" in failed.stderr
    assert failed.end.app_status == 1
    assert before.stdout == after.stdout == HEAD + b"1"  # the same connection lived on


async def test_exception_after_output_started_ends_the_request_with_status_1() -> None:
    async def app(request: Request) -> AsyncIterator[bytes]:
        yield HEAD + b"partial"
        raise RuntimeError("late failure")

    async with running(app) as bound, Raw.connect(bound) as raw:
        first = await raw.request(get())
        second = await raw.request(get())  # still serving
    assert (first.stdout, first.end.app_status) == (HEAD + b"partial", 1)
    assert b"RuntimeError: late failure" in first.stderr
    assert second.stdout == HEAD + b"partial"


@pytest.mark.parametrize(
    ("result", "complaint"),
    [("text", b"returned str"), (None, b"returned NoneType"), (["text"], b"yielded str")],
)
async def test_output_that_is_not_bytes_is_a_500(result: object, complaint: bytes) -> None:
    async def app(request: Request) -> Any:
        return result

    async with running(app) as bound, Raw.connect(bound) as raw:
        reply = await raw.request(get())
    assert reply.stdout.startswith(b"Status: 500")
    assert reply.end.app_status == 1
    assert complaint in reply.stderr


async def test_an_invalid_app_status_is_a_500() -> None:
    async def app(request: Request) -> bytes:
        request.app_status = -1
        return HEAD

    async with running(app) as bound, Raw.connect(bound) as raw:
        reply = await raw.request(get())
    assert reply.stdout.startswith(b"Status: 500")
    assert reply.end.app_status == 1
    assert b"app_status must be" in reply.stderr


# --- connections ---


async def test_keep_conn_reuses_the_connection(address: str) -> None:
    async def app(request: Request) -> bytes:
        return HEAD + str(request.connection_id).encode()

    async with running(app, address) as bound, Raw.connect(bound) as raw:
        # request id 1 each time, on the same connection
        replies = [await raw.request(get(), keep_conn=True) for _ in range(3)]
    assert [reply.request_id for reply in replies] == [1, 1, 1]
    assert [reply.stdout for reply in replies] == [HEAD + b"1"] * 3


async def test_keep_conn_false_closes_after_the_request(address: str) -> None:
    async def app(request: Request) -> bytes:
        return HEAD + b"bye"

    async with running(app, address) as bound, Raw.connect(bound) as raw:
        reply = await raw.request(get(), keep_conn=False)
        assert reply.stdout == HEAD + b"bye"
        assert raw.conn.closed
        assert await raw.closed_by_peer()


async def test_200_multiplexed_requests_each_get_their_own_body() -> None:
    count = 200
    rng = random.Random(200)
    bodies = [rng.randbytes(rng.randrange(0, 128 * 1024)) for _ in range(count)]
    arrived = 0
    all_arrived = anyio.Event()

    async def app(request: Request) -> AsyncIterator[bytes]:
        nonlocal arrived
        arrived += 1
        if arrived == count:
            all_arrived.set()
        await all_arrived.wait()  # passes only once all 200 run at once
        yield HEAD
        body = request.stdin
        for start in range(0, len(body), 10_000):  # small chunks: the records interleave
            yield body[start : start + 10_000]

    async with (
        running(app, multiplex=True, max_requests=count) as bound,
        Raw.connect(bound, multiplex=True) as raw,
    ):
        rids = [raw.conn.send_request(get(), body) for body in bodies]
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(raw.send)  # while reading: the responses may fill the socket first
            await raw.until_ended(*rids)
    assert sorted(rids) == list(range(1, count + 1))
    for rid, body in zip(rids, bodies, strict=True):
        assert raw.stdout[rid] == HEAD + body, rid
        assert raw.ends[rid] == EndRequest(rid, 0, ProtocolStatus.REQUEST_COMPLETE)


async def test_requests_past_max_requests_are_overloaded() -> None:
    release = anyio.Event()

    async def app(request: Request) -> bytes:
        await release.wait()
        return HEAD + b"done"

    async with (
        running(app, multiplex=True, max_requests=2) as bound,
        Raw.connect(bound, multiplex=True) as raw,
    ):
        rids = [raw.conn.send_request(get()) for _ in range(3)]
        await raw.send()
        await raw.until_ended(rids[2])
        assert raw.ends[rids[2]].protocol_status is ProtocolStatus.OVERLOADED
        release.set()
        await raw.until_ended(*rids[:2])
    for rid in rids[:2]:
        assert raw.stdout[rid] == HEAD + b"done"


async def test_abort_ends_one_multiplexed_request_and_the_others_complete() -> None:
    running_apps = 0
    all_running = anyio.Event()
    release = anyio.Event()
    outcome: list[tuple[str, bool, bool]] = []  # (path, aborted, finished)
    slow_over = anyio.Event()

    async def app(request: Request) -> AsyncIterator[bytes]:
        nonlocal running_apps
        running_apps += 1
        if running_apps == 3:
            all_running.set()
        finished = False
        try:
            yield HEAD + b"started"
            if request.params["SCRIPT_NAME"] == "/slow":
                await anyio.sleep_forever()  # until cancelled
            await release.wait()
            yield b" done"
            finished = True
        finally:
            outcome.append((request.params["SCRIPT_NAME"], request.aborted, finished))
            if request.params["SCRIPT_NAME"] == "/slow":
                slow_over.set()

    async with running(app, multiplex=True) as bound, Raw.connect(bound, multiplex=True) as raw:
        slow = raw.conn.send_request(get("/slow"))
        others = [raw.conn.send_request(get("/other")) for _ in range(2)]
        await raw.send()
        await all_running.wait()
        while any(raw.stdout.get(rid) != HEAD + b"started" for rid in (slow, *others)):
            await raw.read()
        raw.conn.abort_request(slow)
        await raw.send()
        await raw.until_ended(slow)
        await slow_over.wait()  # its task was cancelled
        assert raw.ends[slow].app_status == 1
        assert not any(rid in raw.ends for rid in others)
        release.set()
        await raw.until_ended(*others)
        for rid in others:
            assert raw.stdout[rid] == HEAD + b"started done"
            assert raw.ends[rid].app_status == 0
        after = await raw.request(get("/other"))  # the connection goes on
    assert sorted(outcome) == [("/other", False, True)] * 3 + [("/slow", True, False)]
    assert raw.stdout[slow] == HEAD + b"started"
    assert after.stdout == HEAD + b"started done"


async def test_abort_before_the_request_is_whole_never_calls_the_app(address: str) -> None:
    called: list[Request] = []

    async def app(request: Request) -> bytes:
        called.append(request)
        return HEAD

    async with running(app, address) as bound, Raw.connect(bound) as raw:
        rid = raw.conn.begin_request()
        raw.conn.send_params(rid, get())
        raw.conn.end_params(rid)
        raw.conn.send_stdin(rid, b"half a body")
        raw.conn.abort_request(rid)
        await raw.send()
        await raw.until_ended(rid)
    assert raw.ends[rid].app_status == 1
    assert called == []


async def test_get_values_is_answered_from_the_configuration() -> None:
    async def app(request: Request) -> bytes:
        return HEAD

    async with (
        running(app, multiplex=True, max_connections=7, max_requests=5) as bound,
        Raw.connect(bound) as raw,
    ):
        raw.conn.get_values(["FCGI_MAX_CONNS", "FCGI_MAX_REQS", "FCGI_MPXS_CONNS"])
        await raw.send()
        while raw.values is None:
            await raw.read()
    assert raw.values == {"FCGI_MAX_CONNS": "7", "FCGI_MAX_REQS": "5", "FCGI_MPXS_CONNS": "1"}


async def test_without_multiplex_a_second_request_waits_for_the_first() -> None:
    """HAProxy sends a second request on a busy connection even after FCGI_MPXS_CONNS=0:
    it is answered once the first is, as php-fpm does, never alongside it."""
    release = anyio.Event()
    running_apps: list[str] = []
    overlapped = False

    async def app(request: Request) -> bytes:
        nonlocal overlapped
        overlapped = overlapped or bool(running_apps)
        running_apps.append(request.params["SCRIPT_NAME"])
        if request.params["SCRIPT_NAME"] == "/first":
            await release.wait()
        running_apps.remove(request.params["SCRIPT_NAME"])
        return HEAD + request.params["SCRIPT_NAME"].encode()

    async with (
        running(app, multiplex=False) as bound,
        Raw.connect(bound, multiplex=True) as raw,
    ):
        raw.conn.get_values(["FCGI_MPXS_CONNS"])
        first = raw.conn.send_request(get("/first"))
        second = raw.conn.send_request(get("/second"))
        await raw.send()
        while raw.values is None:
            await raw.read()
        await anyio.sleep(0.1)
        assert second not in raw.ends  # waits behind the first
        release.set()
        await raw.until_ended(first, second)
    assert raw.values == {"FCGI_MPXS_CONNS": "0"}
    assert not overlapped
    assert raw.ends[second].protocol_status is ProtocolStatus.REQUEST_COMPLETE
    assert raw.stdout[first].endswith(b"/first") and raw.stdout[second].endswith(b"/second")


async def test_garbage_closes_only_that_connection(address: str) -> None:
    async def app(request: Request) -> bytes:
        return HEAD + str(request.connection_id).encode()

    async with running(app, address) as bound, Raw.connect(bound) as kept:
        first = await kept.request(get())
        async with Raw.connect(bound) as garbage:
            await garbage.stream.send(b"GET / HTTP/1.1\r\nHost: example\r\n\r\n")
            assert await garbage.closed_by_peer()
        async with Raw.connect(bound) as cut:  # a client gone in the middle of a record
            await cut.stream.send(b"\x01\x01\x00\x01\x00\x08")
        second = await kept.request(get())  # the kept connection still works
        async with Raw.connect(bound) as other:
            third = await other.request(get())
    assert first.stdout == second.stdout == HEAD + b"1"
    assert third.stdout == HEAD + b"4"


async def test_the_client_closing_mid_request_cancels_it(address: str) -> None:
    started = anyio.Event()
    cancelled = anyio.Event()
    aborted: list[bool] = []

    async def app(request: Request) -> bytes:
        started.set()
        try:
            await anyio.sleep_forever()
        finally:
            aborted.append(request.aborted)
            cancelled.set()
        return HEAD  # pragma: no cover

    async with running(app, address) as bound:
        async with Raw.connect(bound) as raw:
            raw.conn.send_request(get())
            await raw.send()
            await started.wait()
        await cancelled.wait()
        async with Raw.connect(bound) as again:  # the server goes on
            again.conn.get_values(["FCGI_MPXS_CONNS"])
            await again.send()
            while again.values is None:
                await again.read()
    assert aborted == [True]


async def test_a_slow_client_holds_the_app_back(tmp_path: Path) -> None:
    """The client reads nothing for a while: the app gets no further than the socket buffers."""
    chunk = b"x" * 65536
    total = 1024  # 64 MiB
    produced = 0

    async def app(request: Request) -> AsyncIterator[bytes]:
        nonlocal produced
        yield HEAD
        for _ in range(total):
            produced += 1
            yield chunk

    async with (
        running(app, str(tmp_path / "app.sock")) as bound,
        Raw.connect(bound) as raw,
    ):
        rid = raw.conn.send_request(get())
        await raw.send()
        await anyio.sleep(0.5)  # ample time for an unbounded server to queue all 64 MiB
        stalled_at = produced
        received = 0
        while rid not in raw.ends:
            await raw.read()
            received += len(raw.stdout.pop(rid, b""))
    assert stalled_at * len(chunk) < 16 * 1024 * 1024, stalled_at
    assert received == len(HEAD) + total * len(chunk)


async def test_a_client_that_sends_without_reading_does_not_stop_the_server() -> None:
    """One request's output fills the socket while the client sends another's large body."""
    big = 8 * 1024 * 1024

    async def app(request: Request) -> AsyncIterator[bytes]:
        yield HEAD
        if request.params["SCRIPT_NAME"] == "/out":
            for _ in range(big // 65536):
                yield b"o" * 65536
        else:
            yield str(len(request.stdin)).encode()

    async with running(app, multiplex=True) as bound, Raw.connect(bound, multiplex=True) as raw:
        out = raw.conn.send_request(get("/out"))
        await raw.send()
        while not raw.stdout.get(out):
            await raw.read()
        upload = raw.conn.send_request(get("/in"), stdin=b"i" * big)
        await (
            raw.send()
        )  # never returns (the deadline fails the test) if the server stopped reading
        await raw.until_ended(out, upload)
    assert len(raw.stdout[out]) == len(HEAD) + big
    assert raw.stdout[upload] == HEAD + str(big).encode()


async def test_a_client_that_never_reads_the_answers_is_not_read_either(tmp_path: Path) -> None:
    """GET_VALUES answers pile up only so far: then the server stops reading that client."""
    # About 1.6 MiB each way: far more than the socket buffers and max_unsent_size hold.
    count = 50_000

    async def app(request: Request) -> bytes:
        return HEAD  # pragma: no cover

    async with (
        running(app, str(tmp_path / "app.sock"), within=3 * WAIT) as bound,  # 2 s unloaded
        Raw.connect(bound) as raw,
    ):
        for _ in range(count):
            raw.conn.get_values(["FCGI_MPXS_CONNS"])
        sent = anyio.Event()

        async def send_all() -> None:
            await raw.send()
            sent.set()

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(send_all)
            # A server that read on would take it all in well within this (0.2 s here).
            with anyio.move_on_after(1.5):
                await sent.wait()
            assert not sent.is_set()  # the server stopped reading: our sending is stuck
            answers = 0
            while answers < count:
                answers += sum(isinstance(event, GetValuesResult) for event in await raw.read())
        assert sent.is_set()
    assert answers == count


async def test_max_connections_holds_a_new_connection_while_every_app_runs(
    address: str,
) -> None:
    entered, leave = anyio.Event(), anyio.Event()

    async def app(request: Request) -> bytes:
        entered.set()
        await leave.wait()
        return HEAD + b"done"

    async with running(app, address, max_connections=1) as bound, Raw.connect(bound) as first:
        first.conn.send_request(get())
        await first.send()
        await entered.wait()
        async with Raw.connect(bound) as second:  # nothing may give way: it waits
            second.conn.get_values(["FCGI_MAX_CONNS"])
            await second.send()
            with anyio.move_on_after(0.3):
                await second.read()
            assert second.values is None
            leave.set()
            await first.until_ended(1)
            await first.stream.aclose()
            await second.read()  # served once the first is gone
            assert second.values == {"FCGI_MAX_CONNS": "1"}


# --- starting and stopping ---


async def test_cancelling_serve_leaves_no_task_and_no_socket(address: str) -> None:
    fds = open_fds()
    tasks_before = len(anyio.get_running_tasks())
    streaming = anyio.Event()

    async def app(request: Request) -> AsyncIterator[bytes]:
        yield HEAD
        streaming.set()
        while True:  # until cancelled
            yield b"."
            await anyio.sleep(0.005)

    with anyio.fail_after(WAIT):
        async with anyio.create_task_group() as tasks:
            bound: Address = await tasks.start(serve, app, address)
            idle = await Raw.open(bound)
            idle.conn.get_values(["FCGI_MPXS_CONNS"])
            await idle.send()
            await idle.read()  # the idle connection is accepted and served
            busy = await Raw.open(bound, multiplex=True)
            busy.conn.send_request(get())
            await busy.send()
            await streaming.wait()
            assert len(anyio.get_running_tasks()) > tasks_before
            tasks.cancel_scope.cancel()
        # serve has returned: every task it started has ended, every socket is closed.
        assert len(anyio.get_running_tasks()) == tasks_before
        assert await idle.closed_by_peer()
        while await busy.receive():  # the stream is cut, the connection closed
            pass
        await idle.stream.aclose()
        await busy.stream.aclose()
    assert open_fds() == fds
    if bound.path is not None:
        assert not os.path.exists(bound.path)


async def test_tcp_port_0_reports_the_real_port() -> None:
    async def app(request: Request) -> bytes:
        return HEAD

    async with running(app, ("127.0.0.1", 0)) as bound:
        assert bound.host == "127.0.0.1" and bound.port > 0
        async with Raw.connect(bound) as raw:
            reply = await raw.request(get())
    assert reply.stdout == HEAD


async def test_a_stale_unix_socket_file_is_replaced(tmp_path: Path) -> None:
    path = str(tmp_path / "stale.sock")
    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    leftover.bind(path)
    leftover.close()  # the file stays, nothing listens

    async def app(request: Request) -> bytes:
        return HEAD + b"ok"

    async with running(app, path) as bound, Raw.connect(bound) as raw:
        reply = await raw.request(get())
    assert reply.stdout == HEAD + b"ok"
    assert not os.path.exists(path)


async def test_a_live_unix_socket_or_another_file_is_left_alone(tmp_path: Path) -> None:
    path = str(tmp_path / "live.sock")

    async def app(request: Request) -> bytes:
        return HEAD + b"first"

    async with running(app, path) as bound:
        with pytest.raises(OSError, match="another server is listening"):
            await serve(app, path)
        async with Raw.connect(bound) as raw:
            reply = await raw.request(get())
        assert reply.stdout == HEAD + b"first"
    regular = tmp_path / "file.sock"
    regular.write_text("keep me")
    with pytest.raises(FileExistsError):
        await serve(app, str(regular))
    assert regular.read_text() == "keep me"
