"""One connection of the client: a backend stream, its protocol state, what is left to write.

Written once for both clients: the blocking copy is generated from this file.
"""

from __future__ import annotations

from fcgiproto import (
    ClientConnection,
    Event,
    ReadError,
    ReadTimeout,
    TimeoutException,
    WriteError,
    WriteTimeout,
)
from fcgiproto.support import Address, Deadline, receive_from

from ._interface import AsyncNetworkStream
from ._primitives import Refill

__all__ = ["READ_SIZE", "AsyncConnection", "timeout_error"]

#: A read takes what the transport has, up to this: several 64 KiB records at once.
READ_SIZE = 256 * 1024


def timeout_error(
    error: type[TimeoutException],
    address: Address,
    deadline: Deadline,
    step: float | None,
    by_total: bool,
) -> TimeoutException:
    """The timeout a request hit: its total, or the limit of the step it was in."""
    if by_total:
        return error(f"request to {address} exceeded its total timeout of {deadline.total}s")
    doing = "take more of the request" if error is WriteTimeout else "send anything"
    return error(f"{address} did not {doing} within {step}s")


class AsyncConnection:
    """A stream, the protocol state of the requests on it, and the output not yet written."""

    __slots__ = ("_pending", "address", "proto", "stream", "write_failed")

    def __init__(self, stream: AsyncNetworkStream, address: Address, multiplex: bool) -> None:
        self.stream = stream
        self.address = address
        self.proto = ClientConnection(multiplex=multiplex)
        self._pending = memoryview(b"")
        #: A write failed, after which only reading goes on: never reuse it.
        self.write_failed = False

    @property
    def flushed(self) -> bool:
        """Whether everything queued has been written."""
        return not self._pending

    def queue(self) -> None:
        """Take what the protocol state has for the wire."""
        data = self.proto.data_to_send()
        if data:
            self._pending = (
                memoryview(bytes(self._pending) + data) if self._pending else memoryview(data)
            )

    async def flush(self, deadline: Deadline, write_timeout: float | None) -> None:
        """Write everything pending, reading nothing."""
        while self._pending:
            wait, by_total = deadline.limit(write_timeout)
            try:
                sent = await self.stream.write_some(self._pending, wait)
            except WriteTimeout:
                raise timeout_error(
                    WriteTimeout, self.address, deadline, write_timeout, by_total
                ) from None
            self._pending = self._pending[sent:]

    async def exchange(
        self,
        deadline: Deadline,
        read_timeout: float | None,
        write_timeout: float | None,
        refill: Refill | None = None,
    ) -> list[Event]:
        """Write what is pending while waiting for input; the events of the next read.

        `refill` is asked for more output whenever the pending output is gone;
        it returns False once it has nothing more to give.
        """
        stream = self.stream
        if self.write_failed:
            refill = None  # nothing more goes out on this connection
        while True:
            if not self._pending and refill is not None and await refill():
                self.queue()
            if self._pending:
                wait, by_total = deadline.limit(write_timeout)
                try:
                    sent, data = await stream.write_or_read(self._pending, READ_SIZE, wait)
                except WriteTimeout:
                    raise timeout_error(
                        WriteTimeout, self.address, deadline, write_timeout, by_total
                    ) from None
                except WriteError as failed:
                    refill = None
                    data = await self._read_after(failed, deadline, read_timeout)
                else:
                    self._pending = self._pending[sent:]
                    if data is None:
                        continue
            else:
                wait, by_total = deadline.limit(read_timeout)
                try:
                    data = await stream.read(READ_SIZE, wait)
                except ReadTimeout:
                    raise timeout_error(
                        ReadTimeout, self.address, deadline, read_timeout, by_total
                    ) from None
            events = receive_from(self.proto, data, self.address)
            if events:
                return events

    async def _read_after(
        self, failed: WriteError, deadline: Deadline, read_timeout: float | None
    ) -> bytes:
        """What the application sent before the write failed; `failed` when it sent nothing.

        An application may answer without reading the whole body and close
        the connection (php-fpm, when the rest of the body reads as its next
        request; uWSGI after every response): the next write then fails while
        the whole answer waits unread, and the answer is the result.
        """
        self.write_failed = True
        self._pending = memoryview(b"")
        wait, _ = deadline.limit(read_timeout)
        try:
            data = await self.stream.read(READ_SIZE, wait)
        except (ReadError, ReadTimeout):
            raise failed from None
        if not data:
            raise failed
        return data

    async def aclose(self) -> None:
        await self.stream.aclose()
