"""The seam between the client and a transport: what a backend must provide.

A backend connects to an Address within a limit and gives a stream. Every
failure leaves a backend as one of the fcgiproto errors, translated in one
place (its exception map), with the address in the message:

    connecting   ConnectError, ConnectTimeout
    reading      ReadError, ReadTimeout
    writing      WriteError, WriteTimeout

The client does the rest: records, deadlines, pooling, retries. A stream is
used by one caller at a time, except on a multiplexed connection, where one
reader and one writer use it at once.
"""

from __future__ import annotations

from typing import Protocol

from fcgiproto.support import Address

__all__ = ["AsyncNetworkBackend", "AsyncNetworkStream"]


class AsyncNetworkStream(Protocol):
    """A connection to an application, carrying bytes both ways."""

    async def read(self, max_bytes: int, timeout: float | None) -> bytes:
        """Up to max_bytes as soon as some arrive; b"" once the application closed.

        ReadTimeout when nothing arrives within `timeout` seconds (None: no limit).
        """
        ...

    async def write_some(self, data: memoryview, timeout: float | None) -> int:
        """Write what the transport takes now of `data` (at least a byte); how much.

        WriteTimeout when it takes nothing within `timeout` seconds.
        """
        ...

    async def write_or_read(
        self, data: memoryview, max_bytes: int, timeout: float | None
    ) -> tuple[int, bytes | None]:
        """Write some of `data`, or read if the application speaks first.

        (bytes written, None), or (0, what was read) when input came while
        the transport would not take more. An application may answer before
        it has read the whole request body, and wait for its answer to be
        read: a client that only wrote would then wait forever. A transport
        that cannot wait for both may simply write, at that risk.
        """
        ...

    def looks_alive(self) -> bool:
        """Whether an idle connection can be used: it has nothing to read.

        Anything readable on an idle FastCGI connection is its end (php-fpm
        closes after pm.max_requests, or on restart) or garbage.
        """
        ...

    async def aclose(self) -> None:
        """Close the connection; a read waiting on it ends. Safe to call twice."""
        ...


class AsyncNetworkBackend(Protocol):
    """Opens streams to applications: sockets, TLS, or memory in tests."""

    async def connect(self, address: Address, timeout: float | None) -> AsyncNetworkStream:
        """A stream to `address`, within `timeout` seconds (None: no limit)."""
        ...
