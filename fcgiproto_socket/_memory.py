# Generated from fcgiproto_anyio/_memory.py by scripts/generate_sync.py: do not edit.
"""The in-memory backend: the client talks to an application peer with no socket.

For fast, deterministic tests of the client's own logic (pool, probe,
retries, deadlines, aborts); the real peers in tests/ stay the proof of
behaviour. Written once for both clients: the blocking copy is generated.
"""

from __future__ import annotations

from collections.abc import Callable

from fcgiproto import ReadError, ReadTimeout, WriteError
from fcgiproto.support import Address, MemoryPeer

from ._primitives import Flag, checkpoint

__all__ = ["MemoryBackend", "MemoryStream"]


class MemoryBackend:
    """Connects to a fresh peer from `peer_factory` at every connect().

    `streams` lists every stream it opened, in order, for tests to inspect.
    """

    def __init__(self, peer_factory: Callable[[], MemoryPeer]) -> None:
        self._peer_factory = peer_factory
        self.streams: list[MemoryStream] = []

    def connect(self, address: Address, timeout: float | None) -> MemoryStream:
        checkpoint()
        stream = MemoryStream(self._peer_factory(), address)
        self.streams.append(stream)
        return stream


class MemoryStream:
    """One connection to a peer: what the client writes goes to it, its answers queue up."""

    def __init__(self, peer: MemoryPeer, address: Address) -> None:
        self.peer = peer
        self.address = address
        self.written = bytearray()  # everything the client wrote
        self.closed = False  # the client closed it
        self.peer_closed = False  # the application closed its end
        self._inbound = bytearray()
        self._ready = Flag()

    def read(self, max_bytes: int, timeout: float | None) -> bytes:
        while not self._inbound and not self.peer_closed:
            if self.closed:
                raise ReadError(f"the connection to {self.address} was closed")
            self._ready.clear()
            if not self._ready.wait(timeout):
                raise ReadTimeout(f"{self.address} did not send anything within {timeout}s")
        data = bytes(self._inbound[:max_bytes])
        del self._inbound[:max_bytes]
        checkpoint()
        return data

    def write_some(self, data: memoryview, timeout: float | None) -> int:
        if self.closed or self.peer_closed:
            raise WriteError(f"writing to {self.address} failed: the connection is closed")
        chunk = bytes(data)
        self.written += chunk
        answer, close = self.peer.receive(chunk)
        self._inbound += answer
        self.peer_closed = self.peer_closed or close
        self._ready.set()
        checkpoint()
        return len(chunk)

    def write_or_read(
        self, data: memoryview, max_bytes: int, timeout: float | None
    ) -> tuple[int, bytes | None]:
        # The peer takes every write whole: writing never has to wait.
        return self.write_some(data, timeout), None

    def looks_alive(self) -> bool:
        return not self._inbound and not self.peer_closed and not self.closed

    def close(self) -> None:
        self.closed = True
        self._ready.set()
