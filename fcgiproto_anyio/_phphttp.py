"""uvicorn's httptools protocol, with the writes of one pass of the event loop joined.

Imported by `fcgi php` only when httptools is installed (the ``php`` extra
installs it); a module of its own so that uvicorn's worker processes, which
are started afresh, can import the class by name.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any, cast

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["CoalescingHttpToolsProtocol"]


class _CoalescingTransport:
    """A transport whose writes made before the task yields leave in one system call.

    uvicorn writes a response's head and its body as the two ASGI messages
    arrive, and the loop sends each at once: two segments, and the client
    woken twice, for a page that fits in one. Here the first write queues a
    callback and the writes that follow join it; the callback, run on the
    loop's next pass, writes them all. The order of bytes is kept, and
    closing writes what is pending first. Everything else is the transport's.
    """

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(bytes(data))

    def writelines(self, lines: Iterable[bytes | bytearray | memoryview]) -> None:
        for data in lines:
            self.write(data)

    def _flush(self) -> None:
        pending = self._pending
        if not pending:
            return
        self._pending = []
        if self._transport.is_closing():
            return  # the client is gone: nothing to write to
        self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def write_eof(self) -> None:
        self._flush()
        self._transport.write_eof()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(map(len, self._pending))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    """HttpToolsProtocol writing through a _CoalescingTransport."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not derive from asyncio.Transport.
        coalescing = _CoalescingTransport(
            cast(asyncio.Transport, transport), asyncio.get_running_loop()
        )
        super().connection_made(coalescing)  # type: ignore[arg-type]
