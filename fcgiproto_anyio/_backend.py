"""The anyio backend: sockets driven directly, waiting through anyio (asyncio or trio).

The socket is non-blocking and is waited on only when it would block: a
request and its answer then cost a few system calls and little Python, where a
stream object's protocol layers cost several times the client's own work per
request. On asyncio the stream keeps the socket registered with the loop
(AsyncioStream); on trio it waits through trio itself (TrioStream); elsewhere
with anyio.wait_readable / wait_writable.
"""

from __future__ import annotations

import errno
import os
import select
import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import anyio
import anyio.lowlevel

from fcgiproto import (
    ConnectError,
    ConnectTimeout,
    ReadTimeout,
    WriteTimeout,
)
from fcgiproto.support import Address

from ._asyncio_stream import AsyncioStream
from ._running import running_library
from ._stream_errors import StreamErrors

if TYPE_CHECKING:
    from ._interface import AsyncNetworkStream

__all__ = ["AnyioBackend", "AnyioStream"]

_Wait = Callable[[socket.socket], Awaitable[None]]


class AnyioBackend:
    """TCP and Unix sockets on the running event loop."""

    async def connect(self, address: Address, timeout: float | None) -> AsyncNetworkStream:
        stream = _stream_type()
        with anyio.move_on_after(timeout) as scope:
            try:
                if address.path is not None:
                    return stream(await _connect_one(socket.AF_UNIX, address.path), address)
                infos = await anyio.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM)
                last: OSError = OSError(f"no address for {address.host}")
                for family, _, _, _, sockaddr in infos:
                    try:
                        sock = await _connect_one(family, sockaddr)
                    except OSError as exc:
                        last = exc
                        continue
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    return stream(sock, address)
                raise last
            except OSError as exc:
                raise ConnectError(f"cannot connect to {address}: {exc.strerror or exc}") from exc
        assert scope.cancelled_caught
        raise ConnectTimeout(f"connecting to {address} took longer than {timeout}s")


def _stream_type() -> type[AsyncioStream] | type[AnyioStream]:
    """The stream for the running loop: its own on asyncio and trio, else the portable one."""
    library = running_library()
    if library == "asyncio":
        return AsyncioStream
    if library == "trio":
        from ._trio_stream import TrioStream  # trio is an optional extra

        return TrioStream
    return AnyioStream


async def _connect_one(family: int, sockaddr: object) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        code = sock.connect_ex(sockaddr)  # type: ignore[arg-type]
        if code in (errno.EINPROGRESS, errno.EAGAIN, errno.EWOULDBLOCK):
            await anyio.wait_writable(sock)
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            raise OSError(code, os.strerror(code))
        return sock
    except BaseException:
        sock.close()
        raise


class AnyioStream(StreamErrors):
    """One non-blocking socket; its errors leave as the fcgiproto tree."""

    _checkpoint = staticmethod(anyio.lowlevel.checkpoint)

    def __init__(self, sock: socket.socket, address: Address) -> None:
        self._sock = sock
        self._address = address
        self._closed = False
        # Just wrote a request: its answer cannot be there yet, so a read
        # waits first instead of trying a recv that would fail.
        self._wrote = False
        self._poller: select.poll | None = None

    def wait_first(self) -> None:
        """The next read waits for the socket before it tries: nothing can be there yet.

        What a server says once it has read every request the peer sent
        whole: the peer sends more only after an answer.
        """
        self._wrote = True

    async def read(self, max_bytes: int, timeout: float | None) -> bytes:
        waited = self._wrote
        if waited:
            self._wrote = False
            await self._wait(anyio.wait_readable, timeout, ReadTimeout)
        while True:
            try:
                data = self._sock.recv(max_bytes)
            except BlockingIOError:
                await self._wait(anyio.wait_readable, timeout, ReadTimeout)
                waited = True
                continue
            except OSError as exc:
                raise self._read_error(exc) from exc
            if not waited:
                # Data was there at once: still let other tasks run, and
                # cancellation in, as every async call should.
                await self._checkpoint()
            return data

    async def write_some(self, data: memoryview, timeout: float | None) -> int:
        while True:
            try:
                sent = self._sock.send(data)
            except BlockingIOError:
                await self._wait(anyio.wait_writable, timeout, WriteTimeout)
                continue
            except OSError as exc:
                raise self._write_error(exc) from exc
            self._wrote = True
            return sent

    async def write_or_read(
        self, data: memoryview, max_bytes: int, timeout: float | None
    ) -> tuple[int, bytes | None]:
        while True:
            try:
                sent = self._sock.send(data)
            except BlockingIOError:
                pass
            except OSError as exc:
                raise self._write_error(exc) from exc
            else:
                self._wrote = True
                return sent, None
            if await self._readable_first(timeout):
                try:
                    return 0, self._sock.recv(max_bytes)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    raise self._read_error(exc) from exc

    async def _readable_first(self, timeout: float | None) -> bool:
        """Wait until the socket can be read or written; True when it can be read."""
        ready: list[bool] = []
        with anyio.move_on_after(timeout) as limit:
            async with anyio.create_task_group() as tasks:

                async def watch(wait: _Wait, readable: bool) -> None:
                    await self._wait(wait, None, WriteTimeout)
                    ready.append(readable)
                    tasks.cancel_scope.cancel()

                tasks.start_soon(watch, anyio.wait_readable, True)
                tasks.start_soon(watch, anyio.wait_writable, False)
        if limit.cancelled_caught and not ready:
            raise WriteTimeout(f"{self._address} did not take more within {timeout}s")
        return ready[0]

    def looks_alive(self) -> bool:
        try:
            if self._poller is None:  # made once: the check runs before every reuse
                self._poller = select.poll()
                self._poller.register(self._sock, select.POLLIN | select.POLLPRI)
            return not self._poller.poll(0)
        except (OSError, ValueError):
            return False

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Wake any task waiting on the socket before it goes away.
        anyio.notify_closing(self._sock)
        self._sock.close()

    async def _wait(
        self,
        wait: _Wait,
        timeout: float | None,
        error: type[ReadTimeout] | type[WriteTimeout],
    ) -> None:
        if self._closed:
            raise self._closed_error(error)
        with anyio.move_on_after(timeout) as scope:
            try:
                await wait(self._sock)
            except (anyio.ClosedResourceError, OSError):
                raise self._closed_error(error) from None
        if scope.cancelled_caught:
            raise self._timeout(error, timeout)
