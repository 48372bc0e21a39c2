"""One connection shared by many tasks, for applications that multiplex (FCGI_MPXS_CONNS=1).

A reader task feeds the protocol state and routes each event to its request's
inbox. Writes go out whole under a lock and shielded from cancellation, since
a record cut in half would corrupt the connection for every request on it; a
cancelled request is aborted instead, and its id held until END_REQUEST.
"""

from __future__ import annotations

from collections import deque

import anyio
import anyio.abc

from fcgiproto import (
    Event,
    FastCGIError,
    GetValuesResult,
    LocalProtocolError,
    ParamsInput,
    ReadError,
    ReadTimeout,
    Role,
    TimeoutException,
)
from fcgiproto.support import Address, Deadline, receive_from, recipient

from ._connection import StreamConnection

__all__ = ["AsyncInbox", "AsyncMuxConnection"]

#: How long an abort or a request may take to write before the whole
#: connection is given up; writes cannot be cut short, so they need a bound.
ABORT_WRITE_LIMIT = 5.0


class AsyncInbox:
    __slots__ = ("events", "wake")

    def __init__(self) -> None:
        self.events: deque[Event] = deque()
        self.wake = anyio.Event()

    def put(self, event: Event) -> None:
        self.events.append(event)
        self.wake.set()


class AsyncMuxConnection:
    def __init__(self, conn: StreamConnection, keepalive_expiry: float) -> None:
        self.conn = conn
        self.address: Address = conn.address
        self.proto = conn.proto
        self._write_lock = anyio.Lock(fast_acquire=True)
        self._inboxes: dict[int, AsyncInbox] = {}
        self._values_waiters: deque[AsyncInbox] = deque()
        self._failure: FastCGIError | None = None
        self._closing = False
        self._expiry = keepalive_expiry
        self._idle_since = anyio.current_time()

    @property
    def usable(self) -> bool:
        return self._failure is None and not self._closing and self.proto.can_send_request

    @property
    def idle(self) -> bool:
        return not self._inboxes

    def expired(self) -> bool:
        return not self._inboxes and anyio.current_time() - self._idle_since >= self._expiry

    # --- a request's calls ---

    async def begin(
        self,
        params: ParamsInput,
        stdin: bytes | None,
        role: Role,
        deadline: Deadline,
        write_timeout: float | None,
    ) -> tuple[int, AsyncInbox]:
        self._check()
        if stdin is None:
            rid = self.proto.begin_request(role)
            self.proto.send_params(rid, params)
            self.proto.end_params(rid)
        else:
            rid = self.proto.send_request(params, stdin, role=role)
        inbox = self._inboxes[rid] = AsyncInbox()
        try:
            await self._write(self.proto.data_to_send(), deadline, write_timeout)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.finish(rid, inbox)  # its caller never gets the inbox
            raise
        return rid, inbox

    async def send_stdin(
        self, rid: int, chunk: bytes | None, deadline: Deadline, write_timeout: float | None
    ) -> None:
        self._check()
        if chunk is None:
            self.proto.end_stdin(rid)
        else:
            self.proto.send_stdin(rid, chunk)
        await self._write(self.proto.data_to_send(), deadline, write_timeout)

    async def get_values(
        self, names: list[str], deadline: Deadline, limit: float | None
    ) -> GetValuesResult:
        self._check()
        inbox = AsyncInbox()
        self._values_waiters.append(inbox)
        self.proto.get_values(names)
        await self._write(self.proto.data_to_send(), deadline, limit)
        while True:
            for event in await self.events(inbox, deadline, limit):
                if isinstance(event, GetValuesResult):
                    return event

    async def events(
        self, inbox: AsyncInbox, deadline: Deadline, read_timeout: float | None
    ) -> list[Event]:
        while not inbox.events:
            self._check()
            wait, by_total = deadline.limit(read_timeout)
            with anyio.move_on_after(wait):
                await inbox.wake.wait()
            if inbox.events:
                break
            self._check()
            if by_total:
                raise ReadTimeout(
                    f"request to {self.address} exceeded its total timeout of {deadline.total}s"
                )
            raise ReadTimeout(f"{self.address} did not answer within {read_timeout}s")
        events = list(inbox.events)
        inbox.events.clear()
        inbox.wake = anyio.Event()
        return events

    async def finish(self, rid: int, inbox: AsyncInbox) -> None:
        """The caller is done with the request: abort it when still in flight."""
        if self._inboxes.get(rid) is not inbox:
            return  # it ended, and the id already belongs to a newer request
        del self._inboxes[rid]
        if not self._inboxes:
            self._idle_since = anyio.current_time()
        if rid not in self.proto.active_requests or self._failure is not None:
            return
        self.proto.abort_request(rid)
        try:
            await self._write(
                self.proto.data_to_send(),
                Deadline(None, anyio.current_time),
                ABORT_WRITE_LIMIT,
            )
        except FastCGIError:
            await self.aclose()

    # --- internals ---

    def _check(self) -> None:
        if self._failure is not None:
            raise type(self._failure)(str(self._failure))
        if self._closing:
            raise LocalProtocolError(f"the connection to {self.address} is closed")

    async def _write(self, data: bytes, deadline: Deadline, write_timeout: float | None) -> None:
        # Shielded: a record cut in half would corrupt every request on the
        # connection. The write's own limit still bounds it.
        with anyio.CancelScope(shield=True):
            async with self._write_lock:
                if self.conn.torn:
                    raise self._fail(ReadError(f"the connection to {self.address} broke"))
                try:
                    await self.conn.send(data, deadline, write_timeout)
                except (TimeoutException, FastCGIError) as exc:
                    if self.conn.torn:
                        self._fail(ReadError(f"the connection to {self.address} broke: {exc}"))
                    raise

    async def read_loop(self) -> None:
        """The reader task: route events to their requests until the connection ends."""
        forever = Deadline(None, anyio.current_time)
        try:
            while True:
                try:
                    data = await self.conn.read_some(forever, self._expiry)
                except ReadTimeout:
                    if self.expired():
                        self._fail(ReadError(f"the idle connection to {self.address} expired"))
                        return
                    continue
                try:
                    events = receive_from(self.proto, data, self.address)
                except FastCGIError as exc:
                    self._fail(exc)
                    return
                for event in events:
                    inbox = recipient(event, self._inboxes, self._values_waiters)
                    if inbox is not None:
                        inbox.put(event)
        except (ReadError, anyio.ClosedResourceError) as exc:
            self._fail(exc if isinstance(exc, ReadError) else ReadError(f"{self.address}: closed"))
        finally:
            self._closing = True
            await self.conn.aclose()

    def _fail(self, failure: FastCGIError) -> FastCGIError:
        if self._failure is None:
            self._failure = failure
        for inbox in [*self._inboxes.values(), *self._values_waiters]:
            inbox.wake.set()
        return failure

    async def aclose(self) -> None:
        self._closing = True
        self._fail(ReadError(f"the connection to {self.address} was closed"))
        await self.conn.aclose()
