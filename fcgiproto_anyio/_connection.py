"""One anyio byte stream to an application, with its timeouts and its error map."""

from __future__ import annotations

import select
import socket

import anyio
import anyio.abc

from fcgiproto import (
    ClientConnection,
    ConnectError,
    ConnectTimeout,
    Event,
    ReadError,
    ReadTimeout,
    RemoteProtocolError,
    WriteError,
    WriteTimeout,
)
from fcgiproto._adapter import Address, Deadline

__all__ = ["READ_SIZE", "StreamConnection", "connect", "deadline_on_anyio_clock"]

#: A read takes what the kernel has, up to this: several 64 KiB records at once.
READ_SIZE = 256 * 1024
_BROKEN = (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)


def deadline_on_anyio_clock(total: float | None) -> Deadline:
    return Deadline(total, anyio.current_time)


async def connect(address: Address, timeout: float | None) -> anyio.abc.SocketStream:
    with anyio.move_on_after(timeout) as scope:
        try:
            if address.path is not None:
                return await anyio.connect_unix(address.path)
            stream = await anyio.connect_tcp(address.host, address.port)
            return stream
        except OSError as exc:
            raise ConnectError(f"cannot connect to {address}: {exc.strerror or exc}") from exc
    assert scope.cancelled_caught
    raise ConnectTimeout(f"connecting to {address} took longer than {timeout}s")


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
    """A stream, its protocol state, and whether a write was cut short."""

    def __init__(self, stream: anyio.abc.SocketStream, address: Address, multiplex: bool) -> None:
        self.stream = stream
        self.address = address
        self.proto = ClientConnection(multiplex=multiplex)
        # A write cancelled halfway leaves a partial record on the wire: the
        # connection can then only be closed.
        self.torn = False

    def looks_alive(self) -> bool:
        """An idle connection is usable only while it has nothing to read."""
        sock: socket.socket = self.stream.extra(anyio.abc.SocketAttribute.raw_socket)
        try:
            poller = select.poll()
            poller.register(sock, select.POLLIN | select.POLLPRI)
            return not poller.poll(0)
        except (OSError, ValueError):
            return False

    async def send(self, data: bytes, deadline: Deadline, write_timeout: float | None) -> None:
        if not data:
            return
        wait, by_total = deadline.limit(write_timeout)
        self.torn = True
        with anyio.move_on_after(wait) as scope:
            try:
                await self.stream.send(data)
            except _BROKEN as exc:
                raise WriteError(f"writing to {self.address} failed: {exc}") from exc
            self.torn = False
            return
        assert scope.cancelled_caught
        raise _timeout_error(WriteTimeout, self.address, deadline, write_timeout, by_total)

    async def receive(self, deadline: Deadline, read_timeout: float | None) -> list[Event]:
        """The events of the next read (maybe none)."""
        wait, by_total = deadline.limit(read_timeout)
        with anyio.move_on_after(wait) as scope:
            try:
                data = await self.stream.receive(READ_SIZE)
            except anyio.EndOfStream:
                data = b""
            except _BROKEN as exc:
                raise ReadError(f"reading from {self.address} failed: {exc}") from exc
        if scope.cancelled_caught:
            raise _timeout_error(ReadTimeout, self.address, deadline, read_timeout, by_total)
        if data:
            return self.proto.receive_data(data)
        try:
            events = self.proto.receive_data(b"")
        except RemoteProtocolError as exc:
            raise ReadError(f"{self.address}: {exc}") from exc
        if not events:
            raise ReadError(f"{self.address} closed the connection")
        return events

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True):
            await self.stream.aclose()
