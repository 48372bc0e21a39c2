"""One behaviour suite for every client against both servers, so that drift fails a test.

Every test runs against {blocking Client, AsyncClient on asyncio, AsyncClient
on trio} x {fcgiproto_socket's Server, fcgiproto_anyio's serve on asyncio} x
{TCP loopback, a Unix socket}, through the public API only. The async clients
run on an event loop in a thread of their own (a blocking portal), so each
test reads as plain code whichever client it uses. Apps that only compute an
answer are one function for both servers; apps that wait or write to STDERR
come in a blocking and an async version, the only difference the servers allow.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import peers
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from targets import MiB, md5, payload

from fcgiproto import Overloaded, ReadError, WriteError
from fcgiproto_anyio import AsyncClient
from fcgiproto_anyio import serve as anyio_serve
from fcgiproto_socket import Address, Client, Response, Server

#: Every call's limit: far beyond what any of them takes, unless something hangs.
TIMEOUT = 10.0
#: How long an app waits for the test to let it go on before giving up.
PATIENCE = 10.0

INTERNAL_ERROR_BODY = b"Internal Server Error\n"
TEXT = b"Content-Type: text/plain; charset=utf-8\r\n"

App = Callable[..., Any]


# --- the two servers ---


@contextlib.contextmanager
def blocking_server(app: App, address: str, **options: Any) -> Iterator[Address]:
    with Server(app, address, **options) as server:
        yield server.address


@contextlib.contextmanager
def anyio_server(app: App, address: str, **options: Any) -> Iterator[Address]:
    with start_blocking_portal("asyncio") as portal:
        future, bound = portal.start_task(functools.partial(anyio_serve, app, address, **options))
        try:
            yield bound
        finally:
            future.cancel()  # leaving the portal waits for serve() to return


SERVERS = {"blocking": blocking_server, "anyio": anyio_server}


# --- the three clients, behind one blocking face ---


class SyncFace:
    """The blocking Client."""

    def __init__(self, client: Client) -> None:
        self.client = client

    def request(self, params: dict[str, str], stdin: bytes = b"") -> Response:
        return self.client.request(params, stdin)

    def request_chunks(self, params: dict[str, str], chunks: list[bytes]) -> Response:
        return self.client.request(params, iter(chunks))

    def stream(
        self, params: dict[str, str], stdin: bytes, on_chunk: Callable[[bytes], object]
    ) -> tuple[int, list[tuple[str, str]]]:
        with self.client.stream(params, stdin) as r:
            for chunk in r.iter_body():
                on_chunk(chunk)
            return r.status, r.headers

    def get_values(self) -> dict[str, str]:
        return self.client.get_values()


class AsyncFace:
    """An AsyncClient, called from this thread on its event loop's."""

    def __init__(self, portal: BlockingPortal, client: AsyncClient) -> None:
        self.portal = portal
        self.client = client

    def request(self, params: dict[str, str], stdin: bytes = b"") -> Response:
        return self.portal.call(self.client.request, params, stdin)

    def request_chunks(self, params: dict[str, str], chunks: list[bytes]) -> Response:
        async def body() -> AsyncIterator[bytes]:
            for chunk in chunks:
                yield chunk

        async def run() -> Response:
            return await self.client.request(params, body())

        return self.portal.call(run)

    def stream(
        self, params: dict[str, str], stdin: bytes, on_chunk: Callable[[bytes], object]
    ) -> tuple[int, list[tuple[str, str]]]:
        async def run() -> tuple[int, list[tuple[str, str]]]:
            async with self.client.stream(params, stdin) as r:
                async for chunk in r.aiter_body():
                    on_chunk(chunk)
                return r.status, r.headers

        return self.portal.call(run)

    def get_values(self) -> dict[str, str]:
        return self.portal.call(self.client.get_values)


Face = SyncFace | AsyncFace


@dataclass
class World:
    """One test's server kind, client kind and transport; what it starts is stopped after it."""

    server_kind: str
    client_kind: str
    transport: str
    socket_dir: Path
    stack: contextlib.ExitStack

    def address(self, name: str = "app") -> str:
        if self.transport == "tcp":
            return "127.0.0.1:0"
        return str(self.socket_dir / f"{name}.sock")

    def serve(self, apps: App | dict[str, App], **options: Any) -> Address:
        """Start this test's server with the app for its kind; its bound address."""
        app = apps[self.server_kind] if isinstance(apps, dict) else apps
        return self.stack.enter_context(SERVERS[self.server_kind](app, self.address(), **options))

    def connect(self, address: Address, **options: Any) -> Face:
        """This test's client, closed after the test (before the servers)."""
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


@pytest.fixture(params=["tcp", "unix"])
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def world(server_kind: str, client_kind: str, transport: str, tmp_path: Path) -> Iterator[World]:
    with contextlib.ExitStack() as stack:
        yield World(server_kind, client_kind, transport, peers.socket_dir(tmp_path), stack)


# --- apps ---


def hello(request: Any) -> bytes:
    """A GET answered from its params, with a status, repeated headers and a body."""
    params = request.params
    return (
        b"Status: 418 I'm a teapot\r\n"
        + TEXT
        + b"X-Method: %s\r\n" % params["REQUEST_METHOD"].encode()
        + b"X-Trace: %s\r\n" % params["HTTP_X_TRACE"].encode()
        + b"Set-Cookie: a=1\r\nSet-Cookie: b=2\r\n\r\n"
        + f"{params['SCRIPT_NAME']}?{params['QUERY_STRING']}".encode()
    )


def echo(request: Any) -> bytes:
    body: bytes = request.stdin
    length = request.params.get("CONTENT_LENGTH", "").encode()
    return (
        b"Content-Type: application/octet-stream\r\n"
        b"X-Body-Length: %d\r\nX-Body-Md5: %s\r\n"
        b"X-Content-Length: %s\r\n\r\n" % (len(body), md5(body).encode(), length)
    ) + body


def connection_id(request: Any) -> bytes:
    return TEXT + b"\r\n%d" % request.connection_id


def fails(request: Any) -> bytes:
    raise ZeroDivisionError("the app divided by zero on purpose")


def post(body: bytes) -> dict[str, str]:
    return {"REQUEST_METHOD": "POST", "SCRIPT_NAME": "/echo", "CONTENT_LENGTH": str(len(body))}


GET = {"REQUEST_METHOD": "GET", "SCRIPT_NAME": "/"}


def check_echo(response: Response, body: bytes) -> None:
    assert (response.status, response.app_status) == (200, 0)
    assert response.header("X-Body-Length") == str(len(body))
    assert response.header("X-Body-Md5") == md5(body)
    assert response.body == body
    assert response.stderr == b""


# --- requests and answers ---


def test_get_with_params_gives_status_headers_and_body(world: World) -> None:
    client = world.connect(world.serve(hello))
    params = {
        "REQUEST_METHOD": "GET",
        "SCRIPT_NAME": "/hello",
        "QUERY_STRING": "name=café&x=1",
        "HTTP_X_TRACE": "abc-123",
    }
    r = client.request(params)
    assert (r.status, r.reason, r.app_status) == (418, "I'm a teapot", 0)
    assert r.headers == [
        ("Content-Type", "text/plain; charset=utf-8"),
        ("X-Method", "GET"),
        ("X-Trace", "abc-123"),
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
    ]
    assert r.body == "/hello?name=café&x=1".encode()
    assert r.stderr == b""


def test_post_body_as_bytes_and_as_an_iterable(world: World) -> None:
    client = world.connect(world.serve(echo))
    body = payload(100_000, seed=1)
    check_echo(client.request(post(body), body), body)
    chunks = [b"first ", b"", b"second ", body[:70_000], b"last"]
    joined = b"".join(chunks)
    r = client.request_chunks(post(joined), chunks)
    check_echo(r, joined)
    assert r.header("X-Content-Length") == str(len(joined))


def test_stderr_is_kept_apart_from_stdout(world: World) -> None:
    def blocking(request: Any) -> bytes:
        request.log("warning: café\n")
        request.log(b"\xff raw bytes\n")
        return TEXT + b"\r\nthe body"

    async def async_app(request: Any) -> bytes:
        await request.log("warning: café\n")
        await request.log(b"\xff raw bytes\n")
        return TEXT + b"\r\nthe body"

    client = world.connect(world.serve({"blocking": blocking, "anyio": async_app}))
    r = client.request(GET)
    assert (r.status, r.body) == (200, b"the body")
    assert r.stderr == "warning: café\n".encode() + b"\xff raw bytes\n"


def test_a_large_body_both_ways(world: World) -> None:
    client = world.connect(world.serve(echo))
    body = payload(3 * MiB, seed=2)
    check_echo(client.request(post(body), body), body)
    chunks = [body[i : i + 1000_003] for i in range(0, len(body), 1000_003)]
    check_echo(client.request_chunks(post(body), chunks), body)


def test_stream_reads_the_response_as_the_app_produces_it(world: World) -> None:
    # The app sends its second part only once the client has the first: a
    # server that held the output back, or a client that waited for the end,
    # would leave the app waiting and `released` false.
    first_read = threading.Event()
    released: list[bool] = []

    def blocking(request: Any) -> Iterator[bytes]:
        yield TEXT + b"\r\nfirst part|"
        released.append(first_read.wait(PATIENCE))
        yield b"second part"

    async def async_app(request: Any) -> AsyncIterator[bytes]:
        yield TEXT + b"\r\nfirst part|"
        released.append(await anyio.to_thread.run_sync(first_read.wait, PATIENCE))
        yield b"second part"

    client = world.connect(world.serve({"blocking": blocking, "anyio": async_app}))
    chunks: list[bytes] = []

    def on_chunk(chunk: bytes) -> None:
        chunks.append(chunk)
        if b"|" in b"".join(chunks):
            first_read.set()

    status, headers = client.stream(GET, b"", on_chunk)
    assert (status, headers) == (200, [("Content-Type", "text/plain; charset=utf-8")])
    assert b"".join(chunks) == b"first part|second part"
    assert released == [True]


def test_an_app_that_raises_gives_a_plain_500_and_logs_the_traceback(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    client = world.connect(world.serve(fails))
    with caplog.at_level(logging.ERROR):
        r = client.request(GET)
    assert (r.status, r.app_status) == (500, 1)
    assert r.header("Content-Type") == "text/plain; charset=utf-8"
    assert r.body == INTERNAL_ERROR_BODY  # nothing of the traceback for the HTTP client
    # The traceback is in the server's log, and in STDERR: the web server's error log.
    failures = [rec for rec in caplog.records if rec.exc_info and rec.levelno == logging.ERROR]
    assert len(failures) == 1
    package = "fcgiproto_socket" if world.server_kind == "blocking" else "fcgiproto_anyio"
    assert failures[0].name == f"{package}.server"
    assert failures[0].exc_info is not None and failures[0].exc_info[0] is ZeroDivisionError
    assert b"Traceback" in r.stderr and b"divided by zero on purpose" in r.stderr
    # The connection goes on serving.
    assert client.request(GET).status == 500


# --- connections and limits ---


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({}, {"FCGI_MAX_CONNS": "100", "FCGI_MAX_REQS": "100", "FCGI_MPXS_CONNS": "0"}),
        (
            {"max_connections": 7, "max_requests": 9},
            {"FCGI_MAX_CONNS": "7", "FCGI_MAX_REQS": "9", "FCGI_MPXS_CONNS": "0"},
        ),
        (
            {"multiplex": True, "max_connections": 3, "max_requests": 50},
            {"FCGI_MAX_CONNS": "3", "FCGI_MAX_REQS": "50", "FCGI_MPXS_CONNS": "1"},
        ),
    ],
    ids=["defaults", "plain", "multiplexed"],
)
def test_get_values_answers_the_options_as_configured(
    world: World, options: dict[str, Any], expected: dict[str, str]
) -> None:
    # FCGI_MAX_REQS is the application's: a server that does not multiplex,
    # configured for 9, answers 9, not the 1 request a connection carries.
    client = world.connect(world.serve(hello, **options))
    assert client.get_values() == expected


@pytest.mark.parametrize("client_kind", ["blocking"])
@pytest.mark.parametrize(
    "options",
    [{}, {"multiplex": True}, {"multiplex": False, "max_requests": 9, "max_connections": 2}],
    ids=["defaults", "multiplexed", "plain"],
)
def test_both_servers_answer_get_values_alike(
    client_kind: str, transport: str, tmp_path: Path, options: dict[str, Any]
) -> None:
    answers = {}
    for kind in SERVERS:
        with contextlib.ExitStack() as stack:
            world = World(kind, client_kind, transport, peers.socket_dir(tmp_path), stack)
            answers[kind] = world.connect(world.serve(hello, **options)).get_values()
    assert answers["blocking"] == answers["anyio"]
    assert set(answers["anyio"]) == {"FCGI_MAX_CONNS", "FCGI_MAX_REQS", "FCGI_MPXS_CONNS"}


def test_keep_alive_reuses_one_connection(world: World) -> None:
    client = world.connect(world.serve(connection_id))
    ids = {client.request(GET).body for _ in range(4)}
    assert len(ids) == 1


def test_multiplexed_requests_share_a_connection_and_run_at_once(world: World) -> None:
    count = 5
    # Each app waits until all are running: they can only finish if the
    # server runs them at once, and they came on one connection.
    arrived = threading.Barrier(count)
    seen: list[tuple[int, int]] = []

    def blocking(request: Any) -> bytes:
        seen.append((request.connection_id, request.request_id))
        arrived.wait(PATIENCE)
        return TEXT + b"\r\n%d" % request.request_id

    async def async_app(request: Any) -> bytes:
        seen.append((request.connection_id, request.request_id))
        await anyio.to_thread.run_sync(arrived.wait, PATIENCE)
        return TEXT + b"\r\n%d" % request.request_id

    address = world.serve({"blocking": blocking, "anyio": async_app}, multiplex=True)
    client = world.connect(address, max_connections=1)
    assert client.get_values()["FCGI_MPXS_CONNS"] == "1"
    with ThreadPoolExecutor(count) as pool:
        responses = list(pool.map(lambda _: client.request(GET), range(count)))
    assert [r.status for r in responses] == [200] * count
    assert len({connection for connection, _ in seen}) == 1
    assert sorted(int(r.body) for r in responses) == sorted(rid for _, rid in seen)
    assert len(seen) == count


def test_max_requests_counts_requests_across_connections(world: World) -> None:
    # Without multiplexing each connection carries one request, so the limit
    # of 1 can only hold if it counts the application's requests.
    entered, leave = threading.Event(), threading.Event()

    def blocking(request: Any) -> bytes:
        if request.params["SCRIPT_NAME"] == "/slow":
            entered.set()
            leave.wait(PATIENCE)
        return TEXT + b"\r\ndone"

    async def async_app(request: Any) -> bytes:
        if request.params["SCRIPT_NAME"] == "/slow":
            entered.set()
            await anyio.to_thread.run_sync(leave.wait, PATIENCE)
        return TEXT + b"\r\ndone"

    address = world.serve({"blocking": blocking, "anyio": async_app}, max_requests=1)
    client = world.connect(address, max_connections=2, multiplex=False)
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(client.request, {"REQUEST_METHOD": "GET", "SCRIPT_NAME": "/slow"})
        assert entered.wait(PATIENCE)
        with pytest.raises(Overloaded):
            client.request(GET)
        leave.set()
        assert slow.result(TIMEOUT).body == b"done"
    assert client.request(GET).body == b"done"  # the slot was given back


@pytest.mark.parametrize("limit", [300, 4096])
def test_max_params_size_at_its_edge(world: World, limit: int) -> None:
    def size(request: Any) -> bytes:
        return TEXT + b"\r\n%d" % len(request.params["BIG"])

    client = world.connect(world.serve(size, max_params_size=limit))
    # One pair: 1 byte of name length, 4 of value length (>= 128), "BIG", the value.
    overhead = 1 + 4 + len("BIG")
    assert client.request({"BIG": "v" * (limit - overhead)}).body == b"%d" % (limit - overhead)
    with pytest.raises((ReadError, WriteError)):  # one byte more: the connection is closed
        client.request({"BIG": "v" * (limit - overhead + 1)})
    assert client.request({"BIG": "v" * 200}).body == b"200"  # the server goes on


def test_default_max_params_size_is_one_mib(world: World) -> None:
    def size(request: Any) -> bytes:
        return TEXT + b"\r\n%d" % len(request.params["BIG"])

    client = world.connect(world.serve(size))
    overhead = 1 + 4 + len("BIG")
    assert client.request({"BIG": "v" * (MiB - overhead)}).body == b"%d" % (MiB - overhead)
    with pytest.raises((ReadError, WriteError)):
        client.request({"BIG": "v" * (MiB - overhead + 1)})
