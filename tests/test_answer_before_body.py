"""An application that answers before it reads the request body, more than a socket holds.

Both sides then write and neither reads: a client that only wrote would wait
out its write timeout while the application waits for its answer to be read.
The clients read while they write (the backends' write_or_read), so the
answer arrives whole and the call ends at once.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import pytest

from fcgiproto import Params, ServerConnection
from fcgiproto_anyio import AsyncClient
from fcgiproto_socket import Client, Timeout

ANSWER = b"Status: 200 OK\r\n\r\n" + bytes(range(256)) * (16 * 1024)  # 4 MiB of body
BODY_SIZE = 16 * 1024 * 1024  # far more than both sockets' buffers hold
#: Generous: the exchange takes milliseconds; a client that deadlocked would
#: wait out its 10 s write timeout.
LIMITS = Timeout(connect=5, read=10, write=10, pool=5, total=20)
BOUND = 8.0


def answer_once_the_params_are_in(conn: socket.socket, answer: bytes) -> bool:
    """Read a request up to its params and send `answer` whole; False if the client left."""
    proto = ServerConnection()
    while True:
        data = conn.recv(65536)
        if not data:
            return False
        for event in proto.receive_data(data):
            if isinstance(event, Params):
                proto.send_stdout(event.request_id, answer)
                proto.end_request(event.request_id)
                conn.sendall(proto.data_to_send())  # blocks until the client reads
                return True


def answer_early(listener: socket.socket) -> None:
    """Answer as soon as the params are in, then read (and drop) whatever comes."""
    conn, _ = listener.accept()
    with conn:
        if answer_once_the_params_are_in(conn, ANSWER):
            while conn.recv(1 << 20):
                pass


def body_pieces() -> Iterator[bytes]:
    piece = b"x" * (1 << 20)
    for _ in range(BODY_SIZE // len(piece)):
        yield piece


@pytest.fixture
def address(tmp_path: Path) -> Iterator[str]:
    path = str(tmp_path / "early.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    thread = threading.Thread(target=answer_early, args=(listener,), daemon=True)
    thread.start()
    try:
        yield f"unix:{path}"
    finally:
        listener.close()
        thread.join(BOUND)


@pytest.mark.parametrize("body_kind", ["bytes", "iterable"])
def test_blocking_client_reads_the_answer_while_sending(address: str, body_kind: str) -> None:
    stdin = bytes(BODY_SIZE) if body_kind == "bytes" else body_pieces()
    started = time.monotonic()
    with Client(address, multiplex=False, timeout=LIMITS) as client:
        response = client.request({"REQUEST_METHOD": "POST"}, stdin=stdin)
    assert response.stdout == ANSWER
    assert time.monotonic() - started < BOUND


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@pytest.mark.parametrize("body_kind", ["bytes", "iterable"])
def test_async_client_reads_the_answer_while_sending(
    address: str, body_kind: str, backend: str
) -> None:
    async def main() -> bytes:
        stdin = bytes(BODY_SIZE) if body_kind == "bytes" else body_pieces()
        async with AsyncClient(address, multiplex=False, timeout=LIMITS) as client:
            return (await client.request({"REQUEST_METHOD": "POST"}, stdin=stdin)).stdout

    started = time.monotonic()
    assert anyio.run(main, backend=backend) == ANSWER
    assert time.monotonic() - started < BOUND


# --- an application that answers, then closes without reading the body ---
#
# php-fpm does this to a POST without CONTENT_LENGTH: the script runs without
# the body, and the body's records, read as the next request, make it close the
# kept connection. uWSGI closes after every response. The client's next write
# of the body then fails with EPIPE or ECONNRESET while the whole answer sits
# unread in its socket: the answer is the result, not the write error.

SHORT_ANSWER = b"Status: 200 OK\r\nX-Early: yes\r\n\r\nanswered"


def answer_then_close(listener: socket.socket, closed: threading.Event) -> None:
    """Answer once the params are in, then close with the body unread, for each connection."""
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            answer_once_the_params_are_in(conn, SHORT_ANSWER)
        closed.set()


@pytest.fixture
def closing(tmp_path: Path) -> Iterator[tuple[str, threading.Event]]:
    path = str(tmp_path / "closing.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(4)
    closed = threading.Event()
    thread = threading.Thread(target=answer_then_close, args=(listener, closed), daemon=True)
    thread.start()
    try:
        yield f"unix:{path}", closed
    finally:
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        thread.join(BOUND)


def pieces_after(closed: threading.Event) -> Iterator[bytes]:
    """A first piece, then more only once the application has closed the connection."""
    yield b"a=1"
    assert closed.wait(BOUND)
    time.sleep(0.05)  # the close reaches this side's socket
    for _ in range(8):
        yield b"x" * 65536


@pytest.mark.parametrize("call", ["request", "stream"])
def test_blocking_client_keeps_the_answer_of_an_application_that_closed(
    closing: tuple[str, threading.Event], call: str
) -> None:
    address, closed = closing
    with Client(address, multiplex=False, timeout=LIMITS) as client:
        params = {"REQUEST_METHOD": "POST"}
        if call == "request":
            response = client.request(params, stdin=pieces_after(closed))
            assert (response.status, response.body) == (200, b"answered")
        else:
            with client.stream(params, stdin=pieces_after(closed)) as streamed:
                assert streamed.header("x-early") == "yes"
                assert b"".join(streamed.iter_body()) == b"answered"
        closed.clear()
        # The closed connection is not reused: the next request has a new one.
        assert client.request({"REQUEST_METHOD": "GET"}).body == b"answered"


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@pytest.mark.parametrize("call", ["request", "stream"])
def test_async_client_keeps_the_answer_of_an_application_that_closed(
    closing: tuple[str, threading.Event], call: str, backend: str
) -> None:
    address, closed = closing

    async def pieces() -> AsyncIterator[bytes]:
        yield b"a=1"
        assert await anyio.to_thread.run_sync(closed.wait, BOUND)
        await anyio.sleep(0.05)
        for _ in range(8):
            yield b"x" * 65536

    async def main() -> None:
        async with AsyncClient(address, multiplex=False, timeout=LIMITS) as client:
            params = {"REQUEST_METHOD": "POST"}
            if call == "request":
                response = await client.request(params, stdin=pieces())
                assert (response.status, response.body) == (200, b"answered")
            else:
                async with client.stream(params, stdin=pieces()) as streamed:
                    assert streamed.header("x-early") == "yes"
                    assert b"".join([c async for c in streamed.aiter_body()]) == b"answered"
            closed.clear()
            assert (await client.request({"REQUEST_METHOD": "GET"})).body == b"answered"

    anyio.run(main, backend=backend)
