"""One socket to an application, on anyio, with its timeouts and its error map.

The socket is used directly, non-blocking, waiting with anyio.wait_readable /
wait_writable only when it would block: a request and its answer then cost a
few system calls and little Python, where a stream object's protocol layers
cost several times the client's own work per request.
"""

from __future__ import annotations

import errno
import os
import select
import socket

import anyio
import anyio.lowlevel

from fcgiproto import (
    ClientConnection,
    ConnectError,
    ConnectTimeout,
    Event,
    ReadError,
    ReadTimeout,
    WriteError,
    WriteTimeout,
)
from fcgiproto.support import Address, Deadline, receive_from

__all__ = ["READ_SIZE", "StreamConnection", "connect", "deadline_on_anyio_clock"]

#: A read takes what the kernel has, up to this: several 64 KiB records at once.
READ_SIZE = 256 * 1024


def deadline_on_anyio_clock(total: float | None) -> Deadline:
    return Deadline(total, anyio.current_time)


async def connect(address: Address, timeout: float | None) -> socket.socket:
    with anyio.move_on_after(timeout) as scope:
        try:
            if address.path is not None:
                return await _connect_one(socket.AF_UNIX, address.path)
            infos = await anyio.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM)
            last: OSError = OSError(f"no address for {address.host}")
            for family, _, _, _, sockaddr in infos:
                try:
                    sock = await _connect_one(family, sockaddr)
                except OSError as exc:
                    last = exc
                    continue
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return sock
            raise last
        except OSError as exc:
            raise ConnectError(f"cannot connect to {address}: {exc.strerror or exc}") from exc
    assert scope.cancelled_caught
    raise ConnectTimeout(f"connecting to {address} took longer than {timeout}s")


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


def _timeout_error(
    error: type[ReadTimeout] | type[WriteTimeout],
    address: Address,
    deadline: Deadline,
    step: float | None,
    by_total: bool,
) -> Exception:
    if by_total:
        return error(f"request to {address} exceeded its total timeout of {deadline.total}s")
    doing = "take more of the request" if error is WriteTimeout else "send anything"
    return error(f"{address} did not {doing} within {step}s")


class StreamConnection:
    """A socket, its protocol state, and whether a write was cut short."""

    def __init__(self, sock: socket.socket, address: Address, multiplex: bool) -> None:
        self.sock = sock
        self.address = address
        self.proto = ClientConnection(multiplex=multiplex)
        # A write cancelled halfway leaves a partial record on the wire: the
        # connection can then only be closed.
        self.torn = False
        self._closed = False

    def looks_alive(self) -> bool:
        """An idle connection is usable only while it has nothing to read."""
        try:
            poller = select.poll()
            poller.register(self.sock, select.POLLIN | select.POLLPRI)
            return not poller.poll(0)
        except (OSError, ValueError):
            return False

    async def send(self, data: bytes, deadline: Deadline, write_timeout: float | None) -> None:
        view = memoryview(data)
        self.torn = True
        while view:
            try:
                view = view[self.sock.send(view) :]
                continue
            except BlockingIOError:
                pass
            except OSError as exc:
                raise WriteError(
                    f"writing to {self.address} failed: {exc.strerror or exc}"
                ) from exc
            wait, by_total = deadline.limit(write_timeout)
            with anyio.move_on_after(wait) as scope:
                await self._wait(anyio.wait_writable)
            if scope.cancelled_caught:
                raise _timeout_error(WriteTimeout, self.address, deadline, write_timeout, by_total)
        self.torn = False

    async def read_some(
        self, deadline: Deadline, read_timeout: float | None, expecting: bool = False
    ) -> bytes:
        """The next bytes from the application; b"" when it closed.

        `expecting`: nothing can be there yet (the request just went out), so
        wait before reading rather than try a read that would fail.
        """
        try:
            if expecting:
                raise BlockingIOError
            data = self.sock.recv(READ_SIZE)
        except BlockingIOError:
            wait, by_total = deadline.limit(read_timeout)
            with anyio.move_on_after(wait) as scope:
                await self._wait(anyio.wait_readable)
            if scope.cancelled_caught:
                raise _timeout_error(
                    ReadTimeout, self.address, deadline, read_timeout, by_total
                ) from None
            try:
                data = self.sock.recv(READ_SIZE)
            except BlockingIOError:
                return await self.read_some(deadline, read_timeout)
            except OSError as exc:
                raise self._read_error(exc) from exc
        except OSError as exc:
            raise self._read_error(exc) from exc
        else:
            # Data was there at once: still let other tasks run, and
            # cancellation in, as every async call should.
            await anyio.lowlevel.checkpoint()
        return data

    async def receive(
        self, deadline: Deadline, read_timeout: float | None, expecting: bool = False
    ) -> list[Event]:
        """The events of the next read (maybe none)."""
        data = await self.read_some(deadline, read_timeout, expecting)
        return receive_from(self.proto, data, self.address)

    async def _wait(self, wait: object) -> None:
        if self._closed:
            raise anyio.ClosedResourceError
        await wait(self.sock)  # type: ignore[operator]

    def _read_error(self, exc: OSError) -> ReadError:
        return ReadError(f"reading from {self.address} failed: {exc.strerror or exc}")

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Wake any task waiting on the socket before it goes away.
        anyio.notify_closing(self.sock)
        self.sock.close()
