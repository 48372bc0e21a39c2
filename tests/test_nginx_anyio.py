"""nginx in front of fcgiproto_anyio's serve(), which runs in a thread of its own."""

from __future__ import annotations

import http.client
import random
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import peers
import pytest
from anyio.from_thread import start_blocking_portal

from fcgiproto_anyio._server import App, Request, serve

TIMEOUT = 30.0  # generous: every request here ends long before, unless something hangs


class Backend:
    """serve() on an event loop in a background thread, and what the app has seen."""

    def __init__(self) -> None:
        self.connection_ids: list[int] = []  # one per request, in order
        self.keep_conn: list[bool] = []

    async def app(self, request: Request) -> bytes | AsyncIterator[bytes]:
        self.connection_ids.append(request.connection_id)
        self.keep_conn.append(request.keep_conn)
        path = request.params["DOCUMENT_URI"]
        if path == "/missing":
            return (
                b"Status: 404 Not Found\r\n"
                b"X-Custom: custom value\r\n"
                b"Content-Type: text/plain\r\n"
                b"\r\n"
                b"nothing at /missing\n"
            )
        if path == "/echo":
            head = b"Content-Type: application/octet-stream\r\nX-Body-Length: %d\r\n\r\n"
            return head % len(request.stdin) + request.stdin
        if path == "/stream":
            return self._stream()
        query = request.params["QUERY_STRING"]
        text = f"{request.params['REQUEST_METHOD']} {path} {query}".strip()
        return b"Content-Type: text/plain\r\n\r\n" + text.encode()

    async def _stream(self) -> AsyncIterator[bytes]:
        yield b"Content-Type: text/plain\r\n\r\n"
        for number in range(100):
            yield b"%d\n" % number


@contextmanager
def serving(app: App, address: str, backend: str) -> Iterator[str]:
    """serve(app, address) in a thread for the block; the bound address, as nginx takes it."""
    with start_blocking_portal(backend) as portal:
        future, bound = portal.start_task(serve, app, address)
        try:
            yield str(bound)
        finally:
            future.cancel()  # leaving the portal waits for serve() to return


@pytest.fixture(params=["asyncio", "trio"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=["unix", "tcp"])
def listen_address(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "tcp":
        return "127.0.0.1:0"
    return str(peers.socket_dir(tmp_path) / "app.sock")


@pytest.fixture
def app_backend() -> Backend:
    return Backend()


@pytest.fixture
def nginx(
    make_nginx: peers.NginxFactory, app_backend: Backend, listen_address: str, backend: str
) -> Iterator[peers.Nginx]:
    with serving(app_backend.app, listen_address, backend) as address:
        yield make_nginx(address, keep_conn=True)


def http_connection(nginx: peers.Nginx) -> http.client.HTTPConnection:
    host, port = nginx.http_address.rsplit(":", 1)
    return http.client.HTTPConnection(host, int(port), timeout=TIMEOUT)


def fetch(
    connection: http.client.HTTPConnection, method: str, path: str, body: bytes | None = None
) -> tuple[int, http.client.HTTPMessage, bytes]:
    connection.request(method, path, body=body)
    response = connection.getresponse()
    return response.status, response.headers, response.read()


def test_get_on_one_keepalive_connection_and_on_several(
    nginx: peers.Nginx, app_backend: Backend
) -> None:
    connection = http_connection(nginx)
    try:
        for number in range(5):
            status, headers, body = fetch(connection, "GET", f"/page?n={number}")
            assert status == 200
            assert headers["Content-Type"] == "text/plain"
            assert body == f"GET /page n={number}".encode()
    finally:
        connection.close()
    connections = [http_connection(nginx) for _ in range(3)]
    try:
        for round_ in range(2):
            for number, connection in enumerate(connections):
                assert fetch(connection, "GET", f"/c{number}?r={round_}")[2] == (
                    f"GET /c{number} r={round_}".encode()
                )
        status, _, body = fetch(connections[0], "GET", "/stream")
        assert status == 200
        assert body == b"".join(b"%d\n" % number for number in range(100))
    finally:
        for connection in connections:
            connection.close()
    assert len(app_backend.connection_ids) == 5 + 3 * 2 + 1
    assert all(app_backend.keep_conn)  # fastcgi_keep_conn on


def test_post_body_is_echoed_byte_exact(nginx: peers.Nginx) -> None:
    body = random.Random(1).randbytes(1024 * 1024)
    connection = http_connection(nginx)
    try:
        status, headers, echoed = fetch(connection, "POST", "/echo", body)
    finally:
        connection.close()
    assert status == 200
    assert headers["X-Body-Length"] == str(len(body))
    assert echoed == body


def test_status_and_headers_pass_through(nginx: peers.Nginx) -> None:
    connection = http_connection(nginx)
    try:
        status, headers, body = fetch(connection, "GET", "/missing")
        assert (status, headers["X-Custom"], body) == (
            404,
            "custom value",
            b"nothing at /missing\n",
        )
        assert fetch(connection, "GET", "/found")[:1] == (200,)  # the HTTP connection goes on
    finally:
        connection.close()


def test_nginx_keeps_its_fastcgi_connection_alive(nginx: peers.Nginx, app_backend: Backend) -> None:
    for number in range(10):  # one after the other, each on an HTTP connection of its own
        connection = http_connection(nginx)
        try:
            assert fetch(connection, "GET", f"/seq?n={number}")[0] == 200
        finally:
            connection.close()
    assert len(app_backend.connection_ids) == 10
    assert len(set(app_backend.connection_ids)) < 10, app_backend.connection_ids
