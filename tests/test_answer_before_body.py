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
from collections.abc import Iterator
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


def answer_early(listener: socket.socket) -> None:
    """Answer as soon as the params are in, then read (and drop) whatever comes."""
    conn, _ = listener.accept()
    with conn:
        proto = ServerConnection()
        answered = False
        while not answered:
            data = conn.recv(65536)
            if not data:
                return
            for event in proto.receive_data(data):
                if isinstance(event, Params) and not answered:
                    proto.send_stdout(event.request_id, ANSWER)
                    proto.end_request(event.request_id)
                    conn.sendall(proto.data_to_send())  # blocks until the client reads
                    answered = True
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
