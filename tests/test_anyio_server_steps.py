"""The anyio server decodes a big read in steps, turning the event loop between them.

DECODE_BUDGET is set to 0 here, so every step after the first waits for a
turn of the loop and for the answers so far to go out: what crosses a step
boundary (a record cut in two, a request's body in many pieces) must arrive
whole, and every GET_VALUES of a flood must still be answered.
"""

from __future__ import annotations

import hashlib
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from attacks import GET_VALUES, HEADER, pair, record
from helpers import serving_anyio

import fcgiproto_anyio._server as anyio_server
from fcgiproto_anyio import Request
from fcgiproto_socket import Address, Client

GET_VALUES_RESULT = 10
PATIENCE = 30.0


async def digest_app(request: Request) -> AsyncIterator[bytes]:
    yield b"Content-Type: text/plain\r\n\r\n"
    yield hashlib.sha256(request.stdin).hexdigest().encode()


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Address]:
    monkeypatch.setattr(anyio_server, "DECODE_BUDGET", 0.0)
    with serving_anyio(digest_app, str(tmp_path / "steps.sock")) as address:
        yield address


def test_a_body_decoded_in_many_steps_arrives_whole(server: Address) -> None:
    body = bytes(range(251)) * 8000  # ~2 MB, records cut at every 32 KiB step
    with Client(server, timeout=PATIENCE) as client:
        response = client.request({"REQUEST_METHOD": "POST"}, body)
    assert response.body == hashlib.sha256(body).hexdigest().encode()


def test_every_get_values_of_a_flood_in_one_write_is_answered(server: Address) -> None:
    count = 6000  # about 140 KiB in one write: several steps
    flood = record(GET_VALUES, 0, pair(b"FCGI_MPXS_CONNS", b"")) * count
    assert server.path is not None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(PATIENCE)
        sock.connect(server.path)
        sock.sendall(flood)
        answers, buffered = 0, b""
        while answers < count:
            chunk = sock.recv(1 << 16)
            assert chunk, f"closed after {answers} answers"
            buffered += chunk
            while len(buffered) >= HEADER.size:
                _, rtype, _, length, padding = HEADER.unpack_from(buffered)
                if len(buffered) < HEADER.size + length + padding:
                    break
                assert rtype == GET_VALUES_RESULT
                assert b"FCGI_MPXS_CONNS" in buffered[HEADER.size : HEADER.size + length]
                buffered = buffered[HEADER.size + length + padding :]
                answers += 1
    assert answers == count and buffered == b""
