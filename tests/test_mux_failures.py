"""Failures on a multiplexed connection: a write cut short, a reset, an error in the block."""

from __future__ import annotations

import os
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from fcgiproto import ConnectError, TransportError, WriteTimeout
from fcgiproto_anyio import AsyncClient
from fcgiproto_socket import Client, Timeout


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class Listener:
    """Accepts connections and then either never reads, or reads a byte and resets."""

    def __init__(self, path: Path, reset: bool) -> None:
        self.path = str(path)
        self.reset = reset
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(self.path)
        self.sock.listen(64)
        self.held: list[socket.socket] = []
        self.stopped = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopped:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            if self.reset:
                conn.recv(1)
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()
            else:
                self.held.append(conn)  # never read from

    def close(self) -> None:
        self.stopped = True
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(5)
        for conn in self.held:
            conn.close()


@pytest.fixture
def listener(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Listener]:
    server = Listener(tmp_path / "app.sock", reset=request.param == "reset")
    yield server
    server.close()


BIG = b"x" * (16 << 20)


@pytest.mark.parametrize("listener", ["silent"], indirect=True)
def test_a_write_cut_short_gives_up_the_shared_connection(listener: Listener) -> None:
    with Client(listener.path, multiplex=True) as client:
        with pytest.raises(WriteTimeout):
            client.request({}, stdin=BIG, timeout=Timeout(write=0.3, total=5))
        shared = client._mux
        assert shared is not None
        assert not shared.usable, "half a record is on the wire: nothing more may follow it"


@pytest.mark.parametrize("listener", ["reset"], indirect=True)
def test_failed_requests_on_a_shared_connection_leave_no_descriptor(listener: Listener) -> None:
    with Client(listener.path, multiplex=True, timeout=5) as client:
        before = None
        for attempt in range(20):
            with pytest.raises(TransportError):
                client.request({}, stdin=BIG)
            if attempt == 2:
                before = open_fds()
        assert before is not None and open_fds() <= before + 1


@pytest.mark.parametrize("listener", ["reset"], indirect=True)
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_async_failed_requests_on_a_shared_connection_leave_no_descriptor(
    listener: Listener, backend: str
) -> None:
    async def main() -> None:
        async with AsyncClient(listener.path, multiplex=True, timeout=5) as client:
            before = None
            for attempt in range(20):
                with pytest.raises(TransportError):
                    await client.request({}, stdin=BIG)
                if attempt == 2:
                    before = open_fds()
            assert before is not None and open_fds() <= before + 1

    anyio.run(main, backend=backend)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_errors_leave_the_async_client_block_as_they_were_raised(backend: str) -> None:
    async def refused() -> None:
        async with AsyncClient("127.0.0.1:1", timeout=1) as client:
            await client.request({})

    async def own_error() -> None:
        async with AsyncClient("127.0.0.1:1", timeout=1):
            raise KeyError("mine")

    with pytest.raises(ConnectError):
        anyio.run(refused, backend=backend)
    with pytest.raises(KeyError, match="mine"):
        anyio.run(own_error, backend=backend)
